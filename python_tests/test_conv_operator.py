"""conv_operator_norms (method "operator") against the explicit operator matrix."""
import pytest
import torch
import torch.nn as nn

import specreg_fast as sf
from specreg_fast import conv as C
from specreg_fast import reference as ref

from test_reference import _conv_cases, _ids, _make_conv

CASES = _conv_cases()
# every padding mode, stride, dilation, groups and dimension; the whole grid under `slow`
PARAMS = [pytest.param(c, marks=() if i % 4 == 0 else pytest.mark.slow, id=_ids(c)) for i, c in enumerate(CASES)]
TRANSPOSED = [(1, 3, 2, 1, 1, 1, 1), (2, 3, 2, 1, 1, 1, 2), (2, 4, 2, 1, 1, 0, 1), (3, 2, 2, 0, 1, 1, 1)]


def _spec(case):
    d, cin, cout, k, s, p, dil, g, mode, size = case
    conv = _make_conv(d, cin, cout, k, s, p, dil, g, mode)
    return conv, ref.ConvSpec.from_module(conv, (cin,) + (size,) * d)


@pytest.mark.parametrize("case", PARAMS)
def test_adjoint_and_weight_gradient_are_exact(case):
    conv, spec = _spec(case)
    geom = C._Geometry(spec)
    M = ref.conv_operator_matrix(spec)
    x = torch.randn((2,) + tuple(spec.input_shape), dtype=torch.float64)
    Ax = geom.apply(x, conv.weight.detach())
    torch.testing.assert_close(Ax.reshape(2, -1), x.reshape(2, -1) @ M.t())
    y = torch.randn_like(Ax)
    torch.testing.assert_close(geom.adjoint(y, conv.weight.detach()).reshape(2, -1), y.reshape(2, -1) @ M)
    # weight gradient of <y, A(w) x> vs autograd through the nn module
    w = conv.weight.detach().clone().requires_grad_()
    s = (y * ref.conv_apply(ref.ConvSpec(**{**spec.__dict__, "weight": w}), x)).sum()
    (gw,) = torch.autograd.grad(s, w)
    torch.testing.assert_close(geom.weight_grad(x, y, conv.weight.detach()), gw)


@pytest.mark.parametrize("case", PARAMS)
def test_converges_to_svd_of_explicit_operator(case):
    conv, spec = _spec(case)
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    st = C.init_conv_state([spec], generator=torch.Generator().manual_seed(0))
    sig = C.conv_operator_norms([spec], st, n_iter=3000)[0]
    assert sig <= sv[0] * (1 + 1e-12)
    if sv[1] / sv[0] < 0.999:
        assert abs(sig - sv[0]) / sv[0] < 1e-4


@pytest.mark.parametrize("d,k,s,p,dil,op,g", TRANSPOSED)
def test_conv_transpose(d, k, s, p, dil, op, g):
    convt = _make_conv(d, 2, 4, k, s, p, dil, g, "zeros", transposed=True, output_padding=op)
    spec = ref.ConvSpec.from_module(convt, (2,) + (3,) * d)
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    st = C.init_conv_state([spec])
    sig = C.conv_operator_norms([spec], st, n_iter=3000)[0]
    if sv[1] / sv[0] < 0.999:
        assert abs(sig - sv[0]) / sv[0] < 1e-4
    x = torch.randn((1, 2) + (3,) * d, dtype=torch.float64)
    y = torch.randn_like(C._Geometry(spec).apply(x, convt.weight.detach()))
    w = convt.weight.detach().clone().requires_grad_()
    (gw,) = torch.autograd.grad((y * ref.conv_apply(ref.ConvSpec(**{**spec.__dict__, "weight": w}), x)).sum(), w)
    torch.testing.assert_close(C._Geometry(spec).weight_grad(x, y, convt.weight.detach()), gw)


def test_list_of_layers_and_gradcheck():
    convs = [nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="reflect").double(),
             nn.Conv1d(3, 2, 5, padding=2, dilation=2, padding_mode="circular").double()]
    specs = [ref.ConvSpec.from_module(convs[0], (2, 6, 6)), ref.ConvSpec.from_module(convs[1], (3, 11))]
    st = C.init_conv_state(specs)
    sig = C.conv_operator_norms(specs, st, n_iter=2000)
    for s, spec in zip(sig, specs):
        exact = ref.conv_sigma_exact(spec)
        assert abs(s - exact) / exact < 1e-4

    def f(w0, w1):
        sp = [ref.ConvSpec(**{**specs[0].__dict__, "weight": w0}), ref.ConvSpec(**{**specs[1].__dict__, "weight": w1})]
        return C.conv_operator_norms(sp, st, update=False)

    ws = [c.weight.detach().clone().requires_grad_() for c in convs]
    assert torch.autograd.gradcheck(f, ws)


def test_zero_and_non_finite_weights():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
    spec = ref.ConvSpec.from_module(conv, (1, 5, 5))
    st = C.init_conv_state([spec])
    x0 = st.xs[0].clone()
    assert C.conv_operator_norms([spec], st, n_iter=3)[0].item() == 0.0
    assert torch.equal(st.xs[0], x0)
    conv2 = nn.Conv2d(1, 2, 3, padding=1)
    spec2 = ref.ConvSpec.from_module(conv2, (1, 5, 5))
    st2 = C.init_conv_state([spec2])
    with torch.no_grad():
        conv2.weight[0, 0, 1, 1] = float("nan")
    x0, y0 = st2.xs[0].clone(), st2.ys[0].clone()
    s = C.conv_operator_norms([ref.ConvSpec.from_module(conv2, (1, 5, 5))], st2, n_iter=3)
    assert torch.isnan(s).all() and torch.equal(st2.xs[0], x0) and torch.equal(st2.ys[0], y0)


def test_bad_state_raises_and_keeps_state():
    conv = nn.Conv2d(1, 2, 3)
    spec = ref.ConvSpec.from_module(conv, (1, 6, 6))
    st = C.init_conv_state([spec])
    snap = st.xs[0].clone()
    with pytest.raises(ValueError, match="input shape"):
        C.conv_operator_norms([ref.ConvSpec.from_module(conv, (1, 7, 7))], st)
    with pytest.raises(ValueError, match=r"one per conv"):
        C.conv_operator_norms([spec, spec], st)
    with pytest.raises(ValueError, match="n_iter"):
        C.conv_operator_norms([spec], st, n_iter=-1)
    assert torch.equal(st.xs[0], snap)


def test_stateless_conv_operator_norm():
    m = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    s = sf.conv_operator_norm(m, (3, 8, 8), tol=1e-13, max_iter=5000)
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(m, (3, 8, 8)))
    assert abs(s - exact) / exact < 1e-6
