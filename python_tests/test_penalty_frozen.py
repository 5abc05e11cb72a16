"""Frozen maps (no parameter requires grad): stepped in the warm start, then held.

A frozen layer's sigma cannot change in training, so its term is a constant of the loss: the
penalty stops power-stepping it after the warm start and keeps its last estimate. The other
maps must not notice: same vectors, values and gradients as with nothing frozen."""
import copy

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import reference as ref
from specreg_fast.conv import ConvSpec


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(),
                         nn.Linear(16, 5))


FROZEN = ("0", "7")  # a conv and a dense layer; "2" and "5" stay trainable, "9" is the readout
VECTORS = {"0": ("x_0", "y_0"), "7": ("u_1", "v_1")}


def pair():
    """The same model and penalty twice; in the second, FROZEN are frozen after a first call."""
    x = torch.randn(3, 2, 8, 8)
    a = net()
    b = copy.deepcopy(a)
    pa = sf.SpectralPenalty(a, gamma=0.1, readout="9", n_iter_init=4)
    pb = sf.SpectralPenalty(b, gamma=0.1, readout="9", n_iter_init=4)
    a(x), b(x)
    assert pa.layer_names == pb.layer_names == ["5", "7", "0", "2"]
    return a, pa, b, pb


def _call(route, model, pen):
    for q in model.parameters():
        q.grad = None
    if route == "autograd":
        v = pen()
        if v.requires_grad:
            v.backward()
        return v.detach()
    return pen.accumulate_grad()


@pytest.mark.parametrize("route", ["autograd", "accumulate_grad"])
def test_frozen_maps_hold_their_estimate_and_the_others_do_not_notice(route):
    a, pa, b, pb = pair()
    _call(route, a, pa), _call(route, b, pb)  # the warm start: every map stepped in both
    torch.testing.assert_close(pa.last_sigmas, pb.last_sigmas, rtol=0, atol=0)
    for name in FROZEN:
        b.get_submodule(name).requires_grad_(False)
    held = pb.last_sigmas.clone()
    frozen_state = {k: pb.get_buffer(k).clone() for name in FROZEN for k in VECTORS[name]}
    idx = [pb.layer_names.index(n) for n in FROZEN]
    live = [i for i in range(4) if i not in idx]
    for _ in range(3):
        va, vb = _call(route, a, pa), _call(route, b, pb)
        # the frozen maps took no step: vectors and estimates as after the warm start
        for k, t in frozen_state.items():
            assert torch.equal(pb.get_buffer(k), t), k
        assert torch.equal(pb.last_sigmas[idx], held[idx])
        # ...while the unfrozen penalty refines them (the held value is really held)
        assert not torch.equal(pa.last_sigmas[idx], held[idx])
        # the trainable maps: the same steps, values and gradients as with nothing frozen
        torch.testing.assert_close(pb.last_sigmas[live], pa.last_sigmas[live], rtol=1e-6, atol=0)
        for name in ("2", "5"):
            torch.testing.assert_close(b.get_submodule(name).weight.grad, a.get_submodule(name).weight.grad,
                                       rtol=1e-6, atol=1e-9)
        for name in FROZEN:
            assert b.get_submodule(name).weight.grad is None
        # the value keeps the frozen terms, at their held estimates
        torch.testing.assert_close(vb, (0.1 * pb.last_sigmas.double() ** 2).sum().float(), rtol=1e-6, atol=0)


def test_an_unfrozen_map_resumes_its_steps_and_converges():
    _, _, b, pb = pair()
    pb()
    b[0].requires_grad_(False)
    pb()
    x0 = pb.get_buffer("x_0").clone()
    pb()
    assert torch.equal(pb.get_buffer("x_0"), x0)
    b[0].requires_grad_(True)
    for _ in range(500):
        pb()
    assert not torch.equal(pb.get_buffer("x_0"), x0)
    exact = ref.conv_sigma_exact(ConvSpec.from_module(b[0], (2, 8, 8)))
    torch.testing.assert_close(pb.last_sigmas[2].double(), exact.double(), rtol=1e-3, atol=0)


def test_every_map_frozen_gives_the_held_constant():
    _, _, b, pb = pair()
    pb()
    b.requires_grad_(False)
    state = {k: t.clone() for k, t in pb.named_buffers() if k.split("_")[0] in ("u", "v", "x", "y")}
    v = pb()
    assert not v.requires_grad
    torch.testing.assert_close(v, (0.1 * pb.last_sigmas.double() ** 2).sum().float(), rtol=1e-6, atol=0)
    assert pb.accumulate_grad() == v
    for k, t in state.items():
        assert torch.equal(pb.get_buffer(k), t), k


def test_a_frozen_map_is_stepped_in_the_warm_start():
    # frozen from the start: the warm start still gives it an estimate (then it is held)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 8), nn.GELU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="4", n_iter_init=50)
    model(torch.randn(2, 12))
    pen()
    exact = torch.linalg.svdvals(model[0].weight.detach().double())[0]
    torch.testing.assert_close(pen.last_sigmas[0].double(), exact, rtol=1e-4, atol=0)
    u0 = pen.get_buffer("u_0").clone()
    pen()
    assert torch.equal(pen.get_buffer("u_0"), u0)


