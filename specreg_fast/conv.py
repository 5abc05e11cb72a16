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
from math import nan
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class _Geometry:
    """How to apply one conv layer's map, its adjoint and its weight-gradient with plain
    conv calls: non-zero padding modes (and 'same') become an explicit pad followed by an
    unpadded conv, whose adjoint is the conv's input-gradient followed by the pad's adjoint."""

    def __init__(self, spec: ConvSpec):
        self.spec = spec
        d = self.d = spec.ndim
        self.conv = [F.conv1d, F.conv2d, F.conv3d][d - 1]
        self.convt = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][d - 1]
        self.pre_pad = None
        self.conv_pad = spec.padding
        if not spec.transposed and (spec.padding_mode != "zeros" or isinstance(spec.padding, str)):
            rp = spec._module()._reversed_padding_repeated_twice
            self.pre_pad = tuple(int(p) for p in rp)
            self.pad_mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
            self.conv_pad = (0,) * d
        shp = list(spec.input_shape[1:])
        if self.pre_pad is not None:
            for i in range(d):  # pre_pad is last-dim first: (left_d-1, right_d-1, left_d-2, ...)
                shp[d - 1 - i] += self.pre_pad[2 * i] + self.pre_pad[2 * i + 1]
        self.padded_spatial = tuple(shp)

    def apply(self, x, w):
        sp = self.spec
        if sp.transposed:
            return self.convt(x, w, None, sp.stride, sp.padding, sp.output_padding, sp.groups, sp.dilation)
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return self.conv(x, w, None, sp.stride, self.conv_pad, sp.dilation, sp.groups)

    def adjoint(self, y, w):
        sp = self.spec
        if sp.transposed:
            return self.conv(y, w, None, sp.stride, sp.padding, sp.dilation, sp.groups)
        k = w.shape[2:]
        op = tuple(self.padded_spatial[i] - ((y.shape[2 + i] - 1) * sp.stride[i] - 2 * self.conv_pad[i]
                                             + sp.dilation[i] * (k[i] - 1) + 1) for i in range(self.d))
        g = self.convt(y, w, None, sp.stride, self.conv_pad, op, sp.groups, sp.dilation)
        if self.pre_pad is None:
            return g
        # adjoint of the padding map (crop, wrap-around fold, or reflect/replicate scatter)
        z = torch.zeros((y.shape[0],) + tuple(sp.input_shape), dtype=g.dtype, device=g.device, requires_grad=True)
        with torch.enable_grad():
            padded = F.pad(z, self.pre_pad, mode=self.pad_mode)
        return torch.autograd.grad(padded, z, g)[0]

    def weight_grad(self, x, y, w):
        """d<y, A(w) x>/dw: the conv weight-gradient with input x and output-gradient y."""
        sp = self.spec
        if sp.transposed:
            return torch.ops.aten.convolution_backward(y, x, w, None, sp.stride, sp.padding, sp.dilation, True,
                                                       sp.output_padding, sp.groups, [False, True, False])[1]
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return torch.ops.aten.convolution_backward(y, x, w, None, sp.stride, self.conv_pad, sp.dilation, False,
                                                   (0,) * self.d, sp.groups, [False, True, False])[1]


class _ConvSigma(torch.autograd.Function):
    """sigma = <y, A(W) x> with x, y held fixed: backward is the conv weight-gradient.
    ``value`` may carry sigma already computed by the power step (||A^T y|| at the new x,
    equal to <y, A x> in exact arithmetic), which saves one conv per call."""

    @staticmethod
    def forward(ctx, weight, geom, x, y, value):
        ctx.geom, ctx.wdtype = geom, weight.dtype
        ctx.save_for_backward(weight, x, y)
        if value is not None:
            return value.detach().clone()
        with torch.no_grad():
            return (y * geom.apply(x[None], weight.detach().to(x.dtype))[0]).sum()

    @staticmethod
    def backward(ctx, g):
        weight, x, y = ctx.saved_tensors
        gw = ctx.geom.weight_grad(x[None], (y * g.to(y.dtype))[None], weight.detach().to(x.dtype))
        return gw.to(ctx.wdtype), None, None, None, None


def _power_steps(geom: _Geometry, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int,
                 tol: Optional[float]):
    """``steps`` power steps in place on (x, y); returns the estimate at the new vectors
    (``||A^T y_new||``), or None if no step ran. Zero operator: vectors kept, estimate 0;
    non-finite weight: vectors back to their values before the call, estimate NaN."""
    x0, y0 = x.clone(), y.clone()
    est = None
    with torch.no_grad():
        for it in range(steps):
            tiny = torch.finfo(x.dtype).tiny  # a zero operator gives 0/tiny = 0, not NaN
            ax = geom.apply(x[None], w)[0]
            tn = torch.linalg.vector_norm(ax)
            ax = ax / tn.clamp_min(tiny)
            aty = geom.adjoint(ax[None], w)[0]
            an = torch.linalg.vector_norm(aty)
            ok = (tn > 0) & (an > 0)
            y.copy_(torch.where(ok, ax, y))
            x.copy_(torch.where(ok, aty / an.clamp_min(tiny), x))
            finite = torch.isfinite(tn) & torch.isfinite(an)
            prev, est = est, torch.where(finite, torch.where(ok, an, torch.zeros_like(an)), torch.full_like(an, nan))
            if tol is not None and prev is not None and bool(torch.abs(est - prev) <= tol * est):
                break
        if est is not None:
            bad = ~torch.isfinite(est)
            x.copy_(torch.where(bad, x0, x))
            y.copy_(torch.where(bad, y0, y))
    return est


def conv_operator_norms(specs: Sequence[ConvSpec], state: ConvState, n_iter: int = 1, tol: Optional[float] = None,
                        max_iter: Optional[int] = None, *, update: bool = True,
                        names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """sigma_max estimates of the conv operators ``specs`` (differentiable in each
    ``spec.weight``), after ``n_iter`` power steps (or until a relative change ``tol``,
    at most ``max_iter`` steps) that update ``state`` in place. Returns a 1-D float32
    tensor (float64 if any weight is float64).

    A step is one conv and one adjoint (conv_transpose, plus the padding map's adjoint for
    non-zero padding modes); sigma = <y, A x> at the new vectors, equal to ||A^T y||, is
    read off the step, so the forward costs no extra conv and the backward is one conv
    weight-gradient per layer.
    """
    specs = list(specs)
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    _validate(specs, state, names)
    steps = (n_iter if tol is None else (max_iter or 100)) if update else 0
    out_dtype = torch.float64 if any(s.weight.dtype == torch.float64 for s in specs) else torch.float32
    sig = []
    for l, spec in enumerate(specs):
        geom = _Geometry(spec)
        x, y = state.xs[l], state.ys[l]
        w = spec.weight.detach().to(x.dtype)
        est = _power_steps(geom, w, x, y, steps, tol) if steps > 0 else None
        sig.append(_ConvSigma.apply(spec.weight, geom, x, y, est).to(out_dtype))
    if not sig:
        return torch.zeros(0)
    return torch.stack(sig)


def conv_operator_norm(module: nn.Module, input_shape: Sequence[int], tol: float = 1e-6, max_iter: int = 2000,
                       seed: int = 0) -> torch.Tensor:
    """Stateless operator norm of one conv module at ``input_shape`` (``(C_in, *spatial)``)."""
    spec = ConvSpec.from_module(module, input_shape)
    st = init_conv_state([spec], generator=torch.Generator().manual_seed(seed))
    return conv_operator_norms([spec], st, tol=tol, max_iter=max_iter)[0]
