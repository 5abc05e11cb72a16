"""Operator norms of convolutions (``method="operator"``): the true linear map x -> conv(x)
with the layer's own stride, padding, dilation, groups and padding mode, at the input size
the layer sees. ConvNd and ConvTransposeNd, 1-D to 3-D.

State per layer: the persistent input-shaped vector ``x`` and output-shaped ``y`` of the
power iteration. ``sigma = <y, A(W) x>`` is differentiable in W with gradient the conv
weight-gradient of (x, y); no autograd through the iterations.

The functions below are the package's public conv API. Their first implementation runs the
plain-PyTorch reference loop per layer; the fast grouped C++ op replaces the internals
without changing the signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from . import reference as ref
from .reference import ConvSpec

__all__ = ["ConvSpec", "ConvState", "init_conv_state", "conv_operator_norms", "conv_operator_norm"]


@dataclass
class ConvState:
    """Persistent power-iteration vectors of each conv layer: ``xs[l]`` input-shaped
    ``(C_in, *spatial)``, ``ys[l]`` output-shaped; float32 (float64 for float64 weights)."""

    xs: List[torch.Tensor] = field(default_factory=list)
    ys: List[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.xs)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _spec_acc(spec: ConvSpec) -> ConvSpec:
    return ConvSpec(**{**spec.__dict__, "weight": spec.weight.detach().to(_acc(spec.weight.dtype))})


def init_conv_state(specs: Sequence[ConvSpec], generator: Optional[torch.Generator] = None) -> ConvState:
    """Random unit input vectors and the matching normalized outputs."""
    xs, ys = [], []
    for spec in specs:
        acc = _acc(spec.weight.dtype)
        x = torch.randn(tuple(spec.input_shape), dtype=acc, generator=generator).to(spec.weight.device)
        x = x / torch.linalg.vector_norm(x)
        with torch.no_grad():
            y = ref.conv_apply(_spec_acc(spec), x[None])[0]
        y = y / torch.linalg.vector_norm(y).clamp_min(torch.finfo(acc).tiny)
        xs.append(x)
        ys.append(y)
    return ConvState(xs, ys)


def _validate(specs: Sequence[ConvSpec], state: ConvState, names=None) -> None:
    if len(state.xs) != len(specs) or len(state.ys) != len(specs):
        raise ValueError(f"state: expected {len(specs)} (x, y) pairs, one per conv, got {len(state.xs)} x and "
                         f"{len(state.ys)} y")
    for l, spec in enumerate(specs):
        name = names[l] if names is not None else f"specs[{l}]"
        if not isinstance(spec, ConvSpec):
            raise TypeError(f"{name}: expected a ConvSpec, got {type(spec).__name__}")
        acc = _acc(spec.weight.dtype)
        x, y = state.xs[l], state.ys[l]
        if tuple(x.shape) != tuple(spec.input_shape):
            raise ValueError(f"{name}: state x must have the input shape {tuple(spec.input_shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != acc or y.dtype != acc:
            raise ValueError(f"{name}: state x/y must be {acc} for a {spec.weight.dtype} weight, got {x.dtype}/{y.dtype}")
        if x.device != spec.weight.device or y.device != spec.weight.device:
            raise ValueError(f"{name}: state x/y must be on {spec.weight.device}")


class _ConvSigma(torch.autograd.Function):
    """sigma = <y, A(W) x> with x, y held fixed: backward is the conv weight-gradient."""

    @staticmethod
    def forward(ctx, weight, spec, x, y):
        ctx.spec, ctx.wdtype = spec, weight.dtype
        ctx.save_for_backward(x, y)
        with torch.no_grad():
            s = (y * ref.conv_apply(_spec_acc(spec), x[None])[0]).sum()
        return s

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        spec = ctx.spec
        w = spec.weight.detach().to(x.dtype).requires_grad_(True)
        with torch.enable_grad():
            s = (y * ref.conv_apply(ConvSpec(**{**spec.__dict__, "weight": w}), x[None])[0]).sum()
            (gw,) = torch.autograd.grad(s, w)
        return (gw * g).to(ctx.wdtype), None, None, None


def conv_operator_norms(specs: Sequence[ConvSpec], state: ConvState, n_iter: int = 1, tol: Optional[float] = None,
                        max_iter: Optional[int] = None, *, update: bool = True,
                        names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """sigma_max estimates of the conv operators ``specs`` (differentiable in each
    ``spec.weight``), after ``n_iter`` power steps (or until a relative change ``tol``,
    at most ``max_iter`` steps) that update ``state`` in place. Returns a 1-D float32
    tensor (float64 if any weight is float64)."""
    specs = list(specs)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    _validate(specs, state, names)
    steps = n_iter if tol is None else (max_iter or 100)
    out_dtype = torch.float64 if any(s.weight.dtype == torch.float64 for s in specs) else torch.float32
    sig = []
    for l, spec in enumerate(specs):
        if update and steps > 0:
            prev = None
            for _ in range(steps):
                s, y, x = ref.conv_power_iteration(spec, state.xs[l], 1)
                if torch.isfinite(s):
                    state.xs[l].copy_(x)
                    state.ys[l].copy_(y)
                if tol is not None and prev is not None and abs(s - prev) <= tol * abs(s):
                    break
                prev = s
        sig.append(_ConvSigma.apply(spec.weight, spec, state.xs[l], state.ys[l]).to(out_dtype))
    if not sig:
        return torch.zeros(0)
    return torch.stack(sig)


def conv_operator_norm(module: nn.Module, input_shape: Sequence[int], tol: float = 1e-6, max_iter: int = 2000,
                       seed: int = 0) -> torch.Tensor:
    """Stateless operator norm of one conv module at ``input_shape`` (``(C_in, *spatial)``)."""
    spec = ConvSpec.from_module(module, input_shape)
    st = init_conv_state([spec], generator=torch.Generator().manual_seed(seed))
    return conv_operator_norms([spec], st, tol=tol, max_iter=max_iter)[0]
