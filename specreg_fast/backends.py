"""Backend selection for the dense power step.

``backend=`` (on :func:`power_step_` here and on ``specreg_fast.spectral_norms``) picks the
kernel that runs the no-grad power iteration:

* ``"cpp"``: the compiled C++ CPU kernel (CPU tensors).
* ``"cuda"``: the compiled CUDA C++ kernel (CUDA tensors; the extension built with CUDA).
* ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``"reference"``: the plain-PyTorch reference kernel (any device).
* ``"auto"`` (default), in this order:
    - CUDA tensors: ``cuda`` if the extension has CUDA kernels, else ``triton`` if triton
      imports, else ``reference``;
    - CPU tensors: ``cpp`` if the extension is built, else ``reference``;
    - other devices: ``reference``.

The same order is what ``torch.ops.specreg_fast.power_step_`` dispatches to: on
``import specreg_fast``, when CUDA is available and the extension has no CUDA kernel, the
Triton kernels are registered for the CUDA dispatch key (:func:`register_triton_for_cuda`);
the reference sits under CompositeExplicitAutograd for everything else.

An explicitly requested backend that cannot run raises ``ValueError`` (no silent fallback).
Where the Triton kernels (``"auto"`` on CUDA without the compiled CUDA kernels, or
``"triton"``) hand part of a call to the reference because they have no kernel for it
(float64 weights, float64/complex128 blocks), :func:`warn_reference_fallback` (defined in
:mod:`specreg_fast.fallback`, below this module and the Triton backend) warns once per
(op, reason).
"""
from __future__ import annotations

import functools
import os
from typing import List, Sequence

import torch

from . import ops
from .fallback import warn_reference_fallback

__all__ = ["BACKENDS", "available", "resolve", "power_step_", "has_triton", "register_triton_for_cuda",
           "warn_reference_fallback"]

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")


def _has_kernel(op: str, key: str) -> bool:
    return ops.HAS_CPP_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"specreg_fast::{op}", key)


def _cuda_is_ext() -> bool:
    """True when the CUDA kernel of power_step_ is the compiled extension's (not Triton's)."""
    if not _has_kernel("power_step_", "CUDA"):
        return False
    try:
        from .triton import registered
    except ImportError:
        return True
    return "power_step_" not in registered()


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> List[str]:
    """Backends (besides ``auto``) that can run on ``device``."""
    device = torch.device(device)
    out = []
    if device.type == "cpu" and _has_kernel("power_step_", "CPU"):
        out.append("cpp")
    if device.type == "cuda" and _cuda_is_ext():
        out.append("cuda")
    if has_triton() and (device.type == "cuda" or (device.type == "cpu" and _interpret())):
        out.append("triton")
    out.append("reference")
    return out


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device`` (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    avail = available(device)
    if backend == "auto":
        order = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}.get(device.type,
                                                                                            ("reference",))
        return next(b for b in order if b in avail)
    if backend not in avail:
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors here "
                         f"(available: {avail})")
    return backend


def _device(weights: Sequence[torch.Tensor]) -> torch.device:
    return weights[0].device if weights else torch.device("cpu")


def power_step_(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                tol: float = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """``specreg_fast::power_step_`` run by the chosen backend (same semantics on all)."""
    b = resolve(backend, _device(weights))
    weights, us, vs = list(weights), list(us), list(vs)
    if b == "reference":
        return ops.power_step_reference(weights, us, vs, int(n_iter), float(tol))
    if b == "triton":
        from .triton import _power_step_cuda

        return _power_step_cuda(weights, us, vs, int(n_iter), float(tol))
    # cpp / cuda: the compiled kernel behind the dispatcher (the device picks which).
    return ops.power_step_(weights, us, vs, n_iter, tol)


def register_triton_for_cuda() -> List[str]:
    """Make the Triton kernels the CUDA implementation of the dense ops when the extension
    registered none; runs once on ``import specreg_fast`` (after ``HAS_CUDA_EXT`` is set, so
    that flag keeps meaning "the compiled extension has CUDA kernels"). Only where CUDA
    tensors can exist: importing triton costs time on CPU-only machines."""
    if torch.cuda.is_available() and has_triton():
        from .triton import register

        return register()
    return []
