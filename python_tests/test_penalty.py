"""SpectralPenalty against plain references and exact norms."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import reference as ref
from spectral_testing import assert_compiled_step_matches_eager


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 7))


class Block(nn.Module):
    """A ResNet-style block: conv-BN-ReLU-conv-BN plus a strided 1x1 shortcut, then a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.shortcut = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h)) + self.shortcut(x)
        return self.fc(torch.relu(h).mean(dim=(2, 3)))


def test_mlp_value_and_gradients_match_plain_reference():
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=0.1, n_iter=3, n_iter_init=3)
    model(torch.randn(4, 20))
    p = pen()
    assert pen.layer_names == ["0", "2"]  # readout "4" left out
    grads = torch.autograd.grad(p, [model[0].weight, model[2].weight, model[4].weight], allow_unused=True)
    # plain reference with the same vectors: gamma * sum (u^T W v)^2 by autograd
    ws = [model[0].weight, model[2].weight]
    want = 0.1 * sum((pen.get_buffer(f"u_{i}") @ w @ pen.get_buffer(f"v_{i}")) ** 2 for i, w in enumerate(ws))
    gw = torch.autograd.grad(want, ws)
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(grads[0], gw[0])
    torch.testing.assert_close(grads[1], gw[1])
    assert grads[2] is None


def test_mlp_converges_to_exact_norms():
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=1.0, scope="all", n_iter=200)
    model(torch.randn(2, 20))
    p = pen()
    exact = [torch.linalg.matrix_norm(model[i].weight.double(), 2) for i in (0, 2, 4)]
    torch.testing.assert_close(p.double(), sum(e ** 2 for e in exact), rtol=1e-4, atol=0)


def test_cnn_operator_norm_at_the_seen_input_size():
    model = cnn()
    pen = sf.SpectralPenalty(model, gamma=1.0, n_iter=400)
    model(torch.randn(3, 2, 8, 8))
    pen()
    sig = pen.sigmas()
    assert set(sig) == {"0", "2"}
    assert pen._input_shapes["0"] == (2, 8, 8) and pen._input_shapes["2"] == (4, 8, 8)
    for name, shape in (("0", (2, 8, 8)), ("2", (4, 8, 8))):
        m = dict(model.named_modules())[name]
        exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, shape)).item()
        assert abs(sig[name] - exact) / exact < 1e-3, (name, sig[name], exact)
    # conv gradient = weight-gradient of (x, y): matches autograd through <y, conv(x)>
    p = pen(update=False)
    (g,) = torch.autograd.grad(p, [model[0].weight])
    w = model[0].weight.detach().double().requires_grad_()
    x, y = pen.get_buffer("x_0").double(), pen.get_buffer("y_0").double()
    spec = ref.ConvSpec.from_module(model[0], (2, 8, 8), weight=w)
    s = (y * ref.conv_apply(spec, x[None])[0]).sum()
    (gw,) = torch.autograd.grad(s ** 2, w)
    torch.testing.assert_close(g.double(), gw, rtol=1e-4, atol=1e-6)


def test_state_made_at_the_first_forward_follows_a_larger_input_until_the_first_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    pen = sf.SpectralPenalty(model, scope="all")
    model(torch.randn(1, 2, 6, 6))  # the state is created at the end of this forward
    assert pen.get_buffer("x_0").shape == (2, 6, 6)
    model(torch.randn(1, 2, 8, 8))  # a larger input before the first call: made again at 8x8
    assert pen.get_buffer("x_0").shape == (2, 8, 8) and pen.get_buffer("y_1").shape == (3, 8, 8)
    pen()
    model(torch.randn(1, 2, 10, 10))  # after the first call the state stays as it is
    pen()
    assert pen._input_shapes["0"] == (2, 8, 8) and pen.get_buffer("x_0").shape == (2, 8, 8)
    for name, m in (("0", model[0]), ("2", model[2])):
        exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, (m.in_channels, 8, 8))).item()
        assert 0.98 * exact <= pen.sigmas()[name] <= exact * (1 + 1e-6)  # a power-iteration estimate, from below


def test_largest_input_size_is_used():
    model = cnn()
    pen = sf.SpectralPenalty(model, scope="all")
    model[0](torch.randn(1, 2, 6, 6))
    model(torch.randn(1, 2, 8, 8))
    pen()
    assert pen._input_shapes["0"] == (2, 8, 8)


