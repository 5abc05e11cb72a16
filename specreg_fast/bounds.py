"""Certified brackets ``[lower, upper]`` on a layer's spectral norm.

* lower: the power-iteration value ``<y, A x>`` with unit ``x, y`` (never above the norm).
* upper, dense: Gram iteration (Delattre, Barthelemy, Araujo & Allauzen, ICML 2023):
  ``sigma_1(W)^(2^t) = sigma_1(G_t)`` for ``G_{t+1} = G_t^T G_t``, and
  ``sigma_1(G_t) <= ||G_t||_F``; the rescaling is tracked in log space in float64.
* upper, stride-1 conv with zero padding: the zero-padded operator at size ``n`` is a
  restriction of the circular conv at size ``N = n + dilation*(k-1) + 2*padding`` (zero-embed
  the input, keep the valid outputs), so the exact circular norm at ``N`` (per-frequency SVD)
  bounds it. The circular norm at the SAME size does not (kernel [1, -1], n = 3: 1.732 <
  1.802).
* upper, circular padding at stride dividing the size: the exact circular norm itself.
* upper, other zero-padded convs (strided, transposed): the Schur test
  ``sqrt(max row abs-sum * max column abs-sum)`` of the operator, from the kernel (loose).
Reflect/replicate padding has no bound here (the pad map duplicates entries): ValueError.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import reference as ref

__all__ = ["gram_upper_bound", "conv_upper_bound", "schur_conv_bound", "operator_norm_bounds"]

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


def conv_upper_bound(m: nn.Module, input_shape: Sequence[int]) -> float:
    """Certified upper bound on the operator norm of conv ``m`` at ``input_shape``."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        raise TypeError(f"expected a conv module, got {type(m).__name__}")
    spatial = tuple(int(s) for s in input_shape[1:])
    w = m.weight.detach().double()
    if not m.transposed and not isinstance(m.padding, str):
        pad = tuple(m.padding)
        if m.padding_mode == "circular" and all(n % s == 0 for n, s in zip(spatial, m.stride)):
            return float(ref.circular_conv_sigma_exact(w, spatial, m.stride, m.dilation, pad, m.groups)) * _SAFETY
        if m.padding_mode == "zeros" and all(s == 1 for s in m.stride):
            N = tuple(n + d * (k - 1) + 2 * p for n, d, k, p in zip(spatial, m.dilation, w.shape[2:], pad))
            return float(ref.circular_conv_sigma_exact(w, N, 1, m.dilation, pad, m.groups)) * _SAFETY
    b = schur_conv_bound(m)
    if b is None:
        raise ValueError(f"no certified upper bound for padding_mode={m.padding_mode!r}: the padding map "
                         f"duplicates entries")
    return b


def operator_norm_bounds(layer: Union[nn.Module, torch.Tensor], input_shape: Optional[Sequence[int]] = None,
                         n_iter: int = 6, power_tol: float = 1e-6) -> Tuple[float, float, float]:
    """``(lower, upper, relative gap)`` for a 2-D weight, an ``nn.Linear`` or a conv module at
    ``input_shape`` (``(C_in, *spatial)``; required for convs)."""
    from .conv import conv_operator_norm
    from .dense import spectral_norm

    if isinstance(layer, nn.modules.conv._ConvNd):
        if input_shape is None:
            raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(layer).__name__}")
        lower = float(conv_operator_norm(layer, input_shape, tol=power_tol).detach())
        upper = conv_upper_bound(layer, input_shape)
    else:
        W = layer.weight if isinstance(layer, nn.Linear) else layer
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise TypeError("layer must be an nn.Linear, a conv module or a 2-D tensor")
        lower = float(spectral_norm(W.detach(), tol=power_tol))
        upper = gram_upper_bound(W, n_iter)
    gap = (upper - lower) / upper if upper > 0 else 0.0
    return lower, upper, gap
