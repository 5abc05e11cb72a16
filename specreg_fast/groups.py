"""The penalty's maps by kind: one class per kind of linear map.

A group owns the maps of one kind: the keys of their state buffers (held by the penalty, so
that ``state_dict``, ``.to()`` and ``load_state_dict`` see them), its plan (the validated
per-call constants, cached), its frozen subset, its power step through the norm function of
its kind, its differentiable sigmas and its ``.grad`` writer. :class:`SpectralPenalty`
keeps the surface (arguments, schedule, state, compile variant, reporting) and loops::

    calls = [g.prepare() for g in groups]          # checks: raise before any vector moves
    sig, rec = g.sigmas(call, live, update, n_iter, grad)   # per group, its live maps
    g.add_grads(call, live, rec, coefs)           # accumulate_grad()

A new kind of map is one class here and its tests.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from . import conv as _conv
from . import dense as _dense
from . import distributed as _distributed
from . import layers as _layers
from . import ops as _ops
from .bounds import operator_norm_bounds
from .conv import ConvSpec, ConvState, validate_state as _validate_convs
from .fft import CircularState, circular_conv_norms, circular_params, circular_power_pairs, init_circular_state
from .geometry import pack_conv_params

__all__ = ["MapGroup", "DenseGroup", "LowRankGroup", "ConvOperatorGroup", "CircularGroup", "ShardedGroup",
           "build_groups", "MapSet"]


# ---------------------------------------------------------------------- shared helpers
def _grad_of(P: torch.Tensor) -> torch.Tensor:
    """``P.grad``, created as zeros where it is None (for in-place accumulation)."""
    if P.grad is None:
        P.grad = torch.zeros_like(P)
    return P.grad


def _rank1(left: torch.Tensor, right: torch.Tensor, c, dtype: torch.dtype):
    """``(left, right, alpha)`` for ``G.addr_`` adding ``c left right^T`` in ``dtype``: a Python
    float ``c`` (CPU) stays the alpha; a 0-d device tensor is folded into ``left`` so that
    nothing waits for the device."""
    if left.dtype != dtype:  # (a no-op .to() still costs a dispatch per map and call)
        left = left.to(dtype)
    if right.dtype != dtype:
        right = right.to(dtype)
    if isinstance(c, torch.Tensor):
        return left * c.to(dtype), right, 1.0
    return left, right, c


def _computed(mp: _layers.LinearMap) -> bool:
    """A parametrized weight: recomputed on every access (under no_grad, a tensor with no
    way back to its parameters), so ``accumulate_grad`` goes through autograd for it."""
    if mp.attr is None:
        return False
    # parametrize.is_parametrized(module, attr), without its getattr: nn.Module's __getattr__
    # raises (and is caught) for every module that holds no ``parametrizations``, which was
    # most of ``live()``'s cost per call on MobileNetV3-small's 53 maps
    pz = mp.module._modules.get("parametrizations")
    return isinstance(pz, torch.nn.ModuleDict) and mp.attr in pz


def _add_rank1(mp: _layers.LinearMap, G: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha=1.0) -> None:
    """``G += alpha * V^*(left right^T)``, ``V^*`` the adjoint of the map's view of its parameter:
    a rank-1 update in place through the map's view of ``G`` (a transposed view, a row
    block...), or, where that view has to copy (e.g. a channels_last ``G``), through autograd."""
    Gm = mp.grad_view(G)
    if Gm is not None:
        Gm.addr_(left, right, alpha=alpha)
        return
    with torch.enable_grad():
        Gd = torch.zeros_like(G, requires_grad=True)  # the view is linear: its adjoint at any point
        (gW,) = torch.autograd.grad(mp.view(Gd), Gd, torch.outer(left, right))
    G.add_(gW, alpha=alpha)


def _frozen(mp: _layers.LinearMap) -> bool:
    """Whether no parameter of the map requires grad (its sigma cannot change in training).
    A weight computed by ``extra=`` is never taken to be frozen (its parameters are unknown)."""
    if mp.attr is None:
        return False
    if _computed(mp):
        return not any(q.requires_grad for q in mp.module.parametrizations[mp.attr].parameters())
    return not mp.param().requires_grad


class _PerParamSigma(torch.autograd.Function):
    """Sigmas of the plain dense maps of one tensor (``est``, the power step's estimates) with
    the bilinear form's gradient ``u v^T`` per map. ``group``: ``("param", [(i, map)], whole)``
    for maps that are views of the parameter ``T`` (an attention's q, k, v row blocks of
    ``in_proj_weight``, a 1x1 conv's reshaped kernel, a transposed ``Conv1D``): their rank-1
    blocks go into one parameter-sized gradient in place, through the maps' views (``whole``:
    one map covering the parameter, so no zero fill). Autograd through the views instead
    gives each q/k/v map a zero-filled parameter-sized gradient and sums them: 3 fills, 3
    copies and 2 sums of the whole parameter where one fill and three rank-1 writes do.
    ``("map", [0], _)``: ``T`` is the map's own weight (16-bit, computed): ``ops.rank1_grad``."""

    @staticmethod
    def forward(ctx, est, group, us, vs, T):
        # copies of the vectors: the next power step rewrites them in place (ops.sigma's reason)
        ctx.group, ctx.meta = group, (T.dtype, T.shape, T.device)
        ctx.save_for_backward(*[u.clone() for u in us], *[v.clone() for v in vs])
        return est.clone()

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = len(saved) // 2
        us, vs = saved[:n], saved[n:]
        kind, entries, whole = ctx.group
        dtype, shape, device = ctx.meta
        if kind == "map":
            return None, None, None, None, _ops.rank1_grad(us[0], vs[0], grad[0], dtype)
        # as rank1_grad: scale the short vector
        lefts = [(us[i] * grad[i].to(us[i].dtype)).to(dtype) for i, _ in entries]
        G = torch.empty(shape, dtype=dtype, device=device)
        Gm = entries[0][1].grad_view(G) if whole else None
        if Gm is not None:  # one map covering the parameter through a view: written, no fill
            Gm.addr_(lefts[0], vs[0].to(dtype), beta=0)
        else:
            G.zero_()
            for (i, mp), left in zip(entries, lefts):
                _add_rank1(mp, G, left, vs[i].to(dtype))
        return None, None, None, None, G


def _per_param_sigma(maps: List[_layers.LinearMap], ws: List[torch.Tensor], us, vs, est: torch.Tensor):
    """``ops.sigma_from_step(ws, us, vs, est)`` (value ``est``, gradient ``u v^T`` per map) with
    the gradient reaching each map's parameter directly (:class:`_PerParamSigma`), one
    autograd node per parameter: autograd adds each parameter's gradient into ``.grad`` and
    frees it before the next node runs, so the parameter-sized temporaries reuse memory (one
    node for all would hold all of them at once: fresh pages, page faults, on every call).
    Eager mode; under torch.compile the op itself."""
    if torch.compiler.is_compiling():
        return _ops.sigma_from_step(ws, us, vs, est)
    groups, tensors, slot = [], [], {}
    for i, (mp, w) in enumerate(zip(maps, ws)):
        if not w.requires_grad:
            continue
        P = None if mp.attr is None or _computed(mp) else mp.param()
        if P is None or P.dtype not in (torch.float32, torch.float64):
            groups.append(("map", [i], True))
            tensors.append(w)
            continue
        k = slot.get(id(P))
        if k is None:
            slot[id(P)] = len(groups)
            groups.append(("param", [i], w.numel() == P.numel()))
            tensors.append(P)
        else:
            groups[k] = ("param", groups[k][1] + [i], False)
    if not tensors:
        return est
    outs, index = [], []
    for (kind, idx, whole), T in zip(groups, tensors):
        local = ("map", [0], True) if kind == "map" else ("param", [(j, maps[i]) for j, i in enumerate(idx)], whole)
        # one map (the common case): a slice, not an index tensor built and gathered per map
        part = est[idx[0]:idx[0] + 1] if len(idx) == 1 else est[idx]
        outs.append(_PerParamSigma.apply(part, local, [us[i] for i in idx], [vs[i] for i in idx], T))
        index += idx
    if index == list(range(est.shape[0])):  # every map, in order: the scatter would overwrite all of est
        return torch.cat(outs) if len(outs) > 1 else outs[0]
    return est.index_put((torch.tensor(index, device=est.device),), torch.cat(outs))


def _value_of_step(*args):
    """The step's estimates (the last argument) as the sigmas, with no differentiable wrapper
    (``accumulate_grad``)."""
    return args[-1]


def _planned(raw, typed, *args):
    """``raw(*args)``: an op called straight on arguments the group's cached plan has checked
    (state shapes, dtypes, devices, disjointness, the packed geometry), without the typed
    wrapper's per-call conversions and checks (list copies, conjugate-view scans of every
    vector, int/float/params coercions): on MobileNetV3-small those ran on 53 maps per call.
    Should the op refuse anyway (e.g. ``n_iter`` changed to a bad value after the plan was
    built), it refuses before writing anything, and the typed wrapper ``typed(*args)`` runs
    instead to raise the ValueError/TypeError naming the argument."""
    if torch.compiler.is_compiling():
        return typed(*args)
    try:
        return raw(*args)
    except RuntimeError as err:
        if "interrupted (KeyboardInterrupt)" in str(err):
            raise
        return typed(*args)


class Call(NamedTuple):
    """One call's view of a group: its weights now and the plan's constants."""
    ws: list
    plan: object


def _parametrized(module, attr) -> bool:
    from torch.nn.utils import parametrize
    return module is not None and parametrize.is_parametrized(module, attr)


# ---------------------------------------------------------------------- the kinds
class MapGroup:
    """The maps of one kind. ``positions``: each map's slot among the penalty's maps (its
    sigma's index); ``keys``: each map's state buffer names, looked up in ``buffers`` (the
    penalty's buffer dict) at every call, since ``.to()`` replaces the tensors."""

    kind = "?"

    def __init__(self, buffers: Dict[str, torch.Tensor], maps: Sequence[_layers.LinearMap], positions: Sequence[int],
                 keys: Sequence[tuple], input_shapes: Optional[Dict[str, tuple]] = None):
        self._buffers, self.maps, self.positions, self.keys = buffers, list(maps), list(positions), list(keys)
        self._input_shapes = input_shapes if input_shapes is not None else {}
        self._plan = None

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def names(self) -> List[str]:
        return [mp.name for mp in self.maps]

    def vectors(self, slot: int) -> List[torch.Tensor]:
        """Slot ``slot`` of every map's state (0: u / y side... as ``keys`` orders them)."""
        return [self._buffers[k[slot]] for k in self.keys]

    def specs(self) -> List[ConvSpec]:
        return [ConvSpec.from_module(mp.module, self._input_shapes[mp.owner]) for mp in self.maps]

    def weights(self) -> list:
        return [mp.weight() for mp in self.maps]

    def _cached(self, key, build):
        """The plan for ``key``, built by ``build()`` once per key in eager mode: re-packing
        and re-validating on every call was about a tenth of ``accumulate_grad``'s time on the
        benchmark CNN (``bench/bench_training.py``). Under torch.compile built on every trace."""
        if torch.compiler.is_compiling():
            return build()
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, build())
        return self._plan[1]

    def _key(self, ws) -> tuple:
        """What the plan depends on: every weight's shape/dtype/device and the state buffers
        (by identity: ``.to()`` replaces them, ``load_state_dict`` copies into them)."""
        return (tuple((w.shape, w.dtype, w.device) for w in ws),
                tuple(id(self._buffers[k]) for ks in self.keys for k in ks))

    def prepare(self) -> Call:
        """This call's weights and the validated plan; raises (naming the layer) before any
        vector moves."""
        raise NotImplementedError

    def frozen(self, call: Call) -> tuple:
        """Indices of the maps no parameter of which requires grad."""
        return tuple(i for i, mp in enumerate(self.maps) if _frozen(mp))

    def live(self, call: Call, skip_frozen: bool) -> tuple:
        """The maps this call steps: all, or with ``skip_frozen`` (once the warm start is
        done) all but the frozen ones, whose sigma cannot change: their power step would only
        refine an estimate that is a constant of the loss."""
        if not skip_frozen:
            return tuple(range(len(self)))
        frozen = set(self.frozen(call))
        return tuple(i for i in range(len(self)) if i not in frozen)

    def sigmas(self, call: Call, live: Sequence[int], update: bool, n_iter: int, grad: bool, record: bool):
        """``(sigmas of the maps live, record)``: ``n_iter`` power steps when ``update``; with
        ``grad`` differentiable in the weights; with ``record`` (under no_grad) also what
        :meth:`add_grads` needs."""
        raise NotImplementedError

    def add_grads(self, call: Call, live: Sequence[int], record, coefs: Sequence) -> None:
        """``.grad += coef * d sigma / d param`` for the maps ``live`` (after :meth:`sigmas`
        under no_grad)."""
        raise NotImplementedError

    def bounds(self, n_iter: int, max_dim: int) -> Dict[str, tuple]:
        return {mp.name: operator_norm_bounds(mp.weight().detach(), None, n_iter=n_iter, max_dim=max_dim)
                for mp in self.maps}