def test_resnet_block_selects_all_convs_and_leaves_out_fc():
    model = Block()
    pen = sf.SpectralPenalty(model, gamma=0.01, n_iter=2000)
    model(torch.randn(2, 3, 8, 8))
    pen()
    assert sorted(pen.layer_names) == ["conv1", "conv2", "shortcut.0"]
    sig = pen.sigmas()
    for name, shape in (("conv1", (3, 8, 8)), ("conv2", (4, 4, 4)), ("shortcut.0", (3, 8, 8))):
        m = model.get_submodule(name)
        exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, shape)).item()
        assert abs(sig[name] - exact) / exact < 1e-3


def test_scope_variants():
    model = Block()
    x = torch.randn(1, 3, 8, 8)
    cases = {
        "all": ["conv1", "conv2", "fc", "shortcut.0"],
        "shortcut": ["shortcut.0"],
        ("conv1", "fc"): ["conv1", "fc"],
    }
    for scope, want in cases.items():
        pen = sf.SpectralPenalty(model, scope=scope)
        model(x)
        assert sorted(pen.layer_names) == want, scope
    pen = sf.SpectralPenalty(model, scope="all", exclude=["shortcut", "fc"])
    model(x)
    assert sorted(pen.layer_names) == ["conv1", "conv2"]
    pen = sf.SpectralPenalty(model, scope="all", gamma={"conv1": 0.5, "fc": 0.1})
    model(x)
    assert sorted(pen.layer_names) == ["conv1", "fc"]
    assert sorted(pen.gammas.tolist()) == pytest.approx([0.1, 0.5])
    pen = sf.SpectralPenalty(model, scope="all", gamma=lambda n, m: 0.2 if isinstance(m, nn.Conv2d) else 0.0)
    model(x)
    assert sorted(pen.layer_names) == ["conv1", "conv2", "shortcut.0"]


def test_schedule_start_step_and_every():
    model = mlp()
    pen = sf.SpectralPenalty(model, start_step=2, every=3)
    model(torch.randn(1, 20))
    vals = [pen().item() for _ in range(9)]
    on = [v > 0 for v in vals]
    assert on == [False, False, True, False, False, True, False, False, True]
    assert pen.step_count.item() == 9


def test_manual_step_for_gradient_accumulation():
    model = mlp()
    pen = sf.SpectralPenalty(model, start_step=1, auto_step=False)
    model(torch.randn(1, 20))
    assert pen().item() == 0 and pen().item() == 0  # two micro-batches of step 0
    pen.step()
    assert pen().item() > 0 and pen().item() > 0
    assert pen.step_count.item() == 1


def _train(model, pen, steps, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, *_in_shape(model), generator=g)
        loss = model(x).square().mean() + pen()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _in_shape(model):
    return (3, 8, 8) if isinstance(model, Block) else (20,)


