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

Meshes of several dims (FSDP2 x TP as torchtitan composes them, HSDP x TP): the rank's box
of the parameter comes from ``compute_local_shape_and_global_offset`` (which also places
the ``_StridedShard`` FSDP2 puts over a TP shard of the same dim), and it is one block of
the map. Each mesh dim that shards the parameter splits either the map's rows (its process
group is a row group of the map) or its columns (a column group); ``Replicate`` dims take no
part. ``t`` needs a sum over every group that shards the map; ``A^T t``, formed once ``t``
is summed over the column groups, too. :func:`_schedule` orders them, for all maps at once:
per power iteration, one all-reduce per column group (``t`` of the column-split maps, with
``[t | A^T t]`` of the row-only maps on that group), one per remaining row group
(``[t | A^T t]``), one per column group (``A^T t``). The count per process group is constant
in the number of layers:

    placements (mesh ("dp_shard", "tp"))            all-reduces per power iteration
    FSDP2 / Colwise, 1-D: (Shard(0),)                1
    Rowwise / Conv1D under FSDP2, 1-D: (Shard(1),)   2 (both on its group)
    Colwise then FSDP2: (_StridedShard(0), Shard(0)) 2: dp 1, tp 1
    with Rowwise then FSDP2: (Shard(0), Shard(1))    3: tp 2, dp 1 (t on tp; [t | A^T t] on
                                                     dp; A^T t on tp)

