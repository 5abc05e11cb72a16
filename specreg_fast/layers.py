"""Which linear maps a model applies: one small adapter per layer kind.

:class:`SpectralPenalty` keeps the state, the schedule and the op calls; this module tells it
what to regularize. An adapter looks at one module and returns its :class:`LinearMap` s: for
each map, how to get its weight (a view of the parameter where the weight is stored, never a
copy, so the penalty's gradient reaches the parameter through autograd, and ``accumulate_grad``
writes into the same view of ``.grad``), and whether it is a dense matrix or a conv operator
(whose geometry is the module's). A new layer kind is one adapter in :data:`ADAPTERS` and one
test in ``python_tests/test_layers.py``.

Layer kinds and the maps they give (``name`` is the module's name in the model):

- ``nn.Linear``: ``W`` (``name``).
- HF ``transformers`` ``Conv1D`` (GPT-2; recognized by duck typing: a class named ``Conv1D`` in its MRO,
  an ``(in, out)`` weight and ``nf``): ``W^T``, the transposed view.
- ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``: the conv operator at the input size the
  layer sees (``conv_norm="operator"``), the circular-padding norm (``"fft"``), or the
  reshaped kernel ``(out, -1)`` (``"matrix"``). A conv whose patches do not overlap (see
  :func:`nonoverlapping_patches`) has operator norm ``max_g sigma(K_g)`` over its groups' reshaped
  kernels: :func:`patch_maps` turns it into one dense map per group, and the penalty takes the
  max over them (the paper's term is the layer operator's ``sigma_max^2``).
- ``nn.MultiheadAttention``: ``in_proj_weight`` as the three ``E x E`` maps ``name[q]``,
  ``name[k]``, ``name[v]`` (``q/k/v_proj_weight`` when the embedding dims differ), and
  ``name.out_proj`` (a Linear applied inside the attention's forward, never called as a module).
  ``attention="v"`` keeps only ``name[v]`` and ``name.out_proj``: the value path, through which
  the output is linear in the input for fixed attention weights. Default ``"qkv"``: every
  linear map of the block is regularized, as every layer of an MLP is; q and k set the
  attention logits, whose scale they bound.
- Fused q/k/v projections stored as one layer (GPT-2 ``c_attn``, timm/torchvision-Swin
  ``qkv`` Linears): one map by default, the fused matrix (one power step, and its norm bounds
  each of q, k and v, which are row blocks of it); ``split={name: 3}`` regularizes the three
  row blocks ``name[q]``, ``name[k]``, ``name[v]`` separately (``attention="v"`` then keeps only
  ``name[v]``); ``split={name: n}`` with ``n != 3`` gives ``name[0]`` ... ``name[n-1]``.
- ``peft`` LoRA on a Linear (or on a transformers ``Conv1D``, ``fan_in_fan_out``; recognized by
  duck typing, peft is not imported): ONE map ``name`` (the LoRA module's name), the effective
  weight the layer applies, ``W + sum_a scaling[a] B_a A_a`` over the active adapters
  (``W^T + ...`` for ``fan_in_fan_out``), given to the penalty as its factors
  (:func:`lora_factors`, read afresh per call): the power step and the gradients (on ``A`` and
  ``B``, and ``W`` only where it requires grad) are taken in low-rank form, never building the
  ``out x in`` matrix (:func:`specreg_fast.dense.lowrank_sigmas`). Merged
  adapters (the delta is already in ``W``), disabled adapters or no active one: ``W`` alone.
  ``base_layer``, ``lora_A`` and ``lora_B`` are not maps of their own. Not supported (listed in
  the one warning, not regularized): LoRA variants (DoRA and the other ``lora_variant`` s) and
  LoRA on any other base layer (Conv, Embedding, quantized layers).
- ``extra={name: fn}``: a custom linear map, ``fn()`` returning its 2-D weight matrix
  (differentiable in the parameters it is made of); its gradient reaches them through
  autograd (``accumulate_grad`` included).

Anything else that holds a parameter with 2 or more dims (``nn.Embedding``, ``nn.Bilinear``,
RNNs, custom layers) is listed by :func:`discover` as not supported.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["LinearMap", "ADAPTERS", "CONV_TYPES", "discover", "forward_order", "nonoverlapping_patches",
           "patch_maps", "is_within", "describe", "holds_weight_matrix", "lora_weight",
           "LowRank", "lora_factors"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_QKV = ("q", "k", "v")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _reshaped(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class LinearMap:
    """One linear map of a model that the penalty can regularize.

    Attributes:
        name: the map's name (``penalty.sigmas()``, ``layer_names``, ``gamma`` dict keys).
        owner: the module whose place in forward order is the map's (scope, exclude, readout).
        module: the module that holds the parameter (for a conv: its geometry applies).
        attr: the parameter's attribute name on ``module``; None for an ``extra=`` map.
        view: parameter (or its ``.grad``) -> this map's weight, a view of it.
        fn: for an ``extra=`` map, the callable returning its weight matrix.
        conv: True for a conv operator at the owner's input size; False for a dense matrix.
        layer: maps with the same ``layer`` are blocks of one operator (sigma = their max).
        lowrank: for a LoRA map, ``module -> LowRank``, its factors now (:meth:`factors`; a
            function of the module, not a closure, so a deep copy of the penalty and the model
            reads the copied module); :meth:`weight` materializes the same map (``bounds()``).
    """

    __slots__ = ("name", "owner", "module", "attr", "view", "fn", "conv", "layer", "lowrank")

    def __init__(self, name: str, owner: str, module: Optional[nn.Module], attr: Optional[str] = "weight",
                 view: Callable[[torch.Tensor], torch.Tensor] = _identity, conv: bool = False,
                 fn: Optional[Callable[[], torch.Tensor]] = None, layer: Optional[str] = None,
                 lowrank: Optional[Callable[[nn.Module], "LowRank"]] = None):
        self.name, self.owner, self.module, self.attr, self.view = name, owner, module, attr, view
        self.fn, self.conv, self.layer, self.lowrank = fn, conv, name if layer is None else layer, lowrank

    def param(self) -> Optional[torch.Tensor]:
        """The stored (or parametrized) tensor the map is a view of; None for ``extra=``."""
        return None if self.attr is None else getattr(self.module, self.attr)

    def weight(self) -> torch.Tensor:
        """The map's weight (a 2-D matrix, or the conv kernel), differentiable."""
        if self.lowrank is not None:
            return self.factors().matrix()
        if self.attr is None:
            W = self.fn()
            if not isinstance(W, torch.Tensor) or W.dim() != 2:
                raise ValueError(f"extra[{self.name!r}] must return a 2-D weight matrix, got "
                                 f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__}")
            return W
        return self.view(self.param())

    def factors(self) -> "LowRank":
        """A low-rank map's factors as the module holds them now."""
        return self.lowrank(self.module)

    def like(self) -> torch.Tensor:
        """A tensor with the map's shape, dtype and device, for sizing its state: the weight
        itself, or for a low-rank map a stride-0 stand-in (nothing of the map's size built)."""
        return self.factors().like() if self.lowrank is not None else self.weight()

    def grad_view(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        """This map's block of the parameter's ``.grad``, as a view an in-place update writes
        through; None where the view function had to copy (e.g. a channels_last ``.grad``)."""
        g = self.view(grad)
        return g if g.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr() else None

    def __repr__(self) -> str:
        return f"LinearMap({self.name!r}, {'conv' if self.conv else 'dense'})"


def _rows(view: Callable, i: int, n: int) -> Callable:
    """Row block ``i`` of ``n`` of the matrix ``view`` gives (still a view)."""
    def block(t):
        W = view(t)
        r = W.shape[0] // n
        return W[i * r:(i + 1) * r]
    return block


def _split(name: str, module: nn.Module, view: Callable, opts: dict) -> List[LinearMap]:
    """A dense layer, whole or split into row blocks (``split=``, ``attention=``)."""
    n = opts["split"].get(name)
    if n is None:
        return [LinearMap(name, name, module, view=view)]
    rows = view(module.weight).shape[0]
    if rows % n:
        raise ValueError(f"split[{name!r}]: {n} does not divide the {rows} output features")
    tags = _QKV if n == 3 else tuple(str(i) for i in range(n))
    keep = ("v",) if n == 3 and opts["attention"] == "v" else tags
    return [LinearMap(f"{name}[{t}]", name, module, view=_rows(view, i, n)) for i, t in enumerate(tags) if t in keep]


def _linear(name: str, m: nn.Module, opts: dict) -> Optional[List[LinearMap]]:
    if isinstance(m, nn.Linear):
        return _split(name, m, _identity, opts)
    return None


def _hf_conv1d(name: str, m: nn.Module, opts: dict) -> Optional[List[LinearMap]]:
    # transformers.pytorch_utils.Conv1D, without importing transformers: y = x W + b, W (in, out)
    w = getattr(m, "weight", None)
    # by its class's MRO: FSDP2's fully_shard and replicate() swap the class for a subclass
    # (FSDPConv1D(FSDPModule, Conv1D))
    if (any(c.__name__ == "Conv1D" for c in type(m).__mro__) and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.shape[1] == getattr(m, "nf", None)):
        return _split(name, m, _transpose, opts)
    return None


def _is_lora(m: nn.Module) -> bool:
    """A ``peft`` LoRA layer (any base layer), by duck typing."""
    return (isinstance(getattr(m, "base_layer", None), nn.Module) and isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and isinstance(getattr(m, "scaling", None), dict))


class LowRank(NamedTuple):
    """A map ``M = base_matrix + sum_k scales[k] Bs[k] As[k]`` kept as its factors.

    ``base`` is the stored base weight, ``M``'s first term is ``base`` (``base.t()`` when
    ``transposed``); ``Bs[k]`` is ``(out, r_k)``, ``As[k]`` ``(r_k, in)``."""

    base: torch.Tensor
    transposed: bool
    Bs: Tuple[torch.Tensor, ...]
    As: Tuple[torch.Tensor, ...]
    scales: Tuple[float, ...]

    @property
    def base_matrix(self) -> torch.Tensor:
        return self.base.t() if self.transposed else self.base

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the materialized map (``W + s B A`` promotes)."""
        dt = self.base.dtype
        for t in self.Bs + self.As:
            dt = torch.promote_types(dt, t.dtype)
        return dt

    def like(self) -> torch.Tensor:
        W = self.base_matrix
        return W.new_zeros((), dtype=self.dtype).expand(W.shape)

    def matrix(self) -> torch.Tensor:
        """``M`` materialized, differentiable (the reference the low-rank path avoids)."""
        M = self.base_matrix
        for B, A, s in zip(self.Bs, self.As, self.scales):
            M = M + s * (B @ A)
        return M


def lora_factors(m: nn.Module) -> LowRank:
    """The map a peft LoRA Linear applies in its forward now, as its factors: the base weight
    (transposed for ``fan_in_fan_out``) plus ``scaling[a] B_a A_a`` for each active adapter,
    none when the adapters are disabled or merged (then the base weight already is the map)."""
    Bs, As, scales = [], [], []
    if not (m.disable_adapters or m.merged):
        for a in m.active_adapters:
            if a not in m.lora_A:  # as the forward: an active name with no LoRA weights here
                continue
            if a in getattr(m, "lora_variant", {}):
                raise ValueError(f"LoRA adapter {a!r} is a LoRA variant ({type(m.lora_variant[a]).__name__}, e.g. "
                                 f"DoRA): its map is not W + s B A; not supported")
            Bs.append(m.lora_B[a].weight)
            As.append(m.lora_A[a].weight)
            scales.append(float(m.scaling[a]))
    return LowRank(m.base_layer.weight, bool(m.fan_in_fan_out), tuple(Bs), tuple(As), tuple(scales))


def lora_weight(m: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight a peft LoRA Linear applies in its forward now, materialized
    (:func:`lora_factors`' map)."""
    return lora_factors(m).matrix()


def _lora(name: str, m: nn.Module, opts: dict) -> Optional[List[LinearMap]]:
    # peft.tuners.lora.layer.Linear, without importing peft; [] (claimed, reported as not
    # supported) for a LoRA variant or a base layer other than a Linear / transformers Conv1D
    if not _is_lora(m):
        return None
    base = m.base_layer
    dense = ((isinstance(base, nn.Linear) and base.weight.is_floating_point())  # not a quantized Linear
             or _hf_conv1d(name, base, {"split": {}}) is not None) and hasattr(m, "fan_in_fan_out")
    if not dense or getattr(m, "lora_variant", None):
        return []
    return [LinearMap(name, name, m, attr=None, lowrank=lora_factors)]


def _conv(name: str, m: nn.Module, opts: dict) -> Optional[List[LinearMap]]:
    if not isinstance(m, CONV_TYPES):
        return None
    if opts["conv_norm"] == "matrix":
        return [LinearMap(name, name, m, view=_reshaped)]
    return [LinearMap(name, name, m, conv=True)]


def _mha(name: str, m: nn.Module, opts: dict) -> Optional[List[LinearMap]]:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    keep = _QKV if opts["attention"] == "qkv" else ("v",)
    if m._qkv_same_embed_dim:
        maps = [LinearMap(f"{name}[{t}]", name, m, "in_proj_weight", _rows(_identity, i, 3))
                for i, t in enumerate(_QKV) if t in keep]
    else:
        maps = [LinearMap(f"{name}[{t}]", name, m, f"{t}_proj_weight") for t in _QKV if t in keep]
    out = f"{name}.out_proj" if name else "out_proj"
    return maps + [LinearMap(out, out, m.out_proj)]


#: The adapters, tried in order on every module; the first that answers claims the module
#: and its children (an attention's ``out_proj`` is claimed by the attention's adapter).
#: An adapter that returns ``[]`` claims the module and reports it as not supported.
ADAPTERS: List[Callable[[str, nn.Module, dict], Optional[List[LinearMap]]]] = [_lora, _mha, _hf_conv1d, _linear, _conv]


def _stored(mp: LinearMap) -> torch.Tensor:
    """The tensor a map's weight is stored in: a parametrized weight is computed afresh on
    every access (its id can be reused by the next one), its original is not."""
    m = mp.module
    if parametrize.is_parametrized(m, mp.attr):
        par = getattr(m.parametrizations, mp.attr)
        # several originals where the right inverse returns a tuple (weight_norm: g, v)
        return par.original if par.is_tensor else par.original0
    return mp.param()


def holds_weight_matrix(m: nn.Module) -> bool:
    """Whether ``m`` itself (not its children) holds a parameter with >= 2 dims."""
    return any(p.dim() >= 2 for p in m.parameters(recurse=False))


def discover(root: nn.Module, conv_norm: str = "operator", split: Optional[Dict[str, int]] = None,
             attention: str = "qkv", extra: Optional[Dict[str, Callable[[], torch.Tensor]]] = None
             ) -> Tuple[List[LinearMap], List[Tuple[str, nn.Module]], List[str]]:
    """The linear maps of ``root`` in module order.

    Returns ``(maps, unsupported, skipped_lazy)``: ``unsupported`` are the unclaimed modules
    that hold a parameter with >= 2 dims (Embedding, Bilinear, RNNs, custom layers: not
    regularized), ``skipped_lazy`` the lazy modules not materialized yet. A weight shared by
    several modules (tied weights) gives its maps once."""
    if attention not in ("qkv", "v"):
        raise ValueError(f"attention must be 'qkv' or 'v', got {attention!r}")
    split, extra = dict(split or {}), dict(extra or {})
    modules = dict(root.named_modules())
    for n, k in split.items():
        m = modules.get(n)
        if m is None or _linear(n, m, {"split": {}}) is None and _hf_conv1d(n, m, {"split": {}}) is None:
            raise ValueError(f"split: {n!r} is not a Linear or Conv1D of the model")
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"split[{n!r}] must be an int >= 2, got {k!r}")
    for n, fn in extra.items():
        if not callable(fn):
            raise TypeError(f"extra[{n!r}]: expected a callable returning the weight matrix, got {type(fn).__name__}")
    opts = {"conv_norm": conv_norm, "split": split, "attention": attention}
    maps: List[LinearMap] = []
    unsupported: List[Tuple[str, nn.Module]] = []
    lazy: List[str] = []
    claimed: List[str] = []
    seen = set()
    for n, m in modules.items():  # named_modules: a module shared by several parents once
        if any(n.startswith(c + ".") for c in claimed) or n in extra:
            continue
        for adapter in ADAPTERS:
            found = adapter(n, m, opts)
            if found is not None:
                break
        if found is None:
            if holds_weight_matrix(m):
                unsupported.append((n, m))
            continue
        claimed.append(n)
        if not found:
            unsupported.append((n, m))
            continue
        if any(isinstance(mp.param(), nn.parameter.UninitializedParameter) for mp in found):
            lazy.append(f"{n} ({type(m).__name__})")
            continue
        for mp in found:
            # tied weights: the same map once (a computed map: its module's)
            key = (id(_stored(mp) if mp.attr is not None else mp.module), mp.name[len(mp.owner):])
            if key not in seen:
                seen.add(key)
                maps.append(mp)
    maps += [LinearMap(n, n, modules.get(n), attr=None, fn=fn) for n, fn in extra.items()]
    return maps, unsupported, lazy


