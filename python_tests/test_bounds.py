"""Certified brackets against exact norms (SVD of explicit operators)."""
import functools
import math

import pytest
import torch
import torch.nn as nn

from specreg_fast import bounds as B
from specreg_fast import reference as ref


@pytest.mark.parametrize("shape", [(1, 5), (7, 1), (30, 20), (64, 64)])
def test_gram_bound_brackets_and_tightens(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(W, 2).item()
    prev = math.inf
    for t in range(1, 8):
        ub = B.gram_upper_bound(W, t)
        assert ub >= exact and ub <= prev * (1 + 1e-12)
        prev = ub
    assert prev / exact - 1 < 1e-3
    lo, up, gap = B.operator_norm_bounds(W)
    assert lo <= exact * (1 + 1e-9) and up >= exact and 0 <= gap < 1e-3


CONVS = [
    (nn.Conv1d(1, 1, 2, padding=1, bias=False), (1, 3)),
    (nn.Conv2d(2, 3, 3, padding=1), (2, 6, 6)),
    (nn.Conv2d(2, 3, 3, padding=2, dilation=2), (2, 5, 5)),
    (nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 6, 6)),
    (nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 5, 5)),
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 6, 6)),
    (nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular"), (2, 6, 6)),
    (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), (2, 4, 4)),
    (nn.Conv1d(2, 2, 5, padding=0), (2, 9)),
]


@pytest.mark.parametrize("conv,shape", CONVS, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else str(c))
def test_conv_bracket_contains_exact(conv, shape):
    conv = conv.double()
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv, shape)).item()
    lo, up, gap = B.operator_norm_bounds(conv, shape)
    assert lo <= exact * (1 + 1e-6) and up >= exact, (lo, exact, up)


def test_same_size_circular_is_not_a_bound_but_enlarged_is():
    conv = nn.Conv1d(1, 1, 2, padding="same", bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -1.0]]]))
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv, (1, 3))).item()
    assert ref.circular_conv_sigma_exact(conv.weight, (3,)).item() < exact
    conv2 = nn.Conv1d(1, 1, 2, padding=1, bias=False).double()
    with torch.no_grad():
        conv2.weight.copy_(torch.tensor([[[1.0, -1.0]]]))
    e2 = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv2, (1, 3))).item()
    assert B.conv_upper_bound(conv2, (1, 3)) >= e2


def test_errors():
    with pytest.raises(ValueError, match="input_shape"):
        B.operator_norm_bounds(nn.Conv2d(1, 1, 3))
    reflect = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="reflect"):  # no Fourier blocks for a reflect pad
        B.conv_upper_bound(reflect, (1, 5, 5), method="cholesky")
    with pytest.raises(ValueError, match="max_dim"):  # and the Gram matrix is capped
        B.conv_upper_bound(reflect, (1, 5, 5), max_dim=24)
    with pytest.raises(ValueError, match="max_dim=24"):
        B.conv_upper_bound(nn.Conv2d(1, 1, 3, padding=1), (1, 5, 5), method="dense", max_dim=24)
    with pytest.raises(TypeError):
        B.operator_norm_bounds(torch.randn(2, 2, 2))


GRID = [
    (nn.Conv1d(2, 3, 3, padding=1), (2, 7)),
    (nn.Conv1d(2, 2, 4, padding="same", dilation=1), (2, 6)),
    (nn.Conv1d(3, 3, 3, stride=2, padding=2, dilation=2, groups=3), (3, 9)),
    (nn.Conv2d(2, 4, 3, stride=2, padding=0), (2, 7, 7)),
    (nn.Conv2d(2, 2, 3, stride=2, padding=1, dilation=2), (2, 6, 5)),
    (nn.Conv2d(2, 4, 1, stride=2), (2, 6, 6)),
    (nn.Conv2d(2, 3, 5, padding="same"), (2, 5, 5)),
    (nn.Conv3d(1, 2, 3, padding=1), (1, 4, 3, 4)),
    (nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 5)),
    (nn.ConvTranspose2d(2, 2, 3, stride=1, padding=1), (2, 4, 5)),
    (nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2), (4, 3, 3)),
    (nn.Conv2d(2, 2, 3, stride=3, padding=1, padding_mode="circular"), (2, 6, 6)),
]


