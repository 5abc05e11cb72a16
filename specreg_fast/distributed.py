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

Maps that are views of a sharded parameter (:class:`_Block`): the rank's shard is one block
``A[rows, cols]`` of the map. A row block (the sharded dim splits the map's rows: FSDP2 or
``ColwiseParallel`` on a Linear, the q/k/v rows of ``in_proj_weight``) goes in the buffer
above. A column block (``A = [A_1 | ... | A_R]``: ``RowwiseParallel``, a transformers
``Conv1D`` under FSDP2) gives a partial of every output entry: its ``A_r v_r`` goes in the
first buffer (summed: ``t``), then ``A_r^T t`` into a zero-padded n-vector, summed by a
second all-reduce that carries every column-sharded map of the process group, so ``v`` stays
replicated: at most 2 all-reduces per power iteration for the whole model, whatever its mix.

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
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from . import ops as _ops
from .contract import acc_dtype, out_dtype
from .geometry import conv_adjoint, conv_apply, decode_conv_params, pack_conv_params, pack_geometry
from .power_loop import normalize_

__all__ = ["regularized_weights", "power_step_", "sigma", "sigma_from_step", "add_grads"]


def _dtensor_types():
    from torch.distributed.tensor import DTensor, Replicate, Shard
    return DTensor, Replicate, Shard


def _is_dtensor(w) -> bool:
    return dist.is_available() and isinstance(w, _dtensor_types()[0])


def _fsdp_sharded_weights(root: nn.Module) -> Dict[tuple, nn.Parameter]:
    """``(id(module), parameter name) -> FSDP2's sharded (DTensor) parameter`` for every
    parameter an FSDP2 ``fully_shard`` manages. Between forward and backward FSDP2 may leave
    the module's attribute on the unsharded (gathered, plain) parameter
    (``reshard_after_forward=False``, or the root module, which never reshards after
    forward); the sharded parameter is the one that persists, that the optimizer updates and
    whose ``.grad`` FSDP2 fills, so the penalty always works on it. (FSDP2's per-parameter
    records are private attributes: ``_fsdp_param_groups`` of the module's state,
    ``_fsdp_param_group`` on torch 2.11, ``_module_info``.)"""
    from torch.distributed.fsdp import FSDPModule

    out = {}
    for mod in root.modules():
        if isinstance(mod, FSDPModule):
            state = mod._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch 2.11: one (optional) group per state, _fsdp_param_group
                group = getattr(state, "_fsdp_param_group", None)
                groups = [] if group is None else [group]
            for group in groups:
                for p in group.fsdp_params:
                    out[(id(p._module_info.module), p._module_info.param_name)] = p.sharded_param
    return out


def _weight_of(fsdp: dict, mp) -> torch.Tensor:
    """The tensor a map's weight is made of, as the penalty must see it: FSDP2's sharded
    parameter where FSDP2 manages it, else the module's own; a LoRA map's base weight; an
    ``extra=`` map's computed weight."""
    if mp.lowrank is not None:
        holder, attr = mp.module.base_layer, "weight"
    elif mp.attr is None:
        return mp.weight()
    else:
        holder, attr = mp.module, mp.attr
    return fsdp.get((id(holder), attr), getattr(holder, attr))


