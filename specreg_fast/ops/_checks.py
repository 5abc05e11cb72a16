"""Argument checks shared by the op families, and the conversions of the typed wrappers' plain
arguments (counts, tolerances, packed params)."""
from __future__ import annotations

import math
import numbers
from typing import List

import torch

from ..contract import out_dtype, require
from ._library import MAX_ITER

# ----------------------------------------------------------------------------- argument checks
# The checks of the compiled kernels (csrc/stable_contracts.h, csrc/conv_geometry.h,
# csrc/cpu/circular_conv_cpu.cpp, batched_power_cpu.cpp, shifted_cholesky_cpu.cpp), one checker
# per op family (in the family's module; the parts they share here), run by the fakes and the
# reference kernels. The fakes need them: a fake wins
# dispatch whenever one argument is a meta (or fake) tensor, so without them a call mixing meta
# and CPU tensors returned uninitialized memory and an all-meta call accepted any shape, params
# and n_iter. On top of the kernels' own checks, every tensor argument of one call must be on
# one device. Errors are ValueError/TypeError like the C++ checks (TORCH_CHECK_VALUE/_TYPE).
_INT64_MAX = 2 ** 63 - 1


def _each(name: str, value):
    """``(label, tensor)`` for an argument that is a tensor or a list of tensors."""
    if isinstance(value, (list, tuple)):
        return ((f"{name}[{i}]", t) for i, t in enumerate(value))
    return ((name, value),)


def check_one_device(op: str, named) -> None:
    """``named``: ``(name, tensor or list of tensors)`` pairs; all on the first one's device."""
    first = None
    for name, value in named:
        for where, t in _each(name, value):
            if first is None:
                first = (where, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{op}: every tensor argument must be on one device: {where} is on {t.device}, "
                                 f"{first[0]} on {first[1]}")


def check_n_iter(op: str, n_iter) -> None:
    require(0 <= n_iter <= MAX_ITER, lambda: f"{op}: n_iter must be in [0, {MAX_ITER}] (specreg_fast.ops.MAX_ITER), "
                                             f"got {n_iter}")


def check_est(op: str, est, weights) -> None:
    require(est.dim() == 1 and est.shape[0] == len(weights),
            lambda: f"{op}: est must hold one estimate per layer, shape ({len(weights)},), got "
                    f"shape {tuple(est.shape)}")  # the kernels' words (csrc/stable_contracts.h)
    want = out_dtype(weights)
    require(est.dtype == want, lambda: f"{op}: est must be {want} (the power step's dtype), got {est.dtype}", TypeError)
    if weights:
        check_one_device(op, (("weights", weights[0]), ("est", est)))


