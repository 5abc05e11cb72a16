"""The depthwise conv-operator kernels (csrc/cpu/depthwise_cpu.cpp): each pass against ATen,
the power step against svdvals of the explicit operator and against conv_power_step_, the
weight-gradient against conv_weight_grad_add_, the step's conventions, the checks, opcheck, and
the penalty's conv group routing depthwise layers to them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from specreg_fast import ops
from specreg_fast import reference as ref
from specreg_fast.geometry import ConvSpec, pack_conv_params
from spectral_testing import assert_compiled_step_matches_eager

pytestmark = pytest.mark.skipif(not ops.HAS_CPP_EXT, reason="the compiled library is not loaded")

# (C, H, W, k, stride, padding, dilation): the zoo's kinds (3x3, 5x5, 7x7, strides 1 and 2,
# images down to 2x2 with most taps in the padding) and odd ones (non-square, dilation 2,
# asymmetric padding through 'same', kernels larger than the image)
CASES = [
    (3, 7, 5, 3, 1, 1, 1), (4, 8, 8, 3, 2, 1, 1), (5, 9, 6, 5, 2, 2, 1), (4, 2, 2, 7, 1, 3, 1),
    (6, 4, 4, 5, 1, 2, 1), (3, 5, 7, 3, 2, 1, 2), (2, 6, 5, 7, 1, 3, 1), (3, 3, 3, 5, 2, 2, 1),
    (2, 6, 6, 4, 1, "same", 1), (2, 11, 9, 3, 3, 0, 1),
    # stride 1 with rows of >= 8 outputs: the register-tiled route (zero-padded copies)
    (3, 10, 12, 3, 1, 1, 1), (2, 9, 11, 5, 1, 2, 2), (2, 12, 9, 7, 1, 3, 1), (2, 8, 10, 4, 1, "same", 1),
    (2, 10, 9, 3, 1, 0, 1), (2, 9, 16, 5, 1, 5, 1),
]


def _ident(c):
    return "C{}_{}x{}_k{}_s{}_p{}_d{}".format(*c)


def _case(C, H, W, k, s, p, d, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Conv2d(C, C, k, stride=s, padding=p, dilation=d, groups=C, bias=False).to(dtype)
    spec = ConvSpec.from_module(m, (C, H, W), weight=m.weight.detach())
    params, modes = pack_conv_params([spec])
    return m, spec, params, modes


def _unit(t):
    return t / t.norm()


@pytest.mark.parametrize("case", CASES, ids=_ident)
def test_passes_match_aten(case):
    """A x, A^T y and d<y, A x>/dW each equal ATen's depthwise conv, its input-gradient and its
    weight-gradient to 1e-5 (float32)."""
    m, spec, params, modes = _case(*case)
    C, H, W = spec.input_shape
    x = torch.randn(C, H, W)
    with torch.no_grad():
        Ax = m(x[None])[0]
    y = torch.randn_like(Ax)
    Ax_k, ATy_k, gW_k = ops.depthwise_passes([m.weight.detach()], [x], [y], params, modes)
    xr = x[None].clone().requires_grad_(True)
    out = m(xr)
    gx, gw = torch.autograd.grad(out, (xr, m.weight), y[None])
    torch.testing.assert_close(Ax_k, Ax, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ATy_k, gx[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gW_k, gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=_ident)
def test_power_step_converges_to_exact_norm(case):
    """float64: the iteration's estimate reaches the largest singular value of the explicit
    operator matrix, and <y, A x> = the estimate at the final vectors."""
    _, spec, params, modes = _case(*case, dtype=torch.float64)
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    x = _unit(torch.randn(spec.input_shape, dtype=torch.float64))
    with torch.no_grad():
        y = _unit(ref.conv_apply(spec, x[None])[0]).contiguous()
    est = ops.depthwise_power_step_([spec.weight], [x], [y], params, modes, 20000)
    torch.testing.assert_close(est[0], sv[0], rtol=1e-7, atol=1e-12)
    with torch.no_grad():
        bil = (y * ref.conv_apply(spec, x[None])[0]).sum()
    torch.testing.assert_close(bil, est[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=_ident)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_power_step_equals_conv_power_step(case, n_iter):
    """Several layers in one call: the same vectors and estimates as conv_power_step_ (ATen's
    depthwise convolutions inside), float32 to 1e-5."""
    layers = [_case(*case, seed=s) for s in range(2)]
    ws = [sp.weight for _, sp, _, _ in layers]
    params = [q for _, _, p, _ in layers for q in p]
    modes = [m for _, _, _, ms in layers for m in ms]
    xs = [_unit(torch.randn(sp.input_shape)) for _, sp, _, _ in layers]
    with torch.no_grad():
        ys = [_unit(ref.conv_apply(sp, x[None])[0]).contiguous() for (_, sp, _, _), x in zip(layers, xs)]
    xs2, ys2 = [x.clone() for x in xs], [y.clone() for y in ys]
    e1 = ops.depthwise_power_step_(ws, xs, ys, params, modes, n_iter)
    e2 = ops.conv_power_step_(ws, xs2, ys2, params, modes, n_iter)
    torch.testing.assert_close(e1, e2, rtol=1e-5, atol=1e-6)
    for a, b in zip(xs + ys, xs2 + ys2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # n_iter = 0: <y, A x> at the current vectors, nothing written
    x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
    e0 = ops.depthwise_power_step_(ws, xs, ys, params, modes, 0)
    torch.testing.assert_close(e0, ops.conv_sigma(ws, xs, ys, params, modes), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(xs + ys, x0 + y0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_grad_add_equals_conv_weight_grad_add(dtype):
    layers = [_case(*c, dtype=dtype, seed=i) for i, c in enumerate(CASES)]
    ws = [sp.weight for _, sp, _, _ in layers]
    params = [q for _, _, p, _ in layers for q in p]
    modes = [m for _, _, _, ms in layers for m in ms]
    xs = [torch.randn(sp.input_shape, dtype=dtype) for _, sp, _, _ in layers]
    with torch.no_grad():
        ys = [torch.randn_like(ref.conv_apply(sp, x[None])[0]) for (_, sp, _, _), x in zip(layers, xs)]
    G1 = [torch.randn_like(w) for w in ws]
    G2 = [g.clone() for g in G1]
    ops.depthwise_weight_grad_add_(G1, ws, xs, ys, params, modes)
    ops.conv_weight_grad_add_(G2, ws, xs, ys, params, modes)
    for a, b in zip(G1, G2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_step_conventions_zero_and_nonfinite():
    """Zero weight: estimate 0, vectors kept; a non-finite weight: estimate NaN, that layer's
    vectors as before the call (also after a finite first step), the other layer stepped."""
    case = CASES[1]
    layers = [_case(*case, seed=s) for s in range(2)]
    params = [q for _, _, p, _ in layers for q in p]
    modes = [m for _, _, _, ms in layers for m in ms]
    for n_iter in (1, 4):
        w_bad = layers[0][1].weight.clone()
        w_bad[1, 0, 0, 0] = float("inf")
        ws = [w_bad, layers[1][1].weight]
        xs = [_unit(torch.randn(sp.input_shape)) for _, sp, _, _ in layers]
        with torch.no_grad():
            ys = [_unit(torch.randn_like(ref.conv_apply(sp, x[None])[0])) for (_, sp, _, _), x in zip(layers, xs)]
        x0, y0 = [x.clone() for x in xs], [y.clone() for y in ys]
        est = ops.depthwise_power_step_(ws, xs, ys, params, modes, n_iter)
        assert torch.isnan(est[0]) and torch.isfinite(est[1]) and est[1] > 0
        assert torch.equal(xs[0], x0[0]) and torch.equal(ys[0], y0[0])
        assert not torch.equal(xs[1], x0[1])
        zs = [torch.zeros_like(layers[0][1].weight), layers[1][1].weight]
        x1 = xs[0].clone()
        est = ops.depthwise_power_step_(zs, xs, ys, params, modes, n_iter)
        assert est[0] == 0 and torch.equal(xs[0], x1)


def test_checks_name_the_argument():
    m, spec, params, modes = _case(*CASES[0])
    W = spec.weight
    x = torch.randn(spec.input_shape)
    with torch.no_grad():
        y = m(x[None])[0].contiguous()
    with pytest.raises(ValueError, match="padding mode must be zeros"):
        ops.depthwise_power_step_([W], [x], [y], params, ["reflect"])
    bad = list(params)
    bad[1] = 1  # groups 1: not depthwise
    with pytest.raises(ValueError, match="groups must equal the channels"):
        ops.depthwise_power_step_([W], [x], [y], bad, modes)
    with pytest.raises(TypeError, match=r"weights\[0\] must be float32 or float64"):
        ops.depthwise_power_step_([W.half()], [x], [y], params, modes)
    with pytest.raises(ValueError, match=r"ys\[0\] must have the output shape"):
        ops.depthwise_power_step_([W], [x], [y[:, :-1].contiguous()], params, modes)
    with pytest.raises(ValueError, match="share memory"):
        ops.depthwise_power_step_([W], [x], [x.view(y.shape) if x.numel() == y.numel() else x], params, modes)
    with pytest.raises(ValueError, match=r"grads\[0\] must be contiguous"):
        ops.depthwise_weight_grad_add_([torch.zeros(W.shape[::-1]).permute(3, 2, 1, 0)], [W], [x], [y], params,
                                       modes)


def test_opcheck():
    _, spec, params, modes = _case(*CASES[2])
    W = spec.weight
    x = _unit(torch.randn(spec.input_shape))
    with torch.no_grad():
        y = _unit(ref.conv_apply(spec, x[None])[0]).contiguous()
    torch.library.opcheck(torch.ops.specreg_fast.depthwise_power_step_.default, ([W], [x], [y], params, modes, 2, 0.0))
    torch.library.opcheck(torch.ops.specreg_fast.depthwise_weight_grad_add_.default,
                          ([torch.zeros_like(W)], [W], [x], [y], params, modes))
    torch.library.opcheck(torch.ops.specreg_fast.depthwise_passes.default, ([W], [x], [y], params, modes))


class _DwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.d1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.p1 = nn.Conv2d(8, 12, 1)
        self.d2 = nn.Conv2d(12, 12, 5, padding=2, groups=12)
        self.d3 = nn.Conv2d(12, 12, 7, padding=3, groups=12, padding_mode="reflect")  # not taken: reflect
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.d3(self.d2(self.p1(self.d1(self.c0(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["accumulate_grad", "penalty"])
def test_penalty_routes_depthwise_layers(method):
    """The conv group sends the supported depthwise layers to the direct kernels: sigmas,
    vectors and .grad as with ATen's kernels (set_depthwise_kernel('aten')), over a few calls."""
    from specreg_fast import SpectralPenalty
    from specreg_fast.groups import ConvOperatorGroup

    out = {}
    for choice in ("direct", "aten"):
        prev = ops.set_depthwise_kernel(choice)
        try:
            torch.manual_seed(0)
            net = _DwNet()
            pen = SpectralPenalty(net, gamma=1e-2, n_iter_init=3)
            with torch.no_grad():
                net(torch.randn(2, 3, 12, 12))
            sigs = []
            for _ in range(3):
                if method == "accumulate_grad":
                    pen.accumulate_grad()
                else:
                    pen().backward()
                sigs.append(pen.last_sigmas.clone())
            group = next(g for g in pen._set.groups if isinstance(g, ConvOperatorGroup))
            routed = group._cached(group._key(group.weights()), None)[5]
            out[choice] = (routed, sigs, {n: q.grad.clone() for n, q in net.named_parameters() if q.grad is not None},
                           {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)})
        finally:
            ops.set_depthwise_kernel(prev)
    routed_d, sig_d, g_d, st_d = out["direct"]
    routed_a, sig_a, g_a, st_a = out["aten"]
    names = [mp.name for mp in group.maps]
    assert [n for n, r in zip(names, routed_d) if r] == ["d1", "d2"] and not any(routed_a)
    for a, b in zip(sig_d, sig_a):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert g_d.keys() == g_a.keys() and {"d1.weight", "d2.weight"} <= g_d.keys()
    for n in g_d:
        torch.testing.assert_close(g_d[n], g_a[n], rtol=1e-5, atol=1e-7)
    for k in st_d:
        torch.testing.assert_close(st_d[k], st_a[k], rtol=1e-5, atol=1e-6)


def test_set_depthwise_kernel_checks_choice():
    with pytest.raises(ValueError, match="'auto', 'direct' or 'aten'"):
        ops.set_depthwise_kernel("fast")


def test_torch_compile_penalty_with_depthwise_layers_matches_eager():
    """fullgraph torch.compile through the routed depthwise step (its fake) and the planned op
    calls: the same loss, gradients and vectors as eager."""
    from specreg_fast import SpectralPenalty

    prev = ops.set_depthwise_kernel("direct")
    try:
        def make():
            torch.manual_seed(0)
            net = _DwNet()
            pen = SpectralPenalty(net, gamma=0.5, readout="fc", n_iter=1, n_iter_init=1)
            with torch.no_grad():
                net(torch.randn(1, 3, 12, 12))
            pen()
            return net, pen

        pe, pc = assert_compiled_step_matches_eager(make, lambda: torch.randn(2, 3, 12, 12), steps=2)
        for k, v in pe.state_dict().items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(pc.state_dict()[k], v)
    finally:
        ops.set_depthwise_kernel(prev)