class DenseGroup(MapGroup):
    """Dense matrices (Linear, transformers Conv1D, attention q/k/v/out, patch-conv groups,
    reshaped kernels, parametrized and ``extra=`` weights): one ``power_step_`` op call for
    all, the gradient ``u v^T`` to each parameter (:func:`_per_param_sigma`)."""

    kind = "dense"

    def prepare(self) -> Call:
        ws = self.weights()

        def build():
            us, vs = self.vectors(0), self.vectors(1)
            _dense.validate_state(ws, _dense.PowerState(us, vs), self.names)
            return us, vs

        return Call(ws, self._cached(self._key(ws), build))

    def sigmas(self, call, live, update, n_iter, grad, record):
        us_all, vs_all = call.plan
        ws = [call.ws[i] for i in live]
        maps = [self.maps[i] for i in live]
        from_step = (lambda w, u, v, est: _per_param_sigma(maps, w, u, v, est)) if grad else _value_of_step
        us, vs = [us_all[i] for i in live], [vs_all[i] for i in live]
        if update and n_iter >= 1 and all(w.device.type == "cpu" for w in ws):
            # dense.step_sigmas's CPU route, the op called on the plan's checked state
            with torch.no_grad():
                est = _planned(torch.ops.specreg_fast.power_step_, _ops.power_step_, [w.detach() for w in ws], us, vs,
                               n_iter, 0.0)
            return from_step(ws, us, vs, est), None
        return _dense.step_sigmas(ws, _dense.PowerState(us, vs), n_iter, update, from_step=from_step), None

    def add_grads(self, call, live, record, coefs):
        us, vs = call.plan
        for k, i in enumerate(live):
            mp = self.maps[i]
            if mp.attr is None or _computed(mp):  # its gradient reaches its parameters through autograd
                with torch.enable_grad():
                    Wx = mp.weight()
                    if Wx.requires_grad:
                        Wx.backward(torch.outer(us[i], vs[i]).to(Wx.dtype) * coefs[k])
                continue
            W = mp.param()
            if not W.requires_grad:  # a frozen layer gets no gradient, as on the autograd route
                continue
            G = _grad_of(W)
            u, v, c = _rank1(us[i], vs[i], coefs[k], G.dtype)
            _add_rank1(mp, G, u, v, alpha=c)  # into the map's block of .grad