@pytest.mark.parametrize("make", [mlp, Block], ids=["mlp", "block"])
def test_state_dict_round_trip_is_bit_identical(make):
    model = make()
    pen = sf.SpectralPenalty(model, gamma=0.1, seed=3)
    _train(model, pen, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pen": pen.state_dict()}, buf)
    a = pen().detach()
    sig_a = pen.last_sigmas.clone()
    # restore into fresh objects (the penalty's vectors are created lazily: loading before
    # the first call must work)
    buf.seek(0)
    ck = torch.load(buf)
    model2 = make()
    model2.load_state_dict(ck["model"])
    pen2 = sf.SpectralPenalty(model2, gamma=0.1, seed=99)
    pen2.load_state_dict(ck["pen"])
    b = pen2().detach()
    assert torch.equal(a, b) and torch.equal(sig_a, pen2.last_sigmas)
    assert pen2.step_count.item() == pen.step_count.item()


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        model = mlp()
        pen = sf.SpectralPenalty(model, seed=5)
        model(torch.randn(1, 20))
        outs.append(pen().detach())
    assert torch.equal(outs[0], outs[1])


def test_eval_and_update_false_do_not_move_vectors():
    model = mlp()
    pen = sf.SpectralPenalty(model)
    model(torch.randn(1, 20))
    pen()
    snap = {k: v.clone() for k, v in pen.state_dict().items() if k[0] in "uv"}
    pen(update=False)
    pen.eval()
    pen()
    for k, v in snap.items():
        assert torch.equal(pen.get_buffer(k), v)
    pen.train()
    pen()
    assert not torch.equal(pen.get_buffer("v_0"), snap["v_0"])


def test_reset():
    model = mlp()
    pen = sf.SpectralPenalty(model)
    model(torch.randn(1, 20))
    a = pen().detach()
    pen.reset()
    assert pen.step_count.item() == 0 and "u_0" not in dict(pen.named_buffers())
    torch.testing.assert_close(pen().detach(), a)


def test_bf16_weights_and_autocast():
    model = mlp()
    pen32 = sf.SpectralPenalty(copy.deepcopy(model), gamma=1.0, n_iter=100, scope="all")
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    pen16 = sf.SpectralPenalty(m16, gamma=1.0, n_iter=100, scope="all")
    pen32._model[0](torch.randn(1, 20))
    m16(torch.randn(1, 20, dtype=torch.bfloat16))
    p16 = pen16()
    assert p16.dtype == torch.float32 and pen16.get_buffer("u_0").dtype == torch.float32
    torch.testing.assert_close(p16, pen32(), rtol=2e-2, atol=0)  # bf16 storage of W: ~3 digits
    p16.backward()
    assert m16[0].weight.grad.dtype == torch.bfloat16
    cnn_model = cnn()
    pen = sf.SpectralPenalty(cnn_model, n_iter=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cnn_model(torch.randn(2, 2, 8, 8))
        p = pen()
    assert p.dtype == torch.float32 and torch.isfinite(p)
    assert pen.get_buffer("x_0").dtype == torch.float32


def test_shared_layer_counted_once():
    shared = nn.Linear(10, 10)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(10, 2))
    pen = sf.SpectralPenalty(model)
    model(torch.randn(1, 10))
    assert pen.layer_names == ["0"]


def test_parametrized_weight():
    model = mlp()
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    pen = sf.SpectralPenalty(model, gamma=1.0, n_iter=200)
    model(torch.randn(1, 20))
    pen()
    exact = torch.linalg.matrix_norm(model[0].weight.detach(), 2).item()
    assert abs(pen.sigmas()["0"] - exact) / exact < 1e-4


def test_warns_about_skipped_modules():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.attn = nn.MultiheadAttention(4, 2)
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sf.SpectralPenalty(M())
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and "emb (Embedding)" in msgs[0]  # the attention is a supported layer now
    assert "attn" not in msgs[0]


def test_clear_errors():
    with pytest.raises(ValueError, match="no supported layers"):
        sf.SpectralPenalty(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="scope: no module named 'nope'"):
        sf.SpectralPenalty(mlp(), scope="nope")
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        sf.SpectralPenalty(mlp(), gamma=-1.0)
    with pytest.raises(ValueError, match="conv_norm"):
        sf.SpectralPenalty(mlp(), conv_norm="exact")
    with pytest.raises(RuntimeError, match="run one forward pass"):
        sf.SpectralPenalty(mlp())()
    with pytest.raises(RuntimeError, match="input size of 0 is unknown"):
        sf.SpectralPenalty(cnn(), scope="all")()
    with pytest.raises(ValueError, match="gamma for 0"):
        m = mlp()
        p = sf.SpectralPenalty(m, gamma={"0": -2.0})
        m(torch.randn(1, 20))
        p()


def test_fft_and_matrix_conv_norms():
    model = cnn()
    sf.to_circular_padding(model)
    pen = sf.SpectralPenalty(model, conv_norm="fft", scope="all", gamma=1.0)
    model(torch.randn(1, 2, 8, 8))
    pen()
    exact = ref.circular_conv_sigma_exact(model[0].weight, (8, 8), 1, 1, 1).item()
    assert abs(pen.sigmas()["0"] - exact) / exact < 1e-4
    pen = sf.SpectralPenalty(cnn(), conv_norm="matrix", scope="all", gamma=1.0, n_iter=300)
    pen._model[0](torch.randn(1, 2, 8, 8))
    pen()
    w = pen._model[0][0].weight.detach()
    exact = torch.linalg.matrix_norm(w.reshape(4, -1), 2).item()
    assert abs(pen.sigmas()["0"] - exact) / exact < 1e-4


def test_eig_ub_adds_activation_term():
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=0.1, eig_ub=True)
    x = torch.randn(6, 20)
    model(x)
    p = pen()
    q = (pen.gammas * pen.last_sigmas ** 2).sum()
    # manual: for each GELU, batch mean of max_j GELU'(z_j)^2
    z1 = model[0](x)
    z2 = model[2](model[1](z1))
    want = 0.0
    for z in (z1, z2):
        zz = z.detach().requires_grad_()
        (d,) = torch.autograd.grad(nn.functional.gelu(zz).sum(), zz)
        want += (d ** 2).amax(1).mean()
    torch.testing.assert_close((p - q).detach(), (0.1 * want).detach(), rtol=1e-4, atol=1e-6)


