"""The dense ops: ``power_step_``, ``sigma``, ``sigma_from_step`` (csrc/cpu/power_step_cpu.cpp),
and ``rank1_grad``, the gradient of their bilinear form."""
from __future__ import annotations

import math
from typing import List

import torch

from ..contract import WEIGHT_DTYPES, acc_dtype, out_dtype
from ..power_loop import power_iterate
from ._checks import (typed_call, check_est, check_from_step, check_n_iter, check_one_device, check_writable, eager_autograd,
                      iter_arg, require, tol_arg)


def _check_dense_args(op: str, weights, us, vs) -> None:
    """Checks of ``power_step_`` / ``sigma`` / ``sigma_from_step`` (csrc/stable_contracts.h)."""
    require(len(us) == len(weights) and len(vs) == len(weights),
            lambda: f"{op}: expected as many u and v vectors as weights, got {len(weights)} weights, "
                    f"{len(us)} u, {len(vs)} v")
    check_one_device(op, (("weights", weights), ("us", us), ("vs", vs)))
    for l, W in enumerate(weights):
        u, v = us[l], vs[l]
        require(W.dim() == 2, lambda: f"{op}: weights[{l}] must be 2-D, got shape {tuple(W.shape)}")
        require(W.dtype in WEIGHT_DTYPES,
                lambda: f"{op}: weights[{l}] must be float32/float64/bfloat16/float16, got {W.dtype}", TypeError)
        require(u.dim() == 1 and u.shape[0] == W.shape[0],
                lambda: f"{op}: us[{l}] must have shape ({W.shape[0]},), got {tuple(u.shape)}")
        require(v.dim() == 1 and v.shape[0] == W.shape[1],
                lambda: f"{op}: vs[{l}] must have shape ({W.shape[1]},), got {tuple(v.shape)}")
        acc = acc_dtype(W.dtype)
        require(u.dtype == acc and v.dtype == acc,
                lambda: f"{op}: us[{l}] and vs[{l}] must be {acc} for a {W.dtype} weight, got {u.dtype} "
                        f"and {v.dtype}", TypeError)
        require(u.is_contiguous() and v.is_contiguous(),
                lambda: f"{op}: us[{l}]/vs[{l}] must be contiguous")


def _check_power_step_args(op: str, weights, us, vs, n_iter, tol) -> None:
    _check_dense_args(op, weights, us, vs)
    check_n_iter(op, n_iter)
    require(tol >= 0, lambda: f"{op}: tol must be >= 0, got {tol}")


# ----------------------------------------------------------------------------- reference kernels
def power_step_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int,
                         tol: float) -> torch.Tensor:
    """Reference kernel of ``power_step_`` for any device: the per-layer loop of the PyTorch
    reference (:func:`specreg_fast.power_loop.power_iterate`), with the op's conventions (zero
    W keeps the vectors, non-finite W rolls them back) expressed with ``torch.where`` so no
    host synchronization is needed."""
    _check_power_step_args("specreg_fast::power_step_", weights, us, vs, n_iter, tol)
    out = torch.zeros(len(weights), dtype=out_dtype(weights),
                      device=weights[0].device if weights else "cpu")
    with torch.no_grad():
        for l, (W, u, v) in enumerate(zip(weights, us, vs)):
            Wf = W.to(u.dtype)
            u0, v0 = u.clone(), v.clone()
            est = power_iterate(lambda x: Wf @ x, lambda t: Wf.t() @ t, u, v, n_iter, tol)
            if n_iter == 0:
                est = u @ Wf @ v
            bad = ~torch.isfinite(Wf).all() if W.numel() else torch.zeros((), dtype=torch.bool, device=W.device)
            u.copy_(torch.where(bad, u0, u))
            v.copy_(torch.where(bad, v0, v))
            out[l] = torch.where(bad, torch.full_like(est, math.nan), est).to(out.dtype)
    return out