@pytest.mark.parametrize("route", ["autograd", "accumulate_grad"])
def test_lora_model_steps_its_adapted_maps_and_holds_the_frozen_base_layers(route):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 6))
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.5)
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="base_model.model.4", n_iter_init=3)
    model(torch.randn(2, 12))
    names = pen.layer_names
    lora, plain = names.index("base_model.model.0"), names.index("base_model.model.2")  # "2": frozen by peft
    _call(route, model, pen)  # warm start
    st = {k: pen.get_buffer(k).clone() for k in (f"u_{lora}", f"v_{lora}", f"u_{plain}", f"v_{plain}")}
    held = pen.last_sigmas[plain].clone()
    _call(route, model, pen)
    assert torch.equal(pen.get_buffer(f"u_{plain}"), st[f"u_{plain}"])
    assert torch.equal(pen.get_buffer(f"v_{plain}"), st[f"v_{plain}"])
    assert torch.equal(pen.last_sigmas[plain], held)
    assert not torch.equal(pen.get_buffer(f"v_{lora}"), st[f"v_{lora}"])  # the LoRA map is stepped
    grads = {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_compiled_penalty_holds_frozen_maps_like_eager():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 24), nn.GELU(),
                      nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 5))
    b = copy.deepcopy(a)
    x = torch.randn(3, 2, 8, 8)
    pa = sf.SpectralPenalty(a, gamma=0.1, readout="7").prepare(x, warm_start=True)
    pb = sf.SpectralPenalty(b, gamma=0.1, readout="7").prepare(x, warm_start=True)
    for m in (a, b):
        m[0].requires_grad_(False)
        m[5].requires_grad_(False)
    held = {k: pb.get_buffer(k).clone() for k in ("x_0", "y_0", "u_1", "v_1")}
    live = pb.get_buffer("v_0").clone()  # layer "3": trainable
    step = torch.compile(lambda: pb(), backend="aot_eager", fullgraph=True)

    def close(x, y, msg=None):  # eager vs the compiled graph: two op sequences, equal to rounding
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6 * y.abs().max().item(), msg=msg)

    for _ in range(3):
        va, vb = pa(), step()
        va.backward()
        vb.backward()
        close(va, vb)
    for k, t in pa.named_buffers():
        if k.split("_")[0] in ("u", "v", "x", "y"):
            close(t, pb.get_buffer(k), msg=k)
    for k, t in held.items():  # frozen: never written, so bit for bit
        assert torch.equal(pb.get_buffer(k), t), k
    close(a[3].weight.grad, b[3].weight.grad)
    assert not torch.equal(pb.get_buffer("v_0"), live)


class _RowScale(nn.Module):
    """A parametrization with a parameter of its own: ``W -> diag(d) W``."""

    def __init__(self, rows):
        super().__init__()
        self.d = nn.Parameter(torch.linspace(0.5, 2.0, rows, dtype=torch.float64))

    def forward(self, W):
        return self.d[:, None] * W


class _Product(nn.Module):
    """A custom linear map ``x -> (a b) x``, given to the penalty as ``extra=``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(7, 4, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(4, 9, dtype=torch.float64))

    def forward(self, x):
        return x @ (self.a @ self.b).t()


def _partly_trainable(kind):
    """(model, penalty kwargs, name of the map, the map's weight now (differentiable), the
    trainable tensor): a map whose stored weight (or one of its parts) is frozen while another
    tensor it is made of trains, so it is not frozen."""
    torch.manual_seed(0)
    if kind == "lora_base":  # the LoRA factors frozen, the base weight trained
        peft = pytest.importorskip("peft")
        from specreg_fast.layers import lora_weight

        base = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.5)
        for n, q in model.named_parameters():
            q.requires_grad_("base_layer.weight" in n)
        return model, {"readout": "base_model.model.2"}, "base_model.model.0", lambda: lora_weight(layer), \
            layer.base_layer.weight
    if kind == "extra":  # a computed map: its parameters are unknown to the penalty, never frozen
        model = nn.Sequential(_Product(), nn.Tanh(), nn.Linear(7, 3)).double()
        model[0].b.requires_grad_(False)
        fn = lambda: model[0].a @ model[0].b  # noqa: E731
        return model, {"readout": "2", "extra": {"0": fn}}, "0", fn, model[0].a
    # a parametrized weight whose stored original is frozen and the parametrization's d trains
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _RowScale(7))
    model[0].parametrizations.weight.original.requires_grad_(False)
    return model, {"readout": "2"}, "0", lambda: model[0].weight, model[0].parametrizations.weight[0].d


@pytest.mark.parametrize("route", ["autograd", "accumulate_grad"])
@pytest.mark.parametrize("kind", ["lora_base", "extra", "parametrization"])
def test_a_map_with_a_trainable_part_is_not_frozen(kind, route):
    """A LoRA map with frozen factors and a trained base weight, an ``extra=`` map, a
    parametrized weight with a frozen original and a trained parametrization: after the warm
    start they keep their power steps, so after their trainable tensor changes the estimate
    reaches the SVD norm of the new weight, and the gradient (float64) is the one of
    ``gamma sigma_max(W)^2`` by autograd through the SVD, reaching the trainable tensor."""
    model, kw, name, weight, trainable = _partly_trainable(kind)
    pen = sf.SpectralPenalty(model, gamma=0.1, n_iter=1, n_iter_init=5, **kw)
    model(torch.randn(2, 9, dtype=torch.float64))
    assert pen.layer_names == [name]
    _call(route, model, pen)  # the warm start
    with torch.no_grad():  # a training step's change of the trainable tensor
        trainable.mul_(torch.linspace(0.6, 1.7, trainable.numel(), dtype=trainable.dtype).view(trainable.shape))
    pen.n_iter = 2000
    _call(route, model, pen)
    W = weight()
    exact = torch.linalg.svdvals(W.detach())[0].item()
    assert abs(pen.sigmas()[name] - exact) <= 1e-6 * exact  # (sigmas() are float32)
    got = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    (0.1 * torch.linalg.matrix_norm(W, 2) ** 2).backward()
    want = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    assert got.keys() == want.keys() and trainable.grad is not None
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-7, atol=1e-9, msg=n)