class LowRankGroup(MapGroup):
    """LoRA maps ``W + sum_k s_k B_k A_k``, kept as factors (:func:`dense.lowrank_sigmas`):
    the matrix is never built, the gradients go to ``W``, ``B``, ``A`` as rank-1 terms."""

    kind = "lowrank"

    def prepare(self) -> Call:
        # the factors first: an adapter refused here (a LoRA variant) raises before any vector moves
        factors = [mp.factors() for mp in self.maps]
        likes = [M.like() for M in factors]

        def build():
            us, vs = self.vectors(0), self.vectors(1)
            _dense.validate_state(likes, _dense.PowerState(us, vs), self.names)
            return us, vs

        return Call(factors, self._cached(self._key(likes), build))

    def frozen(self, call):
        return tuple(i for i, M in enumerate(call.ws)
                     if not any(t.requires_grad for t in (M.base, *M.Bs, *M.As)))

    def sigmas(self, call, live, update, n_iter, grad, record):
        us, vs = call.plan
        with torch.set_grad_enabled(grad):
            return _dense.lowrank_sigmas([call.ws[i] for i in live], [us[i] for i in live], [vs[i] for i in live],
                                         n_iter, update=update, validate=False), None

    def add_grads(self, call, live, record, coefs):
        us, vs = call.plan
        for k, i in enumerate(live):
            for P, left, right in _dense.lowrank_grads(call.ws[i], us[i], vs[i]):
                left, right, c = _rank1(left, right, coefs[k], P.dtype)
                _grad_of(P).addr_(left, right, alpha=c)


