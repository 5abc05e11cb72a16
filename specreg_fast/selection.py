"""Which maps of a model the penalty regularizes, and with which gamma.

:class:`Selection` discovers the model's linear maps (:func:`specreg_fast.layers.discover`),
records the forward order and each conv's input size with forward hooks (until the penalty's
first call), and applies ``scope``, ``exclude``, the readout rule and ``gamma``.
:class:`specreg_fast.SpectralPenalty` holds one; its argument docs are the user-facing ones.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import layers as _layers

__all__ = ["AUTO", "Selection", "unwrap", "watch_activations"]

AUTO = "auto"  # the readout argument's default: found from the forward order


def unwrap(model: nn.Module) -> nn.Module:
    """The real model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class Selection:
    """The model's maps and the rules that pick the regularized ones (see the arguments of
    :class:`specreg_fast.SpectralPenalty`). ``root`` is the unwrapped model."""

    def __init__(self, root: nn.Module, gamma, scope, exclude: Sequence[str], conv_norm: str,
                 readout, split: Optional[Dict[str, int]], attention: str, extra,
                 input_shapes: Optional[Dict[str, Sequence[int]]], after_forward: Optional[Callable[[], None]] = None):
        if isinstance(gamma, (int, float)) and (gamma < 0 or not math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
        self.root, self.gamma, self.scope, self.exclude = root, gamma, scope, tuple(exclude)
        by_name = dict(root.named_modules())  # dedupes shared modules: counted once
        self.maps, unsupported, lazy = _layers.discover(root, conv_norm, split, attention, extra)
        for n in lazy:
            warnings.warn(f"SpectralPenalty: skipping {n}: lazy module not materialized yet; construct the penalty "
                          f"after the first forward")
        unsupported = [(n, m) for n, m in unsupported if not _layers.is_within(n, self.exclude)]
        if unsupported:
            warnings.warn(f"SpectralPenalty: not regularized, not a layer kind it knows: "
                          f"{_layers.describe(unsupported)}; pass extra={{name: callable returning the weight "
                          f"matrix}} for a custom linear map")
        if not self.maps:
            raise ValueError("model has no supported layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                             "MultiheadAttention, transformers Conv1D, extra=)")
        if not isinstance(scope, str) or scope not in ("hidden", "all"):
            for s in [scope] if isinstance(scope, str) else list(scope):
                if s not in by_name:
                    raise ValueError(f"scope: no module named {s!r} in the model")
        for e in self.exclude:
            if e not in by_name:
                raise ValueError(f"exclude: no module named {e!r} in the model")
        self.supported_owners = {mp.owner for mp in self.maps}
        if readout != AUTO:
            if scope != "hidden":
                raise ValueError(f"readout: applies to scope='hidden', got scope={scope!r}")
            if readout is not None and readout not in by_name and readout not in self.supported_owners:
                raise ValueError(f"readout: no module named {readout!r} in the model")
        self.readout_arg = readout
        # forward order of every module that holds a weight matrix (the readout rule); the
        # parts of a supported layer (a LoRA layer's base_layer / lora_A / lora_B) are not
        self.weight_owners = [n for n, m in by_name.items() if n in self.supported_owners or (
            _layers.holds_weight_matrix(m) and not _layers.is_within(n, self.supported_owners))]
        self.starts: Dict[str, int] = {}
        self.ends: Dict[str, int] = {}
        self.order: List[str] = []
        self.input_shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in (input_shapes or {}).items()}
        self.hooks = []
        self._links: dict = {}  # check_attached's paths, per list of maps
        for n, m in by_name.items():
            self.hooks.append(m.register_forward_pre_hook(self._record_hook(n, m)))
            self.hooks.append(m.register_forward_hook(self._end_hook(n, m)))
        if after_forward is not None:  # at the end of a forward of the model itself
            self.hooks.append(root.register_forward_hook(lambda mod, args, out: after_forward() if mod is root else None))

    # The hooks act only on the module they were registered on: a deep copy of the model (an
    # EMA/SWA AveragedModel made before the first penalty call) carries copies of them, whose
    # forwards at other input sizes must not change this selection.
    def _record_hook(self, name, module):
        conv = isinstance(module, _layers.CONV_TYPES) and name in self.supported_owners

        def hook(mod, args):
            if mod is not module:
                return
            self.starts.setdefault(name, len(self.starts) + len(self.ends))
            if conv and args and isinstance(args[0], torch.Tensor):
                shp = tuple(args[0].shape[1:]) if args[0].dim() == mod.weight.dim() else tuple(args[0].shape)
                old = self.input_shapes.get(name)
                # several sizes: the largest (its zero-padding norm is the largest)
                if old is None or math.prod(shp) > math.prod(old):
                    self.input_shapes[name] = shp
        return hook

    def _end_hook(self, name, module):
        def hook(mod, args, out):
            if mod is not module:
                return
            self.ends.setdefault(name, len(self.starts) + len(self.ends))
        return hook

    def observe(self, *args, **kwargs) -> None:
        """One forward of the model on example arguments for the hooks (``no_grad``, every
        module in eval mode for that pass, so no BatchNorm statistics move)."""
        modes = [(m, m.training) for m in self.root.modules()]
        self.root.eval()
        try:
            with torch.no_grad():
                self.root(*args, **kwargs)
        finally:
            for m, mode in modes:
                m.training = mode

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def forward_order(self) -> List[str]:
        """The modules that hold a weight matrix, in forward order (recorded by the hooks, or
        loaded from a checkpoint before any forward)."""
        if self.starts:
            self.order = _layers.forward_order(self.weight_owners, self.starts, self.ends)
        return self.order

    def _in_scope(self, name: str) -> bool:
        if self.scope in ("hidden", "all"):
            return True
        wanted = [self.scope] if isinstance(self.scope, str) else list(self.scope)
        return any(name == s or name.startswith(s + ".") for s in wanted)

    def gamma_of(self, mp: _layers.LinearMap) -> float:
        g, name = self.gamma, mp.name
        if callable(g):
            val = float(g(name, mp.module))
        elif isinstance(g, dict):  # the map's own name, else its layer's or module's
            val = float(g.get(name, g.get(mp.layer, g.get(mp.owner, 0.0))))
        else:
            val = float(g)
        if val < 0 or not math.isfinite(val):
            raise ValueError(f"gamma for {name}: must be a finite number >= 0, got {val}")
        return val

    def readout(self) -> Optional[str]:
        """The module left free by ``scope="hidden"`` (see the ``readout`` argument)."""
        if self.readout_arg != AUTO:
            return self.readout_arg
        order = self.forward_order()
        if not order:
            raise RuntimeError("SpectralPenalty(scope='hidden') finds the readout from the forward order: run one "
                               "forward pass of the model before the first penalty() call, or pass readout=")
        last = order[-1]
        kind = type(self.root.get_submodule(last)).__name__
        if last not in self.supported_owners:
            warnings.warn(f"SpectralPenalty: the last layer with a weight in forward order, {last} ({kind}), is not a "
                          f"layer the penalty supports: no layer is taken as the readout, every supported layer is "
                          f"regularized; pass readout='name' (or readout=None) to say so")
            return None
        warnings.warn(f"SpectralPenalty: readout taken to be {last} ({kind}), the last layer in forward order, and "
                      f"left free; pass readout={last!r} (or another name, or None) to say so")
        return last

    def select(self) -> Tuple[List[_layers.LinearMap], Dict[str, float]]:
        """The regularized maps (model order) and each one's gamma (> 0)."""
        if self.scope == "hidden" and self.readout_arg == AUTO:
            self.check_attached(self.maps)  # the forward order comes from hooks on the modules found
        maps = [mp for mp in self.maps if self._in_scope(mp.owner) and not _layers.is_within(mp.owner, self.exclude)]
        if self.scope == "hidden":
            readout = self.readout()
            if readout is not None:
                maps = [mp for mp in maps if not _layers.is_within(mp.owner, [readout])]
        gammas = {mp.name: self.gamma_of(mp) for mp in maps}
        maps = [mp for mp in maps if gammas[mp.name] > 0]
        self.check_attached(maps)
        if not maps:
            raise ValueError(f"scope={self.scope!r} with exclude={self.exclude} and this gamma selects no layer")
        for mp in maps:
            if mp.conv and mp.owner not in self.input_shapes:
                raise RuntimeError(f"input size of {mp.owner} is unknown: run one forward pass of the model first, or "
                                   f"pass input_shapes={{'{mp.owner}': (C_in, *spatial)}}")
        return maps, gammas

    def check_attached(self, maps: Sequence[_layers.LinearMap]) -> None:
        """Model surgery after the penalty was built is a ValueError naming the layers: a
        map's module is no longer the model's module of that name (replaced or removed), so
        its weight would go on being regularized and the new module not. One identity test
        per step of the paths to the maps' modules (``links``, walked again only when a step
        changed); ``extra=`` maps are skipped (their weight is the user's function)."""
        links = self._links.get(id(maps))
        if links is not None and links[0] is maps and all(p._modules.get(k) is c for p, k, c in links[1]):
            return
        out, seen, replaced = [], set(), []
        for mp in maps:
            if mp.attr is None and mp.lowrank is None:
                continue
            path = mp.owner.split(".") if mp.owner else []
            node, chain, found = self.root, [], True
            for key in path:
                node = _through_compiled(node, chain, key)
                child = node._modules.get(key)
                if child is None:
                    found = False
                    break
                chain.append((node, key, child))
                node = child
            node = _through_compiled(node, chain, None, mp.module)
            if not found or node is not mp.module:
                replaced += [mp.owner] if mp.owner not in replaced else []
                continue
            for link in chain:
                if (id(link[0]), link[1]) not in seen:
                    seen.add((id(link[0]), link[1]))
                    out.append(link)
        if replaced:
            raise ValueError(f"SpectralPenalty: the model no longer holds the module{'s' * (len(replaced) > 1)} it "
                             f"found at {', '.join(repr(n) for n in replaced)} (replaced or removed after the penalty "
                             f"was built), whose weights it would go on regularizing: build the penalty after "
                             f"changing the model")
        self._links[id(maps)] = (maps, out)