(HSDP's replicate dim adds nothing.) Process groups are told apart by their ranks: a 2-D mesh
and its 1-D submesh hand out distinct group objects for one set of ranks.

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
import weakref
from collections import OrderedDict
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
    cgroups = ()

    @property
    def rgroups(self):
        return () if self.group is None else (self.group,)

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


def _contiguous_strides(shape) -> List[int]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return out[::-1]


# the plans of views that are not strided views of the parameter along its axes (a gather:
# each holds an int64 index of its block), least recently used first; bounded, so that
# building penalties again and again (each with new view closures) cannot grow it
_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()
_PLANS_MAX = 16
# the plans of strided views (six ints and a set of dims: no tensor), per view function,
# held weakly: a penalty's view closures die with it, and their plans with them (reading a
# plan from the strides takes ~100 us, a lookup here under 1 us; every call builds its blocks)
_AFFINE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_AFFINE_PER_VIEW = 1024


def _axis_run(size: int, stride: int, gshape, gstrides, o) -> Optional[List[int]]:
    """The parameter dims (inner first) that one axis of a strided view walks, with ``o`` the
    coordinates of the view's first entry: every dim but the outermost whole, the outermost
    from ``o`` on. None when the axis is not such a run (then the general plan decides)."""
    if size == 1:
        return []
    dims = [e for e in range(len(gshape)) if gstrides[e] == stride and gshape[e] > 1]
    if len(dims) != 1:
        return None
    e, rem, run = dims[0], size, []
    while True:
        if rem <= gshape[e] - o[e]:
            return run + [e]
        if o[e] != 0 or rem % gshape[e]:
            return None
        run.append(e)
        rem //= gshape[e]
        e -= 1
        while e >= 0 and gshape[e] == 1:
            e -= 1
        if e < 0:
            return None


def _affine_plan(view, gshape, lshape, offset):
    """:func:`_block_plan` from the strides of ``view`` applied to a meta tensor (no index
    tensor): for views whose rows and columns each walk a run of the parameter's dims (a
    Linear's weight, a Conv1D's transpose, row blocks of them, a conv kernel as a matrix).
    None for any other view, or when the rank's box cuts a run's inner dim."""
    P = torch.empty(tuple(gshape), device="meta")
    with torch.no_grad():
        M = view(P)
    if (M is not P and not (M._is_view() and M._base is P)) or M.dim() < 1 or M.numel() == 0:
        return None
    sizes, strides = list(M.shape), list(M.stride())
    cols = [(s, st) for s, st in zip(sizes[1:], strides[1:]) if s != 1]
    if any(a[1] != b[1] * b[0] for a, b in zip(cols, cols[1:])):  # columns that reshape(m, -1) would copy
        return None
    gstrides = _contiguous_strides(gshape)
    o = [(M.storage_offset() // g) % n for g, n in zip(gstrides, gshape)]
    row_run = _axis_run(sizes[0], strides[0], gshape, gstrides, o)
    col_run = _axis_run(math.prod(sizes[1:]), cols[-1][1] if cols else 1, gshape, gstrides, o)
    if row_run is None or col_run is None or set(row_run) & set(col_run):
        return None
    col_dims = frozenset(col_run)
    empty = (0, 0, 0, 0, (0, 0, 0), col_dims)
    in_run = set(row_run) | set(col_run)
    if any(n == 0 for n in lshape) or any(not (b <= o[d] < b + n) for d, (b, n) in enumerate(zip(offset, lshape))
                                          if d not in in_run):
        return empty
    lstrides = _contiguous_strides(lshape)
    base, ranges, steps = 0, [], []
    for run, size in ((row_run, sizes[0]), (col_run, math.prod(sizes[1:]))):
        if not run:
            ranges.append((0, 1))
            steps.append(0)
            continue
        if any(offset[d] != 0 or lshape[d] != gshape[d] for d in run[:-1]):
            return None  # the box cuts an inner dim of the run: not one block (the general plan says so)
        outer, inner = run[-1], math.prod(gshape[d] for d in run[:-1])
        x0, x1 = max(offset[outer], o[outer]), min(offset[outer] + lshape[outer], o[outer] + size // inner)
        if x1 <= x0:
            return empty
        ranges.append(((x0 - o[outer]) * inner, (x1 - o[outer]) * inner))
        steps.append(lstrides[run[0]])
        base += (x0 - offset[outer]) * lstrides[outer]
    base += sum((o[d] - offset[d]) * lstrides[d] for d in range(len(gshape)) if d not in in_run)
    (r0, r1), (c0, c1) = ranges
    return (r0, r1, c0, c1, (base, steps[0] if r1 - r0 > 1 else 0, steps[1] if c1 - c0 > 1 else 0), col_dims)


def _block_plan(view, gshape, lshape, offset, name, placements):
    """Where this rank's box ``offset + [0, lshape)`` of the parameter (global shape
    ``gshape``) lies in the map ``view(parameter)``: ``(out_lo, out_hi, in_lo, in_hi, index,
    col_dims)``. ``index``: the local flat position of each entry of the block, as ``(base,
    s0, s1)`` when it is affine (a strided view of the contiguous local shard: identity, the
    transpose of a Conv1D, a row block of q/k/v), else an int64 matrix (a gather).
    ``col_dims``: the parameter dims along which the map's columns run (a shard on one of
    them splits the map's columns, so each output entry is a sum over ranks), the same on
    every rank. The strided views are read from their strides (kept per view function, weakly:
    no index tensor); any other view takes index tensors over the parameter, once per (view,
    shapes, offset), in a bounded cache."""
    shapes = (tuple(gshape), tuple(lshape), tuple(offset))
    try:
        per_view = _AFFINE.get(view)
        if per_view is None:
            per_view = _AFFINE[view] = {}
    except TypeError:  # a view that takes no weak reference: read its plan every time
        per_view = {}
    plan = per_view.get(shapes)
    if plan is not None:
        return plan
    plan = _affine_plan(view, *shapes)
    if plan is not None:
        if len(per_view) >= _AFFINE_PER_VIEW:
            per_view.clear()
        per_view[shapes] = plan
        return plan
    key = (view, tuple(gshape), tuple(lshape), tuple(offset))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    G = torch.arange(math.prod(gshape)).view(tuple(gshape))
    M = view(G)
    M = M.reshape(M.shape[0], -1)
    coords = _unravel(M, tuple(gshape))
    col_dims = frozenset(d for d in range(len(gshape)) if bool((coords[d] != coords[d][:, :1]).any()))
    inside = torch.ones(M.shape, dtype=torch.bool)
    for c, o, l in zip(coords, offset, lshape):
        inside &= (c >= o) & (c < o + l)
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    if rows.numel() == 0:
        plan = (0, 0, 0, 0, (0, 0, 0), col_dims)
    else:
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if (r1 - r0) * (c1 - c0) != int(inside.sum()) or not bool(inside[r0:r1, c0:c1].all()):
            raise ValueError(f"{name}: this rank's shard of the parameter (placements {tuple(placements)}) is not "
                             f"one rectangular block of the map's matrix, which the sharded penalty needs")
        local = torch.zeros_like(M[r0:r1, c0:c1])
        stride = 1
        for c, o, l in reversed(list(zip(coords, offset, lshape))):
            local += (c[r0:r1, c0:c1] - o) * stride
            stride *= l
        base = int(local[0, 0])
        s0 = int(local[1, 0] - base) if local.shape[0] > 1 else 0
        s1 = int(local[0, 1] - base) if local.shape[1] > 1 else 0
        affine = base + s0 * torch.arange(local.shape[0])[:, None] + s1 * torch.arange(local.shape[1])[None]
        affine_ok = s0 >= 0 and s1 >= 0 and torch.equal(affine, local)  # (as_strided takes no negative stride)
        plan = (r0, r1, c0, c1, (base, s0, s1) if affine_ok else local, col_dims)
    _PLANS[key] = plan
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)
    return plan


# _mesh_split's answers (small tuples and the mesh's groups, no tensor) per (shape, mesh,
# placements): compute_local_shape_and_global_offset took most of a block's set-up, which
# every call repeats; bounded
_SPLITS: "OrderedDict[tuple, tuple]" = OrderedDict()
_SPLITS_MAX = 256


def _mesh_split(W, name: str):
    """:func:`_mesh_split_uncached` with its groups and their keys, once per (shape, mesh,
    placements): ``(offset, [(parameter dim, group, group key)])``."""
    mesh = W.device_mesh
    # by the mesh object (held weakly: a new mesh, over new groups, is a new entry even where
    # it equals an old one)
    key = (tuple(W.shape), id(mesh), tuple(W.placements))
    hit = _SPLITS.get(key)
    if hit is not None and hit[0]() is mesh:
        return hit[1]
    offset, split = _mesh_split_uncached(W, name)
    out = (offset, [(d, mesh.get_group(k), _group_key(mesh.get_group(k))) for k, d in split])
    _SPLITS[key] = (weakref.ref(mesh), out)
    while len(_SPLITS) > _SPLITS_MAX:
        _SPLITS.popitem(last=False)
    return out


def _mesh_split_uncached(W, name: str):
    """``(local box offset, [(mesh dim, parameter dim)])`` of a DTensor weight: the mesh dims
    that shard it and the parameter dim each shards. ``Shard(d)`` on any mesh dim, and the
    ``_StridedShard`` FSDP2 puts over a tensor-parallel shard of the same dim (the rank's
    part is then still one box: the split factor is the size of the later mesh dims that
    shard that dim). Anything else (``Partial``, other strided shards) is refused by name."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover
        _StridedShard = ()

    placements, mesh = tuple(W.placements), W.device_mesh
    split = []
    for k, p in enumerate(placements):
        if isinstance(p, Replicate):
            continue
        if isinstance(p, _StridedShard):
            later = math.prod(mesh.size(j) for j in range(k + 1, len(placements))
                              if type(placements[j]) is Shard and placements[j].dim == p.dim)
            if p.split_factor != later:
                raise ValueError(f"{name}: the weight's placement {p} on mesh dim {k} (placements {placements}) "
                                 f"leaves this rank strided rows, not one block of the weight; the sharded penalty "
                                 f"supports the strided shard FSDP2 puts over a tensor-parallel Shard of the same "
                                 f"dim (split factor {later} here)")
        elif type(p) is not Shard:
            raise ValueError(f"{name}: the sharded penalty supports weights sharded (Shard(d), FSDP2's strided shard "
                             f"over tensor parallelism) or replicated on each mesh dim, not {p} (a pending sum) on "
                             f"mesh dim {k}; got the weight's placements {placements}")
        split.append((k, p.dim % W.dim()))
    if not split:
        return (0,) * W.dim(), []
    _, offset = compute_local_shape_and_global_offset(W.shape, mesh, placements)
    return tuple(offset), split


class _Block:
    """A dense map (a view of a possibly sharded parameter: a Linear's weight, a Conv1D's
    transpose, a q/k/v row block) on this rank: the block ``A[out_lo:out_hi, in_lo:in_hi]``
    of the map that the rank's shard holds, on a mesh of any number of dims. Each mesh dim
    that shards the parameter either splits the map's rows (``rgroups``: FSDP2 / Colwise on
    a Linear, q/k/v rows) or its columns (``cgroups``: RowwiseParallel, FSDP2 on a Conv1D);
    the power step (:func:`power_step_`) sums ``t`` over both kinds, ``A^T t`` (formed once
    ``t`` is summed over ``cgroups``) over both kinds as well. ``two_pass``: some mesh dim
    splits the columns."""

    geometry = None

    def __init__(self, W: torch.Tensor, view, name: str, out_vec: torch.Tensor, in_vec: torch.Tensor):
        self.name, self.shape = name, tuple(W.shape)
        self.m, self.n = out_vec.numel(), in_vec.numel()
        offset, split, placements = (0,) * W.dim(), [], ()
        if _is_dtensor(W):
            placements = tuple(W.placements)
            offset, split = _mesh_split(W, name)
            self.local = W.detach().to_local()
        else:
            self.local = W.detach()
        with torch.no_grad():
            probe = view(torch.empty(self.shape, device="meta"))
        if (probe.shape[0], math.prod(probe.shape[1:])) != (self.m, self.n) or out_vec.dim() != 1 or in_vec.dim() != 1:
            raise ValueError(f"{name}: state u, v must have shapes ({probe.shape[0]},), "
                             f"({math.prod(probe.shape[1:])},) for its map, got {tuple(out_vec.shape)}, "
                             f"{tuple(in_vec.shape)}")
        (self.out_lo, self.out_hi, self.in_lo, self.in_hi, self.index, col_dims) = _block_plan(
            view, self.shape, tuple(self.local.shape), offset, name, placements)
        self.rgroups = tuple(g for d, g, _ in split if d not in col_dims)
        self.cgroups = tuple(g for d, g, _ in split if d in col_dims)
        self.rkeys = tuple(k for d, _, k in split if d not in col_dims)
        self.ckeys = tuple(k for d, _, k in split if d in col_dims)
        self.two_pass = bool(self.cgroups)

    @property
    def group(self):
        """A process group the map is sharded over (None: the rank holds the whole map)."""
        return (self.rgroups + self.cgroups)[0] if self.rgroups or self.cgroups else None

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


def _group_key(group) -> tuple:
    """A process group by its ranks: the meshes that FSDP2 and tensor parallelism build over
    the same ranks (a 2-D mesh and its 1-D submesh) hand out distinct group objects for one
    set of ranks, and the power step coalesces them into one all-reduce."""
    return tuple(dist.get_process_group_ranks(group))


def _keyed(shards, ids):
    """``({key: group} in first-seen order, {layer: row keys}, {layer: column keys})``."""
    groups: Dict[tuple, object] = {}
    rk, ck = {}, {}
    for l in ids:
        sh = shards[l]
        for out, gs, keys in ((rk, sh.rgroups, getattr(sh, "rkeys", None)),
                              (ck, sh.cgroups, getattr(sh, "ckeys", None))):
            out[l] = list(keys) if keys is not None else [_group_key(g) for g in gs]
            for g, k in zip(gs, out[l]):
                groups.setdefault(k, g)
    return groups, rk, ck


def _schedule(shards: Sequence, ids: Sequence[int]):
    """The all-reduces of one power iteration of the layers ``ids``, the same list on every
    rank: ``(phase, group, [(layer, part)])`` with ``part`` "t" (the zero-padded ``t`` and the
    non-finite flag) or "a" (the zero-padded ``A^T t``). A layer needs ``t`` summed over every
    group that shards it, and ``A^T t`` too; a layer with column groups forms its ``A^T t``
    only once ``t`` is summed over them. So: phase 1, per column group: the ``t`` of the
    layers it splits by columns, with ``t`` and ``A^T t`` of the row-only layers it shards;
    phase 2, per row group of the rest: ``t`` and ``A^T t``; phase 3, per column group: the
    ``A^T t`` of the layers it splits by columns. One all-reduce per group per phase,
    whatever the number of layers: on one mesh dim 1 (rows only) or 2; FSDP2 x TP with
    Rowwise maps 3 (tp, dp, tp)."""
    groups, rk, ck = _keyed(shards, ids)
    cols = list(dict.fromkeys(k for l in ids for k in ck[l]))
    out = []
    for k in cols:
        parts = []
        for l in ids:
            if k in ck[l]:
                parts.append((l, "t"))
            elif not ck[l] and k in rk[l]:
                parts += [(l, "t"), (l, "a")]
        out.append((1, groups[k], parts))
    rows = list(dict.fromkeys(k for l in ids for k in rk[l] if ck[l] or k not in cols))
    for k in rows:
        out.append((2, groups[k], [(l, p) for l in ids if k in rk[l] and (ck[l] or k not in cols) for p in "ta"]))
    for k in cols:
        out.append((3, groups[k], [(l, "a") for l in ids if k in ck[l]]))
    return out


def _all_reduce_parts(group, parts, T, A):
    """One sum all-reduce over ``group`` of the vectors ``parts`` names, in place."""
    vecs = [T[l] if part == "t" else A[l] for l, part in parts]
    if not vecs:
        return
    buf = torch.cat(vecs) if len(vecs) > 1 else vecs[0]
    dist.all_reduce(buf, group=group)
    if len(vecs) > 1:
        for v, piece in zip(vecs, buf.split([v.numel() for v in vecs])):
            v.copy_(piece)


def power_step_(weights: Sequence[torch.Tensor], us: List[torch.Tensor], vs: List[torch.Tensor], n_iter: int = 1,
                names: Optional[Sequence[str]] = None, conv_specs: Sequence = (), views=None) -> torch.Tensor:
    """``n_iter`` power steps on (possibly sharded) weights, in place on the replicated
    vectors, with the conventions of ``ops.power_step_`` / ``ops.conv_power_step_`` (a zero
    weight keeps its vectors, a non-finite one rolls them back and gets a NaN estimate);
    returns the estimates (identical on every rank). The last ``len(conv_specs)`` weights
    are convs (``us``: their output-shaped ``y``, ``vs``: their input-shaped ``x``). Per
    step, the all-reduces of :func:`_schedule` (one per process group and phase, for all
    layers together); layers that are not sharded take no collective (dense ones the
    single-process fused op)."""
    names = _names(names, len(weights))
    shards = _shards(weights, us, vs, names, _conv_geometries(conv_specs), views)
    est = torch.zeros(len(shards), dtype=out_dtype([sh.local for sh in shards]),
                      device=us[0].device if us else torch.device("cpu"))
    fused = [l for l, sh in enumerate(shards) if sh.group is None and sh.geometry is None]
    if fused:
        e = _ops.power_step_([shards[l].local2d for l in fused], [us[l] for l in fused], [vs[l] for l in fused],
                             n_iter, 0.0)
        est[fused] = e.to(est.dtype)
    sharded = [l for l, sh in enumerate(shards) if sh.group is not None]
    # the sharded layers together; a conv the rank holds whole on its own (no collective)
    with torch.no_grad():
        for ids in [sharded] * bool(sharded) + [[l] for l, sh in enumerate(shards)
                                                  if sh.group is None and sh.geometry is not None]:
            _step_layers(shards, ids, us, vs, n_iter, est)
    return est


def _step_layers(shards, ids, us, vs, n_iter, est):
    ws = {l: shards[l].weight(us[l].dtype) for l in ids}
    # a float64 sum is non-finite iff an entry is (float32/bf16 weights cannot overflow it):
    # one read of the shard, with no bool temporary (isfinite().all() took 3x the two mv of a
    # 512x1024 shard here)
    nonfinite = {l: (~torch.isfinite(ws[l].sum(dtype=torch.float64))).to(us[l].dtype) for l in ids}
    saved = {l: (us[l].clone(), vs[l].clone()) for l in ids}
    schedule = _schedule(shards, ids)
    T: Dict[int, torch.Tensor] = {}
    for _ in range(n_iter):
        A: Dict[int, torch.Tensor] = {}
        for l in ids:  # t's partial (this rank's output entries) and the flag; A^T t where t is whole here
            sh = shards[l]
            T[l] = torch.zeros(sh.m + 1, dtype=us[l].dtype, device=us[l].device)
            T[l][sh.out_lo:sh.out_hi] = sh.apply(ws[l], vs[l].reshape(-1)[sh.in_lo:sh.in_hi])
            T[l][sh.m] = nonfinite[l]
            if not sh.cgroups:
                A[l] = _adjoint_part(sh, ws[l], T[l], vs[l])
        for phase, group, parts in schedule:
            if phase >= 2 and len(A) < len(ids):  # t is summed over the column groups: A^T t
                for l in ids:
                    if l not in A:
                        A[l] = _adjoint_part(shards[l], ws[l], T[l], vs[l])
            _all_reduce_parts(group, parts, T, A)
        for l in ids:
            est[l] = normalize_(T[l][:shards[l].m], A[l], us[l].view(-1), vs[l].view(-1))[0].to(est.dtype)
    if n_iter == 0:  # the estimate at the current vectors
        est[ids] = _local_sigmas([shards[l] for l in ids], [us[l] for l in ids], [vs[l] for l in ids]).to(est.dtype)
        return
    for l in ids:
        if bool(T[l][shards[l].m] > 0):  # some rank's shard is not finite
            us[l].copy_(saved[l][0])
            vs[l].copy_(saved[l][1])
            est[l] = math.nan


def _adjoint_part(sh, W, t, v):
    """``A_r^T t`` of this rank's block, zero-padded to the n-vector (``t``: the m-vector,
    whole over the rank's output entries)."""
    a = torch.zeros(sh.n, dtype=v.dtype, device=v.device)
    a[sh.in_lo:sh.in_hi] = sh.adjoint(W, t[sh.out_lo:sh.out_hi])
    return a


def _local_sigmas(shards: Sequence[_Shard], us, vs) -> torch.Tensor:
    """``<u, A v>`` of every layer, detached, identical on every rank: the per-rank partials
    ``<u_r, A_r v_r>`` summed by one all-reduce per process group that shards some layer."""
    out = torch.zeros(len(shards), dtype=out_dtype([sh.local for sh in shards]),
                      device=us[0].device if us else torch.device("cpu"))
    with torch.no_grad():
        part = torch.stack([us[l].reshape(-1)[sh.out_lo:sh.out_hi].double()
                            @ sh.apply(sh.weight(us[l].dtype), vs[l].reshape(-1)[sh.in_lo:sh.in_hi]).double()
                            for l, sh in enumerate(shards)]) if shards else out.double()
        groups, rk, ck = _keyed(shards, range(len(shards)))
        for k, g in groups.items():
            ids = [l for l in range(len(shards)) if k in rk[l] or k in ck[l]]
            p = part[ids]
            dist.all_reduce(p, group=g)
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