def forward_order(names: Sequence[str], starts: Dict[str, int], ends: Dict[str, int]) -> List[str]:
    """``names`` (module names) in forward order, from the event counters recorded by hooks on
    every module: a module's pre-hook gives its place (``starts``); a module whose forward never
    ran but whose weight was used (an attention's ``out_proj``, Swin's ``qkv``/``proj``, used
    through ``F.linear``) takes the end (``ends``) of its nearest ancestor that ran. Names with
    no such ancestor (never used) are left out."""
    placed = []
    for i, n in enumerate(names):
        pos = starts.get(n)
        a = n
        while pos is None and a:
            a = a.rpartition(".")[0]
            pos = ends.get(a)
        if pos is not None:
            placed.append((pos, i, n))
    return [n for _, _, n in sorted(placed)]


def _ints(v, d: int) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * d


def nonoverlapping_patches(m: nn.Module, input_shape: Sequence[int]) -> bool:
    """True when the conv ``m`` at ``input_shape`` ``(C_in, *spatial)`` applies its kernel to
    disjoint patches, ``(k-1)*d+1 <= s`` in every spatial dim, with zero padding (or none) and
    at least one patch fully inside the (conv-side) image. Then its operator is, up to
    permutations, block diagonal with one block per (patch, group): the reshaped group kernel
    ``K_g`` for a full patch and a column subset of it for a patch cut by the padding, so the
    operator norm is ``max_g sigma(K_g)``. A transposed conv is the adjoint of the conv from
    its output size, with the same condition."""
    if not isinstance(m, CONV_TYPES) or m.padding_mode != "zeros":
        return False
    d = m.weight.dim() - 2
    k, s, dil = tuple(m.weight.shape[2:]), _ints(m.stride, d), _ints(m.dilation, d)
    if any((k[i] - 1) * dil[i] + 1 > s[i] for i in range(d)):
        return False
    if isinstance(m.padding, str):
        # 'valid' has none; 'same' pads only a kernel with reach > 1, which overlaps here
        # (s = 1), except a 1-wide one
        p = (0,) * d
    else:
        p = _ints(m.padding, d)
    sp = tuple(int(n) for n in input_shape[1:])
    if len(sp) != d or any(n <= 0 for n in sp):
        return False
    for i in range(d):
        reach = (k[i] - 1) * dil[i]
        if m.transposed:  # conv side: the transposed output (N) -> the transposed input (positions)
            positions = sp[i]
            N = (sp[i] - 1) * s[i] - 2 * p[i] + reach + _ints(m.output_padding, d)[i] + 1
        else:
            N = sp[i]
            positions = (N + 2 * p[i] - reach - 1) // s[i] + 1
        o = -(-p[i] // s[i])  # first patch that starts inside the image
        if o >= positions or o * s[i] - p[i] + reach > N - 1:
            return False
    return True


def patch_maps(mp: LinearMap, input_shape: Sequence[int]) -> Optional[List[LinearMap]]:
    """A conv map whose patches do not overlap (:func:`nonoverlapping_patches`) as dense maps:
    one per group, the group's kernel block reshaped to ``(rows, -1)`` (rows: the group's
    output channels, or input channels for a transposed conv, whose map is that block's
    transpose; same norm); they share ``layer`` (sigma = max over groups). None otherwise."""
    m = mp.module
    if not mp.conv or not nonoverlapping_patches(m, input_shape):
        return None
    g = m.groups
    if g == 1:
        return [LinearMap(mp.name, mp.owner, m, view=_reshaped)]

    def block(i):
        return lambda t: t.unflatten(0, (g, -1))[i].flatten(1)

    return [LinearMap(f"{mp.name}[g{i}]", mp.owner, m, view=block(i), layer=mp.name) for i in range(g)]


def is_within(name: str, prefixes: Sequence[str]) -> bool:
    """``name`` is one of ``prefixes`` or inside one of them (module-name prefixes)."""
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


def describe(entries: Sequence[Tuple[str, nn.Module]]) -> str:
    """``name (Type: param, ...)`` for the warning on unsupported modules."""
    out = []
    for n, m in entries:
        ps = [k for k, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        if not ps:  # a module claimed whole and not supported (a LoRA variant): its full type
            out.append(f"{n or '<root>'} ({type(m).__module__}.{type(m).__qualname__})")
            continue
        out.append(f"{n or '<root>'} ({type(m).__name__}" + ("" if ps == ["weight"] else f": {', '.join(ps)}") + ")")
    return ", ".join(out)