def _through_compiled(node: nn.Module, chain: list, key: Optional[str], target: Optional[nn.Module] = None):
    """``node``, or the module a ``torch.compile`` wrapper put in its place holds
    (``OptimizedModule._orig_mod``: a block compiled and registered back, as torchtitan does),
    the step recorded in ``chain``; taken only where ``node`` lacks ``key`` (or is not
    ``target``)."""
    while ((key is not None and key not in node._modules) or (key is None and node is not target)) \
            and isinstance(node._modules.get("_orig_mod"), nn.Module):
        chain.append((node, "_orig_mod", node._modules["_orig_mod"]))
        node = node._modules["_orig_mod"]
    return node


_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus)


def _act_slope_sq_max(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Batch mean of max_j phi'(z_j)^2 for one nonlinearity (the released code's eig-ub
    term), differentiable in z."""
    zz = z if z.requires_grad else z.detach().requires_grad_(True)
    with torch.enable_grad():
        # act.forward, not act(): calling the module would re-enter the hook
        (d,) = torch.autograd.grad(act.forward(zz).sum(), zz, create_graph=z.requires_grad)
    return (d.flatten(1) ** 2).amax(dim=1).mean()


def watch_activations(root: nn.Module, take: Callable[[Callable[[], torch.Tensor]], None]) -> None:
    """For ``eig_ub=True``: after each forward of a nonlinearity module of ``root``,
    ``take(term)`` with ``term()`` computing its :func:`_act_slope_sq_max` (lazily: the
    penalty computes it only in training with grad enabled)."""
    for m in {m: None for m in root.modules()}:  # a module shared by several parents once
        if isinstance(m, _ACTIVATIONS):
            def hook(mod, args, out, act=m):
                if mod is act:
                    take(lambda: _act_slope_sq_max(act, args[0]))
            m.register_forward_hook(hook)
