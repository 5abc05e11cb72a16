"""The plain-PyTorch reference against exact answers (SVD of explicit operators)."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from specreg_fast import reference as ref
from spectral_testing import matrix_with_gap


@pytest.mark.parametrize("m,n", [(1, 7), (9, 1), (30, 20), (20, 30), (64, 64)])
def test_dense_power_iteration_converges_to_svd(m, n):
    W = matrix_with_gap(m, n, gap=0.7) * 3.0
    v = torch.randn(n, dtype=torch.float64)
    u = torch.zeros(m, dtype=torch.float64)
    sigma, u1, v1 = ref.power_iteration(W, u, v / v.norm(), n_iter=100)
    exact = torch.linalg.svdvals(W)[0]
    assert abs(sigma - exact) / exact < 1e-5
    # singular-vector pair: W v = sigma u
    torch.testing.assert_close(W @ v1, sigma * u1, atol=1e-6, rtol=0)


def test_dense_power_iteration_does_not_modify_inputs():
    W = torch.randn(5, 4, dtype=torch.float64)
    u, v = torch.ones(5, dtype=torch.float64), torch.ones(4, dtype=torch.float64) / 2
    u0, v0 = u.clone(), v.clone()
    ref.power_iteration(W, u, v, 3)
    assert torch.equal(u, u0) and torch.equal(v, v0)


def _conv_cases():
    # (dims, cin, cout, k, stride, padding, dilation, groups, padding_mode, size)
    cases = []
    for d, (s, p, dil, g, mode) in itertools.product(
            (1, 2), itertools.product((1, 2), (0, 1, 2, "same"), (1, 2), (1, 2), ("zeros", "circular", "reflect",
                                                                                  "replicate"))):
        if p == "same" and s != 1:
            continue  # torch rejects padding='same' with stride > 1
        size = 7 if d == 1 else 6
        if mode == "reflect" and not isinstance(p, str) and p >= size:
            continue
        cases.append((d, 2, 4, 3, s, p, dil, g, mode, size))
    # 3-d: a few representative ones (the explicit matrix grows fast)
    cases += [(3, 2, 2, 3, 1, 1, 1, 1, "zeros", 4), (3, 2, 4, 2, 2, 0, 1, 2, "zeros", 5),
              (3, 1, 2, 3, 1, 1, 1, 1, "circular", 4)]
    return cases


def _make_conv(d, cin, cout, k, s, p, dil, g, mode, transposed=False, output_padding=0):
    if transposed:
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][d - 1]
        return cls(cin, cout, k, stride=s, padding=p, output_padding=output_padding, groups=g, dilation=dil,
                   bias=False).double()
    cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][d - 1]
    return cls(cin, cout, k, stride=s, padding=p, dilation=dil, groups=g, padding_mode=mode, bias=False).double()


def _ids(c):
    return "d{}_ci{}_co{}_k{}_s{}_p{}_dil{}_g{}_{}_n{}".format(*c)


@pytest.mark.parametrize("case", _conv_cases(), ids=_ids)
def test_conv_adjoint_is_exact_transpose(case):
    d, cin, cout, k, s, p, dil, g, mode, size = case
    conv = _make_conv(d, cin, cout, k, s, p, dil, g, mode)
    spec = ref.ConvSpec.from_module(conv, (cin,) + (size,) * d)
    M = ref.conv_operator_matrix(spec)
    y = torch.randn(3, M.shape[0], dtype=torch.float64)
    out_shape = conv(torch.zeros((1, cin) + (size,) * d, dtype=torch.float64)).shape[1:]
    aty = ref.conv_adjoint(spec, y.reshape((3,) + tuple(out_shape)))
    torch.testing.assert_close(aty.reshape(3, -1), y @ M, atol=1e-12, rtol=1e-12)


_ALL = _conv_cases()
# Every case of the grid under `slow`; a representative third (every padding mode, stride,
# dilation, groups and dimension still appear) runs always.
_PI_CASES = [pytest.param(c, marks=() if i % 3 == 0 else pytest.mark.slow, id=_ids(c)) for i, c in enumerate(_ALL)]


@pytest.mark.parametrize("case", _PI_CASES)
def test_conv_power_iteration_converges_to_svd(case):
    d, cin, cout, k, s, p, dil, g, mode, size = case
    conv = _make_conv(d, cin, cout, k, s, p, dil, g, mode)
    spec = ref.ConvSpec.from_module(conv, (cin,) + (size,) * d)
    sv = torch.linalg.svdvals(ref.conv_operator_matrix(spec))
    exact = sv[0]
    x0 = torch.randn((cin,) + (size,) * d, dtype=torch.float64)
    sigma, y, x = ref.conv_power_iteration(spec, x0, n_iter=3000)
    assert sigma <= exact * (1 + 1e-12)
    # converged to the top singular value unless the top two are (numerically) equal
    if sv.numel() > 1 and sv[1] / sv[0] < 0.999:
        assert abs(sigma - exact) / exact < 1e-5, (sigma.item(), exact.item())


@pytest.mark.parametrize("d,k,s,p,dil,op,g", [
    (1, 3, 2, 1, 1, 1, 1), (2, 3, 2, 1, 1, 1, 2), (2, 4, 2, 1, 1, 0, 1), (2, 3, 1, 0, 2, 0, 1),
    (3, 2, 2, 0, 1, 1, 1), (2, 3, 3, 1, 1, 2, 1)])
def test_conv_transpose_operator(d, k, s, p, dil, op, g):
    convt = _make_conv(d, 2, 4, k, s, p, dil, g, "zeros", transposed=True, output_padding=op)
    size = 4 if d < 3 else 3
    spec = ref.ConvSpec.from_module(convt, (2,) + (size,) * d)
    M = ref.conv_operator_matrix(spec)
    y = torch.randn(2, M.shape[0], dtype=torch.float64)
    out_shape = convt(torch.zeros((1, 2) + (size,) * d, dtype=torch.float64)).shape[1:]
    torch.testing.assert_close(ref.conv_adjoint(spec, y.reshape((2,) + tuple(out_shape))).reshape(2, -1), y @ M)
    sv = torch.linalg.svdvals(M)
    sigma, _, _ = ref.conv_power_iteration(spec, torch.randn((2,) + (size,) * d, dtype=torch.float64), 3000)
    if sv[1] / sv[0] < 0.999:
        assert abs(sigma - sv[0]) / sv[0] < 1e-5


def _circular_cases():
    out = []
    for d, s, k, g, dil in itertools.product((1, 2), (1, 2, 3), (1, 3, 5), (1, 2), (1, 2)):
        if k == 1 and dil == 2:
            continue
        out.append((d, s, k, g, dil))
    out += [(3, 1, 3, 1, 1), (3, 2, 3, 1, 1)]
    return out


@pytest.mark.parametrize("d,s,k,g,dil", _circular_cases())
def test_circular_fft_blocks_give_the_whole_spectrum(d, s, k, g, dil):
    """The union of the per-frequency block singular values is the whole spectrum of the
    explicit strided circular-conv matrix (so the max is the operator norm)."""
    size = {1: 12, 2: 6, 3: 6}[d]
    if d == 3 and s == 1:
        size = 4
    cin, cout = 2, 4
    p = dil * (k - 1) // 2
    conv = _make_conv(d, cin, cout, k, s, p, dil, g, "circular")
    spec = ref.ConvSpec.from_module(conv, (cin,) + (size,) * d)
    M = ref.conv_operator_matrix(spec)
    assert M.shape[0] == cout * (size // s) ** d  # full wrap-around output
    sv = torch.linalg.svdvals(M)
    P = ref.circular_transfer_blocks(conv.weight, (size,) * d, s, dil, p, g)
    blocks = torch.linalg.svdvals(P).reshape(-1)
    blocks = torch.sort(blocks, descending=True).values[: sv.numel()]
    torch.testing.assert_close(blocks, sv, atol=1e-10, rtol=1e-10)
    exact = ref.circular_conv_sigma_exact(conv.weight, (size,) * d, s, dil, p, g)
    assert abs(exact - sv[0]) <= 1e-10 * sv[0]


def test_grouped_norm_is_max_not_product():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False, padding_mode="circular").double()
    with torch.no_grad():
        conv.weight[2:] *= 3.0
    spec = ref.ConvSpec.from_module(conv, (4, 5, 5))
    exact = ref.conv_sigma_exact(spec)
    per_group = [ref.circular_conv_sigma_exact(conv.weight[2 * i:2 * i + 2], (5, 5), 1, 1, 1, 1) for i in range(2)]
    assert abs(exact - max(per_group)) < 1e-10 * exact
    assert abs(exact - per_group[0] * per_group[1]) > 1e-3 * exact


def test_zero_padding_norm_differs_from_circular():
    # kernel [1, -1] at n = 3 with 'same' zero padding is the 3x3 bidiagonal difference
    # matrix, norm 2 cos(pi/7) = 1.802; with wrap-around it is circulant, norm sqrt(3) = 1.732.
    conv = nn.Conv1d(1, 1, 2, padding="same", bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -1.0]]]))
    z = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv, (1, 3)))
    c = ref.circular_conv_sigma_exact(conv.weight, (3,), 1, 1, 0)
    assert math.isclose(c.item(), math.sqrt(3), rel_tol=1e-12)
    assert math.isclose(z.item(), 2 * math.cos(math.pi / 7), rel_tol=1e-12)


def test_conv_spec_rejects_bad_input():
    with pytest.raises(TypeError, match="ConvNd"):
        ref.ConvSpec.from_module(nn.Linear(3, 3), (3,))
    with pytest.raises(ValueError, match="input_shape"):
        ref.ConvSpec.from_module(nn.Conv2d(1, 1, 3), (1, 5))
    with pytest.raises(ValueError, match="stride 2 must divide"):
        ref.circular_transfer_blocks(torch.randn(1, 1, 3), (5,), 2)
