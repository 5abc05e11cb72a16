"""Certified brackets against exact norms (SVD of explicit operators)."""
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
    with pytest.raises(ValueError, match="reflect"):
        B.conv_upper_bound(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5, 5))
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
        ub = B.conv_upper_bound(conv, shape, n_iter=t)
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
