"""Certified brackets against exact norms (SVD of explicit operators)."""
import copy
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
        ours, lapack = ops.shifted_cholesky_info(H, shift), ops.shifted_cholesky_info_reference(H, shift)
        assert ours.dtype == torch.int32
        assert bool(((ours == 0) == (f > 1)).all()), (f, ours)
        assert bool(((ours == 0) == (lapack == 0)).all()), (f, ours, lapack)
    D = torch.diag_embed(torch.linspace(1.0, 2.0, c, dtype=H.real.dtype)).to(dtype)[None].repeat(2, 1, 1)
    D[1, c // 2, c // 2] = 5.0  # shift 3 - 5 < 0 at pivot c//2 + 1
    info = ops.shifted_cholesky_info(D, torch.full((2,), 3.0, dtype=H.real.dtype))
    assert info.tolist() == [0, c // 2 + 1]
    assert info.tolist() == ops.shifted_cholesky_info_reference(D, torch.full((2,), 3.0, dtype=H.real.dtype)).tolist()


def test_shifted_cholesky_info_opcheck_and_errors():
    from specreg_fast import ops

    H = torch.randn(3, 4, 4, dtype=torch.complex64)
    H = H.mH @ H
    torch.library.opcheck(torch.ops.specreg_fast.shifted_cholesky_info.default, (H, torch.full((3,), 50.0)))
    with pytest.raises(ValueError, match="complex"):
        ops.shifted_cholesky_info(H.real.contiguous(), torch.ones(3))
    with pytest.raises(ValueError, match="shift"):
        ops.shifted_cholesky_info(H, torch.ones(3, dtype=torch.float64))
    # the op's own check, past the wrapper: a RuntimeError (its kernel is on the stable ABI, which
    # has no typed errors; the typed front is ops.shifted_cholesky_info, above)
    with pytest.raises(RuntimeError if ops.HAS_CPP_EXT else TypeError, match="real dtype"):
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


# ------------------------------------------------------------------ floating-point margins
# Each margin of the certificates is a function of bounds.py with its derivation in the
# docstring. The tests below (1) check each formula against the derivation written out here by
# hand, (2) measure the rounding error each margin must cover on constructed inputs (it is
# positive, so a zero margin would certify a false bound, and below the margin), and (3) spy on
# the certificates to check that they apply the derived margins (a margin dropped where it is
# used fails there).
U64, U32 = 2.0 ** -53, 2.0 ** -24


def _gamma_by_hand(k, u):
    return k * u / (1 - k * u)


def _shift_margin_by_hand(n, gram_error, mu2, u):
    g = 2 * _gamma_by_hand(n + 2, u)  # Demmel's gamma_{n+1}, complex arithmetic: 2 gamma_{n+2}
    return g * n / (1 - g) + gram_error / mu2 + 4 * u


@pytest.mark.parametrize("u", [U64, U32], ids=["float64", "float32"])
@pytest.mark.parametrize("n", [1, 16, 400])
def test_cholesky_and_gram_margins_are_the_derived_formulas(n, u):
    g = 2 * (n + 2) * u / (1 - (n + 2) * u)
    assert B.cholesky_margin(n, u) == pytest.approx(g * n / (1 - g), rel=1e-12, abs=0)
    k = 3 * n + 5
    assert B.gram_rounding_coefficient(k, u) == pytest.approx(2 * (k + 2) * u / (1 - (k + 2) * u), rel=1e-12, abs=0)
    assert B.shift_margin(n, 7e-3, 2.5, u) == pytest.approx(_shift_margin_by_hand(n, 7e-3, 2.5, u), rel=1e-12, abs=0)
    assert B.shift_margin(n, 0.0, 1.0, u) == pytest.approx(_shift_margin_by_hand(n, 0.0, 1.0, u), rel=1e-15, abs=0)
    # the float32 tier is used only while its margin stays small: 400 is near its end
    assert B.cholesky_margin(400, U32) == pytest.approx(0.0193, rel=1e-2, abs=0)


def _block_error_by_hand(w, T, A, d, u):
    tau = 2 * math.pi * (_gamma_by_hand(d + 1, U64) * A + 2 * U64) + 2 * U64
    cast = u if u > U64 else 0.0
    return (math.sqrt(2) * (_gamma_by_hand(T, u) + tau + cast) + 2 * cast) * math.sqrt(T) * float(w.norm())


def test_block_rounding_error_is_the_derived_formula():
    w = torch.randn(4, 3, 3, 5, dtype=torch.float64)
    # T = 15 taps; largest tap offsets 2*(3-1)//1 = 4 and 1*(5-1)//2 = 2: A = 6
    for u in (U64, U32):
        assert B.block_rounding_error(w, (1, 2), (2, 1), u) == pytest.approx(
            _block_error_by_hand(w, 15, 6, 2, u), rel=1e-12, abs=0)


def test_block_rounding_error_covers_the_blocks_rounding():
    """The computed Fourier blocks against blocks computed to 40 digits (mpmath): the error is
    positive in both precisions (the margin is needed) and below block_rounding_error."""
    mpmath = pytest.importorskip("mpmath")
    from specreg_fast.fft import circular_blocks

    mpmath.mp.dps = 40
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 2, 4, dtype=torch.float64, generator=g)  # 1-D, 4 taps, dilation 3: a_t = 3t
    n, dil = 10, 3
    exact = []
    for f in range(n // 2 + 1):  # the half spectrum
        tw = [mpmath.expjpi(mpmath.mpf(2 * f * dil * t) / n) for t in range(4)]
        exact.append([[sum(mpmath.mpf(float(w[o, c, t])) * tw[t] for t in range(4)) for c in range(2)]
                      for o in range(3)])
    for dtype, u in ((torch.float64, U64), (torch.float32, U32)):
        P = circular_blocks(w.to(dtype), (n,), 1, dil)
        worst = 0.0
        for f in range(n // 2 + 1):
            fro2 = sum(abs(exact[f][o][c] - mpmath.mpc(complex(P[f, o, c]))) ** 2 for o in range(3) for c in range(2))
            worst = max(worst, float(mpmath.sqrt(fro2)))  # ||dP||_F >= ||dP||_2
        assert 0 < worst <= B.block_rounding_error(w, 1, dil, u), (dtype, worst)


def test_the_cholesky_test_needs_its_margin_and_the_margin_covers_it():
    """Bisect the smallest shift s at which the float32 Cholesky test passes on complex64
    Grams with a known top eigenvalue lam: on some of them s < lam (a test without margin would
    certify lam <= s, false), and the derived margin covers the gap: s / (1 - eps) >= lam."""
    from specreg_fast import ops

    def passes(H, s):
        return int(ops.shifted_cholesky_info(H, torch.tensor([s], dtype=torch.float32))[0]) == 0

    gaps = []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        c = 8
        Q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.complex128, generator=g))
        d = torch.rand(c, dtype=torch.float64, generator=g)
        H = ((Q * d) @ Q.mH).to(torch.complex64)[None]
        lam = float(torch.linalg.eigvalsh(H.to(torch.complex128))[0, -1])  # of the stored matrix
        lo, hi = lam * (1 - 1e-4), lam * (1 + 1e-4)
        assert passes(H, hi) and not passes(H, lo)
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if passes(H, mid) else (mid, hi)
        eps = B.shift_margin(c, 0.0, lam, U32)
        assert hi / (1 - eps) >= lam
        gaps.append((lam - hi) / lam)
    assert max(gaps) > 0.3 * U32, gaps


def test_gram_iteration_factor_is_the_derived_formula():
    u = U64
    shapes, logs = [(30, 20), (20, 20), (20, 20)], [2.5, -0.7, -1.2]
    log_factor = 0.0
    for t, (r, c) in enumerate(shapes[:-1]):
        g = _gamma_by_hand(r * c + 1, u)
        rho, low = 1 / (1 - g), (1 - u) / ((1 + g) * math.sqrt(c))
        e = _gamma_by_hand(r, u) * ((1 + u) * rho) ** 2
        log_factor += (math.log(1 + u * rho / low) - 0.5 * math.log(1 - e / low ** 2)) / 2 ** t
    log_factor += -math.log(1 - _gamma_by_hand(400 + 1, u)) / 4
    S = 2.5 + 0.7 / 2 + 1.2 / 4
    expect = math.exp(log_factor + 4 * 4 * u * (S + 1) + 3 * u)
    assert B.gram_iteration_factor(shapes, logs) == pytest.approx(expect, rel=1e-14, abs=0)
    # complex iterates: 2N real squares and 2 gamma_{r+2} per inner product: larger
    assert B.gram_iteration_factor(shapes, logs, complex_=True) > expect
    # to first order 1 + (r c + c^2) u / 2: a fixed 1 + 1e-9 is too small at 4096 x 4096
    big = B.gram_iteration_factor([(4096, 4096)] * 7, [0.0] * 7) - 1
    assert big == pytest.approx(2 * 4096 ** 2 * U64 / 2, rel=0.02, abs=0) and big > 1e-9


def test_gram_bound_is_above_the_exact_norm_only_with_its_factor(monkeypatch):
    """Rank-1 integer matrices with an exactly known norm (|a| |b| with integer norms): the
    certified bound is above it. Then the rounding is forced by construction, so that no CPU or
    BLAS decides its direction: float64 is a legal machine of the coarser unit roundoff
    u = 2^-20, and every computed Frobenius norm is lowered by half of gamma_{N+1}(u), the
    error the factor's derivation allows a sum of N squares and a sqrt. Against that adversary
    the bound stays above the norm with gram_iteration_factor(u), and falls below it without."""
    cases = [([12, 12, 21], [3, 12, 24], 27 * 27), ([20, 20, 35], [11, 44, 88], 45 * 99),
             ([3, 6, 6], [28, 28, 49], 9 * 63)]
    for a, b, sigma in cases:
        W = torch.outer(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        assert torch.linalg.svdvals(W)[0].item() == pytest.approx(sigma, rel=1e-14, abs=0)
        for n in (1, 2, 6):
            assert B.gram_upper_bound(W, n) >= sigma
    u = 2.0 ** -20
    matrix_norm, factor = torch.linalg.matrix_norm, B.gram_iteration_factor

    def low_norm(G, ord):  # the lowest value the derivation's model allows, up to float64's own error
        return matrix_norm(G, ord) * (1 - B._gamma(G.numel() + 1, u) / 2)

    monkeypatch.setattr(torch.linalg, "matrix_norm", low_norm)
    for a, b, sigma in cases:
        W = torch.outer(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        for n in (1, 2, 6):
            monkeypatch.setattr(B, "gram_iteration_factor", lambda s, l: factor(s, l, u=u))
            assert B.gram_upper_bound(W, n) >= sigma
            # the raw value is sigma (1 - gamma/2)^(1/2^n) up to float64 rounding: 7e-8 below at n = 6
            monkeypatch.setattr(B, "gram_iteration_factor", lambda s, l: 1.0)
            assert B.gram_upper_bound(W, n) < sigma * (1 - 1e-9)


def test_bounds_of_tiny_weights_do_not_underflow_to_zero():
    W = torch.outer(torch.tensor([12.0, 12, 21], dtype=torch.float64), torch.tensor([3.0, 12, 24], dtype=torch.float64))
    assert B.gram_upper_bound(W * 1e-200) >= 729e-200  # was 0.0: the squares underflowed
    w = torch.zeros(2, 2, 3, dtype=torch.float64)
    w[0, 1, 1] = 3e-200
    assert B.circular_cholesky_bound(w, (6,)) >= 3e-200
    assert B.circular_gram_bound(w, (6,)) >= 3e-200


@pytest.mark.parametrize("dtype,exp", [(torch.float64, -700), (torch.float32, -100)], ids=["float64", "float32"])
def test_dense_bound_of_tiny_weights_is_certified_and_tight(dtype, exp):
    """The dense certificate and the auto bracket of a weight scaled by 2^exp stay certified and
    within rtol: the float64 Gram of a 2^-700 weight underflowed to 0 (bound 0.0, below the
    norm), the power steps of the guess and of the lower end to 0 (float32 2^-100: bound 65%
    above the norm, lower end 0)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate", bias=False).to(dtype)
    shape = (2, 4, 4)
    exact = math.ldexp(torch.linalg.svdvals(_explicit(copy.deepcopy(conv).double(), shape))[0].item(), exp)
    with torch.no_grad():
        conv.weight.mul_(2.0 ** exp)  # exact: the scaled weights stay normal numbers
    assert exact <= B.dense_cholesky_bound(conv, shape, rtol=1e-3) <= exact * (1 + 1.01e-3)
    lo, up, gap = B.operator_norm_bounds(conv, shape)
    assert exact * (1 - 1e-5) <= lo <= exact <= up <= exact * (1 + 1.01e-3)


def _spy(monkeypatch, module, name, log):
    real = getattr(module, name)

    def spy(*args):
        out = real(*args)
        log.append((args, out))
        return out

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("cin,cout", [(16, 24), (4, 6)], ids=["complex64-tier", "float64-only"])
def test_circular_cholesky_certificate_applies_the_derived_margins(cin, cout, monkeypatch):
    """Every Cholesky test of the circular certificate uses at least the derived shift margin
    for its precision (Demmel + Gram rounding with ||P||_F^2 = tr(H) + diagonal), and the
    returned bound is at least what the last test certified plus the blocks' rounding error
    (delta32 for float32-certified blocks, delta64 for float64 ones), rounded up."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=g)
    w = w / w.abs().max() * 0.75  # largest entry in [0.5, 1): the certificate's power-of-two scaling is 1
    calls = []
    _spy(monkeypatch, B, "_cholesky_fails", calls)
    ub = B.circular_cholesky_bound(w, (6, 6), rtol=1e-3)
    c, k = min(cin, cout), max(cin, cout)
    assert calls
    for (H, mu2, eps), _ in calls:
        u = U32 if H.dtype == torch.complex64 else U64
        # tr(H) = ||P||_F^2, rounded up as the computed norm must be (2ck squares, sqrt, square)
        fro2 = H.diagonal(dim1=1, dim2=2).real.double().sum(1) / (1 - _gamma_by_hand(4 * c * k + 4, u))
        need = torch.tensor([_shift_margin_by_hand(c, 2 * _gamma_by_hand(k + 2, u) * float(f), mu2, u) for f in fro2])
        assert bool((torch.as_tensor(eps) >= need * (1 - 1e-6)).all()), (H.dtype, eps, need)
    delta = {U64: _block_error_by_hand(w, 9, 4, 2, U64), U32: _block_error_by_hand(w, 9, 4, 2, U32)}
    (H, mu2, _), _ = calls[-1]
    u = U32 if H.dtype == torch.complex64 else U64
    assert ub >= (math.sqrt(mu2) + delta[u]) * (1 + 3 * U64)
    assert (cin == 16) == any(H.dtype == torch.complex64 for (H, _, _), _ in calls)


def test_dense_certificate_applies_the_derived_margins(monkeypatch):
    """The dense certificate's Cholesky tests shift by at least Demmel's margin for the Gram
    side D, the Gram's rounding bound err and the diagonal's rounding, and the bound is the
    certified mu rounded up."""
    from specreg_fast import ops

    torch.manual_seed(8)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    with torch.no_grad():  # largest entry in [0.5, 1): the certificate's power-of-two scaling is 1
        conv.weight.mul_(0.75 / conv.weight.abs().max())
    shape = (3, 4, 4)
    M, err = B.dense_operator_gram(conv, shape)
    D = M.shape[-1]
    margins, tests = [], []
    _spy(monkeypatch, B, "shift_margin", margins)
    _spy(monkeypatch, ops, "shifted_cholesky_info_reference", tests)
    exact = torch.linalg.svdvals(_explicit(conv, shape))[0].item()
    ub = B.dense_cholesky_bound(conv, shape, lower=exact * 0.999, rtol=1e-3)
    assert len(margins) == len(tests) >= 1
    for ((n, e, mu2, u), _), ((_, shift), _) in zip(margins, tests):
        assert (n, e, u) == (D, err, U64)
        assert err / mu2 > 100 * U64  # so that dropping err would show below
        assert float(shift[0]) <= mu2 * (1 - _shift_margin_by_hand(D, err, mu2, U64)) * (1 + 2 * U64)
    (_, _, mu2, _), _ = margins[-1]
    assert exact <= ub and ub >= math.sqrt(mu2) * (1 + 3 * U64)


def test_nonfinite_dense_weight_is_an_error_naming_it():
    with pytest.raises(ValueError, match="2-D weight has non-finite"):
        B.operator_norm_bounds(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="nn.Linear's weight has non-finite"):
        B.operator_norm_bounds(lin)
    with pytest.raises(ValueError, match="non-finite"):
        B.gram_upper_bound(torch.full((2, 2), float("nan")))


def test_circular_gram_bound_applies_the_iteration_factor_and_the_block_error(monkeypatch):
    """Inflating the two margins by known amounts moves the bound by those amounts: each is
    applied (the rounding they stand for is far too small for a black-box test to see)."""
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    w = w / w.abs().max() * 0.75  # no power-of-two scaling
    base = B.circular_gram_bound(w, (8,), n_iter=3)
    real_factor, real_delta = B.gram_iteration_factor, B.block_rounding_error
    monkeypatch.setattr(B, "gram_iteration_factor", lambda *a, **k: real_factor(*a, **k) * (1 + 1e-3))
    assert B.circular_gram_bound(w, (8,), n_iter=3) == pytest.approx(base * (1 + 1e-3), rel=1e-6, abs=0)
    monkeypatch.setattr(B, "gram_iteration_factor", real_factor)
    monkeypatch.setattr(B, "block_rounding_error", lambda *a, **k: real_delta(*a, **k) + 0.5)
    assert B.circular_gram_bound(w, (8,), n_iter=3) == pytest.approx(base + 0.5, rel=1e-6, abs=0)


def test_schur_and_dense_gram_roundings_are_the_derived_ones():
    """Integer weights make the abs-sums exact: the Schur bound is sqrt(s0 s1) / (1 -
    gamma_{n0+n1+4}) and, for a 1x1 conv on one pixel (T = 1, one pixel pair), the dense
    Gram's rounding bound is gamma_{C_out+1} x the Schur product / (1 - gamma_{T (C_in+C_out)+4})."""
    g = torch.Generator().manual_seed(9)
    conv = nn.Conv2d(10, 30, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-3, 4, conv.weight.shape, generator=g).double())
    a = conv.weight.abs()
    s0, s1 = float(a.flatten(1).sum(1).max()), float(a.transpose(0, 1).flatten(1).sum(1).max())
    n0, n1 = 10 * 9, 30 * 9
    assert B.schur_conv_bound(conv) == pytest.approx(math.sqrt(s0 * s1) / (1 - _gamma_by_hand(n0 + n1 + 4, U64)),
                                                     rel=1e-15, abs=0)
    one = nn.Conv2d(10, 30, 1, bias=False).double()
    with torch.no_grad():
        one.weight.copy_(torch.randint(-3, 4, one.weight.shape, generator=g).double())
    a = one.weight.abs().flatten(1)
    rows, cols = float(a.sum(1).max()), float(a.sum(0).max())
    _, err = B.dense_operator_gram(one, (10, 1, 1))  # input side: inner dimension C_out = 30, one term
    expect = _gamma_by_hand(30 + 1, U64) * rows * cols / (1 - _gamma_by_hand(10 + 30 + 4, U64))
    assert err == pytest.approx(expect, rel=1e-15, abs=0)
