"""The low-rank (LoRA) op: ``lowrank_power_step_`` (csrc/cpu/lowrank_step_cpu.cpp), power steps on
maps ``M = W + s B A`` kept as their factors, every map of a list in one call."""
from __future__ import annotations

import math
import numbers
from typing import List, Sequence

import torch

from ..contract import WEIGHT_DTYPES, require
from ..power_loop import power_iterate
from ._checks import check_n_iter, check_one_device, check_writable, iter_arg, tol_arg, typed_call

OP = "specreg_fast::lowrank_power_step_"


def map_acc_dtype(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.dtype:
    """The dtype a map ``W + s B A`` accumulates in (and of its ``u``/``v``): float64 when any
    factor is float64, else float32 (the dtype rule of :mod:`specreg_fast.contract` applied to
    the map's promoted dtype)."""
    return torch.float64 if torch.float64 in (W.dtype, A.dtype, B.dtype) else torch.float32


def lowrank_out_dtype(weights, As, Bs) -> torch.dtype:
    return torch.float64 if any(map_acc_dtype(W, A, B) == torch.float64 for W, A, B in zip(weights, As, Bs)) \
        else torch.float32


def _check_lowrank_args(op: str, weights, As, Bs, scales, us, vs) -> None:
    """The kernel's checks (csrc/cpu/lowrank_step_cpu.cpp: check_lowrank_args), same messages."""
    L = len(weights)
    require(len(As) == L and len(Bs) == L and len(scales) == L and len(us) == L and len(vs) == L,
            lambda: f"{op}: expected one A, B, scale, u and v per weight, got {L} weights, {len(As)} As, "
                    f"{len(Bs)} Bs, {len(scales)} scales, {len(us)} us, {len(vs)} vs")
    check_one_device(op, (("weights", weights), ("As", As), ("Bs", Bs), ("us", us), ("vs", vs)))
    for l in range(L):
        W, A, B, u, v = weights[l], As[l], Bs[l], us[l], vs[l]
        require(W.dim() == 2, lambda: f"{op}: weights[{l}] must be 2-D, got shape {tuple(W.shape)}")
        for what, T in (("weights", W), ("As", A), ("Bs", B)):
            require(T.dtype in WEIGHT_DTYPES,
                    lambda: f"{op}: {what}[{l}] must be float32/float64/bfloat16/float16, got {T.dtype}", TypeError)
        require(A.dim() == 2 and A.shape[1] == W.shape[1],
                lambda: f"{op}: As[{l}] must have shape (r, {W.shape[1]}), got {tuple(A.shape)}")
        require(B.dim() == 2 and B.shape[0] == W.shape[0] and B.shape[1] == A.shape[0],
                lambda: f"{op}: Bs[{l}] must have shape ({W.shape[0]}, {A.shape[0]}), got {tuple(B.shape)}")
        require(math.isfinite(scales[l]), lambda: f"{op}: scales[{l}] must be finite, got {scales[l]}")
        require(u.dim() == 1 and u.shape[0] == W.shape[0],
                lambda: f"{op}: us[{l}] must have shape ({W.shape[0]},), got {tuple(u.shape)}")
        require(v.dim() == 1 and v.shape[0] == W.shape[1],
                lambda: f"{op}: vs[{l}] must have shape ({W.shape[1]},), got {tuple(v.shape)}")
        acc = map_acc_dtype(W, A, B)
        require(u.dtype == acc and v.dtype == acc,
                lambda: f"{op}: us[{l}] and vs[{l}] must be {acc} for map {l}, got {u.dtype} and {v.dtype}",
                TypeError)
        require(u.is_contiguous() and v.is_contiguous(), lambda: f"{op}: us[{l}]/vs[{l}] must be contiguous")


def _check_step_args(op, weights, As, Bs, scales, us, vs, n_iter, tol) -> None:
    _check_lowrank_args(op, weights, As, Bs, scales, us, vs)
    check_n_iter(op, n_iter)
    require(tol >= 0, lambda: f"{op}: tol must be >= 0, got {tol}")


def scales_arg(op: str, scales) -> List[float]:
    """``scales`` as a list of finite floats (TypeError / ValueError naming the entry)."""
    out = []
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"{op}: scales[{i}] must be a real number, got {type(s).__name__}")
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"{op}: scales[{i}] must be finite, got {s}")
        out.append(s)
    return out


# ----------------------------------------------------------------------------- reference kernel
def lowrank_power_step_reference(weights: List[torch.Tensor], As: List[torch.Tensor], Bs: List[torch.Tensor],
                                 scales: List[float], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                                 tol: float) -> torch.Tensor:
    """Reference kernel of ``lowrank_power_step_`` for any device: per map, the Python power loop
    (:func:`specreg_fast.power_loop.power_iterate`) on ``x -> W x + s B (A x)`` and its adjoint in
    the map's accumulation dtype, with the op's conventions (zero map: vectors kept, estimate 0;
    non-finite: vectors as before the call, NaN), without host synchronization."""
    _check_step_args(OP, weights, As, Bs, scales, us, vs, n_iter, tol)
    out = torch.zeros(len(weights), dtype=lowrank_out_dtype(weights, As, Bs),
                      device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, A, B, s, u, v) in enumerate(zip(weights, As, Bs, scales, us, vs)):
            Wf, Af, Bf = W.to(u.dtype), A.to(u.dtype), B.to(u.dtype)

            def apply(x, Wf=Wf, Af=Af, Bf=Bf, s=s):
                return Wf @ x + s * (Bf @ (Af @ x))

            def adjoint(y, Wf=Wf, Af=Af, Bf=Bf, s=s):
                return Wf.t() @ y + s * (Af.t() @ (Bf.t() @ y))

            if n_iter == 0:
                est = u @ apply(v) if W.numel() else torch.zeros((), dtype=u.dtype, device=u.device)
            else:
                est = power_iterate(apply, adjoint, u, v, n_iter, tol, rollback=True)
            out[l] = est.to(out.dtype)
    return out


# ----------------------------------------------------------------------------- registration
@torch.library.register_fake("specreg_fast::lowrank_power_step_")
def _lowrank_power_step_fake(weights, As, Bs, scales, us, vs, n_iter, tol):
    _check_step_args(OP, weights, As, Bs, scales, us, vs, n_iter, tol)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=lowrank_out_dtype(weights, As, Bs))


torch.library.impl("specreg_fast::lowrank_power_step_", "CompositeExplicitAutograd")(lowrank_power_step_reference)


# ----------------------------------------------------------------------------- typed wrapper
def lowrank_power_step_(weights: Sequence[torch.Tensor], As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                        scales: Sequence[float], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                        n_iter: int = 1, tol: float = 0.0) -> torch.Tensor:
    """Run ``n_iter`` power steps on the maps ``W_l + scales[l] Bs[l] As[l]`` in place on
    ``us``/``vs`` (one call for all maps, each step reading each ``W`` once); returns the detached
    estimates ``u^T M v`` at the new vectors (``n_iter = 0``: at the current ones). See
    ``csrc/specreg_fast.cpp``."""
    us, vs = list(us), list(vs)
    check_writable(OP, "us", us)
    check_writable(OP, "vs", vs)
    args = (list(weights), list(As), list(Bs), scales_arg(OP, scales), us, vs, iter_arg(OP, "n_iter", n_iter),
            tol_arg(OP, tol, finite=False))
    return typed_call(torch.ops.specreg_fast.lowrank_power_step_, args,
                      lambda *a: _check_step_args(OP, *a))
