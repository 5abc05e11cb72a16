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