# The typed wrappers below check their plain arguments before the call, so that a bad one is a
# ValueError/TypeError naming it, not the binding's cast error (n_iter=2**63) or an internal
# assert (a conjugate view written in place).
def int_arg(op: str, name: str, value, minimum: int = 0, maximum: int = _INT64_MAX):
    """``value`` as a Python int in ``[minimum, maximum]`` (by default the schema's int64)."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= maximum:
        top = "2**63 - 1" if maximum == _INT64_MAX else f"{maximum} (specreg_fast.ops.MAX_ITER)"
        raise ValueError(f"{op}: {name} must be an int in [{minimum}, {top}], got {value}")
    return value


def iter_arg(op: str, name: str, value, minimum: int = 0):
    """An iteration count (``n_iter``, ``max_iter``): an int in ``[minimum, MAX_ITER]``."""
    return int_arg(op, name, value, minimum, MAX_ITER)


def tol_arg(op: str, tol, finite: bool) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"{op}: tol must be a real number, got {type(tol).__name__}")
    try:
        value = float(tol)
    except OverflowError:  # an int beyond float's range
        value = math.copysign(math.inf, tol)
    if not (value >= 0 and (math.isfinite(value) or not finite)):
        raise ValueError(f"{op}: tol must be {'finite and ' if finite else ''}>= 0, got {tol}")
    return value


def params_arg(op: str, params) -> List[int]:
    params = list(params)
    # (C-level passes first: the penalty hands a conv net's whole packing every step)
    if set(map(type, params)) <= {int} and -_INT64_MAX - 1 <= min(params, default=0) \
            and max(params, default=0) <= _INT64_MAX:
        return params
    return [int_arg(op, f"params[{i}]", p, -_INT64_MAX - 1) for i, p in enumerate(params)]


def modes_arg(op: str, modes) -> List[str]:
    modes = list(modes)
    for i, m in enumerate(modes):
        if not isinstance(m, str):
            raise TypeError(f"{op}: padding_modes[{i}] must be a str, got {type(m).__name__}")
    return modes


def check_writable(op: str, name: str, value) -> None:
    """Arguments written in place must own their values: a conjugate or negative view (``z.conj()``,
    ``z.conj().imag``) would be written through a temporary copy (PyTorch asserts)."""
    tensors = value if isinstance(value, (list, tuple)) else (value,)
    if torch.compiler.is_compiling() or not any(isinstance(t, torch.Tensor) and (t.is_conj() or t.is_neg())
                                                for t in tensors):
        return
    for where, t in _each(name, value):
        if isinstance(t, torch.Tensor) and (t.is_conj() or t.is_neg()):
            raise ValueError(f"{op}: {where} is a conjugate or negative view (z.conj(), z.conj().imag) and is "
                             f"written in place; pass a tensor that owns its values (.resolve_conj() copies)")


def check_written_apart(op: str, groups) -> None:
    """The kernels' check that a tensor the op writes shares no memory with any other argument
    (csrc/stable_contracts.h, MemoryArgsStable), for the reference kernels: ``groups`` are
    ``(name, tensors, written)``; the same ValueError message. Eager only (no memory while
    torch.compile traces, nor on meta tensors)."""
    if torch.compiler.is_compiling():
        return
    spans = []
    for what, ts, written in groups:
        for i, t in enumerate(ts):
            if t.numel() == 0 or t.device.type == "meta":
                continue
            extent = 1 + sum((k - 1) * st for k, st in zip(t.shape, t.stride()))
            begin = t.data_ptr()
            spans.append((begin, begin + extent * t.element_size(), what, i, written))
    spans.sort(key=lambda sp: sp[0])
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            if spans[b][0] >= spans[a][1]:
                break
            if spans[a][4] or spans[b][4]:
                raise ValueError(f"{op}: {spans[a][2]}[{spans[a][3]}] and {spans[b][2]}[{spans[b][3]}] share memory, "
                                 f"and the op writes one of them in place; pass separate tensors")


def check_disjoint_state(named) -> None:
    """Raise ``ValueError`` naming the entries when two persistent vectors of one call share
    memory (the same tensor as a layer's u and v, one tensor in two layers, overlapping views):
    each is written in place, so one would overwrite the other. ``named``: ``(label, tensor)``
    pairs. Eager only (memory is not visible while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    by_storage: dict = {}
    for label, t in named:
        n = t.numel()
        if n == 0:
            continue
        span = n if t.is_contiguous() else sum((k - 1) * st for k, st in zip(t.shape, t.stride())) + 1
        lo = t.storage_offset() * t.element_size()
        hi = lo + span * t.element_size()
        spans = by_storage.setdefault((t.device, t.untyped_storage()._cdata), [])
        for other, olo, ohi in spans:
            if lo < ohi and olo < hi:
                raise ValueError(f"{label} shares memory with {other}: every persistent vector must be its own "
                                 f"tensor (each is written in place)")
        spans.append((label, lo, hi))


def eager_autograd(weights) -> bool:
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(w, torch.Tensor) and w.requires_grad for w in weights))


def check_from_step(weights, xs, ys, est):
    # what the op's schema and fake check, for the eager route (which bypasses them)
    if not (len(xs) == len(weights) == len(ys)):
        raise ValueError(f"weights and the two vector lists must have the same length, got {len(weights)}, "
                         f"{len(xs)}, {len(ys)}")
    if not isinstance(est, torch.Tensor) or est.shape != (len(weights),):
        raise ValueError(f"est must hold one estimate per layer, shape ({len(weights)},), got "
                         f"{getattr(est, 'shape', type(est).__name__)}")


def typed_call(fn, args, check):
    """``fn(*args)``, with the typed errors of the front. The kernels of specreg_fast._C are built
    on the LibTorch stable ABI, whose errors all reach Python as RuntimeError; when one of their
    argument checks fails (a message ``specreg_fast::<op>: ...``), ``check(*args)`` (the same
    checks in Python, the fakes') raises the ValueError/TypeError naming the argument, and a
    check it does not repeat (memory shared by written vectors) becomes a ValueError with the
    kernel's message. An interrupt stays a RuntimeError. Free on success: nothing runs before
    the call."""
    if torch.compiler.is_compiling():  # the fakes run the checks
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as err:
        msg = str(err)
        if not msg.startswith("specreg_fast::") or "interrupted (KeyboardInterrupt)" in msg:
            raise
        check(*args)
        raise ValueError(msg) from None