class _ConvGroup(MapGroup):
    """What the two conv kinds share: the ``.grad`` writer from each layer's (x, y) pair."""

    def add_grads(self, call, live, pairs, coefs):
        # dsigma/dW of each conv: the conv weight-gradient of its pair, times 2 gamma sigma
        # scale, as the autograd route's backward computes it (the coefficient scales the
        # output-sized y, not the weight-sized gradient)
        for k, i in enumerate(live):
            mp = self.maps[i]
            if _computed(mp):  # the pair's weight-gradient, through the parametrization
                x, y, params, mode = pairs[k]
                with torch.enable_grad():
                    Wc = mp.param()
                    if Wc.requires_grad:
                        gW = _ops.conv_weight_grad([Wc.detach()], [x], [y * coefs[k]], params, [mode])[0]
                        Wc.backward(gW.to(Wc.dtype))
        P = {k: self.maps[i].param() for k, i in enumerate(live) if not _computed(self.maps[i])}
        train = [k for k in P if P[k].requires_grad]
        direct = self._depthwise_live(call, live)
        # One op call for the layers with a .grad, added in place (conv_weight_grad_add_: no
        # weight-sized temporary where the direct kernels run), one for those without; the
        # depthwise layers the plan routes to csrc/cpu/depthwise_cpu.cpp in one call of their own.
        for fresh in (False, True):
            ks = [k for k in train if (P[k].grad is None) == fresh]
            dks = [k for k in ks if k in direct and (fresh or (P[k].grad.is_contiguous()
                                                              and P[k].grad.dtype == P[k].dtype))]
            if dks:
                ws = [P[k] for k in dks]
                Gs = ([torch.zeros_like(W, memory_format=torch.contiguous_format) for W in ws] if fresh
                      else [W.grad for W in ws])
                _ops.depthwise_weight_grad_add_(Gs, [W.detach() for W in ws], [pairs[k][0] for k in dks],
                                                [pairs[k][1] * coefs[k] for k in dks],
                                                [q for k in dks for q in pairs[k][2]], [pairs[k][3] for k in dks])
                if fresh:
                    for W, G in zip(ws, Gs):
                        W.grad = G
                ks = [k for k in ks if k not in set(dks)]
            if not ks:
                continue
            ws = [P[k] for k in ks]
            args = ([W.detach() for W in ws], [pairs[k][0] for k in ks], [pairs[k][1] * coefs[k] for k in ks],
                    [q for k in ks for q in pairs[k][2]], [pairs[k][3] for k in ks])
            if fresh:
                for W, gW in zip(ws, _ops.conv_weight_grad(*args)):
                    W.grad = gW.to(W.dtype)
            else:
                _ops.conv_weight_grad_add_([W.grad for W in ws], *args)

    def _depthwise_live(self, call, live) -> frozenset:
        """Positions ``k`` in ``live`` of the layers whose weight-gradient takes the depthwise
        kernels (none here: :class:`ConvOperatorGroup` routes some)."""
        return frozenset()

    def bounds(self, n_iter, max_dim):
        return {mp.name: operator_norm_bounds(mp.module, self._input_shapes[mp.owner], n_iter=n_iter, max_dim=max_dim)
                for mp in self.maps}