def regularized_weights(root: nn.Module, maps: Sequence) -> Optional[List[torch.Tensor]]:
    """The tensors the ``maps`` (:class:`specreg_fast.layers.LinearMap`) are made of, as the
    penalty must see them, when any is a DTensor (FSDP2's sharded parameter where FSDP2
    manages the module), else None: the single-process path (also under
    DistributedDataParallel), at the cost of one ``is_initialized`` check."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    fsdp = _fsdp_sharded_weights(root)
    ws = [_weight_of(fsdp, mp) for mp in maps]
    return ws if any(_is_dtensor(w) for w in ws) else None


class _Shard:
    """One layer's part on this rank, as a linear map between flat vectors: it reads
    ``x[in_lo:in_hi]`` of the (replicated) input vector and produces ``(A x)[out_lo:out_hi]``
    of the output vector, exactly (no other rank's weights enter those output entries).
    ``group``: the process group its rows are split over; None when the rank holds the
    whole weight (plain tensor, Replicate)."""

    two_pass = False

    def __init__(self, W: torch.Tensor, name: str, out_vec: torch.Tensor, in_vec: torch.Tensor, geometry=None):
        shape = tuple(W.shape)
        if len(shape) < 2:
            raise ValueError(f"{name}: a weight needs at least 2 dims, got shape {shape}")
        self.name, self.shape, self.geometry = name, shape, geometry
        self.m, self.n = out_vec.numel(), in_vec.numel()
        want = (shape[0], math.prod(shape[1:])) if geometry is None else None
        if want is not None and (tuple(out_vec.shape), tuple(in_vec.shape)) != ((want[0],), (want[1],)):
            raise ValueError(f"{name}: state u, v must have shapes ({want[0]},), ({want[1]},) for a weight of shape "
                             f"{shape}, got {tuple(out_vec.shape)}, {tuple(in_vec.shape)}")
        if geometry is not None and not geometry["transposed"] and (
                out_vec.shape[0] != shape[0] or in_vec.shape[0] != shape[1] * geometry["groups"]):
            raise ValueError(f"{name}: state y, x must have {shape[0]} and {shape[1] * geometry['groups']} channels "
                             f"for a conv weight of shape {shape}, got {tuple(out_vec.shape)}, {tuple(in_vec.shape)}")
        self.group, row0, self.local = None, 0, W.detach()
        if _is_dtensor(W):
            self.local, row0, self.group = self._split(W, name)
        rows = self.local.shape[0]
        if geometry is None:  # dense: the rank's rows of the (out, -1) matrix, the whole input
            self.local2d = self.local.reshape(rows, self.n)
            self.out_lo, self.out_hi, self.in_lo, self.in_hi = row0, row0 + rows, 0, self.n
            return
        self.out_spatial = tuple(out_vec.shape[1:])
        self.in_shape, self.local_geometry = tuple(in_vec.shape), geometry
        self.out_lo, self.out_hi, self.in_lo, self.in_hi = 0, self.m, 0, self.n
        if self.group is None:  # the whole conv on this rank
            return
        if geometry["transposed"]:
            raise ValueError(f"{name}: a sharded ConvTranspose weight (dim 0 = input channels) is not supported: the "
                             f"shards' outputs overlap, which would take a second collective per power step")
        # output channels [row0, row0 + rows) of the groups they cover, which read the input
        # channels of those groups only
        groups, c_out, c_in_group = geometry["groups"], shape[0], shape[1]
        per_group = c_out // groups
        if groups > 1 and (row0 % per_group or rows % per_group):
            raise ValueError(f"{name}: the shard of output channels [{row0}, {row0 + rows}) splits a group of "
                             f"{per_group} channels (groups={groups}); it needs shards on group boundaries")
        out_sp, in_sp = self.m // c_out, self.n // in_vec.shape[0]
        g0, local_groups = (row0 // per_group, rows // per_group) if groups > 1 else (0, 1)
        c_lo, c_hi = (g0 * c_in_group, (g0 + local_groups) * c_in_group) if groups > 1 else (0, c_in_group)
        self.in_shape = (c_hi - c_lo,) + tuple(in_vec.shape[1:])
        self.out_lo, self.out_hi = row0 * out_sp, (row0 + rows) * out_sp
        self.in_lo, self.in_hi = c_lo * in_sp, c_hi * in_sp
        self.local_geometry = dict(geometry, groups=max(local_groups, 1))

    @staticmethod
    def _split(W, name):
        """(local tensor, global row offset, process group) of a DTensor weight."""
        _, Replicate, Shard = _dtensor_types()
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shard_dims = [i for i, p in enumerate(W.placements) if not isinstance(p, Replicate)]
        bad = [p for p in W.placements if not isinstance(p, Replicate) and not (type(p) is Shard and p.dim == 0)]
        if bad or len(shard_dims) > 1:
            raise ValueError(f"{name}: the penalty supports weights sharded on dim 0 over one mesh dimension (FSDP2 "
                             f"fully_shard, HSDP, ColwiseParallel) or replicated, not RowwiseParallel (Shard(1)) nor "
                             f"partial sums; got the weight's placements {tuple(W.placements)}")
        local = W.detach().to_local()
        if not shard_dims:
            return local, 0, None
        _, offset = compute_local_shape_and_global_offset(W.shape, W.device_mesh, W.placements)
        return local, offset[0] if local.shape[0] else 0, W.device_mesh.get_group(shard_dims[0])

    def apply(self, Wf, x):
        """This rank's output entries ``(A x)[out_lo:out_hi]`` from its input slice (flat)."""
        if self.geometry is None:
            return torch.mv(Wf, x)
        if self.out_hi == self.out_lo:
            return x.new_zeros(0)
        return conv_apply(self.local_geometry, Wf, x.view(1, *self.in_shape)).reshape(-1)

    def adjoint(self, Wf, t):
        """``A_r^T t_r`` on this rank's input slice (flat), ``t_r`` its output entries."""
        if self.geometry is None:
            return torch.mv(Wf.t(), t)
        if self.out_hi == self.out_lo:
            return t.new_zeros(self.in_hi - self.in_lo)
        return conv_adjoint(self.local_geometry, Wf, t.view(1, -1, *self.out_spatial),
                            t.new_empty((1,) + self.in_shape)).reshape(-1)

    def weight(self, dtype):
        """The local weight in the vectors' dtype, as the operator reads it."""
        return (self.local2d if self.geometry is None else self.local).to(dtype)

    def weight_grad(self, out_vec, in_vec, scale):
        """``d <out, A in> / dW`` restricted to this rank's shard, times ``scale``, in the
        local shard's shape (no communication)."""
        u = out_vec.reshape(-1)[self.out_lo:self.out_hi]
        x = in_vec.reshape(-1)[self.in_lo:self.in_hi]
        if self.geometry is None:
            return torch.outer(u * scale, x).reshape(self.local.shape)
        if self.out_hi == self.out_lo:
            return self.local.new_zeros(self.local.shape, dtype=u.dtype)
        params, modes = pack_geometry(self.local_geometry)
        y = (u * scale).view(-1, *self.out_spatial)
        return _ops.conv_weight_grad([self.local.to(u.dtype)], [x.view(self.in_shape)], [y], params, modes)[0]



def _unravel(idx: torch.Tensor, shape) -> List[torch.Tensor]:
    out = []
    for d in reversed(shape):
        out.append(idx % d)
        idx = idx // d
    return out[::-1]


_PLANS: Dict[tuple, tuple] = {}


def _block_plan(view, gshape, lshape, offset, shard_dims, name, placements):
    """Where this rank's box ``offset + [0, lshape)`` of the parameter (global shape
    ``gshape``) lies in the map ``view(parameter)``: ``(out_lo, out_hi, in_lo, in_hi, two_pass,
    index)``. ``index``: the local flat position of each entry of the block, as ``(base, s0,
    s1)`` when it is affine (a strided view of the contiguous local shard: identity, the
    transpose of a Conv1D, a row block of q/k/v), else an int64 matrix (a gather). ``two_pass``:
    the sharded dims split the map's columns (each output entry is a sum over ranks), the same
    on every rank. Computed once per (view, shapes, placements, offset), on index tensors."""
    key = (view, tuple(gshape), tuple(lshape), tuple(offset), tuple(shard_dims))
    if key in _PLANS:
        return _PLANS[key]
    G = torch.arange(math.prod(gshape)).view(tuple(gshape))
    M = view(G)
    M = M.reshape(M.shape[0], -1)
    coords = _unravel(M, tuple(gshape))
    two_pass = any(bool((coords[d] != coords[d][:, :1]).any()) for d in shard_dims)
    inside = torch.ones(M.shape, dtype=torch.bool)
    for c, o, l in zip(coords, offset, lshape):
        inside &= (c >= o) & (c < o + l)
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    if rows.numel() == 0:
        plan = (0, 0, 0, 0, two_pass, (0, 0, 0))
        _PLANS[key] = plan
        return plan
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if (r1 - r0) * (c1 - c0) != int(inside.sum()) or not bool(inside[r0:r1, c0:c1].all()):
        raise ValueError(f"{name}: this rank's shard of the parameter (placements {tuple(placements)}) is not one "
                         f"rectangular block of the map's matrix, which the sharded penalty needs")
    local = torch.zeros_like(M[r0:r1, c0:c1])
    stride = 1
    for c, o, l in reversed(list(zip(coords, offset, lshape))):
        local += (c[r0:r1, c0:c1] - o) * stride
        stride *= l
    base = int(local[0, 0])
    s0 = int(local[1, 0] - base) if local.shape[0] > 1 else 0
    s1 = int(local[0, 1] - base) if local.shape[1] > 1 else 0
    affine = base + s0 * torch.arange(local.shape[0])[:, None] + s1 * torch.arange(local.shape[1])[None]
    index = (base, s0, s1) if torch.equal(affine, local) else local
    plan = (r0, r1, c0, c1, two_pass, index)
    _PLANS[key] = plan
    return plan


class _Block:
    """A dense map (a view of a possibly sharded parameter: a Linear's weight, a Conv1D's
    transpose, a q/k/v row block) on this rank: the block ``A[out_lo:out_hi, in_lo:in_hi]``
    of the map that the rank's shard holds. A row block (``two_pass`` False: the parameter's
    sharded dim splits the map's rows, e.g. FSDP2 / ColwiseParallel on a Linear) reads the
    whole input and produces its output entries exactly; a column block (``two_pass``:
    RowwiseParallel, FSDP2 on a Conv1D) produces a partial of every output entry, so its
    ``t`` is summed before ``A_r^T t`` (the second all-reduce of the power step)."""

    geometry = None

    def __init__(self, W: torch.Tensor, view, name: str, out_vec: torch.Tensor, in_vec: torch.Tensor):
        self.name, self.shape = name, tuple(W.shape)
        self.m, self.n = out_vec.numel(), in_vec.numel()
        self.group, offset, shard_dims, placements = None, (0,) * W.dim(), (), ()
        if _is_dtensor(W):
            _, Replicate, Shard = _dtensor_types()
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            placements = tuple(W.placements)
            sharded = [i for i, p in enumerate(placements) if not isinstance(p, Replicate)]
            bad = [p for p in placements if not isinstance(p, Replicate) and type(p) is not Shard]
            if bad or len(sharded) > 1:
                raise ValueError(f"{name}: the sharded penalty supports a weight sharded (Shard(d)) over one mesh "
                                 f"dimension or replicated, not partial sums, strided shards or 2-D meshes; got the "
                                 f"weight's placements {placements}")
            self.local = W.detach().to_local()
            if sharded:
                _, offset = compute_local_shape_and_global_offset(W.shape, W.device_mesh, W.placements)
                self.group = W.device_mesh.get_group(sharded[0])
                shard_dims = (placements[sharded[0]].dim,)
        else:
            self.local = W.detach()
        with torch.no_grad():
            probe = view(torch.empty(self.shape, device="meta"))
        if (probe.shape[0], math.prod(probe.shape[1:])) != (self.m, self.n) or out_vec.dim() != 1 or in_vec.dim() != 1:
            raise ValueError(f"{name}: state u, v must have shapes ({probe.shape[0]},), "
                             f"({math.prod(probe.shape[1:])},) for its map, got {tuple(out_vec.shape)}, "
                             f"{tuple(in_vec.shape)}")
        (self.out_lo, self.out_hi, self.in_lo, self.in_hi, self.two_pass, self.index) = _block_plan(
            view, self.shape, tuple(self.local.shape), tuple(offset), shard_dims, name, placements)
        if self.group is None:
            self.two_pass = False

    def _block(self, T: torch.Tensor) -> torch.Tensor:
        """The block of a local-shard-shaped tensor ``T``: a view when the index is affine
        and ``T`` contiguous, else a gather (a copy)."""
        shape = (self.out_hi - self.out_lo, self.in_hi - self.in_lo)
        if isinstance(self.index, tuple):
            if T.is_contiguous() or 0 in shape:
                base, s0, s1 = self.index
                if 0 in shape:
                    return T.new_zeros(shape)
                return T.as_strided(shape, (s0, s1), T.storage_offset() + base)
            T = T.contiguous()
            return self._block(T)
        return T.reshape(-1)[self.index.to(T.device)]

    @property
    def local2d(self) -> torch.Tensor:
        return self._block(self.local)

    def weight(self, dtype):
        return self.local2d.to(dtype)

    def apply(self, Wf, x):
        return torch.mv(Wf, x)

    def adjoint(self, Wf, t):
        return torch.mv(Wf.t(), t)

    def weight_grad(self, out_vec, in_vec, scale):
        """``d <out, A in> / dW`` on this rank's shard, times ``scale``, in the local shard's shape."""
        u = out_vec.reshape(-1)[self.out_lo:self.out_hi]
        x = in_vec.reshape(-1)[self.in_lo:self.in_hi]
        g = torch.zeros(self.local.shape, dtype=u.dtype, device=u.device)
        self.add_grad_(g, u, x, scale)
        return g

    def add_grad_(self, G, u, x, scale):
        """``G += scale * outer(u, x)`` on the block (``u``, ``x``: the block's slices)."""
        if self.out_hi == self.out_lo or self.in_hi == self.in_lo:
            return
        upd = torch.outer(u.to(G.dtype) * (scale if isinstance(scale, float) else scale.to(G.dtype)), x.to(G.dtype))
        if isinstance(self.index, tuple) and G.is_contiguous():
            self._block(G).add_(upd)
        elif isinstance(self.index, tuple):
            G.add_(self._scatter(G, upd))
        else:
            G.view(-1).index_put_((self.index.reshape(-1).to(G.device),), upd.reshape(-1), accumulate=True)

    def _scatter(self, G, upd):
        z = torch.zeros(G.shape, dtype=G.dtype, device=G.device)
        self._block(z).copy_(upd)
        return z


def _conv_geometries(specs) -> list:
    if not specs:
        return []
    params, modes = pack_conv_params(specs)
    return decode_conv_params("SpectralPenalty", [sp.weight for sp in specs], params, modes)


def _shards(weights, outs, ins, names, geometries, views=None) -> list:
    """One :class:`_Shard` (conv, or a dense weight taken whole) or :class:`_Block` (a dense
    map given as ``views[l](weights[l])``) per weight."""
    if len(outs) != len(weights) or len(ins) != len(weights):
        raise ValueError(f"state: expected {len(weights)} vector pairs, one per weight, got {len(outs)} and {len(ins)}")
    nd = len(weights) - len(geometries)
    return [_Block(W, views[l], nm, o, i) if views is not None and l < nd
            else _Shard(W, nm, o, i, None if l < nd else geometries[l - nd])
            for l, (W, o, i, nm) in enumerate(zip(weights, outs, ins, names))]


def _groups(shards: Sequence[_Shard]) -> List[List[int]]:
    """Indices of the sharded layers per process group, groups in the order of their first
    layer (the same on every rank, so every rank issues the same collectives in order)."""
    by_group: Dict[int, List[int]] = {}
    for l, sh in enumerate(shards):
        if sh.group is not None:
            by_group.setdefault(id(sh.group), []).append(l)
    return list(by_group.values())


def _names(names, k):
    return list(names) if names is not None else [f"weights[{l}]" for l in range(k)]


def power_step_(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                names: Optional[Sequence[str]] = None, conv_specs: Sequence = (), views=None) -> torch.Tensor:
    """``n_iter`` power steps on (possibly sharded) weights, in place on the replicated
    vectors, with the conventions of ``ops.power_step_`` / ``ops.conv_power_step_`` (a zero
    weight keeps its vectors, a non-finite one rolls them back and gets a NaN estimate);
    returns the estimates (identical on every rank). The last ``len(conv_specs)`` weights
    are convs (``us``: their output-shaped ``y``, ``vs``: their input-shaped ``x``). One
    all-reduce per step per process group; layers that are not sharded take no collective
    (dense ones the single-process fused op)."""
    names = _names(names, len(weights))
    shards = _shards(weights, us, vs, names, _conv_geometries(conv_specs), views)
    est = torch.zeros(len(shards), dtype=out_dtype([sh.local for sh in shards]),
                      device=us[0].device if us else torch.device("cpu"))
    fused = [l for l, sh in enumerate(shards) if sh.group is None and sh.geometry is None]
    if fused:
        e = _ops.power_step_([shards[l].local2d for l in fused], [us[l] for l in fused], [vs[l] for l in fused],
                             n_iter, 0.0)
        est[fused] = e.to(est.dtype)
    with torch.no_grad():
        groups = _groups(shards) + [[l] for l, sh in enumerate(shards) if sh.group is None and sh.geometry is not None]
        for ids in groups:
            group = shards[ids[0]].group
            buf_dtype = out_dtype([us[l] for l in ids])
            ws = [shards[l].weight(us[l].dtype) for l in ids]
            # a float64 sum is non-finite iff an entry is (float32/bf16 weights cannot overflow
            # it): one read of the shard, with no bool temporary (isfinite().all() took 3x the
            # two mv of a 512x1024 shard here)
            nonfinite = [(~torch.isfinite(w.sum(dtype=torch.float64))).to(buf_dtype) for w in ws]
            saved = [(us[l].clone(), vs[l].clone()) for l in ids]
            # the first buffer: [t | a | flag] of a row block, [t | flag] of a column block;
            # the second (only when some map is column-sharded): the column blocks' a
            offs, offs2 = [0], [0]
            for l in ids:
                sh = shards[l]
                offs.append(offs[-1] + sh.m + (0 if sh.two_pass else sh.n) + 1)
                offs2.append(offs2[-1] + (sh.n if sh.two_pass else 0))
            dev = us[ids[0]].device
            buf = None
            for _ in range(n_iter):
                buf = torch.zeros(offs[-1], dtype=buf_dtype, device=dev)
                for j, l in enumerate(ids):
                    sh, o = shards[l], offs[j]
                    t_r = sh.apply(ws[j], vs[l].reshape(-1)[sh.in_lo:sh.in_hi])
                    buf[o + sh.out_lo:o + sh.out_hi] = t_r
                    if not sh.two_pass:
                        buf[o + sh.m + sh.in_lo:o + sh.m + sh.in_hi] = sh.adjoint(ws[j], t_r)
                    buf[offs[j + 1] - 1] = nonfinite[j]
                if group is not None:
                    dist.all_reduce(buf, group=group)
                buf2 = None
                if offs2[-1]:
                    buf2 = torch.zeros(offs2[-1], dtype=buf_dtype, device=dev)
                    for j, l in enumerate(ids):
                        sh = shards[l]
                        if sh.two_pass:
                            t = buf[offs[j] + sh.out_lo:offs[j] + sh.out_hi].to(us[l].dtype)
                            buf2[offs2[j] + sh.in_lo:offs2[j] + sh.in_hi] = sh.adjoint(ws[j], t)
                    dist.all_reduce(buf2, group=group)
                for j, l in enumerate(ids):
                    sh, o = shards[l], offs[j]
                    t = buf[o:o + sh.m].to(us[l].dtype)
                    a = (buf2[offs2[j]:offs2[j + 1]] if sh.two_pass else buf[o + sh.m:o + sh.m + sh.n]).to(us[l].dtype)
                    est[l] = normalize_(t, a, us[l].view(-1), vs[l].view(-1))[0].to(est.dtype)
            if buf is None:  # n_iter == 0: the estimate at the current vectors
                est[ids] = _local_sigmas([shards[l] for l in ids], [us[l] for l in ids],
                                         [vs[l] for l in ids]).to(est.dtype)
                continue
            for j, l in enumerate(ids):
                if bool(buf[offs[j + 1] - 1] > 0):  # some rank's shard is not finite
                    us[l].copy_(saved[j][0])
                    vs[l].copy_(saved[j][1])
                    est[l] = math.nan
    return est


def _local_sigmas(shards: Sequence[_Shard], us, vs) -> torch.Tensor:
    """``<u, A v>`` of every layer, detached, identical on every rank: one all-reduce of the
    per-rank partials ``<u_r, A_r v>`` per process group."""
    out = torch.zeros(len(shards), dtype=out_dtype([sh.local for sh in shards]),
                      device=us[0].device if us else torch.device("cpu"))
    with torch.no_grad():
        part = torch.stack([us[l].reshape(-1)[sh.out_lo:sh.out_hi].double()
                            @ sh.apply(sh.weight(us[l].dtype), vs[l].reshape(-1)[sh.in_lo:sh.in_hi]).double()
                            for l, sh in enumerate(shards)]) if shards else out.double()
        for ids in _groups(shards):
            p = part[ids]
            dist.all_reduce(p, group=shards[ids[0]].group)
            part[ids] = p
        out.copy_(part)
    return out


class _ShardedSigma(torch.autograd.Function):
    """Value: the given sigmas. Backward: ``grad_l d<u_l, A_l v_l>/dW_l`` restricted to each
    weight's local shard (``u v^T`` rows for a dense layer, the conv weight-gradient of its
    output-channel slice for a conv), returned with the weight's placements (a DTensor for a
    DTensor weight), so autograd accumulates it into the sharded parameter's ``.grad`` with
    no communication."""

    @staticmethod
    def forward(ctx, est, shards, us, vs, *weights):
        ctx.save_for_backward(*us, *vs)
        ctx.shards = shards
        ctx.meta = [(W.dtype, W.stride(), getattr(W, "device_mesh", None), getattr(W, "placements", None))
                    for W in weights]
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        k = len(ctx.meta)
        saved = ctx.saved_tensors
        grads = []
        for l, ((dtype, stride, mesh, placements), sh) in enumerate(zip(ctx.meta, ctx.shards)):
            u, v = saved[l], saved[k + l]
            g = sh.weight_grad(u, v, grad[l].to(u.dtype)).to(dtype)
            if mesh is None:
                grads.append(g)
            else:
                grads.append(_dtensor_types()[0].from_local(g, mesh, placements, run_check=False,
                                                            shape=torch.Size(sh.shape), stride=stride))
        return (None, None, None, None, *grads)


def _with_grad(weights, shards, us, vs, est):
    if torch.is_grad_enabled() and any(W.requires_grad for W in weights):
        return _ShardedSigma.apply(est, shards, list(us), list(vs), *weights)
    return est.clone()


def sigma_from_step(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                    est: torch.Tensor, names: Optional[Sequence[str]] = None,
                    conv_specs: Sequence = (), views=None) -> torch.Tensor:
    """``<u, A v>`` with the value ``est`` of the :func:`power_step_` that left ``us``/``vs``
    as they are (no second pass over W, no collective), differentiable in the weights."""
    shards = _shards(weights, us, vs, _names(names, len(weights)), _conv_geometries(conv_specs), views)
    return _with_grad(weights, shards, us, vs, est)


def sigma(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
          names: Optional[Sequence[str]] = None, conv_specs: Sequence = (), views=None) -> torch.Tensor:
    """``<u, A v>`` of every (possibly sharded) weight at the current vectors,
    differentiable in the weights; one all-reduce per process group."""
    shards = _shards(weights, us, vs, _names(names, len(weights)), _conv_geometries(conv_specs), views)
    return _with_grad(weights, shards, us, vs, _local_sigmas(shards, us, vs))


@torch.no_grad()
def add_grads(weights: Sequence[torch.Tensor], us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
              coefs, names: Optional[Sequence[str]] = None, conv_specs: Sequence = (), views=None) -> None:
    """``W.grad += coef d<u, A v>/dW`` on each rank's shard only (the local shard of a
    DTensor ``.grad``), for the weights that require grad; ``coefs`` are Python floats or
    0-d tensors. No communication."""
    shards = _shards(weights, us, vs, _names(names, len(weights)), _conv_geometries(conv_specs), views)
    for l, (W, sh) in enumerate(zip(weights, shards)):
        if not W.requires_grad:
            continue
        if W.grad is None:
            W.grad = torch.zeros_like(W)
        G = W.grad.to_local() if _is_dtensor(W.grad) else W.grad
        c = coefs[l]
        if isinstance(sh, _Block):
            sh.add_grad_(G, us[l].reshape(-1)[sh.out_lo:sh.out_hi], vs[l].reshape(-1)[sh.in_lo:sh.in_hi], c)
            continue
        if sh.geometry is None and isinstance(c, float):
            u = us[l][sh.out_lo:sh.out_hi].to(G.dtype)
            if G.is_contiguous():  # one in-place rank-1 update, no weight-sized temporary
                G.view(G.shape[0], -1).addr_(u, vs[l].to(G.dtype), alpha=c)
                continue
        G.add_(sh.weight_grad(us[l], vs[l], c if isinstance(c, float) else c.to(us[l].dtype)).to(G.dtype))


def penalty_sigmas(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor],
                   names: Sequence[str], conv_specs: Sequence, update: bool, n_iter: int,
                   views=None) -> torch.Tensor:
    """The sigmas of ``SpectralPenalty`` on sharded weights (dense layers, then the convs of
    ``conv_specs``): ``n_iter`` steps then ``<u, A v>`` from the last step's estimate, or at
    the current vectors (``update=False``); differentiable in the weights."""
    if update:
        est = power_step_(weights, us, vs, n_iter, names, conv_specs, views)
        return sigma_from_step(weights, us, vs, est, names, conv_specs, views)
    return sigma(weights, us, vs, names, conv_specs, views)


