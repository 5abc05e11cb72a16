"""Certified brackets ``[lower, upper]`` on a layer's spectral norm.

* lower: the power-iteration value ``<y, A x>`` with unit ``x, y`` (never above the norm).
* upper, dense: Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023):
  ``sigma_1(W)^(2^t) = sigma_1(G_t)`` for ``G_{t+1} = G_t^H G_t``, and
  ``sigma_1(G_t) <= ||G_t||_F``; the rescaling is tracked in log space in float64.
* upper, circular conv (stride dividing the size): Gram iteration on its Fourier blocks
  (``fft.circular_blocks``, one per frequency of the half spectrum, batched), max over the
  blocks: ``circular_gram_bound``.
* upper, zero-padded conv (any stride): the operator at size ``n`` is a restriction of the
  circular conv at size ``N = ceil((n + pad_lo + pad_hi) / s) * s`` (zero-embed the input
  at offset ``pad_lo``: every valid output reads indices below ``N``, so nothing wraps; keep
  the valid outputs), so the circular bound at ``N`` bounds it. The circular norm at the SAME
  size does not (kernel [1, -1], n = 3: 1.732 < 1.802).
* upper, zero-padded transposed conv: the adjoint of the conv with the same weight at the
  transposed conv's output size, so the same bound there.
* otherwise (output_padding >= stride): the Schur test
  ``sqrt(max row abs-sum * max column abs-sum)`` of the operator, from the kernel (loose).
Reflect/replicate padding has no bound here (the pad map duplicates entries): ValueError.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import reference as ref

__all__ = ["gram_upper_bound", "circular_gram_bound", "conv_upper_bound", "schur_conv_bound",
           "operator_norm_bounds"]

# float64 rounding of the SVD / Gram products: a relative margin far above it
_SAFETY = 1 + 1e-9


def gram_upper_bound(W: torch.Tensor, n_iter: int = 6) -> float:
    """Certified upper bound on sigma_max of a 2-D matrix by ``n_iter`` Gram iterations."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    G = W.detach().to(torch.float64)
    if G.shape[0] < G.shape[1]:
        G = G.t()
    log_scale = 0.0
    for _ in range(n_iter):
        f = torch.linalg.matrix_norm(G, "fro").item()
        if f == 0.0:
            return 0.0
        G = G / f
        log_scale = 2.0 * (log_scale + math.log(f))
        G = G.t() @ G
    f = torch.linalg.matrix_norm(G, "fro").item()
    if f == 0.0:
        return 0.0
    return math.exp((log_scale + math.log(f)) / 2 ** n_iter) * _SAFETY


def circular_gram_bound(weight: torch.Tensor, size: Sequence[int], stride=1, dilation=1, groups: int = 1,
                        n_iter: int = 8, lower: Optional[float] = None, rtol: float = 1e-3) -> float:
    """Certified upper bound on the norm of the circular conv with ``weight`` at spatial
    ``size``: Gram iteration on every Fourier block at once (float64, per-block log-space
    rescaling), the max over blocks. Stops after ``n_iter`` iterations, or earlier once the
    bound is within ``rtol`` of ``lower`` (a known lower bound, e.g. the power iteration's).

    Blocks that cannot hold the maximum are dropped as the iteration goes: with ``G_t`` of
    size c x c, ``||G_t||_F / sqrt(c) <= sigma_1(G_t) <= ||G_t||_F``, so each block has a
    certified interval for its sigma_1 at every step, and a block whose upper end is below the
    largest lower end (or below ``lower``) is out for good. Most frequencies go after one or
    two iterations, which is what makes the bound affordable on large layers."""
    from .fft import circular_blocks

    P = circular_blocks(weight.detach().to(torch.float64), size, stride, dilation, groups)
    if P.numel() == 0:
        return 0.0
    tiny = torch.finfo(torch.float64).tiny
    floor = math.log(lower) if lower is not None and lower > 0 else -math.inf

    def fro(X):  # (through the real view: matrix_norm on complex measured 3x slower)
        return torch.linalg.vector_norm(torch.view_as_real(X), dim=(1, 2, 3))

    G = P  # G_0; G_1 is the Gram of the smaller side, P P^H or P^H P
    c = min(P.shape[1], P.shape[2])
    log_scale = torch.zeros(P.shape[0], dtype=torch.float64)
    ub = math.inf
    for t in range(n_iter + 1):
        f = fro(G)
        log_f = torch.log(f)  # -inf for a zero block: its interval is [0, 0]
        log_hi = (log_scale + log_f) / 2 ** t
        log_lo = (log_scale + log_f - 0.5 * math.log(c)) / 2 ** t
        ub = min(ub, math.exp(float(log_hi.max())) * _SAFETY)
        best_lo = max(float(log_lo.max()), floor)
        if t == n_iter or (lower is not None and ub <= lower * (1 + rtol)):
            break
        keep = log_hi >= best_lo - 1e-12
        if not bool(keep.all()):  # (indexing copies every block: only when some go)
            G, log_scale, f = G[keep], log_scale[keep], f[keep]
        f = f.clamp_min(tiny)
        G = G / f[:, None, None].to(G.dtype)
        log_scale = 2.0 * (log_scale + torch.log(f))
        if t == 0 and G.shape[1] < G.shape[2]:
            G = G @ G.mH
        else:
            G = G.mH @ G
    return ub