@pytest.mark.parametrize("conv,shape", GRID, ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else str(c))
def test_fourier_gram_bound_is_certified_and_tight(conv, shape):
    """The Gram bound on the Fourier blocks of the enlarged circular conv is >= the exact
    norm (svdvals of the explicit matrix) on every geometry and decreases with iterations (how
    close it gets depends on the border: bench/bench_bounds.py measures it on real shapes)."""
    torch.manual_seed(0)
    conv = conv.double()
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv, shape)).item()
    prev = math.inf
    for t in (0, 1, 2, 4, 8):
        ub = B.conv_upper_bound(conv, shape, n_iter=t, method="gram")
        assert ub >= exact * (1 - 1e-12), (t, ub, exact)
        assert ub <= prev * (1 + 1e-12)
        prev = ub


def test_circular_gram_bound_converges_to_the_exact_circular_norm():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    exact = ref.circular_conv_sigma_exact(w, (8, 8), 2, 1, 1).item()
    assert B.circular_gram_bound(w, (8, 8), 2, n_iter=1) > exact * 1.001
    ub = B.circular_gram_bound(w, (8, 8), 2, n_iter=10)
    assert exact <= ub <= exact * (1 + 1e-6)
    # early stop once within rtol of a known lower bound
    ub2 = B.circular_gram_bound(w, (8, 8), 2, n_iter=10, lower=exact * 0.999, rtol=0.01)
    assert exact <= ub2 <= exact * 1.02


# c >= 16 sends the bulk through the complex64 tier (groups and strides included)
CHOLESKY_EXTRA = [
    (nn.Conv2d(16, 16, 3, padding=1), (16, 6, 6)),
    (nn.Conv2d(32, 32, 3, padding=1, groups=2), (32, 5, 5)),
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 6, 6)),
    (nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), (16, 6, 6)),
    (nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=3, padding_mode="circular"), (24, 4, 6)),
    # 1x1 kernels take the single-block shortcut
    (nn.Conv2d(6, 4, 1, stride=2, padding=1), (6, 5, 5)),
    (nn.Conv2d(6, 6, 1, stride=3, groups=3, padding_mode="circular"), (6, 6, 6)),
    (nn.ConvTranspose2d(4, 6, 1, stride=2, output_padding=1), (4, 3, 3)),
    (nn.Conv1d(20, 18, 1, stride=2), (20, 7)),
]


@pytest.mark.parametrize("guess_blocks", [4, 0])
@pytest.mark.parametrize("conv,shape", GRID + CHOLESKY_EXTRA,
                         ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else str(c))
def test_cholesky_bound_is_certified_and_within_rtol(conv, shape, guess_blocks, monkeypatch):
    """exact <= Cholesky bound <= (1 + rtol) x the circular norm it certifies (bounded here by
    the converged Gram bound), whether the guess is right (4 blocks) or far too low (0: every
    block fails first and the failure path raises mu)."""
    torch.manual_seed(0)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.normal_()
    exact = ref.conv_sigma_exact(ref.ConvSpec.from_module(conv, shape)).item()
    monkeypatch.setattr(B, "circular_cholesky_bound",
                        functools.partial(B.circular_cholesky_bound, guess_blocks=guess_blocks))
    ub = B.conv_upper_bound(conv, shape, method="cholesky", rtol=1e-3)
    gram = B.conv_upper_bound(conv, shape, n_iter=12, method="gram")
    assert exact * (1 - 1e-12) <= ub <= gram * (1 + 1.01e-3), (exact, ub, gram)
    if conv.padding_mode == "circular":
        circ = ref.circular_conv_sigma_exact(conv.weight, shape[1:], conv.stride, conv.dilation, conv.padding,
                                             groups=conv.groups).item()
        assert circ <= ub <= circ * (1 + 1.01e-3)


