"""Conventions shared by the ops and the public functions, defined once: the weight dtypes
they take, the dtype the power iteration accumulates in, the dtype of the estimates, and
:func:`require`, the check that works on plain and symbolic (traced) conditions."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["WEIGHT_DTYPES", "acc_dtype", "out_dtype", "require"]

#: The weight dtypes every op and public norm function takes.
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def acc_dtype(w_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the vectors and sums for a weight of ``w_dtype``: float64 for float64,
    float32 for the others (low-precision weights are upcast)."""
    return torch.float64 if w_dtype == torch.float64 else torch.float32


def out_dtype(weights: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of a call's estimates: float64 if any weight is float64, else float32."""
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def require(cond, message, error=ValueError) -> None:
    """Raise ``error(message())`` unless ``cond``: a plain bool is tested in Python (what Dynamo
    traces in the typed wrappers), a symbolic one (dynamic shapes in a fake) by torch._check_with."""
    if isinstance(cond, bool):
        if not cond:
            raise error(message())
    else:
        torch._check_with(error, cond, message)
