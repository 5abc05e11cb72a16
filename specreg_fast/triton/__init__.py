"""Triton backend of the dense ops (and the batched power iteration for the Fourier norms).

Modules: ``power_step`` (grouped dense power step and sigma), ``lowrank_step`` (the grouped
power step of low-rank (LoRA) maps), ``batched_power`` (power
iteration on a B x m x n stack, real or complex), ``aot`` (ahead-of-time compilation of every
kernel config, used by the tests and ``bench/triton_resource_usage.py``).

:func:`register` installs the Triton kernels as the CUDA implementation of
``specreg_fast::power_step_`` and ``specreg_fast::sigma`` when the compiled extension did not
register CUDA kernels of its own (the CUDA C++ kernels win when both exist).
``import specreg_fast`` calls it (through ``specreg_fast.backends.register_triton_for_cuda``) when
CUDA is available.
"""
from __future__ import annotations

import os
from typing import List

import torch

from ..fallback import warn_reference_fallback

_REGISTERED: List[str] = []


def _fix_interpreter_scalar_index() -> None:
    """Triton <= 3.6's interpreter holds a scalar as a 1-element array and converts it to a
    loop bound with ``int(array)``, which NumPy refuses for arrays of ndim > 0 (seen with
    triton 3.6.0 and numpy 2.4.6): every ``range(0, n, BLOCK)`` over a loaded ``n`` raises.
    Triton 3.8 squeezes first; do the same on the older interpreters (a no-op where the
    interpreter already does it)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_specreg_fast_index_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._specreg_fast_index_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_scalar_index()


def _power_step_cuda(weights, us, vs, n_iter, tol):
    from . import power_step as ps
    from .. import ops

    if any(w.dtype == torch.float64 for w in weights):
        # fp64 has no Triton kernel: the float64 layers take the reference, the rest Triton.
        warn_reference_fallback("power_step_", "float64 weights have no Triton kernel")
        return _split_fp64(weights, us, vs, lambda w, u, v: ps.power_step_(w, u, v, n_iter, tol),
                           lambda w, u, v: ops.power_step_reference(w, u, v, n_iter, tol))
    return ps.power_step_(list(weights), list(us), list(vs), n_iter, tol)


def _sigma_cuda(weights, us, vs):
    from . import power_step as ps
    from .. import ops

    if any(w.dtype == torch.float64 for w in weights):
        warn_reference_fallback("sigma", "float64 weights have no Triton kernel")
        return _split_fp64(weights, us, vs, ps.sigma, ops.sigma_reference)
    return ps.sigma(list(weights), list(us), list(vs))


def _split_fp64(weights, us, vs, fast, ref):
    lo = [i for i, w in enumerate(weights) if w.dtype != torch.float64]
    hi = [i for i, w in enumerate(weights) if w.dtype == torch.float64]
    out = torch.empty(len(weights), dtype=torch.float64, device=weights[0].device)
    for idx, fn in ((lo, fast), (hi, ref)):
        if idx:
            out[idx] = fn([weights[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx]).to(torch.float64)
    return out


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", "CUDA")


def _batched_power_step_cuda(blocks, us, vs, n_iter):
    """CUDA kernel of ``specreg_fast::batched_power_step_``: the Triton batched power iteration
    for float32/complex64 (all iterations in one launch), the reference for float64/complex128."""
    from .. import ops
    from .batched_power import batched_power_iteration

    if blocks.dtype in (torch.float32, torch.complex64):
        ops.check_batched_args(blocks, us, vs, n_iter)
        return batched_power_iteration(blocks.contiguous(), us, vs, n_iter)[0]
    if blocks.dtype in (torch.float64, torch.complex128):
        warn_reference_fallback("batched_power_step_", f"{blocks.dtype} blocks have no Triton kernel")
    return ops.batched_power_step_reference(blocks, us, vs, n_iter)


def _lowrank_power_step_cuda(weights, As, Bs, scales, us, vs, n_iter, tol):
    """CUDA kernel of ``specreg_fast::lowrank_power_step_``: the Triton kernels for the maps that
    accumulate in float32, the reference for float64 maps and for ``n_iter = 0``."""
    from .. import ops
    from ..ops import lowrank_step as lr
    from . import lowrank_step as tk

    lr._check_step_args(lr.OP, weights, As, Bs, scales, us, vs, n_iter, tol)
    ops.check_disjoint_state([(f"us[{l}]", u) for l, u in enumerate(us)] + [(f"vs[{l}]", v) for l, v in enumerate(vs)])
    if not weights or n_iter == 0:
        return ops.lowrank_power_step_reference(weights, As, Bs, scales, us, vs, n_iter, tol)
    lo = [i for i, (W, A, B) in enumerate(zip(weights, As, Bs)) if lr.map_acc_dtype(W, A, B) == torch.float32]
    hi = [i for i in range(len(weights)) if i not in set(lo)]
    if hi:
        warn_reference_fallback("lowrank_power_step_", "float64 maps have no Triton kernel")
    out = torch.empty(len(weights), dtype=lr.lowrank_out_dtype(weights, As, Bs), device=weights[0].device)
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    for idx, fn in ((lo, tk.lowrank_power_step_), (hi, ops.lowrank_power_step_reference)):
        if idx:
            out[idx] = fn(pick(weights, idx), pick(As, idx), pick(Bs, idx), pick(scales, idx), pick(us, idx),
                          pick(vs, idx), n_iter, tol).to(out.dtype)
    return out


def register() -> List[str]:
    """Register the Triton kernels for the CUDA dispatch key of each dense op that has no
    CUDA kernel yet. Returns the ops registered (by this or an earlier call)."""
    for op, fn in (("power_step_", _power_step_cuda), ("sigma", _sigma_cuda),
                   ("batched_power_step_", _batched_power_step_cuda),
                   ("lowrank_power_step_", _lowrank_power_step_cuda)):
        if op in _REGISTERED or has_cuda_kernel(op):
            continue
        torch.library.register_kernel(f"specreg_fast::{op}", "cuda", fn)
        _REGISTERED.append(op)
    return list(_REGISTERED)


def registered() -> List[str]:
    return list(_REGISTERED)
