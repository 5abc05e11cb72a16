"""The warning given when a fast kernel hands (part of) a call to the plain-PyTorch reference
kernel (the Triton kernels have none for float64 weights or float64/complex128 blocks).
Below both :mod:`specreg_fast.backends` and :mod:`specreg_fast.triton`, which use it."""
from __future__ import annotations

import warnings
from typing import Set, Tuple

__all__ = ["warn_reference_fallback"]

_FALLBACKS_WARNED: Set[Tuple[str, str]] = set()


def warn_reference_fallback(op: str, reason: str) -> None:
    """Warn, once per ``(op, reason)`` in a process, that ``specreg_fast::<op>`` runs (part of)
    a call on the plain-PyTorch reference kernel instead of the fast one, and why: a training
    loop repeats the same call, so one warning says it all."""
    if (op, reason) in _FALLBACKS_WARNED:
        return
    _FALLBACKS_WARNED.add((op, reason))
    warnings.warn(f"specreg_fast::{op}: {reason}; running the plain-PyTorch reference kernel instead (slower). "
                  f"Warned once per op and reason.", RuntimeWarning, stacklevel=3)