def test_constraint_mode_normalizes_by_operator_norm():
    lin = nn.Linear(12, 9)
    sf.spectral_constraint(lin, n_iter=1)
    for _ in range(100):
        w = lin.weight
    assert abs(torch.linalg.matrix_norm(lin.weight.detach(), 2).item() - 1) < 1e-3
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    sf.spectral_constraint(conv, input_shape=(2, 6, 6), n_iter=1)
    for _ in range(300):
        w = conv.weight
    spec = ref.ConvSpec.from_module(conv, (2, 6, 6), weight=w.detach())
    assert abs(ref.conv_sigma_exact(spec).item() - 1) < 1e-3
    with pytest.raises(ValueError, match="input_shape"):
        sf.spectral_constraint(nn.Conv1d(1, 1, 3))


@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_model_leaves_the_penalty_alone(average):
    """An SWA / EMA copy of the model (buffers averaged too) over training steps: the penalty's
    vectors and values are those of the same run without it, and the averaged model's state
    holds the model's own entries only (the vectors live on the penalty, not the model)."""
    swa = torch.optim.swa_utils

    def run(with_average):
        model = mlp()
        pen = sf.SpectralPenalty(model, gamma=0.1, n_iter_init=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        averaged, sigmas = None, []
        torch.manual_seed(1)
        for step in range(6):
            x = torch.randn(8, 20)
            loss = model(x).square().mean() + pen()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sigmas.append(pen.last_sigmas.clone())
            if with_average and averaged is None:  # after the first call: the penalty's state exists
                averaged = swa.AveragedModel(model, use_buffers=True, multi_avg_fn=(
                    swa.get_ema_multi_avg_fn(0.9) if average == "ema" else None))
            elif with_average:
                averaged.update_parameters(model)
                averaged(x)  # evaluated, as for a validation loss
        return model, pen, averaged, sigmas

    model, pen, averaged, sigmas = run(True)
    _, pen_plain, _, sigmas_plain = run(False)
    for (name, a), b in zip(pen.named_buffers(), pen_plain.buffers()):
        assert torch.equal(a, b), name
    for a, b in zip(sigmas, sigmas_plain):
        assert torch.equal(a, b)
    assert set(averaged.module.state_dict()) == set(mlp().state_dict())
    assert not any(torch.equal(p, q) for p, q in zip(averaged.module.parameters(), model.parameters()))


def test_torch_compile_training_step_matches_eager():
    def make():
        model = mlp()
        pen = sf.SpectralPenalty(model, gamma=0.5, n_iter=1, n_iter_init=1)
        model(torch.randn(1, 20))
        pen()  # first call: discovery done eagerly
        return model, pen

    pe, pc = assert_compiled_step_matches_eager(make, lambda: torch.randn(4, 20), steps=3)
    torch.testing.assert_close(pc.get_buffer("v_0"), pe.get_buffer("v_0"))
    assert pc.step_count.item() == pe.step_count.item()


@pytest.mark.parametrize("conv_norm", ["operator", "fft"])
def test_torch_compile_conv_penalty_matches_eager(conv_norm):
    def make():
        torch.manual_seed(0)
        model = cnn()
        if conv_norm == "fft":
            sf.to_circular_padding(model)
        pen = sf.SpectralPenalty(model, gamma=0.5, scope="all", conv_norm=conv_norm, n_iter=1, n_iter_init=1)
        model(torch.randn(1, 2, 8, 8))
        pen()
        return model, pen

    pe, pc = assert_compiled_step_matches_eager(make, lambda: torch.randn(3, 2, 8, 8), steps=2)
    torch.testing.assert_close(pc.get_buffer("x_0"), pe.get_buffer("x_0"))


def test_bounds_bracket_the_exact_norms():
    model = cnn()
    pen = sf.SpectralPenalty(model, scope="all")
    model(torch.randn(1, 2, 8, 8))
    pen()
    br = pen.bounds()
    assert set(br) == {"0", "2", "5"}
    exact = {"0": ref.conv_sigma_exact(ref.ConvSpec.from_module(model[0], (2, 8, 8))).item(),
             "2": ref.conv_sigma_exact(ref.ConvSpec.from_module(model[2], (4, 8, 8))).item(),
             "5": torch.linalg.matrix_norm(model[5].weight.detach().double(), 2).item()}
    for name, (lo, up, gap) in br.items():
        assert lo <= exact[name] * (1 + 1e-5) and up >= exact[name] * (1 - 1e-9), name


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn-fft"])
def test_accumulate_grad_equals_the_autograd_route(kind):
    """accumulate_grad() after loss.backward() leaves the same .grad, vectors and counters as
    adding penalty() to the loss (its conv gradients come from conv_weight_grad directly, the
    autograd route's from the backward of conv_sigma_from_step)."""
    def make():
        torch.manual_seed(0)
        model = mlp() if kind == "mlp" else cnn()
        if kind == "cnn-fft":
            sf.to_circular_padding(model)
        pen = sf.SpectralPenalty(model, gamma=0.3, scope="all", n_iter=1, n_iter_init=3,
                                 conv_norm="fft" if kind == "cnn-fft" else "operator")
        return model, pen

    ma, pa = make()
    mb, pb = make()
    x = torch.randn(5, 20) if kind == "mlp" else torch.randn(5, 2, 8, 8)
    for step in range(3):
        for m in (ma, mb):
            m.zero_grad(set_to_none=True)
        (ma(x).square().mean() + pa()).backward()
        mb(x).square().mean().backward()
        val = pb.accumulate_grad()
        torch.testing.assert_close(val, (pa.gammas * pa.last_sigmas ** 2).sum())
        for (n, a), b in zip(ma.named_parameters(), mb.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)
    for k, v in pa.state_dict().items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, pb.state_dict()[k])


