"""Contracts of the training API that users rely on without reading the code.

Gradients: a penalty (or sigma) computed once keeps its own gradient when the persistent
vectors move afterwards (a second ``penalty()`` call before ``backward()``: summed
micro-batch losses, a logging call). The expected gradient is built here from the vectors
saved right after the first call, with plain torch ops and autograd: ``2 s u v^T`` for a dense
layer, the autograd weight-gradient of ``<y, conv(x)>`` (torch.nn.functional) for a conv.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import specreg_fast as sf
from specreg_fast import fft, ops
from specreg_fast.reference import ConvSpec


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 5))


def cnn(padding_mode="zeros"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode=padding_mode), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode=padding_mode), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 7))


def _conv_bilinear_grad(conv: nn.Conv2d, x, y, circular_span=False):
    """d<y, conv(x)>/dW by autograd through torch.nn.functional: the layer's own padding, or
    (``circular_span``) the full wrap-around conv of the FFT norm (circular padding of
    dilation*(k-1), split low/high as ``fft.circular_params``)."""
    W = conv.weight.detach().double().requires_grad_(True)
    xb = x.double()[None]
    if circular_span:
        pad = []
        for i in reversed(range(2)):
            span = conv.dilation[i] * (conv.kernel_size[i] - 1)
            pad += [span // 2, span - span // 2]
        out = F.conv2d(F.pad(xb, pad, mode="circular"), W, stride=conv.stride, dilation=conv.dilation,
                       groups=conv.groups)
    elif conv.padding_mode != "zeros":
        pad = [p for p in reversed(conv.padding) for _ in range(2)]
        out = F.conv2d(F.pad(xb, pad, mode=conv.padding_mode), W, stride=conv.stride, dilation=conv.dilation,
                       groups=conv.groups)
    else:
        out = F.conv2d(xb, W, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    (g,) = torch.autograd.grad((y.double()[None] * out).sum(), W)
    return g


# ----------------------------------------------------------------------------- item: two calls, one backward
def test_dense_penalty_gradient_survives_a_second_call():
    model = mlp()
    pen = sf.SpectralPenalty(model, gamma=1.0, n_iter_init=1)
    model(torch.randn(2, 20))
    p1 = pen()
    saved = [(pen.get_buffer(f"u_{i}").clone(), pen.get_buffer(f"v_{i}").clone(), pen.last_sigmas[i].item())
             for i in range(2)]
    pen()  # moves u/v in place before p1's backward
    grads = torch.autograd.grad(p1, [model[0].weight, model[2].weight])
    for g, (u, v, s) in zip(grads, saved):
        torch.testing.assert_close(g, 2 * s * torch.outer(u, v), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("route", ["sigma_from_step", "torch.ops.sigma_from_step", "sigma"])
def test_dense_sigma_ops_save_the_vectors_of_their_call(route):
    """Both autograd routes of the ops (the eager autograd.Function of the typed wrapper and
    the registered autograd of ``torch.ops``) and the plain ``sigma`` op."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(9, 7, generator=g, requires_grad=True)
    st = sf.init_power_state([W.detach()], generator=g)
    est = ops.power_step_([W.detach()], st.us, st.vs, 1, 0.0)
    if route == "sigma_from_step":
        s = ops.sigma_from_step([W], st.us, st.vs, est)
    elif route == "torch.ops.sigma_from_step":
        s = torch.ops.specreg_fast.sigma_from_step([W], st.us, st.vs, est)
    else:
        s = ops.sigma([W], st.us, st.vs)
    u1, v1 = st.us[0].clone(), st.vs[0].clone()
    ops.power_step_([W.detach()], st.us, st.vs, 3, 0.0)
    (gw,) = torch.autograd.grad(s.sum(), W)
    torch.testing.assert_close(gw, torch.outer(u1, v1))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_operator_penalty_gradient_survives_a_second_call(padding_mode):
    model = cnn(padding_mode)
    pen = sf.SpectralPenalty(model, gamma=1.0, n_iter_init=1)
    model(torch.randn(2, 2, 8, 8))
    assert pen.layer_names == ["0", "2"]
    p1 = pen()
    saved = [(pen.get_buffer(f"x_{i}").clone(), pen.get_buffer(f"y_{i}").clone(), pen.last_sigmas[i].item())
             for i in range(2)]
    pen()
    convs = [model[0], model[2]]
    grads = torch.autograd.grad(p1, [c.weight for c in convs])
    for g, c, (x, y, s) in zip(grads, convs, saved):
        torch.testing.assert_close(g.double(), 2 * s * _conv_bilinear_grad(c, x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("route", ["conv_sigma_from_step", "torch.ops.conv_sigma_from_step", "conv_sigma"])
def test_conv_sigma_ops_save_the_vectors_of_their_call(route):
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    spec = ConvSpec.from_module(conv, (3, 7, 7))
    st = sf.init_conv_state([spec], generator=torch.Generator().manual_seed(2))
    params, modes = ops.pack_conv_params([spec])
    W = conv.weight
    est = ops.conv_power_step_([W.detach()], st.xs, st.ys, params, modes, 1, 0.0)
    if route == "conv_sigma_from_step":
        s = ops.conv_sigma_from_step([W], st.xs, st.ys, params, modes, est)
    elif route == "torch.ops.conv_sigma_from_step":
        s = torch.ops.specreg_fast.conv_sigma_from_step([W], st.xs, st.ys, params, modes, est)
    else:
        s = ops.conv_sigma([W], st.xs, st.ys, params, modes)
    x1, y1 = st.xs[0].clone(), st.ys[0].clone()
    ops.conv_power_step_([W.detach()], st.xs, st.ys, params, modes, 3, 0.0)
    (gw,) = torch.autograd.grad(s.sum(), W)
    torch.testing.assert_close(gw.double(), _conv_bilinear_grad(conv, x1, y1), rtol=1e-5, atol=1e-6)


def test_fft_penalty_gradient_survives_a_second_call():
    """The FFT norm's gradient is the circular conv weight-gradient of the step's top pair
    (x*, y*); the pair is rebuilt here by the same step on a copy of the state."""
    model = sf.to_circular_padding(cnn())
    pen = sf.SpectralPenalty(model, gamma=1.0, conv_norm="fft", n_iter_init=1)
    model(torch.randn(2, 2, 8, 8))
    assert pen.layer_names == ["0", "2"]  # creates the vectors
    convs = [model[0], model[2]]
    state = fft.CircularState([pen.get_buffer(f"x_{i}").clone() for i in range(2)])
    specs = [ConvSpec.from_module(c, shape) for c, shape in zip(convs, [(2, 8, 8), (4, 8, 8)])]
    _, x_tops, y_tops, _ = fft.circular_power_pairs(specs, state, 1)
    p1 = pen()
    sig = pen.last_sigmas.tolist()
    pen()
    grads = torch.autograd.grad(p1, [c.weight for c in convs])
    for g, c, x, y, s in zip(grads, convs, x_tops, y_tops, sig):
        torch.testing.assert_close(g.double(), 2 * s * _conv_bilinear_grad(c, x, y, circular_span=True),
                                   rtol=1e-5, atol=1e-6)


def test_circular_block_norm_gradient_survives_a_second_call():
    """The explicit-block form: sigma = |P(w*) v*| with v* the top block's vector of the call."""
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    spec = ConvSpec.from_module(conv, (3, 6, 6))
    st = fft.init_circular_block_state([spec], generator=torch.Generator().manual_seed(3))
    s1 = fft.circular_block_norms([spec], st, n_iter=1)
    with torch.no_grad():
        P = fft.circular_blocks(conv.weight, (6, 6))
        top = int(torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", P, st.vs[0]), dim=1).argmax())
    v1 = st.vs[0][top].clone()
    fft.circular_block_norms([spec], st, n_iter=2)
    (g,) = torch.autograd.grad(s1.sum(), conv.weight)
    W = conv.weight.detach().requires_grad_(True)
    want = torch.linalg.vector_norm(fft.circular_blocks(W, (6, 6), freqs=torch.tensor([top]))[0] @ v1)
    torch.testing.assert_close(s1[0], want.detach())
    torch.testing.assert_close(g, torch.autograd.grad(want, W)[0])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_constraint_gradient_survives_a_second_forward(kind):
    """W / sigma with sigma = u^T W v (dense) or <y, conv(x)> (conv) at the vectors of that
    forward; a second read of the parametrized weight moves them before the backward."""
    if kind == "linear":
        layer = nn.Linear(12, 9)
        sf.spectral_constraint(layer, n_iter=1)
    else:
        layer = nn.Conv2d(2, 3, 3, padding=1)
        sf.spectral_constraint(layer, input_shape=(2, 6, 6), n_iter=1)
    par = layer.parametrizations.weight
    G = torch.randn(layer.weight.shape)
    w1 = layer.weight
    a, b = (par[0].u, par[0].v) if kind == "linear" else (par[0].x, par[0].y)
    a1, b1 = a.clone(), b.clone()
    layer.weight  # noqa: B018  (second forward of the parametrization: the vectors move)
    assert not torch.equal(a, a1)
    (g,) = torch.autograd.grad((w1 * G).sum(), par.original)
    W = par.original.detach().double().requires_grad_(True)
    if kind == "linear":
        s = a1.double() @ W @ b1.double()
    else:
        s = (b1.double()[None] * F.conv2d(a1.double()[None], W, padding=1)).sum()
    (want,) = torch.autograd.grad(((W / s) * G.double()).sum(), W)
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- item: compile from step 0
def _compile_case(kind):
    """(model, penalty, input shape) for the compiled-training tests."""
    if kind == "dense":
        model, shape = mlp(), (4, 20)
    elif kind == "lora":  # peft LoRA on layer 0 (low-rank step) beside the plain hidden Linear 2 (dense op)
        peft = pytest.importorskip("peft")
        model, shape = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"])), (4, 20)
        model.base_model.model[2].weight.requires_grad_(True)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # (starts at zero)
                nn.init.normal_(p, std=0.1)
    else:
        model, shape = cnn(), (3, 2, 8, 8)
        if kind == "fft":
            sf.to_circular_padding(model)
    pen = sf.SpectralPenalty(model, gamma=1.0, conv_norm="fft" if kind == "fft" else "operator", start_step=2,
                             every=2, n_iter_init=5)
    return model, pen, shape


def _loss(model, pen, x):
    return model(x).square().mean() + pen()


def _train_side_by_side(kind, backend, rtol, steps=6, warm_start=False, prepare=True):
    """A compiled (fullgraph, from step 0) and an eager training run from the same prepared
    state; compares after each step the loss, the weights after the SGD step (so every
    gradient) and every penalty buffer. Returns the penalty and the compile counter.
    ``prepare=False``: one eager forward of the model instead of ``prepare()``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, pen, shape = _compile_case(kind)
    if prepare:
        pen.prepare(torch.randn(shape), warm_start=warm_start)
    else:
        with torch.no_grad():
            model(torch.randn(shape))
    model_e, pen_e = copy.deepcopy((model, pen))
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(_loss, backend=counter, fullgraph=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, model_e)]
    torch.manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape)
        losses = []
        for f, m, p, opt in ((compiled, model, pen, opts[0]), (_loss, model_e, pen_e, opts[1])):
            loss = f(m, p, x)
            opt.zero_grad()
            loss.backward()
            opt.step()  # the weights move: a warm start at the wrong step would see other weights
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=0, msg=lambda m: f"loss at step {step}: {m}")
        for (name, a), b in [*zip(pen.named_buffers(), pen_e.buffers()), *zip(model.named_parameters(),
                                                                                model_e.parameters())]:
            if a.dtype.is_floating_point:  # relative to the tensor's scale: vectors have entries near 0
                torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(),
                                           msg=f"{name} at step {step}")
            else:
                assert torch.equal(a, b), f"{name} at step {step}"
    assert counter.frame_count == 1  # one graph for the whole run: the schedule is data, not guards
    return pen, counter


# dense and conv-operator steps split exactly (a + b steps = a steps, then b: the same loop),
# so aot_eager gives eager's bits; the circular step re-enters the Fourier domain at each
# call, which moves the vectors by float rounding when the warm start is split in two.
@pytest.mark.parametrize("kind,rtol", [("dense", 0.0), ("lora", 0.0), ("operator", 0.0), ("fft", 1e-6)])
def test_compiled_training_from_step_zero_matches_eager(kind, rtol):
    """start_step=2, every=2, n_iter_init=5: no power steps on steps 0, 1, 3, 5; the warm
    start (5 steps) on step 2, at the weights of step 2; one step on step 4."""
    pen, _ = _train_side_by_side(kind, "aot_eager", rtol=rtol)
    assert pen.step_count.item() == 6 and bool(pen.initialized)
    if kind == "lora":
        assert pen.layer_names == ["base_model.model.0", "base_model.model.2"]


def test_compiled_training_after_an_eager_warm_start_matches_eager():
    """prepare(warm_start=True): the warm start runs at prepare time, and the compiled graph
    carries no warm-start steps."""
    _, pending = _train_side_by_side("dense", "aot_eager", rtol=0.0, steps=1)
    _, done = _train_side_by_side("dense", "aot_eager", rtol=0.0, steps=4, warm_start=True)
    assert done.op_count < pending.op_count


@pytest.mark.slow  # inductor compiles C++: about a minute per case on 2 cores
@pytest.mark.parametrize("kind", ["dense", "operator"])
def test_compiled_training_from_step_zero_matches_eager_inductor(kind):
    _train_side_by_side(kind, "inductor", rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "operator"])
def test_compiled_training_after_one_eager_forward_needs_no_prepare(kind):
    """As a user types it: one eager forward of the model, then a fullgraph-compiled step
    that calls penalty(), no prepare(): the state was created at the end of that forward."""
    _train_side_by_side(kind, "aot_eager", rtol=0.0, prepare=False)


def test_first_call_inside_fullgraph_asks_for_prepare():
    model, pen, shape = _compile_case("dense")
    compiled = torch.compile(_loss, backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"penalty\.prepare\(example_input\)"):
        compiled(model, pen, torch.randn(shape))


def test_first_call_inside_compile_without_fullgraph_finalizes_by_itself():
    """Without fullgraph the state is created eagerly at a graph break on the first call;
    the run then matches an eager run from the same construction."""
    runs = []
    for f in (torch.compile(_loss, backend="aot_eager"), _loss):
        model, pen, shape = _compile_case("dense")
        torch.manual_seed(1)
        runs.append([f(model, pen, torch.randn(shape)).detach() for _ in range(4)] + [pen.get_buffer("v_0").clone()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_prepare_runs_the_model_without_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    model[3].eval()  # a mixed-mode model: each module's own mode comes back
    before = copy.deepcopy(model.state_dict())
    pen = sf.SpectralPenalty(model).prepare(torch.randn(2, 2, 5, 5))
    assert pen.layer_names == ["0"]
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics untouched
    assert pen.step_count.item() == 0 and not bool(pen.initialized)
    assert sf.SpectralPenalty(mlp(), scope="all").prepare().layer_names == ["0", "2", "4"]  # no forward needed