class ConvOperatorGroup(_ConvGroup):
    """Conv operators with the layer's own padding at the input size it sees: one
    ``conv_power_step_`` op call for all (the per-layer loop in C++), gradients the conv
    weight-gradient of each layer's (x, y)."""

    kind = "conv"

    def _key(self, ws):
        return (super()._key(ws), tuple((m.stride, m.padding, m.dilation, m.groups, m.padding_mode, m.output_padding,
                                         self._input_shapes[mp.owner]) for mp in self.maps for m in [mp.module]),
                _ops.depthwise_kernel())

    def prepare(self) -> Call:
        ws = self.weights()

        def build():
            xs, ys = self.vectors(0), self.vectors(1)
            specs = self.specs()
            _validate_convs(specs, ConvState(xs, ys), self.names)
            packed = [pack_conv_params([sp]) for sp in specs]
            params, modes = [p for p, _ in packed], [m[0] for _, m in packed]
            dw = tuple(_depthwise_route(w, p, m, sp.input_shape) for w, p, m, sp in zip(ws, params, modes, specs))
            return xs, ys, params, modes, {}, dw

        return Call(ws, self._cached(self._key(ws), build))

    def _split(self, call, live):
        """Per set of live maps (cached in the plan): their packed params, and where some are
        routed to the depthwise kernels, ``(dw, other, dw params, other params, perm)``: their
        positions in ``live``, their params, and the permutation from ``dw + other`` order back
        to ``live``'s."""
        _, _, params_all, modes_all, flat, dw = call.plan
        out = flat.get(live)
        if out is None:
            params = [q for j in live for q in params_all[j]]
            di = [k for k, j in enumerate(live) if dw[j]]
            oi = [k for k, j in enumerate(live) if not dw[j]]
            split = None
            if di:
                order = di + oi
                inv = sorted(range(len(order)), key=order.__getitem__)
                perm = None if order == list(range(len(order))) else torch.tensor(inv)
                split = (di, oi, [q for k in di for q in params_all[live[k]]],
                         [q for k in oi for q in params_all[live[k]]], perm)
            out = (params, split)
            if not torch.compiler.is_compiling():
                flat[live] = out
        return out

    def _depthwise_live(self, call, live):
        split = self._split(call, tuple(live))[1]
        return frozenset(split[0]) if split is not None else frozenset()

    def sigmas(self, call, live, update, n_iter, grad, record):
        xs_all, ys_all, params_all, modes_all, flat, dw = call.plan
        live = tuple(live)
        params, split = self._split(call, live)
        ws = [call.ws[j] for j in live]
        xs, ys, modes = [xs_all[j] for j in live], [ys_all[j] for j in live], [modes_all[j] for j in live]
        if split is None or not (update and n_iter > 0):
            sig = _conv_step_sigmas(ws, xs, ys, params, modes, n_iter, update, grad)
        else:
            sig = _split_step_sigmas(ws, xs, ys, params, modes, split, n_iter, grad)
        return sig, [(xs_all[j], ys_all[j], params_all[j], modes_all[j]) for j in live]


def _depthwise_route(weight: torch.Tensor, params, mode: str, input_shape) -> bool:
    """Whether a conv-operator layer's power step and weight-gradient take the depthwise
    kernels (csrc/cpu/depthwise_cpu.cpp): a CPU depthwise layer they support, with the
    compiled library loaded, and by :func:`ops.set_depthwise_kernel`'s choice (``auto``: where
    :func:`ops.depthwise_preferred` says they beat ATen)."""
    choice = _ops.depthwise_kernel()
    if choice == "aten" or not _ops.HAS_CPP_EXT or weight.device.type != "cpu":
        return False
    if weight.dim() != 4 or weight.shape[1] != 1:
        return False
    g = _ops.decode_conv_params("depthwise", [weight], params, [mode])[0]
    if not _ops.depthwise_supported(weight, g):
        return False
    return choice == "direct" or _ops.depthwise_preferred(weight, g, tuple(input_shape))


def _split_step_sigmas(ws, xs, ys, params, modes, split, n_iter, grad):
    """:func:`_conv_step_sigmas` with the depthwise layers ``split`` names stepped by the
    depthwise kernels and the others by the conv op; the estimates in ``ws``'s order."""
    di, oi, p_dw, p_other, perm = split
    det = [w.detach() for w in ws]
    parts = [_planned(torch.ops.specreg_fast.depthwise_power_step_, _ops.depthwise_power_step_, [det[k] for k in di],
                      [xs[k] for k in di], [ys[k] for k in di], p_dw, [modes[k] for k in di], n_iter, 0.0)]
    if oi:
        parts.append(_planned(torch.ops.specreg_fast.conv_power_step_, _ops.conv_power_step_, [det[k] for k in oi],
                              [xs[k] for k in oi], [ys[k] for k in oi], p_other, [modes[k] for k in oi], n_iter, 0.0))
    dt = _ops.out_dtype(ws)
    est = torch.cat(parts).to(dt) if len(parts) > 1 else parts[0].to(dt)
    if perm is not None:
        est = est[perm]
    from_step = _ops.conv_sigma_from_step if grad else _value_of_step
    return from_step(ws, xs, ys, params, modes, est)