def test_accumulate_grad_scale_schedule_and_errors():
    torch.manual_seed(0)
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=0.3, start_step=1)
    model(torch.randn(2, 20))
    assert pen.accumulate_grad().item() == 0.0  # burn-in: no gradient written
    assert all(p.grad is None for p in model.parameters())
    pen.accumulate_grad(scale=1.0)
    g1 = model[0].weight.grad.clone()
    model.zero_grad(set_to_none=True)
    pen.eval()  # same vectors: the gradient scales linearly
    pen.accumulate_grad(scale=3.0)
    torch.testing.assert_close(model[0].weight.grad, 3.0 * g1, rtol=1e-5, atol=1e-8)
    assert model[-1].weight.grad is None  # the readout is not regularized
    model[0].weight.requires_grad_(False)  # a frozen layer gets no gradient, as on the autograd route
    model[0].weight.grad = None
    pen.accumulate_grad()
    assert model[0].weight.grad is None
    model[0].weight.requires_grad_(True)
    c = cnn()
    cpen = sf.SpectralPenalty(c, scope="all")
    c(torch.randn(1, 2, 8, 8))
    c[0].weight.requires_grad_(False)
    cpen.accumulate_grad()
    assert c[0].weight.grad is None and c[2].weight.grad is not None
    with pytest.raises(ValueError, match="eig_ub"):
        sf.SpectralPenalty(mlp(), eig_ub=True).accumulate_grad()
    zp = cnn()  # zero padding: the fft norm refuses it on both routes, before any state moves
    fpen = sf.SpectralPenalty(zp, conv_norm="fft", scope="all")
    zp(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="circular"):
        fpen()  # (the first call also creates the buffers)
    for call in (fpen.accumulate_grad, fpen):
        before = {k: v.clone() for k, v in fpen.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match="circular"):
            call()
        assert all(p.grad is None for p in zp.parameters())
        for k, v in fpen.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="scale must be"):
        pen.accumulate_grad(scale=float("nan"))