def schur_conv_bound(m: nn.Module) -> Optional[float]:
    """Schur-test bound of a zero-padded (transposed) conv: a row of the operator holds at most
    one output channel's taps, a column at most every output channel's taps on one input
    channel, whatever the stride; zero padding only removes entries. None for other modes."""
    if not isinstance(m, nn.modules.conv._ConvNd) or m.padding_mode != "zeros":
        return None
    # The two sums over the kernel's first two axes: for a conv one is the row bound and the
    # other the column bound; a transposed conv swaps them, and the product is the same.
    # (With groups > 1 the second sum also runs over other groups' channels: larger, still a bound.)
    a = m.weight.detach().abs().double()
    s0, s1 = a.flatten(1).sum(1).max(), a.transpose(0, 1).flatten(1).sum(1).max()
    return float(torch.sqrt(s0 * s1)) * _SAFETY


def _pads(m: nn.Module, spatial: Sequence[int]):
    d = len(spatial)
    k = m.weight.shape[2:]
    if m.padding == "valid":
        return (0,) * d, (0,) * d
    if m.padding == "same":
        total = [m.dilation[i] * (k[i] - 1) for i in range(d)]
        return tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    return tuple(m.padding), tuple(m.padding)


def conv_upper_bound(m: nn.Module, input_shape: Sequence[int], n_iter: int = 8, lower: Optional[float] = None,
                     rtol: float = 1e-3) -> float:
    """Certified upper bound on the operator norm of conv ``m`` at ``input_shape`` (Gram
    iteration on Fourier blocks; see the module docstring for which operator is bounded)."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        raise TypeError(f"expected a conv module, got {type(m).__name__}")
    spatial = tuple(int(s) for s in input_shape[1:])
    w = m.weight.detach().double()
    d = len(spatial)
    kw = dict(n_iter=n_iter, lower=lower, rtol=rtol)
    if m.padding_mode == "circular" and not m.transposed and all(n % s == 0 for n, s in zip(spatial, m.stride)):
        return circular_gram_bound(w, spatial, m.stride, m.dilation, m.groups, **kw)
    if m.padding_mode == "zeros":
        if m.transposed:
            # the adjoint of the conv with this weight at the transposed conv's output size
            if any(op >= s for op, s in zip(m.output_padding, m.stride)):
                return schur_conv_bound(m)
            size = [(spatial[i] - 1) * m.stride[i] - 2 * m.padding[i] + m.dilation[i] * (w.shape[2 + i] - 1)
                    + m.output_padding[i] + 1 for i in range(d)]
            lo = hi = tuple(m.padding)
        else:
            size = list(spatial)
            lo, hi = _pads(m, spatial)
        N = [-(-(size[i] + lo[i] + hi[i]) // m.stride[i]) * m.stride[i] for i in range(d)]
        return circular_gram_bound(w, N, m.stride, m.dilation, m.groups, **kw)
    raise ValueError(f"no certified upper bound for padding_mode={m.padding_mode!r}: the padding map "
                     f"duplicates entries")


def operator_norm_bounds(layer: Union[nn.Module, torch.Tensor], input_shape: Optional[Sequence[int]] = None,
                         n_iter: int = 6, power_tol: float = 1e-6) -> Tuple[float, float, float]:
    """``(lower, upper, relative gap)`` for a 2-D weight, an ``nn.Linear`` or a conv module at
    ``input_shape`` (``(C_in, *spatial)``; required for convs). For convs the Gram iteration
    on the Fourier blocks stops once the gap is below 1e-3 (at most 8 iterations)."""
    from .conv import conv_operator_norm
    from .dense import spectral_norm

    if isinstance(layer, nn.modules.conv._ConvNd):
        if input_shape is None:
            raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(layer).__name__}")
        lower = float(conv_operator_norm(layer, input_shape, tol=power_tol).detach())
        upper = conv_upper_bound(layer, input_shape, lower=lower)
    else:
        W = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise TypeError("layer must be an nn.Linear, a conv module or a 2-D tensor")
        lower = float(spectral_norm(W.detach(), tol=power_tol))
        upper = gram_upper_bound(W, n_iter)
    gap = (upper - lower) / upper if upper > 0 else 0.0
    return lower, upper, gap
