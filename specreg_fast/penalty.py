"""Training API: the penalty of the paper for any model in two lines.

    penalty = specreg_fast.SpectralPenalty(model, gamma=1e-2)     # hidden layers only
    loss = criterion(model(x), y) + penalty()                      # gamma * sum_l sigma_l^2

All dense layers go through one grouped op call per step, all conv layers through one call
per conv method; gradients are u v^T (dense) and the conv weight-gradient of (x, y) (conv),
never autograd through the power iterations.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import dense as _dense
from .bounds import operator_norm_bounds
from .conv import ConvSpec, ConvState, conv_operator_norms, init_conv_state
from .conv import _validate as _validate_convs
from .fft import CircularState, circular_conv_norms, circular_params, circular_power_pairs, init_circular_state
from . import distributed as _distributed
from . import layers as _layers
from . import ops as _ops

__all__ = ["SpectralPenalty", "spectral_constraint", "SpectralNormalize"]

_CONV = _layers.CONV_TYPES
_SUPPORTED = (nn.Linear,) + _CONV
_AUTO = "auto"
_CONV_NORMS = ("operator", "fft", "matrix")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel / torch.compile wrappers: regularize the real model.
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _grad_of(P: torch.Tensor) -> torch.Tensor:
    """``P.grad``, created as zeros where it is None (for in-place accumulation)."""
    if P.grad is None:
        P.grad = torch.zeros_like(P)
    return P.grad


def _rank1(left: torch.Tensor, right: torch.Tensor, c, dtype: torch.dtype):
    """``(left, right, alpha)`` for ``G.addr_`` adding ``c left right^T`` in ``dtype``: a Python
    float ``c`` (CPU) stays the alpha; a 0-d device tensor is folded into ``left`` so that
    nothing waits for the device."""
    left, right = left.to(dtype), right.to(dtype)
    if isinstance(c, torch.Tensor):
        return left * c.to(dtype), right, 1.0
    return left, right, c


def _computed(mp: _layers.LinearMap) -> bool:
    """A parametrized weight: recomputed on every access (under no_grad, a tensor with no
    way back to its parameters), so ``accumulate_grad`` goes through autograd for it."""
    return mp.attr is not None and torch.nn.utils.parametrize.is_parametrized(mp.module, mp.attr)


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


def _frozen(mp: _layers.LinearMap, factors=None) -> bool:
    """Whether no parameter of the map requires grad (its sigma cannot change in training).
    A weight computed by ``extra=`` is never taken to be frozen (its parameters are unknown)."""
    if factors is not None:
        return not any(t.requires_grad for t in (factors.base, *factors.Bs, *factors.As))
    if mp.attr is None:
        return False
    if _computed(mp):
        return not any(q.requires_grad for q in mp.module.parametrizations[mp.attr].parameters())
    return not mp.param().requires_grad


def _module_links(root: nn.Module, maps: Sequence[_layers.LinearMap]):
    """Where the maps' modules sit in ``root`` now: ``(links, replaced)``. ``links``: the
    ``(parent, key, child)`` steps (``parent._modules[key] is child``) of the path from
    ``root`` along each map's module name (``mp.owner``), each step once; ``replaced``: the
    module names at which ``root`` no longer holds the map's module (``mp.module``): another
    module is there, or none (model surgery after the maps were found). ``extra=`` maps are
    skipped: their weight is the user's function, not a module's."""
    links, seen, replaced = [], set(), []
    for mp in maps:
        if mp.attr is None and mp.lowrank is None:
            continue
        path = mp.owner.split(".") if mp.owner else []
        node, chain = root, []
        for key in path:
            child = node._modules.get(key)
            if child is None:
                break
            chain.append((node, key, child))
            node = child
        if len(chain) != len(path) or node is not mp.module:
            if mp.owner not in replaced:
                replaced.append(mp.owner)
            continue
        for link in chain:
            if (id(link[0]), link[1]) not in seen:
                seen.add((id(link[0]), link[1]))
                links.append(link)
    return links, replaced


def _act_slope_sq_max(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Batch mean of max_j phi'(z_j)^2 for one nonlinearity (the released code's eig-ub
    term), differentiable in z."""
    zz = z if z.requires_grad else z.detach().requires_grad_(True)
    with torch.enable_grad():
        # act.forward, not act(): calling the module would re-enter the hook
        (d,) = torch.autograd.grad(act.forward(zz).sum(), zz, create_graph=z.requires_grad)
    return (d.flatten(1) ** 2).amax(dim=1).mean()


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
        outs.append(_PerParamSigma.apply(est[idx], local, [us[i] for i in idx], [vs[i] for i in idx], T))
        index += idx
    return est.index_put((torch.tensor(index, device=est.device),), torch.cat(outs))


class _HotPlan(NamedTuple):
    key: tuple
    us: List[torch.Tensor]
    vs: List[torch.Tensor]
    xs: List[torch.Tensor]
    ys: List[torch.Tensor]
    modes: List[str]  # padding mode of each conv layer
    layer_params: List[List[int]]  # packed conv geometry of each conv layer (ops.pack_conv_params)
    subsets: dict  # frozen maps (indices) -> the _MapSet of the others, built once per plan


class _MapSet(NamedTuple):
    """The maps one call steps: dense maps (indices into ``_dense``; ``plain`` and ``low``
    split them by step kind, ``order`` puts cat(plain sigmas, low-rank sigmas) back in
    ``dense`` order), conv maps (indices into ``_convs``, with their packed geometry), and
    ``index``: their positions among all maps (None when the set is every map)."""
    dense: List[int]
    plain: List[int]
    low: List[int]
    order: Optional[torch.Tensor]
    conv: List[int]
    params: List[int]
    modes: List[str]
    index: Optional[torch.Tensor]