def test_cached_geometry_follows_changes_to_the_model():
    """The eager path packs and validates the conv geometry once; a change of padding mode,
    dtype or buffers after the first call is picked up, and a mismatch is still a clear error
    that leaves the state as it was."""
    model = cnn()
    pen = sf.SpectralPenalty(model, gamma=1.0, scope="all", n_iter=300, n_iter_init=300)
    model(torch.randn(1, 2, 8, 8))
    pen.accumulate_grad()
    sf.to_circular_padding(model)  # the layers' operators change: so must the norms
    pen()
    for name in ("0", "2"):
        m = dict(model.named_modules())[name]
        exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, pen._input_shapes[name])).item()
        assert abs(pen.sigmas()[name] - exact) / exact < 1e-3, name
    model.double()  # weights float64, vectors still float32: refused, nothing moves
    before = {k: v.clone() for k, v in pen.state_dict().items() if isinstance(v, torch.Tensor)}
    for call in (pen, pen.accumulate_grad):
        with pytest.raises(ValueError, match=r"^\d: state (u|x/y) must be torch.float64"):
            call()
    for k, v in pen.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    pen.double()  # new buffers (float64): the next call uses them
    p = pen()
    assert pen.get_buffer("x_0").dtype == torch.float64 and p.dtype == torch.float64
    assert not torch.equal(pen.get_buffer("x_0").float(), before["x_0"])


@pytest.mark.parametrize("when", ["before_the_first_call", "after_the_first_call"])
@pytest.mark.parametrize("route", ["penalty", "accumulate_grad"])
def test_replacing_a_regularized_module_after_building_the_penalty_is_an_error(route, when):
    """Model surgery after ``SpectralPenalty(model)`` (``model[2] = nn.Identity()``,
    ``model[0] = nn.Linear(...)``): the penalty would go on regularizing the removed modules'
    weights and never the new layer. Both routes refuse, naming the layers and saying to build
    the penalty after changing the model, with the state untouched; a penalty built after the
    change regularizes the model as it is now (the new layer's SVD norm, its gradient)."""
    model = mlp()
    x = torch.randn(3, 20)
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="4")
    model(x)
    call = pen if route == "penalty" else pen.accumulate_grad
    if when == "after_the_first_call":
        call()
    before = {k: v.clone() for k, v in pen.state_dict().items() if isinstance(v, torch.Tensor)}
    old0 = model[0]
    g0 = None if old0.weight.grad is None else old0.weight.grad.clone()
    model[2] = nn.Identity()
    model[0] = nn.Linear(20, 24)
    for fn in (call, pen.sigmas):
        with pytest.raises(ValueError, match=r"'0', '2'.* build the penalty after changing the model"):
            fn()
    assert {k: v for k, v in pen.state_dict().items() if isinstance(v, torch.Tensor)}.keys() == before.keys()
    for k, v in pen.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    assert model[0].weight.grad is None
    assert (old0.weight.grad is None) if g0 is None else torch.equal(old0.weight.grad, g0)
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="4", n_iter_init=3000)
    model(x)
    pen().backward() if route == "penalty" else pen.accumulate_grad()
    assert pen.layer_names == ["0"]
    W = model[0].weight
    exact = torch.linalg.svdvals(W.detach().double())[0].item()
    assert abs(pen.sigmas()["0"] - exact) <= 1e-4 * exact
    got, W.grad = W.grad.clone(), None
    (0.1 * torch.linalg.matrix_norm(W.double(), 2) ** 2).backward()
    torch.testing.assert_close(got, W.grad, rtol=1e-4, atol=1e-6)


