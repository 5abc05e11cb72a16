"""The explicit-block op ``batched_power_step_`` (csrc/cpu/batched_power_cpu.cpp): power
iteration on every block of a (B, m, n) stack, real or complex."""
from __future__ import annotations

import torch

from ._checks import check_n_iter, check_one_device, check_writable, iter_arg, require, typed_call


def check_batched_args(blocks, us, vs, n_iter) -> None:
    """Checks of ``batched_power_step_`` (csrc/cpu/batched_power_cpu.cpp)."""
    op = "specreg_fast::batched_power_step_"
    require(blocks.dim() == 3, lambda: f"{op}: blocks must be a (B, m, n) stack, got shape "
                                       f"{tuple(blocks.shape)}")
    require(blocks.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128),
            lambda: f"{op}: blocks must be float32/float64/complex64/complex128, got {blocks.dtype}", TypeError)
    B, m, n = blocks.shape
    require(tuple(us.shape) == (B, m) and tuple(vs.shape) == (B, n),
            lambda: f"{op}: us must be ({B}, {m}) and vs ({B}, {n}), got {tuple(us.shape)} and "
                    f"{tuple(vs.shape)}")
    require(us.dtype == blocks.dtype and vs.dtype == blocks.dtype,
            lambda: f"{op}: us/vs must have the blocks' dtype {blocks.dtype}, got {us.dtype}/{vs.dtype}", TypeError)
    require(us.is_contiguous() and vs.is_contiguous(), lambda: f"{op}: us/vs must be contiguous")
    check_one_device(op, (("blocks", blocks), ("us", us), ("vs", vs)))
    check_n_iter(op, n_iter)


def batched_power_step_reference(blocks, us, vs, n_iter):
    """Reference kernel of ``batched_power_step_`` (any device), in place on us/vs."""
    check_batched_args(blocks, us, vs, n_iter)
    with torch.no_grad():
        for _ in range(n_iter):
            t = torch.einsum("bmn,bn->bm", blocks, vs)
            a = torch.einsum("bmn,bm->bn", blocks.conj(), t)
            tn = torch.linalg.vector_norm(t, dim=1, keepdim=True)
            an = torch.linalg.vector_norm(a, dim=1, keepdim=True)
            ok = (tn > 0) & (an > 0) & torch.isfinite(tn) & torch.isfinite(an)
            us.copy_(torch.where(ok, t / torch.where(ok, tn, 1), us))
            vs.copy_(torch.where(ok, a / torch.where(ok, an, 1), vs))
        return torch.linalg.vector_norm(torch.einsum("bmn,bn->bm", blocks, vs), dim=1)


@torch.library.register_fake("specreg_fast::batched_power_step_")
def _batched_power_step_fake(blocks, us, vs, n_iter):
    check_batched_args(blocks, us, vs, n_iter)
    return blocks.new_empty(blocks.shape[0], dtype=blocks.real.dtype if blocks.is_complex() else blocks.dtype)


torch.library.impl("specreg_fast::batched_power_step_", "CompositeExplicitAutograd")(batched_power_step_reference)


def _batched_power_step_lazy_view(blocks, us, vs, n_iter):
    """The kernel of the Conjugate and Negative keys, reached only when some argument is a lazy
    conj/neg view (x.conj(), torch._neg_view): PyTorch's fallback would materialize it, but for
    a written Tensor argument it stops at an internal assert. Written views get a clear error,
    the read-only blocks are materialized. (In Python: torch 2.11's stable ABI, which the
    compiled library is built on, has neither is_conj nor a typed dispatcher call.)"""
    require(not (us.is_conj() or us.is_neg() or vs.is_conj() or vs.is_neg()),
            lambda: "specreg_fast::batched_power_step_: us/vs are lazy conj/neg views (x.conj()), which the op "
                    "cannot write in place; pass x.resolve_conj()")
    return torch.ops.specreg_fast.batched_power_step_(blocks.resolve_conj().resolve_neg(), us, vs, n_iter)


for _key in ("Conjugate", "Negative"):
    torch.library.impl("specreg_fast::batched_power_step_", _key)(_batched_power_step_lazy_view)


def batched_power_step_(blocks: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, n_iter: int = 1) -> torch.Tensor:
    """``n_iter`` power steps on every block of ``blocks`` (B, m, n), in place on ``us``
    (B, m) / ``vs`` (B, n); returns ``|P_b v_b|`` per block (see ``csrc/specreg_fast.cpp``)."""
    op = "specreg_fast::batched_power_step_"
    check_writable(op, "us", us)
    check_writable(op, "vs", vs)
    return typed_call(torch.ops.specreg_fast.batched_power_step_, (blocks, us, vs, iter_arg(op, "n_iter", n_iter)),
                      check_batched_args)