class SpectralPenalty(nn.Module):
    """``gamma * sum_l sigma_max(W_l)^2`` over a model's layers, with persistent vectors.

    The penalty carries no 1/2, as in the authors' released code, so their gamma values
    (1e-3 ... 1e-1 for MLPs, 1e-2 for ResNets) carry over unchanged.

    Args:
        model: the network (a DDP/DataParallel/compiled wrapper is unwrapped).
        gamma: float, ``{name: gamma}`` (a map's name, else its layer's or module's, as in
            ``layer_names``; missing names get 0 and are left out) or a callable
            ``(map name, module) -> gamma``.
        scope: ``"hidden"`` (default, the paper): every supported layer except the readout;
            ``"all"``: every layer (the end-to-end baseline); a module name or list of names:
            exactly the supported layers inside those modules (e.g. ``"features"``).
        readout: with ``scope="hidden"``, the module left free: its name (recommended), or
            None for a model without a readout (every layer is hidden). By default
            (``"auto"``) it is the last layer in forward order, seen on the first forward
            pass, among all layers that hold a weight matrix (excluded ones included; a
            layer whose weight is used without calling it, like an attention's
            ``out_proj``, takes its place in the caller): if that layer is not one the
            penalty supports (a custom head), no layer is taken as the readout. Both cases
            warn, naming the layer.
        exclude: names of modules (and their children) to leave out.
        split / attention / extra: which maps an attention block and fused q/k/v layers give
            (``split={name: 3}``, ``attention="qkv"`` or ``"v"``), and custom linear maps
            (``extra={name: fn}``, ``fn()`` returning the 2-D weight matrix); see
            :mod:`specreg_fast.layers` for every layer kind and its default.
        conv_norm: ``"operator"`` (the true operator norm with the layer's own padding at the
            input size it sees; default), ``"fft"`` (the paper's circular-padding norm, for
            models converted with :func:`specreg_fast.to_circular_padding`) or ``"matrix"``
            (the reshaped-kernel matrix norm, cheap, not an operator norm).
        n_iter: power steps per training step (persistent vectors make 1 enough).
        n_iter_init: power steps on the first active call (warm start).
        start_step / every: the schedule. The step counter (a buffer) counts training-mode
            calls (``auto_step=True``); with gradient accumulation pass ``auto_step=False`` and
            call :meth:`step` after each optimizer step. The penalty is 0 before
            ``start_step`` and on steps where ``(step - start_step) % every != 0``; it is not
            rescaled by ``every`` (as the authors do).
        eig_ub: also add, for each nonlinearity module of the model, the batch mean of
            ``max_j phi'(z_j)^2`` (the released code's activation-aware MLP variant).
        input_shapes: ``{conv_name: (C_in, *spatial)}`` for convs whose size should not be
            taken from the first forward.
        seed: seeds the persistent vectors (identical on every DDP rank).

    Persistent vectors are buffers of this module (not of the model), so an EMA/SWA copy of
    the model never averages them: average ``model``, keep the penalty as it is. A checkpoint
    whose vectors are not finite (a diverged run's) restarts those maps from their initial
    vectors, with a warning and a warm start at the next training call.

    Build the penalty after changing the model: a module whose maps it regularizes that is
    replaced or removed afterwards is a ValueError naming the layers (checked on eager calls).

    Frozen maps (no parameter requires grad: a frozen backbone, the base layers of a LoRA
    model) take part in the warm start, then take no power step: their term is held at its
    last estimate (``last_sigmas``), a constant of the loss that changes no gradient, until
    they are unfrozen, when their steps resume from their vectors. (On sharded DTensor weights
    every map is stepped.)

    The penalty is per linear map (:mod:`specreg_fast.layers`): an attention block gives its
    q, k, v and output maps, each its own term; the groups of a conv with non-overlapping
    patches are blocks of one operator, whose term is ``gamma * max_g sigma_g^2``.
    ``sigmas()`` and ``layer_names`` list the maps.
    """

    def __init__(self, model: nn.Module, gamma: Union[float, Dict[str, float], Callable] = 1e-2,
                 scope: Union[str, Sequence[str]] = "hidden", exclude: Iterable[str] = (),
                 conv_norm: str = "operator", n_iter: int = 1, n_iter_init: int = 20, start_step: int = 0,
                 every: int = 1, auto_step: bool = True, eig_ub: bool = False,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None, seed: int = 0,
                 readout: Optional[str] = _AUTO, split: Optional[Dict[str, int]] = None, attention: str = "qkv",
                 extra: Optional[Dict[str, Callable[[], torch.Tensor]]] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if conv_norm not in _CONV_NORMS:
            raise ValueError(f"conv_norm must be one of {_CONV_NORMS}, got {conv_norm!r}")
        for name, val, lo in (("n_iter", n_iter, 0), ("n_iter_init", n_iter_init, 0), ("start_step", start_step, 0),
                              ("every", every, 1)):
            if not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if isinstance(gamma, (int, float)) and (gamma < 0 or not math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        self._model = [_unwrap(model)]  # a list: not a submodule (keeps the model out of state_dict)
        self.conv_norm, self.n_iter, self.n_iter_init = conv_norm, n_iter, n_iter_init
        self.start_step, self.every, self.auto_step, self.eig_ub = start_step, every, auto_step, eig_ub
        self.seed = seed
        self._gamma_arg, self._scope, self._exclude = gamma, scope, tuple(exclude)
        self.update = True
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

        root = self._model[0]
        names = {m: n for n, m in root.named_modules()}  # dedupes shared modules: counted once
        by_name = dict(root.named_modules())
        self._maps, unsupported, lazy = _layers.discover(root, conv_norm, split, attention, extra)
        for n in lazy:
            warnings.warn(f"SpectralPenalty: skipping {n}: lazy module not materialized yet; construct the penalty "
                          f"after the first forward")
        unsupported = [(n, m) for n, m in unsupported if not _layers.is_within(n, self._exclude)]
        if unsupported:
            warnings.warn(f"SpectralPenalty: not regularized, not a layer kind it knows: "
                          f"{_layers.describe(unsupported)}; pass extra={{name: callable returning the weight "
                          f"matrix}} for a custom linear map")
        if not self._maps:
            raise ValueError("model has no supported layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                             "MultiheadAttention, transformers Conv1D, extra=)")
        if not isinstance(scope, str) or scope not in ("hidden", "all"):
            wanted = [scope] if isinstance(scope, str) else list(scope)
            for s in wanted:
                if s not in by_name:
                    raise ValueError(f"scope: no module named {s!r} in the model")
        for e in self._exclude:
            if e not in by_name:
                raise ValueError(f"exclude: no module named {e!r} in the model")
        if readout != _AUTO:
            if scope != "hidden":
                raise ValueError(f"readout: applies to scope='hidden', got scope={scope!r}")
            if readout is not None and readout not in by_name and readout not in {mp.owner for mp in self._maps}:
                raise ValueError(f"readout: no module named {readout!r} in the model")
        self._readout_arg = readout
        # forward order of every module that holds a weight matrix (the readout rule)
        self._supported_owners = {mp.owner for mp in self._maps}
        # (the parts of a supported layer, e.g. a LoRA layer's base_layer / lora_A / lora_B, are not)
        self._weight_owners = [n for n, m in by_name.items() if n in self._supported_owners or (
            _layers.holds_weight_matrix(m) and not _layers.is_within(n, self._supported_owners))]
        self._starts: Dict[str, int] = {}
        self._ends: Dict[str, int] = {}

        self._input_shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in (input_shapes or {}).items()}
        self._order: List[str] = []
        self._hooks = []
        self._eig_terms: List[torch.Tensor] = []
        for n, m in by_name.items():
            self._hooks.append(m.register_forward_pre_hook(self._make_record_hook(n, m)))
            self._hooks.append(m.register_forward_hook(self._make_end_hook(n, m)))
        if eig_ub:
            acts = (nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus)
            for m in names:
                if isinstance(m, acts):
                    m.register_forward_hook(self._make_eig_hook(m))
        self._ready = False
        self._layers: List[_layers.LinearMap] = []
        self._links: list = []  # _module_links of the selected maps (_check_modules)
        self._plan: Optional[_HotPlan] = None
        self._block_layers: Optional[List[int]] = None

    # ------------------------------------------------------------------ discovery
    # The hooks act only on the module they were registered on: a deep copy of the model (an
    # EMA/SWA AveragedModel made before the first penalty call) carries copies of them, whose
    # forwards at other input sizes must not change this penalty's discovery.
    def _make_record_hook(self, name, module):
        conv = isinstance(module, _CONV) and name in self._supported_owners

        def hook(mod, args):
            if mod is not module:
                return
            self._starts.setdefault(name, len(self._starts) + len(self._ends))
            if conv and args and isinstance(args[0], torch.Tensor):
                shp = tuple(args[0].shape[1:]) if args[0].dim() == mod.weight.dim() else tuple(args[0].shape)
                old = self._input_shapes.get(name)
                # several sizes: the largest (its zero-padding norm is the largest)
                if old is None or math.prod(shp) > math.prod(old):
                    self._input_shapes[name] = shp
        return hook

    def _make_end_hook(self, name, module):
        def hook(mod, args, out):
            if mod is not module:
                return
            self._ends.setdefault(name, len(self._starts) + len(self._ends))
        return hook

    def _make_eig_hook(self, act):
        def hook(mod, args, out):
            if mod is act and self.training and torch.is_grad_enabled():
                self._eig_terms.append(_act_slope_sq_max(act, args[0]))
        return hook

    def _in_scope(self, name: str) -> bool:
        scope = self._scope
        if scope in ("hidden", "all"):
            return True
        wanted = [scope] if isinstance(scope, str) else list(scope)
        return any(name == s or name.startswith(s + ".") for s in wanted)

    def _gamma_of(self, mp: _layers.LinearMap) -> float:
        g, name = self._gamma_arg, mp.name
        if callable(g):
            val = float(g(name, mp.module))
        elif isinstance(g, dict):  # the map's own name, else its layer's or module's
            val = float(g.get(name, g.get(mp.layer, g.get(mp.owner, 0.0))))
        else:
            val = float(g)
        if val < 0 or not math.isfinite(val):
            raise ValueError(f"gamma for {name}: must be a finite number >= 0, got {val}")
        return val

    def _forward_order(self) -> List[str]:
        """The modules that hold a weight matrix, in forward order (recorded by the hooks, or
        loaded from a checkpoint before any forward)."""
        if self._starts:
            self._order = _layers.forward_order(self._weight_owners, self._starts, self._ends)
        return self._order

    def _readout(self) -> Optional[str]:
        """The module left free by ``scope="hidden"`` (see the ``readout`` argument)."""
        if self._readout_arg != _AUTO:
            return self._readout_arg
        order = self._forward_order()
        if not order:
            raise RuntimeError("SpectralPenalty(scope='hidden') finds the readout from the forward order: run one "
                               "forward pass of the model before the first penalty() call, or pass readout=")
        last = order[-1]
        kind = type(self._model[0].get_submodule(last)).__name__
        if last not in self._supported_owners:
            warnings.warn(f"SpectralPenalty: the last layer with a weight in forward order, {last} ({kind}), is not a "
                          f"layer the penalty supports: no layer is taken as the readout, every supported layer is "
                          f"regularized; pass readout='name' (or readout=None) to say so")
            return None
        warnings.warn(f"SpectralPenalty: readout taken to be {last} ({kind}), the last layer in forward order, and "
                      f"left free; pass readout={last!r} (or another name, or None) to say so")
        return last

    def _modules_in_place(self, maps) -> list:
        """``_module_links(model, maps)``'s links; a ValueError naming the layers whose module
        the model no longer holds at that name."""
        links, replaced = _module_links(self._model[0], maps)
        if replaced:
            raise ValueError(f"SpectralPenalty: the model no longer holds the module{'s' * (len(replaced) > 1)} it "
                             f"found at {', '.join(repr(n) for n in replaced)} (replaced or removed after the penalty "
                             f"was built), whose weights it would go on regularizing: build the penalty after "
                             f"changing the model")
        return links

    def _check_modules(self) -> None:
        """Model surgery after the penalty was built is an error (:meth:`_modules_in_place`),
        checked on every eager call at the cost of one identity test per step of the paths
        to the selected maps' modules (the paths are walked again only when a step changed).
        Not under torch.compile (a compiled call skips the check; the eager calls make it)."""
        if torch.compiler.is_compiling():
            return
        for parent, key, child in self._links:
            if parent._modules.get(key) is not child:
                self._links = self._modules_in_place(self._layers)
                return

    def _finalize(self):
        """Select the layers and create the persistent vectors (first call)."""
        if self._scope == "hidden" and self._readout_arg == _AUTO:
            self._modules_in_place(self._maps)  # the forward order comes from hooks on the modules found
        loaded = bool(getattr(self, "_pending_state", None))
        maps = [mp for mp in self._maps if self._in_scope(mp.owner) and not _layers.is_within(mp.owner, self._exclude)]
        if self._scope == "hidden":
            readout = self._readout()
            if readout is not None:
                maps = [mp for mp in maps if not _layers.is_within(mp.owner, [readout])]
        gammas = {mp.name: self._gamma_of(mp) for mp in maps}
        maps = [mp for mp in maps if gammas[mp.name] > 0]
        if not maps:
            raise ValueError(f"scope={self._scope!r} with exclude={self._exclude} and this gamma selects no layer")
        dev = maps[0].like().device
        self._dense, self._convs = [], []
        for mp in maps:
            if mp.conv:
                if mp.owner not in self._input_shapes:
                    raise RuntimeError(f"input size of {mp.owner} is unknown: run one forward pass of the model "
                                       f"first, or pass input_shapes={{'{mp.owner}': (C_in, *spatial)}}")
                blocks = (_layers.patch_maps(mp, self._input_shapes[mp.owner]) if self.conv_norm == "operator"
                          else None)
                if blocks is None:
                    self._convs.append(mp)
                    continue
                gammas.update({b.name: gammas[mp.name] for b in blocks})
                self._dense += blocks  # non-overlapping patches: the dense norm of each group's kernel
            else:
                self._dense.append(mp)
        self._layers = self._dense + self._convs
        self._links = self._modules_in_place(self._layers)  # (before any state is created)
        # maps that are blocks of one operator (a grouped patch conv): index of their layer
        owners = [mp.layer for mp in self._layers]
        self._block_layers = ([owners.index(o) for o in owners] if len(set(owners)) < len(owners) else None)
        # LoRA maps take the low-rank step (dense.lowrank_sigmas); their vectors are u_i/v_i too
        self._lowrank_at = [i for i, mp in enumerate(self._dense) if mp.lowrank is not None]
        for key, (value, name) in self._initial_vectors().items():
            self._set_buf(key, value, name)  # (a checkpoint loaded before this call: its vectors)
        self.register_buffer("gammas", torch.tensor([gammas[mp.name] for mp in self._layers], dtype=torch.float32,
                                                    device=dev))
        self.register_buffer("last_sigmas", torch.zeros(len(self._layers), dtype=torch.float32, device=dev))
        self._ready = True
        if loaded:
            self._restart_nonfinite_vectors()
        # forward order and conv sizes are known: the discovery hooks are no longer needed
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _initial_vectors(self) -> Dict[str, Tuple[torch.Tensor, str]]:
        """``key -> (vector, map name)``: the persistent vectors as a new penalty creates them,
        ``u_i``/``v_i`` of the dense maps then ``x_i`` (and ``y_i`` for the operator norm) of the
        convs, drawn from a generator seeded with ``seed`` (the same on every rank)."""
        g = torch.Generator().manual_seed(self.seed)
        dev = self._layers[0].like().device
        out = {}
        dst = _dense.init_power_state([mp.like().detach() for mp in self._dense], generator=g)
        for i, mp in enumerate(self._dense):
            out[f"u_{i}"], out[f"v_{i}"] = (dst.us[i].to(dev), mp.name), (dst.vs[i].to(dev), mp.name)
        specs = self._conv_specs()
        if self.conv_norm == "operator":
            cst = _distributed.init_conv_state(specs, g, [mp.name for mp in self._convs])  # DTensor weights: on shards
            for i, mp in enumerate(self._convs):
                out[f"x_{i}"], out[f"y_{i}"] = (cst.xs[i], mp.name), (cst.ys[i], mp.name)
        elif self.conv_norm == "fft":
            cst = init_circular_state(specs, generator=g)
            for i, mp in enumerate(self._convs):
                out[f"x_{i}"] = (cst.xs[i], mp.name)
        return out

    @torch.no_grad()
    def _restart_nonfinite_vectors(self) -> None:
        """After a checkpoint is loaded: the maps with a non-finite persistent vector (a run that
        diverged and was saved; the power step keeps a non-finite vector for good) restart
        from their initial vectors (:meth:`_initial_vectors`: deterministic, the same on every
        rank), their estimate (``last_sigmas``) set to 0; a non-finite estimate alone is set to
        0 too. Either way ``initialized`` is cleared, so the next training call takes the
        ``n_iter_init`` warm start (of every map: a frozen map is stepped only there), and a
        warning names the maps. One host read of all the checks."""
        nd = len(self._dense)
        keys = [(f"u_{i}", f"v_{i}") for i in range(nd)] + [
            tuple(k for k in (f"x_{j}", f"y_{j}") if k in self._buffers) for j in range(len(self._convs))]
        b = self._buffers
        checks = torch.cat([torch.stack([torch.stack([torch.isfinite(b[k]).all() for k in pair]).all()
                                         for pair in keys]),
                            torch.isfinite(self.last_sigmas)]).tolist()  # one host read
        bad = [l for l in range(len(keys)) if not checks[l]]
        estimates = [l for l in range(len(keys)) if not checks[len(keys) + l] and l not in bad]
        if not bad and not estimates:
            return
        if bad:
            init = self._initial_vectors()
            for l in bad:
                for k in keys[l]:
                    b[k].copy_(init[k][0])
        self.last_sigmas.nan_to_num_(0.0, 0.0, 0.0)
        self.last_sigmas[bad] = 0.0
        self.initialized.fill_(False)
        self._warm_start_done = False
        names = [self._layers[l].name for l in bad]
        held = [self._layers[l].name for l in estimates]
        warnings.warn("SpectralPenalty: the loaded state is not finite: "
                      + (f"the vectors of {', '.join(map(repr, names))} have non-finite entries and restart from "
                         f"their initial vectors (seed={self.seed}); " if names else "")
                      + (f"the estimates of {', '.join(map(repr, held))} are non-finite and are reset; "
                         if held else "")
                      + f"the next training call takes the warm start (n_iter_init={self.n_iter_init})")

    def _set_buf(self, key, value, layer_name):
        old = self._pending_state.pop(key, None) if hasattr(self, "_pending_state") else None
        if old is not None:
            if old.shape != value.shape:
                raise ValueError(f"state_dict entry {key} for {layer_name} has shape {tuple(old.shape)}, expected "
                                 f"{tuple(value.shape)}")
            # a copy: the entry may be another live penalty's buffer (its state_dict()), which
            # would otherwise move with this one's steps
            value = old.to(device=value.device, dtype=value.dtype, copy=True)
        self.register_buffer(key, value.contiguous())

    def _conv_specs(self) -> List[ConvSpec]:
        return [ConvSpec.from_module(mp.module, self._input_shapes[mp.owner]) for mp in self._convs]

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Vectors are created on the first call; a checkpoint loaded before that is kept
        # aside and used when they are created.
        if not self._ready:
            self._pending_state = {}
            for k in list(state_dict):
                if k.startswith(prefix):
                    key = k[len(prefix):]
                    if key.split("_")[0] in ("u", "v", "x", "y") or key in ("gammas", "last_sigmas"):
                        self._pending_state[key] = state_dict[k]
            shapes = state_dict.get(prefix + "_conv_input_shapes")
            if shapes is not None:
                self._input_shapes.update(shapes)
            state_dict = {k: v for k, v in state_dict.items()
                          if not (k.startswith(prefix) and k[len(prefix):] in self._pending_state)}
        state_dict.pop(prefix + "_conv_input_shapes", None)
        self._warm_start_done = False  # the loaded `initialized` may be False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._ready:  # (else when the vectors are created, in _finalize)
            self._restart_nonfinite_vectors()

    def get_extra_state(self):
        return {"conv_input_shapes": dict(self._input_shapes), "order": list(self._forward_order())}

    def set_extra_state(self, state):
        self._input_shapes.update({k: tuple(v) for k, v in state.get("conv_input_shapes", {}).items()})
        if not self._order:
            self._order = list(state.get("order", []))

    def step(self) -> None:
        """Advance the schedule counter by one (with ``auto_step=False``)."""
        self.step_count.add_(1)

    def reset(self) -> None:
        """Forget the vectors and the step counter; they are re-created on the next call."""
        for k in list(self._buffers):
            if k.split("_")[0] in ("u", "v", "x", "y") or k in ("gammas", "last_sigmas"):
                del self._buffers[k]
        self.step_count.zero_()
        self.initialized.fill_(False)
        self._warm_start_done = False
        self._ready = False
        self._plan = None
        self._pending_state = {}

    @property
    def layer_names(self) -> List[str]:
        if not self._ready:
            self._finalize()
        self._check_modules()
        return [mp.name for mp in self._layers]

    # ------------------------------------------------------------------ compute
    def _sigmas_or_roll_back(self, update: bool, n_iter: int, conv_pairs: Optional[list]) -> torch.Tensor:
        """``_sigmas``; if it raises, the step counter this call advanced goes back (the ops
        themselves leave their vectors as they were on a failed step)."""
        try:
            sharded = self._sharded()
            if sharded is not None:  # DTensor (FSDP2) weights: on the local shards, specreg_fast/distributed.py
                return _distributed.penalty_sigmas(*sharded, update, n_iter)
            return self._sigmas(update, n_iter, conv_pairs)
        except Exception:
            if self.training and self.auto_step and not torch.compiler.is_compiling():
                self.step_count.sub_(1)
            raise

    def _sharded(self):
        """``(weights, us + ys, vs + xs, names, conv specs)`` for specreg_fast/distributed.py
        when a regularized weight is a DTensor (FSDP2), else None."""
        ws = _distributed.regularized_weights(self._model[0], [mp.module for mp in self._layers])
        if ws is None:
            return None
        # distributed.py shards whole weights (a Linear's, a conv's, or a conv kernel as its
        # reshaped matrix); views of part of a parameter (attention q/k/v, a transposed HF
        # Conv1D, a grouped patch conv's blocks) and extra= maps are not sharded there
        partial = [mp.name for mp in self._layers if mp.attr != "weight" or mp.layer != mp.name
                   or mp.view not in (_layers._identity, _layers._reshaped)]
        if partial:
            raise ValueError(f"sharded (DTensor) weights: {', '.join(partial)} regularize part of a parameter or a "
                             f"computed weight, which the sharded path does not support; exclude them")
        if self._convs and self.conv_norm != "operator":
            raise ValueError(f"conv_norm={self.conv_norm!r} on sharded (DTensor) weights is not supported; use "
                             f"'operator' or 'matrix'")
        b, nd, nc = self._buffers, len(self._dense), len(self._convs)
        return (ws, [b[f"u_{i}"] for i in range(nd)] + [b[f"y_{i}"] for i in range(nc)],
                [b[f"v_{i}"] for i in range(nd)] + [b[f"x_{i}"] for i in range(nc)], [mp.name for mp in self._layers],
                self._conv_specs() if nc else [])

    def _plan_key(self, dense_ws, conv_ws) -> tuple:
        """What the hot plan depends on: every weight's shape/dtype/device, each conv's
        hyperparameters and recorded input size, and the state buffers (by identity:
        ``.to()`` replaces them, ``load_state_dict`` copies into them)."""
        b = self._buffers
        return (tuple((w.shape, w.dtype, w.device) for w in dense_ws + conv_ws),
                tuple((m.stride, m.padding, m.dilation, m.groups, m.padding_mode, m.output_padding,
                       self._input_shapes[mp.owner]) for mp in self._convs for m in [mp.module]),
                tuple(id(t) for t in b.values()))

    def _hot_plan(self, dense_ws, conv_ws) -> "_HotPlan":
        """The per-call constants of a penalty call: the state buffers in op order and the
        conv ops' packed geometry, validated (errors name the layer). In eager mode built once
        and rebuilt only when :meth:`_plan_key` changes: re-packing and re-validating on every
        call was about a tenth of ``accumulate_grad``'s time on the benchmark CNN
        (``bench/bench_training.py``). Under torch.compile built on every trace (no cache).
        (The FFT norm's convs are checked by its own functions on every call.)"""
        compiling = torch.compiler.is_compiling()
        key = None if compiling else self._plan_key(dense_ws, conv_ws)
        plan = self._plan
        if key is not None and plan is not None and plan.key == key:
            return plan
        b = self._buffers
        nd, nc = len(self._dense), len(self._convs)
        us, vs = [b[f"u_{i}"] for i in range(nd)], [b[f"v_{i}"] for i in range(nd)]
        xs = [b[f"x_{i}"] for i in range(nc)]
        ys = [b[f"y_{i}"] for i in range(nc)] if self.conv_norm == "operator" else []
        _dense._validate(dense_ws, _dense.PowerState(us, vs), [mp.name for mp in self._dense])
        modes, layer_params = [], []
        if nc and self.conv_norm == "operator":
            specs = self._conv_specs()
            _validate_convs(specs, ConvState(xs, ys), [mp.name for mp in self._convs])
            packed = [_ops.pack_conv_params([sp]) for sp in specs]
            layer_params, modes = [p for p, _ in packed], [m[0] for _, m in packed]
        plan = _HotPlan(key, us, vs, xs, ys, modes, layer_params, {})
        if not compiling:
            self._plan = plan
        return plan

    def _map_set(self, plan: "_HotPlan", factors: Dict[int, object]) -> _MapSet:
        """The maps this call steps: all of them, except, once the warm start is done, the
        frozen ones (:func:`_frozen`: a frozen backbone, a LoRA model's frozen base layers),
        whose sigma cannot change: their power step would only refine an estimate that is a
        constant of the loss. Built once per plan and set of frozen maps."""
        frozen: tuple = ()
        if self._warm_start_done:
            frozen = tuple(k for k, mp in enumerate(self._layers)
                           if _frozen(mp, factors.get(k) if k < len(self._dense) else None))
        s = plan.subsets.get(frozen)
        if s is not None:
            return s
        nd = len(self._dense)
        dense = [i for i in range(nd) if i not in frozen]
        conv = [j for j in range(len(self._convs)) if nd + j not in frozen]
        plain = [i for i in dense if self._dense[i].lowrank is None]
        low = [i for i in dense if self._dense[i].lowrank is not None]
        dev = self.last_sigmas.device
        # position of each dense map in cat(plain sigmas, low-rank sigmas)
        order = (torch.tensor([(plain + low).index(i) for i in dense], dtype=torch.long, device=dev)
                 if plain and low else None)
        operator = self.conv_norm == "operator"
        params = [q for j in conv for q in plan.layer_params[j]] if operator else []
        modes = [plan.modes[j] for j in conv] if operator else []
        index = torch.tensor(dense + [nd + j for j in conv], dtype=torch.long, device=dev) if frozen else None
        s = _MapSet(dense, plain, low, order, conv, params, modes, index)
        plan.subsets[frozen] = s
        return s

    def _sigmas(self, update: bool, n_iter: int, conv_pairs: Optional[list] = None) -> torch.Tensor:
        """The sigmas of every layer (dense first), through the ops directly with the plan of
        :meth:`_hot_plan`. The convs are computed first, so that their checks (e.g. circular
        padding for the FFT norm) fail before the dense step writes its vectors. With
        ``conv_pairs`` (a list; call under no_grad), ``conv_pairs`` receives, per conv layer,
        ``(x, y, params, mode)``: the pair whose conv weight-gradient is ``dsigma/dW`` (for
        ``accumulate_grad``; None for a frozen conv that took no step), and the values are the
        steps' estimates, with no differentiable wrapper. Only custom ops run here (autocast
        does not touch them) except on the FFT norm's path, which runs with autocast off.
        Frozen maps (:meth:`_map_set`) take no step: their entry is the last estimate, held."""
        # the LoRA maps' factors first: an adapter refused here raises before any vector moves
        factors = {i: self._dense[i].factors() for i in self._lowrank_at}
        dense_ws = [mp.weight() if mp.lowrank is None else None for mp in self._dense]
        for i, M in factors.items():
            dense_ws[i] = M.like()  # shape, dtype, device for the plan: M is never built
        conv_ws = [mp.weight() for mp in self._convs]
        plan = self._hot_plan(dense_ws, conv_ws)
        S = self._map_set(plan, factors)
        grad = conv_pairs is None and torch.is_grad_enabled()
        parts = []
        pairs: list = [None] * len(conv_ws)  # per conv layer (None: frozen, no step)
        cws = [conv_ws[j] for j in S.conv]
        if cws and self.conv_norm == "operator":
            xs, ys = [plan.xs[j] for j in S.conv], [plan.ys[j] for j in S.conv]
            if update and n_iter > 0:
                est = _ops.conv_power_step_([w.detach() for w in cws], xs, ys, S.params, S.modes, n_iter, 0.0)
                sig = _ops.conv_sigma_from_step(cws, xs, ys, S.params, S.modes, est) if grad else est
            else:
                sig = _ops.conv_sigma(cws, xs, ys, S.params, S.modes)
            parts.append(sig.float())
            for j in S.conv:
                pairs[j] = (plan.xs[j], plan.ys[j], plan.layer_params[j], plan.modes[j])
        elif cws:
            all_specs = self._conv_specs()
            specs, names = [all_specs[j] for j in S.conv], [self._convs[j].name for j in S.conv]
            st = CircularState([plan.xs[j] for j in S.conv])
            with torch.autocast(device_type=self.gammas.device.type, enabled=False):
                if conv_pairs is None:
                    parts.append(circular_conv_norms(specs, st, n_iter=n_iter, update=update, names=names).float())
                else:
                    est, x_tops, y_tops, _ = circular_power_pairs(specs, st, n_iter, update=update, names=names)
                    parts.append(est.float())
                    for j, spec, x, y in zip(S.conv, specs, x_tops, y_tops):
                        pairs[j] = (x, y, circular_params(spec), "circular")
        if conv_pairs is not None:
            conv_pairs.extend(pairs)
        if S.dense:
            sig = None
            if S.plain:
                ws = [dense_ws[i] for i in S.plain]
                us, vs = [plan.us[i] for i in S.plain], [plan.vs[i] for i in S.plain]
                if update:
                    with torch.no_grad():
                        est = _ops.power_step_([w.detach() for w in ws], us, vs, n_iter, 0.0)
                if update and n_iter >= 1 and all(w.device.type == "cpu" for w in ws):
                    # as in dense.spectral_norms: u^T W v at the new vectors is the step's estimate
                    sig = _per_param_sigma([self._dense[i] for i in S.plain], ws, us, vs, est) if grad else est
                else:
                    sig = _ops.sigma(ws, us, vs)
            if S.low:
                with torch.set_grad_enabled(grad):
                    low = _dense._lowrank_sigmas([factors[i] for i in S.low], [plan.us[i] for i in S.low],
                                                 [plan.vs[i] for i in S.low], n_iter, update)
                sig = torch.cat([sig.float(), low.float()])[S.order] if sig is not None else low
            parts.insert(0, sig.float())
        if S.index is None:
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        held = self.last_sigmas.detach()
        if not parts:  # every map is frozen
            return held.clone()
        return held.index_put((S.index,), torch.cat(parts) if len(parts) > 1 else parts[0])

    def prepare(self, *example_args, warm_start: bool = False, **example_kwargs) -> "SpectralPenalty":
        """Find the layers and create the state now, outside any compiled region; returns the
        penalty. With example arguments, first runs the model once on them (``no_grad``, every
        module in eval mode for that pass, so no BatchNorm statistics move) for the discovery
        that otherwise needs a forward pass before the first call. Call it before compiling a
        training step that contains the penalty from step 0 (``torch.compile(fullgraph=True)``
        cannot create the state inside the graph)::

            penalty = sf.SpectralPenalty(model, gamma=1e-2).prepare(x_example)
            step = torch.compile(train_step, fullgraph=True)

        ``warm_start=True`` also runs the ``n_iter_init`` warm-start steps now, at the current
        weights, instead of on the first penalized step: compiled calls then skip the
        warm-start steps that they otherwise run, masked, while a warm start is pending. The
        schedule counter and ``last_sigmas`` are untouched."""
        if example_args or example_kwargs:
            model = self._model[0]
            modes = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                with torch.no_grad():
                    model(*example_args, **example_kwargs)
            finally:
                for m, mode in modes:
                    m.training = mode
        if not self._ready:
            self._finalize_autocast_off()
        self._check_modules()
        if warm_start and not bool(self.initialized):
            with torch.no_grad():
                self._sigmas(True, max(self.n_iter, self.n_iter_init))
            self.initialized.fill_(True)
        self._warm_start_done = bool(self.initialized)
        return self

    # Under torch.compile a graph break: the state cannot be created inside a graph (a
    # torch.Generator seeds it); with fullgraph=True the reason below is the error.
    @torch.compiler.disable(reason="SpectralPenalty creates its state on the first call, which cannot happen inside "
                                   "a compiled graph: call penalty.prepare(example_input) before compiling with "
                                   "fullgraph=True")
    def _finalize_autocast_off(self):
        with torch.autocast(device_type=self._maps[0].like().device.type, enabled=False):
            self._finalize()

    # Whether the host knows that the warm start has happened (``initialized`` is True): set
    # by the eager calls and prepare(), cleared by reset() and load_state_dict(). A compiled
    # graph traced while it is False carries the masked warm-start steps (_compiled_sigmas).
    _warm_start_done = False

    def forward(self, update: Optional[bool] = None) -> torch.Tensor:
        """The penalty (a differentiable scalar). In training mode (and ``update`` not False)
        the vectors take ``n_iter`` power steps first; ``penalty.eval()`` or
        ``update=False`` evaluates at the current vectors."""
        if not self._ready:
            self._finalize_autocast_off()
        self._check_modules()
        upd = self.training and self.update if update is None else bool(update)
        eig = self._eig_terms
        self._eig_terms = []
        compiling = torch.compiler.is_compiling()
        active = self._active(compiling)
        if self.training and self.auto_step:
            self.step_count.add_(1)
        if compiling:
            sig = self._compiled_sigmas(upd, active)
        elif not active:
            # burn-in / skipped step: no work at all
            return self.gammas.new_zeros(())
        else:
            n_iter = max(self.n_iter, self.n_iter_init) if upd and self._needs_warm_start() else self.n_iter
            sig = self._sigmas_or_roll_back(upd, n_iter, None)
            if upd:
                self.initialized.fill_(True)
                self._warm_start_done = True
        with torch.no_grad():
            self.last_sigmas.copy_(torch.where(active, sig.detach(), self.last_sigmas) if compiling else sig.detach())
        total = (self._term_gammas(sig) * sig.pow(2)).sum()
        if self.eig_ub and eig:
            g = self.gammas.max() if self.gammas.numel() else 0.0
            total = total + g * torch.stack(eig).sum()
        return torch.where(active, total, torch.zeros_like(total)) if compiling else total

    def _compiled_sigmas(self, update: bool, active: torch.Tensor) -> torch.Tensor:
        """``_sigmas`` under torch.compile, with eager's schedule as device-side masks.

        Eager mode reads the step counter and ``initialized`` on the host: no work before
        ``start_step`` or on skipped ``every`` steps, ``max(n_iter, n_iter_init)`` steps on the
        first penalized call. A compiled graph has no data-dependent branch (a host read of a
        mask is a graph break, or a device sync on every step) and ``torch.cond`` rejects the
        in-place power-step ops (torch 2.14), so the graph always does the work and masks its
        result: the vectors are snapshotted; the warm start's extra ``n_iter_init - n_iter``
        steps run and are kept only while not ``initialized``; the ``n_iter`` steps of every
        call run; then all of it is kept only where ``active`` (``torch.where(mask, new, old)``
        into the buffers); the caller masks the value. The ops' ``a + b`` steps are ``a``
        steps then ``b`` (the same loop), so this gives eager's vectors and values: bit for bit
        for dense and conv-operator layers; the circular step re-enters the Fourier domain at
        each call, so there a split warm start differs by float rounding. The cost: an
        inactive compiled call does a normal call's steps, and while a warm start may be
        pending (``_warm_start_done`` False when traced) every compiled call also runs the
        extra steps; ``prepare(..., warm_start=True)`` before compiling (or one eager call)
        removes them from the graph."""
        if not update:
            return self._sigmas(False, self.n_iter)
        b = self._buffers
        vectors = [b[k] for k in b if k.split("_")[0] in ("u", "v", "x", "y")]
        old = [t.clone() for t in vectors]
        extra = self.n_iter_init - self.n_iter
        if extra > 0 and not self._warm_start_done:
            with torch.no_grad():
                self._sigmas(True, extra)  # only the steps: the estimates are not used
                for t, o in zip(vectors, old):  # (on an inactive call, undone with the rest below)
                    t.copy_(torch.where(self.initialized, o, t))
        sig = self._sigmas(True, self.n_iter)
        with torch.no_grad():
            for t, o in zip(vectors, old):
                t.copy_(torch.where(active, t, o))
            self.initialized.logical_or_(active)
        return sig

    def _term_gammas(self, sig: torch.Tensor) -> torch.Tensor:
        """Each map's gamma in the penalty: ``gammas``, except that the blocks of one operator
        (a grouped patch conv) share one term, ``gamma * max_g sigma_g^2``: a block's gamma
        counts where its sigma is its layer's max (split evenly among ties), 0 elsewhere."""
        if self._block_layers is None:
            return self.gammas
        idx = torch.tensor(self._block_layers, device=sig.device)
        s = sig.detach()
        top = torch.zeros_like(s).scatter_reduce(0, idx, s, "amax", include_self=False)
        at_max = (s == top[idx]).to(s.dtype)
        ties = torch.zeros_like(s).scatter_add(0, idx, at_max)
        return self.gammas * (at_max / ties[idx]).to(self.gammas.dtype)

    def _active(self, compiling: bool):
        """Whether this step is penalized (before the counter advances): a bool in eager mode
        (one read of the counter), a 0-d bool tensor under torch.compile (a mask instead of
        a graph break)."""
        if compiling:
            s = self.step_count - self.start_step
            return (s >= 0) & (torch.remainder(s.clamp_min(0), self.every) == 0)
        if self.start_step == 0 and self.every == 1:
            return True  # the default schedule: no read of the counter (a host sync on a GPU)
        s = int(self.step_count) - self.start_step
        return s >= 0 and s % self.every == 0

    def _needs_warm_start(self) -> bool:
        """Whether this call takes the ``n_iter_init`` warm-start steps: the ``initialized``
        buffer is read (a host sync on a GPU) only until it is seen set."""
        if not self._warm_start_done:
            self._warm_start_done = bool(self.initialized)
        return not self._warm_start_done

    def accumulate_grad(self, scale: float = 1.0) -> torch.Tensor:
        """The penalty's gradient added in place into each regularized weight's ``.grad``,
        without autograd; returns the penalty's value (detached, for logging).

        Call it after ``loss.backward()`` instead of adding ``penalty()`` to the loss: the same
        power steps, schedule and gradient, ``2 gamma sigma u v^T`` written with one in-place
        rank-1 update of the existing ``.grad`` per dense layer (``addr_``), where the autograd
        route materializes ``u v^T`` in fresh memory and then adds it: on a 784-1024x3 MLP that
        gradient materialization is most of the penalty's cost (``bench/bench_training.py``).
        A LoRA map's gradient goes into its A and B likewise, as rank-1 updates
        (``dense.lowrank_grads``).
        Conv layers get the conv weight-gradient of their (x, y) pair, added likewise.

        ``scale`` multiplies the gradient (e.g. ``scaler.get_scale()`` under a GradScaler, or
        ``1 / accumulation_steps``). It only reaches ``.grad``: not for ``torch.autograd.grad``
        flows. A computed weight (``parametrize``, ``extra=``) gets it through autograd, from
        the weight back to its parameters (into their ``.grad``); with
        ``DistributedDataParallel`` every rank adds the same term after the all-reduce, so the
        ranks stay identical. ``eig_ub=True`` needs the activations: use ``penalty()`` then.
        """
        if self.eig_ub:
            raise ValueError("accumulate_grad() does not support eig_ub=True (its term depends on the activations): "
                             "add penalty() to the loss instead")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if not self._ready:
            self._finalize()
        self._check_modules()
        self._eig_terms = []
        upd = self.training and self.update
        active = self._active(False)
        if self.training and self.auto_step:
            self.step_count.add_(1)
        if not active:
            return self.gammas.new_zeros(())
        n_iter = max(self.n_iter, self.n_iter_init) if upd and self._needs_warm_start() else self.n_iter
        nd = len(self._dense)
        conv_pairs: list = []
        with torch.no_grad():
            sig = self._sigmas_or_roll_back(upd, n_iter, conv_pairs)
        if upd:
            self.initialized.fill_(True)
            self._warm_start_done = True
        with torch.no_grad():
            self.last_sigmas.copy_(sig)
            # 2 gamma sigma scale per layer: Python floats on the CPU (one read for all layers);
            # on a device, 0-d tensors folded into a vector, so nothing waits for the device
            coefs = (2.0 * float(scale)) * self._term_gammas(sig) * sig
            if coefs.device.type == "cpu":
                coefs = coefs.tolist()
            sharded = self._sharded()
            if sharded is not None:  # each rank adds its rows into the local shard of the DTensor .grad
                _distributed.add_grads(*sharded[:3], coefs, *sharded[3:])
                return (self._term_gammas(sig) * sig.pow(2)).sum()
            for i, mp in enumerate(self._dense):
                if mp.lowrank is not None:  # a LoRA map: d sigma/d(W, B, A) as rank-1 terms (dense.lowrank_grads)
                    u, v = self._buffers[f"u_{i}"], self._buffers[f"v_{i}"]
                    for P, left, right in _dense.lowrank_grads(mp.factors(), u, v):
                        left, right, c = _rank1(left, right, coefs[i], P.dtype)
                        _grad_of(P).addr_(left, right, alpha=c)
                    continue
                if mp.attr is None or _computed(mp):  # its gradient reaches its parameters through autograd
                    with torch.enable_grad():
                        Wx = mp.weight()
                        if Wx.requires_grad:
                            Wx.backward(torch.outer(self._buffers[f"u_{i}"], self._buffers[f"v_{i}"]).to(Wx.dtype)
                                        * coefs[i])
                    continue
                W = mp.param()
                if not W.requires_grad:  # a frozen layer gets no gradient, as on the autograd route
                    continue
                G = _grad_of(W)
                u, v, c = _rank1(self._buffers[f"u_{i}"], self._buffers[f"v_{i}"], coefs[i], G.dtype)
                _add_rank1(mp, G, u, v, alpha=c)  # into the map's block of .grad
            for j, mp in enumerate(self._convs):
                if _computed(mp) and conv_pairs[j] is not None:  # the pair's weight-gradient, through the parametrization
                    x, y, params, mode = conv_pairs[j]
                    with torch.enable_grad():
                        Wc = mp.param()
                        if Wc.requires_grad:
                            gW = _ops.conv_weight_grad([Wc.detach()], [x], [y * coefs[nd + j]], params, [mode])[0]
                            Wc.backward(gW.to(Wc.dtype))
            train = [j for j, mp in enumerate(self._convs) if not _computed(mp) and mp.param().requires_grad]
            if train:
                # dsigma/dW of each conv: the conv weight-gradient of its pair, times 2 gamma
                # sigma scale, as the autograd route's backward computes it (the coefficient
                # scales the output-sized y, not the weight-sized gradient). One op call for
                # the layers with a .grad, added in place (conv_weight_grad_add_: no
                # weight-sized temporary where the direct kernels run), one for those without.
                for fresh in (False, True):
                    js = [j for j in train if (self._convs[j].param().grad is None) == fresh]
                    if not js:
                        continue
                    ws = [self._convs[j].param() for j in js]
                    args = ([W.detach() for W in ws], [conv_pairs[j][0] for j in js],
                            [conv_pairs[j][1] * coefs[nd + j] for j in js], [q for j in js for q in conv_pairs[j][2]],
                            [conv_pairs[j][3] for j in js])
                    if fresh:
                        for W, gW in zip(ws, _ops.conv_weight_grad(*args)):
                            W.grad = gW.to(W.dtype)
                    else:
                        _ops.conv_weight_grad_add_([W.grad for W in ws], *args)
        return (self._term_gammas(sig) * sig.pow(2)).sum()

    @torch.no_grad()
    def sigmas(self) -> Dict[str, float]:
        """Name -> sigma of the last call (for logging; no computation)."""
        if not self._ready:
            self._finalize()
        self._check_modules()
        return {mp.name: float(v) for mp, v in zip(self._layers, self.last_sigmas.tolist())}

    def bounds(self, n_iter: int = 6, max_dim: int = 4096) -> Dict[str, Tuple[float, float, float]]:
        """Name -> ``(lower, upper, rel_gap)``: a certified bracket of each layer's norm
        (see :func:`specreg_fast.bounds.operator_norm_bounds`; ``max_dim`` caps the convs'
        dense Gram certificate)."""
        if not self._ready:
            self._finalize()
        self._check_modules()
        out = {}
        for mp in self._layers:
            shape = self._input_shapes[mp.owner] if mp.conv else None
            out[mp.name] = operator_norm_bounds(mp.module if mp.conv else mp.weight().detach(), shape,
                                                n_iter=n_iter, max_dim=max_dim)
        return out

    def extra_repr(self) -> str:
        return (f"scope={self._scope!r}, conv_norm={self.conv_norm!r}, n_iter={self.n_iter}, "
                f"start_step={self.start_step}, every={self.every}, eig_ub={self.eig_ub}")


# ---------------------------------------------------------------------- constraint mode
class SpectralNormalize(nn.Module):
    """Parametrization ``W -> W / sigma(W)`` with the fast ops: a drop-in for
    ``torch.nn.utils.parametrizations.spectral_norm`` that, for convs, divides by the true
    operator norm at ``input_shape`` instead of the reshaped-kernel matrix norm.

    sigma is clamped at ``sqrt(finfo.tiny)`` of its dtype (1.1e-19 in float32): a zero weight
    (sigma 0) maps to zero instead of 0/0 = NaN, with a finite gradient ``1/floor`` times the
    incoming one (float32/float64/bfloat16 weights; a float16 gradient cannot hold it); a
    low-precision weight is divided in sigma's dtype, where that floor exists."""

    def __init__(self, module: nn.Module, input_shape: Optional[Sequence[int]] = None, n_iter: int = 1,
                 n_iter_init: int = 15, seed: int = 0):
        super().__init__()
        self.n_iter = n_iter
        w = module.weight.detach()
        g = torch.Generator().manual_seed(seed)
        self.is_conv = isinstance(module, _CONV)
        if self.is_conv:
            if input_shape is None:
                raise ValueError(f"input_shape (C_in, *spatial) is required for a {type(module).__name__}")
            self._spec_args = ConvSpec.from_module(module, input_shape)
            st = init_conv_state([self._spec_args], generator=g)
            self.register_buffer("x", st.xs[0])
            self.register_buffer("y", st.ys[0])
            conv_operator_norms([self._spec_args], st, n_iter=n_iter_init)
        else:
            st = _dense.init_power_state([_dense.as_matrix(w)], generator=g)
            self.register_buffer("u", st.us[0])
            self.register_buffer("v", st.vs[0])
            _dense.spectral_norms([_dense.as_matrix(w)], st, n_iter=n_iter_init)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        upd = self.training
        if self.is_conv:
            spec = ConvSpec(**{**self._spec_args.__dict__, "weight": W})
            s = conv_operator_norms([spec], ConvState([self.x], [self.y]), n_iter=self.n_iter, update=upd)[0]
        else:
            s = _dense.spectral_norms([_dense.as_matrix(W)], _dense.PowerState([self.u], [self.v]),
                                      n_iter=self.n_iter, update=upd)[0]
        s = s.clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
        return W / s if W.dtype == s.dtype else (W.to(s.dtype) / s).to(W.dtype)


def spectral_constraint(module: nn.Module, input_shape: Optional[Sequence[int]] = None, n_iter: int = 1,
                        seed: int = 0) -> nn.Module:
    """Constrain ``module.weight`` to unit spectral norm (operator norm for convs, at
    ``input_shape``) by a parametrization; returns the module."""
    from torch.nn.utils import parametrize

    if not isinstance(module, _SUPPORTED):
        raise TypeError(f"spectral_constraint supports Linear and (transposed) convs, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", SpectralNormalize(module, input_shape, n_iter, seed=seed))
    return module
