"""SpectralPenalty reads its ``initialized`` buffer (a host sync on a GPU) only until it is seen
set; reset() and load_state_dict() make it read again, so their warm start still happens."""
import pytest
import torch
import torch.nn as nn

import specreg_fast as sf


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def _penalty(model, n_iter_init):
    pen = sf.SpectralPenalty(model, n_iter_init=n_iter_init)
    model(torch.randn(1, 20))  # the forward order: which layer is the readout
    return pen


def test_reset_after_several_calls_warm_starts_again():
    model = _model()
    pen = _penalty(model, 20)
    first = pen().detach()
    pen()
    pen()  # the buffer has been seen set
    pen.reset()
    torch.testing.assert_close(pen().detach(), first)


def test_loading_an_uninitialized_checkpoint_warm_starts_again():
    model = _model()
    src = _penalty(model, 1)
    src()
    ck = dict(src.state_dict(), initialized=torch.zeros((), dtype=torch.bool))
    used = _penalty(model, 20)
    used()
    used()  # the buffer has been seen set
    used.load_state_dict(ck)
    fresh = sf.SpectralPenalty(model, n_iter_init=20)
    fresh.load_state_dict(ck)
    torch.testing.assert_close(used().detach(), fresh().detach())


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.GELU(), nn.Linear(6, 2))


def _exact(model, pen):
    """name -> the SVD norm of the map (the explicit operator of a conv at its input size)."""
    from specreg_fast import reference as ref

    out = {}
    for name in pen.layer_names:
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            out[name] = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, pen._input_shapes[name])).item()
        else:
            out[name] = torch.linalg.svdvals(m.weight.detach().double())[0].item()
    return out


@pytest.mark.parametrize("before_first_call", [False, True], ids=["loaded_into_a_used_penalty", "loaded_first"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_checkpoint_with_non_finite_vectors_restarts_them(kind, before_first_call):
    """A checkpoint saved by a run that diverged (NaN/inf in some ``u_*``/``v_*``/``x_*``/``y_*``
    and NaN estimates): loading it warns, naming the maps, restarts their vectors from the
    initial ones (those of a new penalty with the same seed) and warm-starts at the next call,
    after which every sigma converges to the exact norm; the other maps keep their loaded
    vectors."""
    model, x = (_model(), torch.randn(2, 20)) if kind == "mlp" else (_cnn(), torch.randn(2, 2, 6, 6))
    src = sf.SpectralPenalty(model, gamma=0.1, n_iter_init=3, readout=None)
    model(x)
    for _ in range(3):
        src()
    ck = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in src.state_dict().items()}
    bad = {"mlp": {"u_0": float("nan"), "v_1": float("inf")}, "cnn": {"x_0": float("nan"), "v_0": float("nan")}}[kind]
    for k, val in bad.items():
        ck[k][1] = val
    ck["last_sigmas"][:] = float("nan")
    fresh = sf.SpectralPenalty(model, gamma=0.1, readout=None)  # the initial vectors of that seed
    pen = sf.SpectralPenalty(model, gamma=0.1, n_iter_init=300, readout=None)
    model(x)
    fresh.layer_names
    if not before_first_call:
        pen()
    with pytest.warns(UserWarning, match="non-finite") as rec:
        pen.load_state_dict(ck)
        pen.layer_names  # (the loaded-first state is used when the vectors are created)
    assert pen.layer_names == (["0", "2", "4"] if kind == "mlp" else ["5", "7", "0", "2"])  # dense maps first
    restarted = {"mlp": {"0": ("u_0", "v_0"), "2": ("u_1", "v_1")}, "cnn": {"5": ("u_0", "v_0"), "0": ("x_0", "y_0")}}
    kept = {"mlp": ("u_2", "v_2"), "cnn": ("u_1", "v_1", "x_1", "y_1")}
    msg = " ".join(str(w.message) for w in rec)
    for name, keys in restarted[kind].items():
        assert repr(name) in msg, msg
        for key in keys:
            assert torch.equal(pen.get_buffer(key), fresh.get_buffer(key)), key
    for key in kept[kind]:
        assert torch.equal(pen.get_buffer(key), ck[key]), key
    assert not bool(pen.initialized)
    value = pen()
    assert torch.isfinite(value)
    exact = _exact(model, pen)
    for _ in range(50):
        pen()
    for n, s in pen.sigmas().items():
        assert abs(s - exact[n]) <= 1e-4 * exact[n], n