def test_blocks_compiled_and_registered_back_keep_their_maps():
    """torchtitan compiles each block and registers the ``torch.compile`` wrapper in its place
    (``model[0] = torch.compile(model[0])``): the penalty built before follows the wrapper's
    ``_orig_mod`` to the modules it found (the same sigmas as the model left alone), and a
    module replaced inside the compiled block is still the error of a replaced module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6)), nn.Tanh(), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="2", seed=3)
    pen_twin = sf.SpectralPenalty(twin, gamma=0.1, readout="2", seed=3)
    model[0] = torch.compile(model[0], backend="eager")
    x = torch.randn(3, 5)
    for _ in range(2):
        (model(x).square().mean() + pen()).backward()
        (twin(x).square().mean() + pen_twin()).backward()
    assert pen.layer_names == ["0.0", "0.2"]
    assert pen.sigmas() == pen_twin.sigmas()
    torch.testing.assert_close(model[0]._orig_mod[0].weight.grad, twin[0][0].weight.grad, rtol=0, atol=0)
    model[0]._orig_mod[2] = nn.Linear(7, 6)
    with pytest.raises(ValueError, match=r"'0.2'.* build the penalty after changing the model"):
        pen()


def test_replacing_the_named_readout_before_the_first_call_is_fine():
    """The readout named by ``readout=`` is left free whichever module holds that name: a new
    head put in after building the penalty (fine-tuning) changes nothing regularized. With the
    automatic readout, found from hooks on the modules the penalty was built on, it is the
    error of any replaced module."""
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="4", n_iter_init=2000)
    auto = sf.SpectralPenalty(model, gamma=0.1)
    model[4] = nn.Linear(24, 3)
    model(torch.randn(2, 20))
    pen()
    assert pen.layer_names == ["0", "2"]
    for name in ("0", "2"):
        exact = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double())[0].item()
        assert abs(pen.sigmas()[name] - exact) <= 1e-4 * exact, name
    with pytest.raises(ValueError, match=r"at '4' .* build the penalty after changing the model"):
        auto()


def test_per_parameter_gradient_equals_autograd_through_each_maps_view():
    # groups._per_param_sigma writes every map's u v^T into one gradient per parameter
    # (whole, row blocks, a transposed view, a view that copies); autograd through the
    # views of the maps' weights is the truth
    from specreg_fast import layers as L
    from specreg_fast import groups as P

    torch.manual_seed(0)
    lin, qkv, conv = nn.Linear(6, 5).double(), nn.Linear(4, 9).double(), nn.Conv2d(3, 7, 1).double()
    maps = [L.LinearMap("lin", "lin", lin), L.LinearMap("conv", "conv", conv, view=L._reshaped),
            L.LinearMap("copied", "copied", lin, view=lambda t: t.t().contiguous() * 1.0)]
    maps[2:2] = [L.LinearMap(f"qkv[{i}]", "qkv", qkv, view=L._rows(L._identity, i, 3)) for i in range(3)]
    ws = [mp.weight() for mp in maps]
    us = [torch.randn(w.shape[0], dtype=torch.float64) for w in ws]
    vs = [torch.randn(w.shape[1], dtype=torch.float64) for w in ws]
    est = torch.randn(len(ws), dtype=torch.float64)
    c = torch.randn(len(ws), dtype=torch.float64)
    params = [lin.weight, qkv.weight, conv.weight]
    got = torch.autograd.grad((P._per_param_sigma(maps, ws, us, vs, est) * c).sum(), params)
    want = torch.autograd.grad(sum(c[i] * (us[i] @ w @ vs[i]) for i, w in enumerate(ws)), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_penalty_gradient_takes_one_autograd_node_per_parameter():
    # q, k, v of an attention block are row blocks of one parameter: one node writes all three
    # into one gradient (not three zero-filled ones summed), and each parameter has its own
    # node, so autograd frees a parameter's gradient before the next one is built
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.fc(self.attn(x, x, x)[0]).mean(1))

    model = Net()
    pen = sf.SpectralPenalty(model, gamma=0.1, readout="head")
    model(torch.randn(2, 4, 8))
    p = pen()
    seen, stack, nodes = set(), [p.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "PerParamSigma" in type(fn).__name__:
            nodes.append(fn)
        stack += [f for f, _ in fn.next_functions]
    assert sorted(pen.layer_names) == sorted(["attn[q]", "attn[k]", "attn[v]", "attn.out_proj", "fc"])
    # in_proj_weight (q, k, v), out_proj.weight, fc.weight
    assert len(nodes) == 3
    targets = sorted(tuple(f.next_functions[-1][0].variable.shape) for f in nodes)
    assert targets == [(8, 8), (8, 8), (24, 8)]
