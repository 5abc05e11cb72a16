"""The penalty on sharded weights (FSDP2 ``fully_shard`` / DTensor), with no weight gather.

Every collective of the package is in this module. A weight sharded on dim 0 (``Shard(0)``:
FSDP2, ``ColwiseParallel``) holds rows ``W_r`` on rank ``r``. One power step of the
single-process op (``t = W v``, ``u = t/|t|``, ``a = W^T t``, ``v = a/|a|``, estimate
``|a|/|t|``) is, on the shards,

    t = sum_r [0, .., W_r v, .., 0]      (each rank writes its rows into a zero m-vector)
    a = sum_r W_r^T (W_r v)               (an n-vector partial per rank)

so ONE sum all-reduce of a flat buffer holding ``[t | a | nonfinite flag]`` of every sharded
layer gives every rank the full ``t`` and ``a`` of every layer: one collective per power
iteration for the whole model (per process group: normally one), never one per layer, and
no ``full_tensor()`` of a weight. ``u`` and ``v`` stay plain tensors, identical on every
rank, so the penalty's state is plain replicated buffers (checkpoints need no resharding).
Weights whose placements shard nothing (``Replicate``, plain tensors) take the
single-process op on their local copy, with no collective.

The gradient stays local: ``d sigma / dW = u v^T`` restricted to the shard is
``u[rows of r] v^T``, computed on the rank and returned as a DTensor with the weight's
placements (:class:`_ShardedSigma`), or added into the local shard of the DTensor ``.grad``
(:func:`add_grads`).

The local partial products ``W_r v`` and ``W_r^T (W_r v)`` are two plain ``torch.mv`` calls:
the fused ``specreg_fast::power_step_`` normalizes inside its step and cannot return the
unnormalized partials that the sum needs.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import ops as _ops

__all__ = ["regularized_weights", "power_step_", "sigma", "sigma_from_step", "add_grads"]


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    return DTensor, Partial, Replicate, Shard


def _is_dtensor(w) -> bool:
    return dist.is_available() and isinstance(w, _dtensor_types()[0])


def _fsdp_sharded_weights(root: nn.Module) -> Dict[int, nn.Parameter]:
    """``id(module) -> FSDP2's sharded (DTensor) weight`` for every module whose ``weight``
    an FSDP2 ``fully_shard`` manages. Between forward and backward FSDP2 may leave the
    module's attribute on the unsharded (gathered, plain) parameter (``reshard_after_forward
    =False``, or the root module, which never reshards after forward); the sharded
    parameter is the one that persists, that the optimizer updates and whose ``.grad`` FSDP2
    fills, so the penalty always works on it. (FSDP2's per-parameter records are private
    attributes: ``_fsdp_param_groups`` of the module's state, ``_module_info``.)"""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for mod in root.modules():
        if isinstance(mod, FSDPModule):
            for group in mod._get_fsdp_state()._fsdp_param_groups:
                for p in group.fsdp_params:
                    if p._module_info.param_name == "weight":
                        out[id(p._module_info.module)] = p.sharded_param
    return out


def regularized_weights(root: nn.Module, modules: Sequence[nn.Module]) -> Optional[List[torch.Tensor]]:
    """The weights of ``modules`` as the penalty must see them when any is a DTensor (FSDP2's
    sharded parameter where FSDP2 manages the module), else None: the single-process path
    (also under DistributedDataParallel), at the cost of one ``is_initialized`` check."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    fsdp = _fsdp_sharded_weights(root)
    ws = [fsdp.get(id(m), m.weight) for m in modules]
    return ws if any(_is_dtensor(w) for w in ws) else None


class _Layout(NamedTuple):
    local: torch.Tensor  # the rank's rows of the (m, n) matrix view, detached
    m: int
    n: int
    row0: int  # global index of the first local row
    group: Optional["dist.ProcessGroup"]  # the group the rows are split over; None: all rows are local


def _layout(W: torch.Tensor, name: str) -> _Layout:
    """How a weight's ``(out, -1)`` matrix view is split over the ranks."""
    shape = tuple(W.shape)
    if len(shape) < 2:
        raise ValueError(f"{name}: a weight needs at least 2 dims, got shape {shape}")
    m, n = shape[0], math.prod(shape[1:])
    if not _is_dtensor(W):
        return _Layout(W.detach().reshape(m, n), m, n, 0, None)
    DTensor, Partial, Replicate, Shard = _dtensor_types()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shard_dims = [i for i, p in enumerate(W.placements) if not isinstance(p, Replicate)]
    bad = [p for p in W.placements if not isinstance(p, Replicate) and not (type(p) is Shard and p.dim == 0)]
    if bad or len(shard_dims) > 1:
        raise ValueError(f"{name}: the penalty supports weights sharded on dim 0 over one mesh dimension (FSDP2 "
                         f"fully_shard, HSDP, ColwiseParallel) or replicated, not RowwiseParallel (Shard(1)) nor "
                         f"partial sums; got the weight's placements {tuple(W.placements)}")
    local = W.detach().to_local()
    if not shard_dims:
        return _Layout(local.reshape(m, n), m, n, 0, None)
    _, offset = compute_local_shape_and_global_offset(W.shape, W.device_mesh, W.placements)
    return _Layout(local.reshape(local.shape[0], n), m, n, offset[0] if local.shape[0] else 0,
                   W.device_mesh.get_group(shard_dims[0]))


def _check_state(layouts: Sequence[_Layout], us, vs, names) -> None:
    if len(us) != len(layouts) or len(vs) != len(layouts):
        raise ValueError(f"state: expected {len(layouts)} (u, v) pairs, one per weight, got {len(us)} u and "
                         f"{len(vs)} v")
    for lay, u, v, name in zip(layouts, us, vs, names):
        for vec, what, size in ((u, "u", lay.m), (v, "v", lay.n)):
            if vec.shape != (size,):
                raise ValueError(f"{name}: state {what} must have shape ({size},) for a ({lay.m}, {lay.n}) weight, "
                                 f"got {tuple(vec.shape)}")


def _groups(layouts: Sequence[_Layout]) -> List[List[int]]:
    """Indices of the sharded layers per process group, groups in the order of their first
    layer (the same on every rank, so every rank issues the same collectives in order)."""
    by_group: Dict[int, List[int]] = {}
    for l, lay in enumerate(layouts):
        if lay.group is not None:
            by_group.setdefault(id(lay.group), []).append(l)
    return list(by_group.values())


def _names(names, k):
    return list(names) if names is not None else [f"weights[{l}]" for l in range(k)]


def power_step_(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``n_iter`` power steps on (possibly sharded) weights, in place on the replicated
    ``us``/``vs``, with the conventions of ``ops.power_step_`` (a zero weight keeps its
    vectors, a non-finite one rolls them back and gets a NaN estimate); returns the estimates
    (identical on every rank). One all-reduce per step per process group."""
    names = _names(names, len(weights))
    layouts = [_layout(W, nm) for W, nm in zip(weights, names)]
    _check_state(layouts, us, vs, names)
    k = len(layouts)
    est = torch.zeros(k, dtype=_ops._out_dtype([lay.local for lay in layouts]),
                      device=us[0].device if us else torch.device("cpu"))
    local_ids = [l for l, lay in enumerate(layouts) if lay.group is None]
    if local_ids:  # nothing sharded: the single-process op, on the local copy
        e = _ops.power_step_([layouts[l].local for l in local_ids], [us[l] for l in local_ids],
                             [vs[l] for l in local_ids], n_iter, 0.0)
        est[local_ids] = e.to(est.dtype)
    with torch.no_grad():
        for ids in _groups(layouts):
            buf_dtype = torch.float64 if any(us[l].dtype == torch.float64 for l in ids) else torch.float32
            sizes = [layouts[l].m + layouts[l].n + 1 for l in ids]
            offs = [0]
            for s in sizes:
                offs.append(offs[-1] + s)
            ws = [layouts[l].local.to(us[l].dtype) for l in ids]
            nonfinite = [(~torch.isfinite(w).all()).to(buf_dtype) for w in ws]
            saved = [(us[l].clone(), vs[l].clone()) for l in ids]
            for _ in range(n_iter):
                buf = torch.zeros(offs[-1], dtype=buf_dtype, device=us[ids[0]].device)
                for j, l in enumerate(ids):
                    lay, o = layouts[l], offs[j]
                    t_r = torch.mv(ws[j], vs[l])
                    buf[o + lay.row0:o + lay.row0 + t_r.numel()] = t_r
                    buf[o + lay.m:o + lay.m + lay.n] = torch.mv(ws[j].t(), t_r)
                    buf[o + lay.m + lay.n] = nonfinite[j]
                dist.all_reduce(buf, group=layouts[ids[0]].group)
                for j, l in enumerate(ids):
                    lay, o = layouts[l], offs[j]
                    t = buf[o:o + lay.m].to(us[l].dtype)
                    a = buf[o + lay.m:o + lay.m + lay.n].to(us[l].dtype)
                    tn, an = torch.linalg.vector_norm(t), torch.linalg.vector_norm(a)
                    ok = (tn > 0) & (an > 0)
                    us[l].copy_(torch.where(ok, t / tn, us[l]))
                    vs[l].copy_(torch.where(ok, a / an, vs[l]))
                    est[l] = torch.where(ok, an / tn, torch.zeros_like(an)).to(est.dtype)
            if n_iter == 0:
                est[ids] = sigma([weights[l] for l in ids], [us[l] for l in ids], [vs[l] for l in ids]).to(est.dtype)
            else:
                for j, l in enumerate(ids):
                    if bool(buf[offs[j + 1] - 1] > 0):  # some rank's shard is not finite
                        us[l].copy_(saved[j][0])
                        vs[l].copy_(saved[j][1])
                        est[l] = math.nan
    return est


def _local_sigmas(weights, us, vs, names) -> torch.Tensor:
    """``u^T W v`` of every layer, detached, identical on every rank: one all-reduce of the
    per-rank partials ``u_r^T W_r v`` per process group."""
    names = _names(names, len(weights))
    layouts = [_layout(W, nm) for W, nm in zip(weights, names)]
    _check_state(layouts, us, vs, names)
    out = torch.zeros(len(layouts), dtype=_ops._out_dtype([lay.local for lay in layouts]),
                      device=us[0].device if us else torch.device("cpu"))
    with torch.no_grad():
        for l, lay in enumerate(layouts):
            if lay.group is None:
                out[l] = (us[l] @ lay.local.to(us[l].dtype) @ vs[l]).to(out.dtype)
        for ids in _groups(layouts):
            part = torch.stack([us[l][layouts[l].row0:layouts[l].row0 + layouts[l].local.shape[0]]
                                @ (layouts[l].local.to(us[l].dtype) @ vs[l]) for l in ids]).to(torch.float64)
            dist.all_reduce(part, group=layouts[ids[0]].group)
            out[ids] = part.to(out.dtype)
    return out


class _ShardedSigma(torch.autograd.Function):
    """Value: the given sigmas. Backward: ``grad_l u_l v_l^T`` restricted to each weight's
    local rows, returned with the weight's placements (a DTensor for a DTensor weight), so
    autograd accumulates it into the sharded parameter's ``.grad`` with no communication."""

    @staticmethod
    def forward(ctx, est, us, vs, *weights):
        ctx.save_for_backward(*us, *vs)
        ctx.meta = []
        for W in weights:
            lay = _layout(W, "weight")
            ctx.meta.append((W.dtype, tuple(W.shape), W.stride(), getattr(W, "device_mesh", None),
                             getattr(W, "placements", None), lay.row0, lay.local.shape[0]))
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        k = len(ctx.meta)
        saved = ctx.saved_tensors
        grads = []
        for l, (dtype, shape, stride, mesh, placements, row0, rows) in enumerate(ctx.meta):
            u, v = saved[l], saved[k + l]
            g = torch.outer(u[row0:row0 + rows] * grad[l].to(u.dtype), v).to(dtype)
            if mesh is None:
                grads.append(g.reshape(shape))
            else:
                grads.append(_dtensor_types()[0].from_local(g.reshape((rows,) + shape[1:]), mesh, placements,
                                                            run_check=False, shape=torch.Size(shape), stride=stride))
        return (None, None, None, *grads)


def sigma_from_step(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                    est: torch.Tensor) -> torch.Tensor:
    """``u^T W v`` with the value ``est`` of the :func:`power_step_` that left ``us``/``vs``
    as they are (no second pass over W, no collective), differentiable in the weights."""
    if torch.is_grad_enabled() and any(W.requires_grad for W in weights):
        return _ShardedSigma.apply(est, list(us), list(vs), *weights)
    return est.clone()


def sigma(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
          names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """``u^T W v`` of every (possibly sharded) weight at the current vectors, differentiable
    in the weights; one all-reduce per process group."""
    return sigma_from_step(weights, us, vs, _local_sigmas(weights, us, vs, names))


@torch.no_grad()
def add_grads(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
              coefs) -> None:
    """``W.grad += coef u v^T`` on each rank's rows only (the local shard of a DTensor
    ``.grad``), for the weights that require grad; ``coefs`` are Python floats or 0-d
    tensors. No communication."""
    for l, W in enumerate(weights):
        if not W.requires_grad:
            continue
        if W.grad is None:
            W.grad = torch.zeros_like(W)
        lay = _layout(W, f"weights[{l}]")
        G = W.grad.to_local() if _is_dtensor(W.grad) else W.grad
        u = us[l][lay.row0:lay.row0 + lay.local.shape[0]].to(G.dtype)
        v, c = vs[l].to(G.dtype), coefs[l]
        if isinstance(c, torch.Tensor):
            u, c = u * c.to(G.dtype), 1.0
        if G.is_contiguous():
            G.view(G.shape[0], -1).addr_(u, v, alpha=c)
        else:
            G.add_(torch.outer(u, v).reshape(G.shape), alpha=c)


def penalty_sigmas(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                   names: Sequence[str], update: bool, n_iter: int) -> torch.Tensor:
    """The sigmas of ``SpectralPenalty`` on sharded weights (its dense layers, in order):
    ``n_iter`` steps then ``u^T W v`` from the last step's estimate, or ``u^T W v`` at the
    current vectors (``update=False``); differentiable in the weights."""
    if len(weights) > len(us):
        raise ValueError(f"conv layers {list(names[len(us):])} on sharded (DTensor) weights: the conv operator and "
                         f"FFT norms are not supported there yet; use conv_norm='matrix' (the reshaped-kernel norm)")
    if update:
        return sigma_from_step(weights, us, vs, power_step_(weights, us, vs, n_iter, names))
    return sigma(weights, us, vs, names)
