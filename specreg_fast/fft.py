"""The paper's conv norm (``method="fft"``): the exact operator norm of a conv with circular
(wrap-around) padding, from its Fourier-domain blocks (one complex
``C_out x (C_in * prod(stride))`` block per frequency; see
:func:`specreg_fast.reference.circular_transfer_blocks`).

Public API: :func:`init_circular_state`, :func:`circular_conv_norms`,
:func:`to_circular_padding`. This first implementation takes the exact per-block SVD with
autograd (correct, slow); the fast batched power iteration replaces the internals without
changing the signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from . import reference as ref
from .reference import ConvSpec

__all__ = ["CircularState", "init_circular_state", "circular_conv_norms", "to_circular_padding"]


@dataclass
class CircularState:
    """Persistent per-frequency vectors, one input-shaped tensor per layer."""

    xs: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def init_circular_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None) -> CircularState:
    xs = []
    for spec in specs:
        acc = torch.float64 if spec.weight.dtype == torch.float64 else torch.float32
        xs.append(torch.randn(tuple(spec.input_shape), dtype=acc, generator=generator).to(spec.weight.device))
    return CircularState(xs)


def _check_circular(spec: ConvSpec, name: str, assume_circular: bool) -> None:
    if spec.transposed:
        raise ValueError(f"{name}: method='fft' supports ConvNd, not ConvTransposeNd")
    if spec.padding_mode != "circular" and not assume_circular:
        raise ValueError(f"{name}: method='fft' computes the norm with circular padding but the layer uses "
                         f"padding_mode={spec.padding_mode!r}; convert the model with to_circular_padding() or "
                         f"pass assume_circular=True")
    for i, (n, s) in enumerate(zip(spec.input_shape[1:], spec.stride)):
        if n % s != 0:
            raise ValueError(f"{name}: stride {s} must divide the input size {n} (spatial dim {i})")


def circular_conv_norms(specs: Sequence[ConvSpec], state: CircularState, n_iter: int = 1, *, update: bool = True,
                        assume_circular: bool = False, names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """sigma_max of each conv with wrap-around padding, differentiable in ``spec.weight``."""
    specs = list(specs)
    if len(state) != len(specs):
        raise ValueError(f"state: expected {len(specs)} vectors, one per conv, got {len(state)}")
    out = []
    for l, spec in enumerate(specs):
        name = names[l] if names is not None else f"specs[{l}]"
        _check_circular(spec, name, assume_circular)
        pad = spec.padding
        if isinstance(pad, str):  # 'same' / 'valid' only shift the phase or crop
            pad = tuple(d * (k - 1) // 2 for d, k in zip(spec.dilation, spec.weight.shape[2:])) if pad == "same" \
                else (0,) * spec.ndim
        P = ref.circular_transfer_blocks(spec.weight, spec.input_shape[1:], spec.stride, spec.dilation, pad,
                                         spec.groups)
        out.append(torch.linalg.matrix_norm(P, ord=2).max())
    if not out:
        return torch.zeros(0)
    dt = torch.float64 if any(s.weight.dtype == torch.float64 for s in specs) else torch.float32
    return torch.stack([o.to(dt) for o in out])


def to_circular_padding(model: nn.Module) -> nn.Module:
    """Switch every ConvNd of ``model`` to ``padding_mode='circular'`` in place (as the
    paper's experiments do). This changes the model's function at the borders."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            m.padding_mode = "circular"
            if isinstance(m.padding, str):
                raise ValueError(f"{type(m).__name__} with padding={m.padding!r} cannot be switched to circular "
                                 f"padding; give a numeric padding")
            m._reversed_padding_repeated_twice = nn.modules.utils._reverse_repeat_tuple(m.padding, 2)
    return model