def _conv_step_sigmas(ws, xs, ys, params, modes, n_iter, update, grad):
    if update and n_iter > 0:  # conv.step_sigmas, the op called on the plan's checked state
        est = _planned(torch.ops.specreg_fast.conv_power_step_, _ops.conv_power_step_, [w.detach() for w in ws], xs,
                       ys, params, modes, n_iter, 0.0)
        return (_ops.conv_sigma_from_step if grad else _value_of_step)(ws, xs, ys, params, modes, est)
    return _conv.step_sigmas(ws, ConvState(xs, ys), params, modes, n_iter, update,
                             from_step=_ops.conv_sigma_from_step if grad else _value_of_step)


class CircularGroup(_ConvGroup):
    """Convs with wrap-around padding, the paper's Fourier-domain norm
    (:func:`fft.circular_conv_norms`; its checks run on every call, before any step)."""

    kind = "circular"

    def prepare(self) -> Call:
        return Call(self.weights(), None)

    def sigmas(self, call, live, update, n_iter, grad, record):
        all_specs = self.specs()
        specs, names = [all_specs[j] for j in live], [self.maps[j].name for j in live]
        st = CircularState([self._buffers[self.keys[j][0]] for j in live])
        with torch.autocast(device_type=specs[0].weight.device.type, enabled=False):
            if not record:
                return circular_conv_norms(specs, st, n_iter=n_iter, update=update, names=names), None
            est, x_tops, y_tops, _ = circular_power_pairs(specs, st, n_iter, update=update, names=names)
        return est, [(x, y, circular_params(sp), "circular") for sp, x, y in zip(specs, x_tops, y_tops)]


class ShardedGroup(MapGroup):
    """Every map when a regularized weight is a DTensor (FSDP2): the power step on the local
    shards with one all-reduce per iteration for all layers (:mod:`specreg_fast.distributed`),
    so dense and conv maps are one group. Frozen maps take no step (as on one process)."""

    kind = "sharded"

    def __init__(self, buffers, maps, positions, keys, input_shapes, root, conv_norm: str):
        super().__init__(buffers, maps, positions, keys, input_shapes)
        self._root, self._conv_norm = root, conv_norm

    def prepare(self) -> Optional[Call]:
        """None unless a regularized weight is a DTensor (then this group replaces the others)."""
        ws = _distributed.regularized_weights(self._root, self.maps)
        if ws is None:
            return None
        # a dense map is any view of its parameter whose shard on each rank is one block of
        # the map (distributed._Block: whole weights, a Conv1D's transpose, q/k/v row blocks,
        # split fused qkv); computed weights, low-rank factors, parametrized weights and the
        # blocks of a patch conv are refused by name
        refused = []
        for mp in self.maps:
            why = ("an extra= map's weight is computed by a callable" if mp.attr is None else
                   "LoRA on a sharded base layer is not supported" if mp.lowrank is not None else
                   "a parametrized weight (torch.nn.utils.parametrize) is not supported"
                   if _parametrized(mp.module, mp.attr) else
                   "the blocks of a patch conv are not supported (use conv_norm='operator' on a conv with "
                   "overlapping patches, or exclude it)" if mp.layer != mp.name else None)
            if why is not None:
                refused.append(f"{mp.name} ({why})")
        if refused:
            raise ValueError(f"sharded (DTensor) weights: the sharded penalty cannot regularize {'; '.join(refused)}; "
                             f"exclude them")
        convs = [mp for mp in self.maps if mp.conv]
        if convs and self._conv_norm != "operator":
            raise ValueError(f"conv_norm={self._conv_norm!r} on sharded (DTensor) weights is not supported; use "
                             f"'operator' or 'matrix'")
        specs = [ConvSpec.from_module(mp.module, self._input_shapes[mp.owner]) for mp in convs]
        views = [mp.view for mp in self.maps if not mp.conv]
        return Call(ws, (self.vectors(0), self.vectors(1), specs, views))

    def frozen(self, call):
        # the (sharded) parameters the penalty works on: the same flags on every rank
        return tuple(i for i, w in enumerate(call.ws) if not w.requires_grad)

    def _live(self, call, live):
        """The plan's lists restricted to the maps ``live`` (dense maps first, then convs)."""
        outs, ins, specs, views = call.plan
        nd = len(views)
        return ([call.ws[i] for i in live], [outs[i] for i in live], [ins[i] for i in live],
                [self.names[i] for i in live], [specs[i - nd] for i in live if i >= nd],
                [views[i] for i in live if i < nd])

    def sigmas(self, call, live, update, n_iter, grad, record):
        ws, outs, ins, names, specs, views = self._live(call, live)
        return _distributed.penalty_sigmas(ws, outs, ins, names, specs, update, n_iter, views), None

    def add_grads(self, call, live, record, coefs):
        ws, outs, ins, names, specs, views = self._live(call, live)
        _distributed.add_grads(ws, outs, ins, coefs, names, specs, views)