def init_conv_state(specs, generator: Optional[torch.Generator] = None, names: Optional[Sequence[str]] = None):
    """``conv.init_conv_state`` for convs whose weight may be a DTensor: the same random
    ``x`` (the same draws from ``generator``), ``y = A x / |A x|`` from the shards with one
    all-reduce (the single-process function where no weight is a DTensor)."""
    from .conv import ConvState
    from .conv import init_conv_state as _single

    if not any(_is_dtensor(sp.weight) for sp in specs):
        return _single(specs, generator=generator)
    xs, ys = [], []
    for sp in specs:
        acc = acc_dtype(sp.weight.dtype)
        x = torch.randn(tuple(sp.input_shape), dtype=acc, generator=generator).to(sp.weight.device)
        xs.append(x / torch.linalg.vector_norm(x))
    geos = _conv_geometries(specs)
    with torch.no_grad():
        for sp, x, g in zip(specs, xs, geos):  # output shapes from the meta device: no data, no collective
            meta = conv_apply(g, torch.empty(sp.weight.shape, device="meta", dtype=x.dtype), x.to("meta")[None])
            ys.append(torch.zeros(meta.shape[1:], dtype=x.dtype, device=x.device))
        shards = _shards([sp.weight for sp in specs], ys, xs, _names(names, len(specs)), geos)
        for ids in _groups(shards) + [[l] for l, sh in enumerate(shards) if sh.group is None]:
            parts = []
            for l in ids:
                sh = shards[l]
                y = torch.zeros(sh.m, dtype=torch.float64, device=xs[l].device)
                y[sh.out_lo:sh.out_hi] = sh.apply(sh.weight(xs[l].dtype), xs[l].reshape(-1)[sh.in_lo:sh.in_hi])
                parts.append(y)
            buf = torch.cat(parts)
            if shards[ids[0]].group is not None:
                dist.all_reduce(buf, group=shards[ids[0]].group)
            for y, l in zip(buf.split([shards[l].m for l in ids]), ids):
                y = y.to(ys[l].dtype)
                ys[l].copy_((y / torch.linalg.vector_norm(y).clamp_min(torch.finfo(y.dtype).tiny)).view(ys[l].shape))
    return ConvState(xs, ys)