def sigma_reference(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    _check_dense_args("specreg_fast::sigma", weights, us, vs)
    dt = out_dtype(weights)
    if not weights:
        return torch.zeros(0, dtype=dt)
    return torch.stack([(u @ W.to(u.dtype) @ v).to(dt) for W, u, v in zip(weights, us, vs)])


# ----------------------------------------------------------------------------- registration
@torch.library.register_fake("specreg_fast::power_step_")
def _power_step_fake(weights, us, vs, n_iter, tol):
    _check_power_step_args("specreg_fast::power_step_", weights, us, vs, n_iter, tol)
    dev = weights[0].device if weights else torch.device("cpu")
    return weights[0].new_empty(len(weights), dtype=out_dtype(weights)) if weights else torch.empty(
        0, dtype=torch.float32, device=dev)


@torch.library.register_fake("specreg_fast::sigma")
def _sigma_fake(weights, us, vs):
    _check_dense_args("specreg_fast::sigma", weights, us, vs)
    if not weights:
        return torch.empty(0, dtype=torch.float32)
    return weights[0].new_empty(len(weights), dtype=out_dtype(weights))


torch.library.impl("specreg_fast::power_step_", "CompositeExplicitAutograd")(power_step_reference)
torch.library.impl("specreg_fast::sigma", "CompositeExplicitAutograd")(sigma_reference)


def _sigma_setup_context(ctx, inputs, output):
    weights, us, vs = inputs
    # Copies, not the vectors: they are persistent state that the next power step rewrites in
    # place (without a version bump), so a second call before backward() (summed micro-batch
    # losses, a logging call) would hand this backward the later vectors. As torch's own
    # spectral_norm does; the vectors are small next to the u v^T the backward writes.
    ctx.save_for_backward(*[u.clone() for u in us], *[v.clone() for v in vs])
    ctx.n = len(weights)
    ctx.w_meta = [(w.dtype, w.shape) for w in weights]


def _sigma_backward(ctx, grad):
    # d(u^T W v)/dW = u v^T (exact for the bilinear form with u, v held fixed; at a
    # converged power iteration it is d sigma_max / dW).
    n = ctx.n
    saved = ctx.saved_tensors
    us, vs = saved[:n], saved[n:]
    grads = [rank1_grad(us[l], vs[l], grad[l], ctx.w_meta[l][0]) for l in range(n)]
    return grads, [None] * n, [None] * n


def rank1_grad(left: torch.Tensor, right: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * left right^T`` in ``dtype``: the gradient of a bilinear form ``left^T W right``."""
    # scale the short vector, not the outer product: one m x n write per layer
    # (a rank-1 mm, not torch.outer: outer's broadcast multiply splits the fresh, page-
    # faulting output across threads and measured 7x slower on the loaded 2-core machine,
    # 3 x 1024x1024: 48 ms vs 6.9 ms with 2 threads; equal with 1 thread)
    return torch.mm((left * g.to(left.dtype)).unsqueeze(1), right.unsqueeze(0)).to(dtype)


torch.library.register_autograd("specreg_fast::sigma", _sigma_backward, setup_context=_sigma_setup_context)


# sigma_from_step: the forward value is power_step_'s estimate (no second read of W), the
# backward that of sigma. One implementation for every device.
@torch.library.register_fake("specreg_fast::sigma_from_step")
def _sigma_from_step_fake(weights, us, vs, est):
    _check_dense_args("specreg_fast::sigma_from_step", weights, us, vs)
    check_est("specreg_fast::sigma_from_step", est, weights)
    return torch.empty_like(est)


@torch.library.impl("specreg_fast::sigma_from_step", "CompositeExplicitAutograd")
def _sigma_from_step_impl(weights, us, vs, est):
    _sigma_from_step_fake(weights, us, vs, est)  # the kernels' checks, where they are not loaded
    return est.clone()


def _sigma_from_step_setup_context(ctx, inputs, output):
    weights, us, vs, _ = inputs
    _sigma_setup_context(ctx, (weights, us, vs), output)


def _sigma_from_step_backward(ctx, grad):
    gw, gu, gv = _sigma_backward(ctx, grad)
    return gw, gu, gv, None


torch.library.register_autograd("specreg_fast::sigma_from_step", _sigma_from_step_backward,
                                setup_context=_sigma_from_step_setup_context)


# ----------------------------------------------------------------------------- eager autograd
# In eager mode the typed wrappers below route the two ``*_from_step`` ops through these
# autograd.Functions: the same value (a copy of the step's estimate) and the same backward
# helpers as the registered autograd, without torch.library's per-call wrapping of a
# Python-registered autograd (pytree flattening of the tensor lists, default filling,
# redispatch): on one 512x512 layer here the op's forward took 63-109 us against 12-16 us for
# the Function, and forward + backward 0.39-0.59 ms against 0.23-0.33 ms, where the power
# step itself takes ~35 us. Under torch.compile, and for torch.ops callers,
# the registered op and its autograd are used as before (tests check both routes agree).
# (forward(ctx, ...) style: a separate setup_context makes every apply bind the signature
# through inspect, ~40 us here.)
class _SigmaFromStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, est, us, vs, *weights):
        _sigma_setup_context(ctx, (weights, us, vs), None)
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        gw, _, _ = _sigma_backward(ctx, grad)
        return (None, None, None, *gw)


# ----------------------------------------------------------------------------- typed wrappers
def power_step_(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                tol: float = 0.0) -> torch.Tensor:
    """Run ``n_iter`` grouped power-iteration steps in place on ``us``/``vs``; returns the
    detached estimates ``u^T W v`` at the new vectors. See ``csrc/specreg_fast.cpp``."""
    op = "specreg_fast::power_step_"
    us, vs = list(us), list(vs)
    check_writable(op, "us", us)
    check_writable(op, "vs", vs)
    return typed_call(torch.ops.specreg_fast.power_step_, (list(weights), us, vs, iter_arg(op, "n_iter", n_iter),
                                                           tol_arg(op, tol, finite=False)),
                      lambda w, u, v, n, t: _check_power_step_args(op, w, u, v, n, t))


def sigma(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor]) -> torch.Tensor:
    """``u_l^T W_l v_l`` for each layer, differentiable in the weights (gradient ``u v^T``)."""
    return typed_call(torch.ops.specreg_fast.sigma, (list(weights), list(us), list(vs)),
                      lambda w, u, v: _check_dense_args("specreg_fast::sigma", w, u, v))


def sigma_from_step(weights: List[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                    est: torch.Tensor) -> torch.Tensor:
    """``sigma`` whose value is ``est``, the return of the ``power_step_`` (n_iter >= 1) that
    left ``us``/``vs`` as they are: equal to ``u^T W v`` to float rounding without reading W."""
    if eager_autograd(weights):
        check_from_step(weights, us, vs, est)
        return _SigmaFromStep.apply(est, list(us), list(vs), *weights)
    op = "specreg_fast::sigma_from_step"

    def check(w, u, v, e):
        _check_dense_args(op, w, u, v)
        check_est(op, e, w)

    return typed_call(torch.ops.specreg_fast.sigma_from_step, (list(weights), list(us), list(vs), est), check)