# ---------------------------------------------------------------------- building
class MapSet:
    """Every map of a penalty, by kind: ``groups`` (in the order they step), ``sharded`` (over
    every map: replaces the groups when a regularized weight is a DTensor), ``maps`` (the
    penalty's map order: its sigma vector; the groups' ``positions`` index it), ``gammas``
    and ``block_layers`` (blocks of one operator, a grouped patch conv: its first block's
    index). :meth:`sigmas` is the loop over the groups."""

    def __init__(self, groups, sharded, maps, gammas, block_layers):
        self.groups, self.sharded, self.maps, self.gammas = groups, sharded, maps, gammas
        self.block_layers = block_layers
        self._assembly: dict = {}
        # whether a regularized weight was a DTensor at the last eager look (on creation and at
        # every eager step): a compiled penalty call then runs eagerly (SpectralPenalty._eager_forward)
        self.sharded_seen = _distributed.regularized_weights(sharded._root, maps) is not None

    def sigmas(self, update: bool, n_iter: int, record: bool, skip_frozen: bool, held: torch.Tensor):
        """The sigmas of every map (the map order), ``held`` (the last estimates) where a
        frozen map takes no step (``skip_frozen``: once the warm start is done), and with
        ``record`` (under no_grad) ``[(group, call, live, record)]`` for :meth:`add_grads`.
        Every group prepares first (its checks raise before any vector moves), then steps."""
        sharded = self.sharded.prepare()
        if not torch.compiler.is_compiling():
            self.sharded_seen = sharded is not None
        groups, calls = (([self.sharded], [sharded]) if sharded is not None
                         else (self.groups, [g.prepare() for g in self.groups]))
        lives = [g.live(c, skip_frozen) for g, c in zip(groups, calls)]
        grad = not record and torch.is_grad_enabled()
        parts, recs = [], []
        for g, c, live in zip(groups, calls, lives):
            if live:
                sig, rec = g.sigmas(c, live, update, n_iter, grad, record)
                parts.append(sig.float())
                recs.append((g, c, live, rec))
        perm, index = self._assemble(groups, lives, held.device)
        if index is not None:  # frozen maps: held at their last estimate
            held = held.detach()
            sig = held.index_put((index,), torch.cat(parts)) if parts else held.clone()
        else:
            sig = torch.cat(parts) if len(parts) > 1 else parts[0]
            sig = sig if perm is None else sig[perm]
        return (sig, recs) if record else sig

    def _assemble(self, groups, lives, device):
        """How the groups' sigmas (the maps ``lives`` of each, concatenated in group order)
        make the vector: ``(perm, None)``, every map (``cat(parts)[perm]``; perm None when
        that is the map order already), or ``(None, index)``, some maps frozen. Cached per set
        of live maps (eager mode)."""
        key = (tuple(id(g) for g in groups), tuple(lives))
        out = self._assembly.get(key)
        if out is None:
            slots = [g.positions[i] for g, live in zip(groups, lives) for i in live]
            if len(slots) < len(self.maps):
                out = None, torch.tensor(slots, dtype=torch.long, device=device)
            elif slots != sorted(slots):
                out = torch.tensor(sorted(range(len(slots)), key=slots.__getitem__), device=device), None
            else:
                out = None, None
            if not torch.compiler.is_compiling():
                self._assembly[key] = out
        return out

    @staticmethod
    def add_grads(recs, coefs) -> None:
        """``.grad += coef * d sigma / d param`` for every map stepped (``recs`` of
        :meth:`sigmas`; ``coefs`` per map, the map order)."""
        for g, call, live, rec in recs:
            g.add_grads(call, live, rec, [coefs[g.positions[i]] for i in live])

    def term_gammas(self, gammas: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        """Each map's gamma in the penalty: ``gammas``, except that the blocks of one operator
        (a grouped patch conv) share one term, ``gamma * max_g sigma_g^2``: a block's gamma
        counts where its sigma is its layer's max (split evenly among ties), 0 elsewhere."""
        if self.block_layers is None:
            return gammas
        idx = torch.tensor(self.block_layers, device=sig.device)
        s = sig.detach()
        top = torch.zeros_like(s).scatter_reduce(0, idx, s, "amax", include_self=False)
        at_max = (s == top[idx]).to(s.dtype)
        ties = torch.zeros_like(s).scatter_add(0, idx, at_max)
        return gammas * (at_max / ties[idx]).to(gammas.dtype)

    @torch.no_grad()
    def restart_nonfinite(self, last_sigmas: torch.Tensor, initial, seed: int, n_iter_init: int) -> bool:
        """The maps whose persistent vectors are not finite (a loaded checkpoint of a run that
        diverged: the power step keeps a non-finite vector for good) get their initial vectors
        back (``initial()``: those of a new penalty of this seed by key, the same on every
        rank), their estimate 0; a non-finite estimate alone is set to 0 too. One host read of
        all the checks; a warning names the maps. Returns whether anything was reset."""
        keys = [None] * len(self.maps)
        for g in self.groups:
            for pos, ks in zip(g.positions, g.keys):
                keys[pos] = [g._buffers[k] for k in ks], ks
        ok = torch.cat([torch.stack([torch.stack([torch.isfinite(t).all() for t in ts]).all() for ts, _ in keys]),
                        torch.isfinite(last_sigmas)]).tolist()
        n = len(keys)
        bad = [l for l in range(n) if not ok[l]]
        held = [l for l in range(n) if not ok[n + l] and ok[l]]
        if not bad and not held:
            return False
        if bad:
            fresh = initial()
            for l in bad:
                for t, k in zip(*keys[l]):
                    t.copy_(fresh[k])
        last_sigmas.nan_to_num_(0.0, 0.0, 0.0)
        last_sigmas[bad] = 0.0
        names = ", ".join(repr(self.maps[l].name) for l in bad)
        estimates = ", ".join(repr(self.maps[l].name) for l in held)
        warnings.warn("SpectralPenalty: the loaded state is not finite: "
                      + (f"the vectors of {names} have non-finite entries and restart from their initial vectors "
                         f"(seed={seed}); " if bad else "")
                      + (f"the estimates of {estimates} are non-finite and are reset; " if held else "")
                      + f"the next training call takes the warm start (n_iter_init={n_iter_init})")
        return True

    def bounds(self, n_iter: int, max_dim: int) -> Dict[str, tuple]:
        out = {}
        for g in self.groups:
            out.update(g.bounds(n_iter, max_dim))
        return {mp.name: out[mp.name] for mp in self.maps}


def build_groups(maps: Sequence[_layers.LinearMap], gammas: Dict[str, float], conv_norm: str,
                 input_shapes: Dict[str, tuple], generator: torch.Generator, set_buffer, buffers, root) -> MapSet:
    """The groups of the selected ``maps`` (dense kinds first, then convs, as the penalty
    lists them; a conv with non-overlapping patches is dense maps, one per group: see
    :func:`layers.patch_maps`), their state created through ``set_buffer(key, tensor,
    map name)``: ``u_i``/``v_i`` for the dense and low-rank maps, ``x_j``/``y_j`` for the
    conv operators, ``x_j`` for the circular convs."""
    dense, convs, gammas = [], [], dict(gammas)
    for mp in maps:
        blocks = (_layers.patch_maps(mp, input_shapes[mp.owner]) if mp.conv and conv_norm == "operator" else None)
        if mp.conv and blocks is None:
            convs.append(mp)
        elif mp.conv:
            dense += blocks  # non-overlapping patches: the dense norm of each group's kernel
            gammas.update({b.name: gammas[mp.name] for b in blocks})
        else:
            dense.append(mp)
    # vectors drawn in the penalty's map order (dense, then convs), from one generator
    dev = maps[0].like().device
    dst = _dense.init_power_state([mp.like().detach() for mp in dense], generator=generator)
    for i, mp in enumerate(dense):
        set_buffer(f"u_{i}", dst.us[i].to(dev), mp.name)
        set_buffer(f"v_{i}", dst.vs[i].to(dev), mp.name)
    specs = [ConvSpec.from_module(mp.module, input_shapes[mp.owner]) for mp in convs]
    if conv_norm == "operator":
        cst = _distributed.init_conv_state(specs, generator, [mp.name for mp in convs])  # DTensor weights: on shards
        for j, mp in enumerate(convs):
            set_buffer(f"x_{j}", cst.xs[j], mp.name)
            set_buffer(f"y_{j}", cst.ys[j], mp.name)
    elif conv_norm == "fft":
        cst = init_circular_state(specs, generator=generator)
        for j, mp in enumerate(convs):
            set_buffer(f"x_{j}", cst.xs[j], mp.name)
    nd = len(dense)
    plain = [i for i, mp in enumerate(dense) if mp.lowrank is None]
    low = [i for i, mp in enumerate(dense) if mp.lowrank is not None]
    conv_cls = ConvOperatorGroup if conv_norm == "operator" else CircularGroup
    conv_keys = [(f"x_{j}", f"y_{j}") if conv_norm == "operator" else (f"x_{j}",) for j in range(len(convs))]
    # convs first: their checks (e.g. circular padding) fail before a dense step writes its vectors
    groups = [g for g in (
        conv_cls(buffers, convs, range(nd, nd + len(convs)), conv_keys, input_shapes),
        DenseGroup(buffers, [dense[i] for i in plain], plain, [(f"u_{i}", f"v_{i}") for i in plain], input_shapes),
        LowRankGroup(buffers, [dense[i] for i in low], low, [(f"u_{i}", f"v_{i}") for i in low], input_shapes),
    ) if len(g)]
    every = dense + convs
    sharded = ShardedGroup(buffers, every, range(len(every)),
                           [(f"u_{i}", f"v_{i}") for i in range(nd)] + [(f"y_{j}", f"x_{j}") for j in range(len(convs))],
                           input_shapes, root, conv_norm)
    owners = [mp.layer for mp in every]
    blocks = [owners.index(o) for o in owners] if len(set(owners)) < len(owners) else None
    return MapSet(groups, sharded, every, [gammas[mp.name] for mp in every], blocks)