def test_cholesky_bound_edge_cases_and_errors():
    w = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
    assert B.circular_cholesky_bound(w, (6, 6)) == 0.0
    w[1, 2, 1, 1] = -3.0  # a single tap: every block has norm 3
    assert 3.0 <= B.circular_cholesky_bound(w, (6, 6)) <= 3.0 * (1 + 1.01e-3)
    with pytest.raises(ValueError, match="non-finite"):
        B.circular_cholesky_bound(torch.full((2, 2, 3), float("nan")), (6,))
    with pytest.raises(ValueError, match="rtol"):
        B.circular_cholesky_bound(torch.ones(2, 2, 3), (6,), rtol=0)
    with pytest.raises(ValueError, match="method"):
        B.conv_upper_bound(nn.Conv1d(1, 1, 3), (1, 5), method="svd")


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("c", [1, 5, 40])
def test_shifted_cholesky_info_matches_lapack(dtype, c):
    """The C++ test against LAPACK (torch.linalg.cholesky_ex on the upper triangle): positive
    definite above the top eigenvalue, the same failing pivot below it and on a clear
    indefinite matrix."""
    from specreg_fast import ops

    g = torch.Generator().manual_seed(c)
    P = torch.randn(6, c, c, dtype=dtype, generator=g)
    H = P.mH @ P
    top = torch.linalg.eigvalsh(H.to(torch.complex128))[:, -1].to(H.real.dtype)
    for f in (1.01, 0.99, 0.5):
        shift = top * f
        ours, lapack = ops.shifted_cholesky_info(H, shift), ops._shifted_cholesky_info_reference(H, shift)
        assert ours.dtype == torch.int32
        assert bool(((ours == 0) == (f > 1)).all()), (f, ours)
        assert bool(((ours == 0) == (lapack == 0)).all()), (f, ours, lapack)
    D = torch.diag_embed(torch.linspace(1.0, 2.0, c, dtype=H.real.dtype)).to(dtype)[None].repeat(2, 1, 1)
    D[1, c // 2, c // 2] = 5.0  # shift 3 - 5 < 0 at pivot c//2 + 1
    info = ops.shifted_cholesky_info(D, torch.full((2,), 3.0, dtype=H.real.dtype))
    assert info.tolist() == [0, c // 2 + 1]
    assert info.tolist() == ops._shifted_cholesky_info_reference(D, torch.full((2,), 3.0, dtype=H.real.dtype)).tolist()


def test_shifted_cholesky_info_opcheck_and_errors():
    from specreg_fast import ops

    H = torch.randn(3, 4, 4, dtype=torch.complex64)
    H = H.mH @ H
    torch.library.opcheck(torch.ops.specreg_fast.shifted_cholesky_info.default, (H, torch.full((3,), 50.0)))
    with pytest.raises(ValueError, match="complex"):
        ops.shifted_cholesky_info(H.real.contiguous(), torch.ones(3))
    with pytest.raises(ValueError, match="shift"):
        ops.shifted_cholesky_info(H, torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="real dtype"):  # the op's own check, past the wrapper
        torch.ops.specreg_fast.shifted_cholesky_info(H, torch.ones(3, dtype=torch.float64))


# the dense Gram certificate: every padding mode, strides that do not divide the size,
# transposed convs with output_padding >= stride (the cases the Fourier route cannot take)
DENSE_EXTRA = [
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 5, 4)),
    (nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="replicate"), (2, 5, 6)),
    (nn.Conv1d(2, 2, 4, padding="same", padding_mode="reflect"), (2, 7)),
    (nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="circular"), (2, 5, 5)),
    (nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1, padding_mode="replicate", groups=2), (2, 3, 4, 3)),
    (nn.ConvTranspose1d(2, 4, 3, stride=1, padding=0, output_padding=1, dilation=2, groups=2), (2, 5)),
    (nn.Conv2d(6, 2, 3, padding=1, groups=2), (6, 3, 3)),
    (nn.Conv2d(1, 8, 3, stride=2, padding=1), (1, 6, 6)),
]


