"""The Cholesky test ``shifted_cholesky_info`` (csrc/cpu/shifted_cholesky_cpu.cpp) behind the
certified bounds of :mod:`specreg_fast.bounds`."""
from __future__ import annotations

import torch

from ._checks import check_one_device, require, typed_call


def _check_cholesky_args(H, shift, allow_real: bool = False) -> None:
    """Checks of ``shifted_cholesky_info`` (csrc/cpu/shifted_cholesky_cpu.cpp); ``allow_real``
    for the reference kernel, which bounds.py also runs on real float64 stacks."""
    op = "specreg_fast::shifted_cholesky_info"
    require(H.dim() == 3 and H.shape[1] == H.shape[2],
            lambda: f"{op}: H must be a (B, c, c) stack, got shape {tuple(H.shape)}")
    dtypes = (torch.complex64, torch.complex128) + ((torch.float32, torch.float64) if allow_real else ())
    require(H.dtype in dtypes, lambda: f"{op}: H must be complex64/complex128, got {H.dtype}", TypeError)
    real = H.real.dtype
    require(shift.dim() == 1 and shift.shape[0] == H.shape[0],
            lambda: f"{op}: shift must have shape ({H.shape[0]},), got {tuple(shift.shape)}")
    require(shift.dtype == real, lambda: f"{op}: shift must be {real} (the real dtype of H), got "
                                         f"{shift.dtype}", TypeError)
    check_one_device(op, (("H", H), ("shift", shift)))


def shifted_cholesky_info_reference(H, shift):
    """Reference kernel of ``shifted_cholesky_info`` (any device): LAPACK/cuSOLVER's info."""
    _check_cholesky_args(H, shift, allow_real=True)
    with torch.no_grad():
        A = torch.neg(H)
        A.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        return torch.linalg.cholesky_ex(A, upper=True).info.to(torch.int32)


@torch.library.register_fake("specreg_fast::shifted_cholesky_info")
def _shifted_cholesky_info_fake(H, shift):
    _check_cholesky_args(H, shift)
    return H.new_empty(H.shape[0], dtype=torch.int32)


torch.library.impl("specreg_fast::shifted_cholesky_info", "CompositeExplicitAutograd")(shifted_cholesky_info_reference)


def shifted_cholesky_info(H: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``info`` of the Cholesky factorization of ``shift_b I - H_b`` for each block of the
    complex stack ``H`` (B, c, c), read from its upper triangle: 0 where the matrix was found
    positive definite, else the 1-based index of the first non-positive pivot (int32; see
    ``csrc/specreg_fast.cpp``). The test behind :func:`specreg_fast.bounds.circular_cholesky_bound`."""
    if not isinstance(H, torch.Tensor) or not H.is_complex() or H.dim() != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must be a complex (B, c, c) tensor, got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not isinstance(shift, torch.Tensor) or shift.shape != (H.shape[0],) or shift.dtype != H.real.dtype:
        raise ValueError(f"shift must be a {H.real.dtype} tensor of shape ({H.shape[0]},)")
    return typed_call(torch.ops.specreg_fast.shifted_cholesky_info, (H, shift), _check_cholesky_args)