def _explicit(conv, shape):
    return ref.conv_operator_matrix(ref.ConvSpec.from_module(conv, shape))


@pytest.mark.parametrize("conv,shape", CONVS + GRID + DENSE_EXTRA,
                         ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else str(c))
def test_dense_gram_has_the_spectrum_of_the_explicit_operator(conv, shape):
    """The Gram matrix assembled from the kernel's channel products, per group, has exactly
    the squared singular values of the explicit operator matrix (all of them, not only the
    top one), for every padding mode, stride, dilation, groups and transposed convs."""
    torch.manual_seed(1)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.normal_()
    sv = torch.linalg.svdvals(_explicit(conv, shape))
    M, err = B.dense_operator_gram(conv, shape)
    assert M.shape[0] == conv.groups and M.shape[1] * conv.groups == sv.numel()
    lam = torch.linalg.eigvalsh(M).flatten().sort(descending=True).values
    assert torch.allclose(lam, sv ** 2, rtol=0, atol=1e-9 * float(sv[0]) ** 2), (lam[:4], sv[:4] ** 2)
    assert 0 < err < 1e-10 * float(sv[0]) ** 2 * 1e3


@pytest.mark.parametrize("conv,shape", CONVS + GRID + DENSE_EXTRA,
                         ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else str(c))
def test_dense_bound_is_certified_and_within_rtol(conv, shape):
    torch.manual_seed(2)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.normal_()
    exact = torch.linalg.svdvals(_explicit(conv, shape))[0].item()
    ub = B.conv_upper_bound(conv, shape, method="dense", rtol=1e-3)
    assert exact <= ub <= exact * (1 + 1.01e-3), (exact, ub)
    # a lower bound far short of the norm: the first Cholesky test fails, the slack grows
    ub2 = B.dense_cholesky_bound(conv, shape, lower=exact * 0.9, rtol=1e-3)
    assert exact <= ub2 <= exact * 1.2
    # the auto bracket: tight where the circular conv is loose, any padding mode
    lo, up, gap = B.operator_norm_bounds(conv, shape)
    assert lo <= exact * (1 + 1e-9) and exact <= up and gap < 0.05, (lo, exact, up)


def test_dense_certificate_is_what_tightens_small_images():
    """On a border-heavy image the enlarged circular conv is far above the operator; the auto
    bracket refines it with the Gram matrix, and without the refinement it would not be tight."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2).double()
    shape = (4, 4, 4)
    exact = torch.linalg.svdvals(_explicit(conv, shape))[0].item()
    circular_only = B.conv_upper_bound(conv, shape, method="cholesky")
    assert circular_only > exact * 1.05
    lo, up, gap = B.operator_norm_bounds(conv, shape)
    assert exact <= up <= exact * (1 + 1.01e-3) and gap < 2e-3
    lo, up, gap = B.operator_norm_bounds(conv, shape, max_dim=8)  # Gram too large: circular only
    assert up == pytest.approx(circular_only, rel=1e-12)


def test_dense_bound_edge_cases():
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
    assert B.conv_upper_bound(conv, (2, 4, 4), method="dense") == 0.0
    with torch.no_grad():
        conv.weight[0, 1, 1, 1] = -3.0  # one tap: the operator is 3 x a partial identity
    assert 3.0 <= B.conv_upper_bound(conv, (2, 4, 4), method="dense") <= 3.0 * (1 + 1.01e-3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        B.conv_upper_bound(conv, (2, 4, 4), method="dense")
    with pytest.raises(ValueError, match="rtol"):
        B.dense_cholesky_bound(conv, (2, 4, 4), rtol=-1.0)
