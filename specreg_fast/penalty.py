"""Training API: the penalty of the paper for any model in two lines.

    penalty = specreg_fast.SpectralPenalty(model, gamma=1e-2)     # hidden layers only
    loss = criterion(model(x), y) + penalty()                      # gamma * sum_l sigma_l^2

``SpectralPenalty`` is the surface: arguments, schedule, state, the compiled variant and
reporting. Which maps it regularizes is :mod:`specreg_fast.selection`; the maps themselves
are groups, one class per kind (:mod:`specreg_fast.groups`), each with one op call per
step for all its maps; gradients are u v^T (dense) and the conv weight-gradient of (x, y)
(conv), never autograd through the power iterations.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import groups as _groups
from .layers import LinearMap
from .constraint import SpectralNormalize, spectral_constraint
from .selection import AUTO as _AUTO
from .selection import Selection, unwrap, watch_activations

__all__ = ["SpectralPenalty", "spectral_constraint", "SpectralNormalize"]

_CONV_NORMS = ("operator", "fft", "matrix")


def _is_vector_key(key: str) -> bool:  # the persistent vectors: u_i, v_i, x_j, y_j
    return key.split("_")[0] in ("u", "v", "x", "y")


def _is_state_key(key: str) -> bool:
    return _is_vector_key(key) or key in ("gammas", "last_sigmas")


def _set_aside(state_dict, prefix: str, input_shapes: dict) -> tuple:
    """A checkpoint loaded before the penalty's vectors exist: ``(the rest, its state
    entries)``, the conv input sizes it records taken into ``input_shapes``."""
    pending = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)
               and _is_state_key(k[len(prefix):])}
    shapes = state_dict.get(prefix + "_conv_input_shapes")
    if shapes is not None:
        input_shapes.update(shapes)
    return {k: v for k, v in state_dict.items() if not (k.startswith(prefix) and k[len(prefix):] in pending)}, pending


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
        split: which maps fused q/k/v layers give: ``{name: 3}`` takes each row block of
            that layer apart (default: the fused matrix); see :mod:`specreg_fast.layers` for
            every layer kind and its default.
        attention: which maps an attention block gives: ``"qkv"`` (default) or ``"v"``.
        extra: custom linear maps, ``{name: fn}`` with ``fn()`` returning the 2-D weight matrix.
        conv_norm: ``"operator"`` (the true operator norm with the layer's own padding at the
            input size it sees; default), ``"fft"`` (the paper's circular-padding norm, for
            models converted with :func:`specreg_fast.to_circular_padding`) or ``"matrix"``
            (the reshaped-kernel matrix norm, cheap, not an operator norm).
        n_iter: power steps per training step (persistent vectors make 1 enough).
        n_iter_init: power steps on the first active call (warm start).
        start_step: the schedule's start: the penalty is 0 before this step.
        every: the schedule's period: the penalty is 0 on steps where
            ``(step - start_step) % every != 0``; it is not rescaled by ``every`` (as the
            authors do).
        auto_step: the step counter (a buffer) counts training-mode calls; with gradient
            accumulation pass ``auto_step=False`` and call :meth:`step` after each optimizer
            step.
        eig_ub: also add, for each nonlinearity module of the model, the batch mean of
            ``max_j phi'(z_j)^2`` (the released code's activation-aware MLP variant).
        input_shapes: ``{conv_name: (C_in, *spatial)}`` for convs whose size should not be
            taken from the first forward.
        seed: seeds the persistent vectors (identical on every DDP rank).

    Persistent vectors are buffers of this module (not of the model), so an EMA/SWA copy of
    the model never averages them: average ``model``, keep the penalty as it is. A checkpoint
    whose vectors are not finite (a diverged run's) restarts those maps from their initial
    vectors, with a warning and a warm start. They are created at the end of the first
    forward of the model. Build the penalty after changing the model: a module whose maps it
    regularizes that is replaced or removed afterwards is a ValueError naming the layers.

    Frozen maps (no parameter requires grad) take part in the warm start, then no power step:
    their term is held at its last estimate (``last_sigmas``) until they are unfrozen (on
    sharded weights too, with no collective for them).

    On sharded (DTensor) weights (FSDP2, tensor parallel) the penalty runs eagerly also when
    it is called inside a ``torch.compile``-d step: its call is a graph break, the model's
    graphs around it stay compiled (dynamo does not trace the all-reduces of the sharded
    power step); a ``fullgraph=True`` step cannot contain it (docs: Distributed training).

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
        self._model = [unwrap(model)]  # a list: not a submodule (keeps the model out of state_dict)
        self.conv_norm, self.n_iter, self.n_iter_init = conv_norm, n_iter, n_iter_init
        self.start_step, self.every, self.auto_step, self.eig_ub = start_step, every, auto_step, eig_ub
        self.seed, self._scope = seed, scope
        self.update = True
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._sel = Selection(self._model[0], gamma, scope, exclude, conv_norm, readout, split, attention, extra,
                              input_shapes, after_forward=self._after_forward)
        self._eig_terms: List[torch.Tensor] = []
        if eig_ub:  # the activations' terms, taken in training with grad enabled
            watch_activations(self._model[0], lambda term: self._eig_terms.append(term()) if (
                self.training and torch.is_grad_enabled()) else None)
        self._ready, self._called = False, False
        self._set: Optional[_groups.MapSet] = None  # the maps by kind, once selected

    # the selection's records, under the names the penalty has always had
    @property
    def _input_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return self._sel.input_shapes

    @property
    def _layers(self) -> List[LinearMap]:
        return self._set.maps if self._set is not None else []

    @property
    def _convs(self) -> List[LinearMap]:
        return [mp for mp in self._layers if mp.conv]

    def _finalize(self):
        """Select the maps and create their groups and persistent vectors (first call)."""
        maps, gammas = self._sel.select()
        self._selected, self._gammas = maps, gammas
        self._set = self._build(self._set_buf)
        dev = maps[0].like().device
        self.register_buffer("gammas", torch.tensor(self._set.gammas, dtype=torch.float32, device=dev))
        self.register_buffer("last_sigmas", torch.zeros(len(self._layers), dtype=torch.float32, device=dev))
        self._ready, self._sized = True, dict(self._input_shapes)
        self._restart_nonfinite()  # a checkpoint loaded before the first call

    def _build(self, set_buffer=None):
        """The maps by kind, their vectors (from the seed) created by ``set_buffer(key, tensor,
        map name)``; without it, just those vectors, by key."""
        if set_buffer is None:
            out: Dict[str, torch.Tensor] = {}
            self._build(lambda key, value, name: out.__setitem__(key, value))
            return out
        g = torch.Generator().manual_seed(self.seed)
        return _groups.build_groups(self._selected, self._gammas, self.conv_norm, self._input_shapes, g, set_buffer,
                                    self._buffers, self._model[0])

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

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if not self._ready:  # kept aside, used when the vectors are created (_set_buf)
            state_dict, self._pending_state = _set_aside(state_dict, prefix, self._input_shapes)
        state_dict.pop(prefix + "_conv_input_shapes", None)
        self._warm_start_done = False  # the loaded `initialized` may be False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self._ready:
            self._restart_nonfinite()

    def _restart_nonfinite(self) -> None:
        # a checkpoint's non-finite vectors restart (groups.MapSet.restart_nonfinite), then a warm start
        if self._set.restart_nonfinite(self.last_sigmas, self._build, self.seed, self.n_iter_init):
            self.initialized.fill_(False)
            self._warm_start_done = False

    def get_extra_state(self):
        return {"conv_input_shapes": dict(self._input_shapes), "order": list(self._sel.forward_order())}

    def set_extra_state(self, state):
        self._input_shapes.update({k: tuple(v) for k, v in state.get("conv_input_shapes", {}).items()})
        if not self._sel.order:
            self._sel.order = list(state.get("order", []))

    def step(self) -> None:
        """Advance the schedule counter by one (with ``auto_step=False``)."""
        self.step_count.add_(1)

    def reset(self) -> None:
        """Forget the vectors and the step counter; they are re-created on the next call."""
        for k in list(self._buffers):
            if _is_state_key(k):
                del self._buffers[k]
        self.step_count.zero_()
        self.initialized.fill_(False)
        self._warm_start_done = False
        self._ready = False
        self._set = None
        self._pending_state = {}

    @property
    def layer_names(self) -> List[str]:
        if not self._ready:
            self._finalize()
        return [mp.name for mp in self._layers]

    # ------------------------------------------------------------------ compute
    def _sigmas_or_roll_back(self, update: bool, n_iter: int, record: bool):
        """``_sigmas``; if it raises, the step counter this call advanced goes back (the ops
        themselves leave their vectors as they were on a failed step)."""
        try:
            return self._sigmas(update, n_iter, record)
        except Exception:
            if self.training and self.auto_step and not torch.compiler.is_compiling():
                self.step_count.sub_(1)
            raise

    def _sigmas(self, update: bool, n_iter: int, record: bool = False):
        """The sigmas of every map (``layer_names`` order), from its groups (:meth:`MapSet.sigmas
        <specreg_fast.groups.MapSet.sigmas>`: frozen maps held once the warm start is done)
        and, with ``record``, what :meth:`accumulate_grad` needs."""
        if not torch.compiler.is_compiling():
            self._sel.check_attached(self._layers)
        return self._set.sigmas(update, n_iter, record, self._warm_start_done, self.last_sigmas)

    def prepare(self, *example_args, warm_start: bool = False, **example_kwargs) -> "SpectralPenalty":
        """Find the layers and create the state now; returns the penalty. With example
        arguments, first runs the model once on them (``no_grad``, eval mode for that pass, so
        no BatchNorm statistics move), the forward that discovery otherwise waits for.
        ``warm_start=True`` also runs the ``n_iter_init`` warm-start steps now, at the current
        weights (compiled calls then carry no masked warm-start steps); the schedule counter
        and ``last_sigmas`` are untouched::

            penalty = sf.SpectralPenalty(model, gamma=1e-2).prepare(x_example)
            step = torch.compile(train_step, fullgraph=True)
        """
        if example_args or example_kwargs:
            self._sel.observe(*example_args, **example_kwargs)
        if not self._ready:
            self._finalize_autocast_off()
        if warm_start and not bool(self.initialized):
            with torch.no_grad():
                self._sigmas(True, max(self.n_iter, self.n_iter_init))
            self.initialized.fill_(True)
        self._warm_start_done = bool(self.initialized)
        return self

    def _after_forward(self) -> None:
        """End of an eager forward of the model before the penalty's first call: the state is
        created now, so a compiled step that calls the penalty finds it (no ``prepare()``
        needed), and re-created while a later forward shows a conv a larger input (the
        largest size seen before the first call is used). An error waits for that call."""
        if torch.compiler.is_compiling() or self._called or (self._ready and self._sized == self._input_shapes):
            return
        if self._ready and (bool(self.initialized) or int(self.step_count) > 0):  # called, compiled: keep the state
            self._first_call()
            return
        try:
            if self._ready:
                self.reset()
            self._finalize_autocast_off()
        except (ValueError, RuntimeError):
            pass

    def _first_call(self) -> None:
        """The discovery hooks are no longer needed once the penalty is called (eagerly)."""
        if not self._called and not torch.compiler.is_compiling():
            self._called = True
            self._sel.remove_hooks()

    # Under torch.compile a graph break: the state cannot be created inside a graph (a
    # torch.Generator seeds it); with fullgraph=True the reason below is the error.
    @torch.compiler.disable(reason="SpectralPenalty creates its state on the first call, which cannot happen inside "
                                   "a compiled graph: call penalty.prepare(example_input) before compiling with "
                                   "fullgraph=True")
    def _finalize_autocast_off(self):
        with torch.autocast(device_type=self._sel.maps[0].like().device.type, enabled=False):
            self._finalize()

    # Whether the host knows that the warm start has happened (``initialized`` is True): set
    # by the eager calls and prepare(), cleared by reset() and load_state_dict(). A compiled
    # graph traced while it is False carries the masked warm-start steps (_compiled_sigmas).
    _warm_start_done = False

    def forward(self, update: Optional[bool] = None) -> torch.Tensor:
        """The penalty (a differentiable scalar). In training mode (and ``update`` not False)
        the vectors take ``n_iter`` power steps first; ``penalty.eval()`` or
        ``update=False`` evaluates at the current vectors."""
        self._first_call()
        if not self._ready:
            self._finalize_autocast_off()
        if self._set.sharded_seen and torch.compiler.is_compiling():
            return self._eager_forward(update)
        upd = self.training and self.update if update is None else bool(update)
        eig = self._eig_terms
        self._eig_terms = []
        compiling = torch.compiler.is_compiling()
        active, n_iter = self._schedule(upd, compiling)
        if compiling:
            sig = _compiled_sigmas(self, upd, active)
        elif not active:
            # burn-in / skipped step: no work at all
            return self.gammas.new_zeros(())
        else:
            sig = self._sigmas_or_roll_back(upd, n_iter, False)
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

    # Sharded (DTensor) weights under torch.compile: the penalty runs eagerly, a graph break
    # (the model's own graphs, per block or whole, stay compiled). Dynamo cannot trace the
    # sharded step: it reads FSDP2's per-parameter records and DTensor shard layouts, issues
    # in-place c10d all-reduces inside a custom autograd.Function, and dynamo's tracking of
    # FSDP2 modules fails on it (torch 2.14). The eager call is the eager route exactly:
    # its schedule, warm start, values and gradients.
    @torch.compiler.disable(reason="SpectralPenalty on sharded (DTensor) weights runs eagerly: its power step issues "
                                   "all-reduces on the shards, which dynamo does not trace")
    def _eager_forward(self, update: Optional[bool]) -> torch.Tensor:
        return self.forward(update)

    def _term_gammas(self, sig: torch.Tensor) -> torch.Tensor:
        return self._set.term_gammas(self.gammas, sig)

    def _schedule(self, update: bool, compiling: bool):
        """``(active, n_iter)`` of this call, decided here for every route, and the counter
        advanced. ``active``, whether the step is penalized: a bool in eager mode (no read of
        the counter on the default schedule: a host sync on a GPU), a 0-d bool tensor under
        torch.compile (a mask instead of a graph break). ``n_iter``: ``max(n_iter,
        n_iter_init)`` for the warm start, whose ``initialized`` flag is read only until seen
        set (under torch.compile ``n_iter``: the graph masks the warm start)."""
        if compiling:
            s = self.step_count - self.start_step
            active = (s >= 0) & (torch.remainder(s.clamp_min(0), self.every) == 0)
        elif self.start_step == 0 and self.every == 1:
            active = True
        else:
            s = int(self.step_count) - self.start_step
            active = s >= 0 and s % self.every == 0
        if self.training and self.auto_step:
            self.step_count.add_(1)
        if not compiling and active and update and not self._warm_start_done:
            self._warm_start_done = bool(self.initialized)
            if not self._warm_start_done:
                return active, max(self.n_iter, self.n_iter_init)
        return active, self.n_iter

    def accumulate_grad(self, scale: float = 1.0) -> torch.Tensor:
        """The penalty's gradient added in place into each regularized weight's ``.grad``,
        without autograd; returns the penalty's value (detached, for logging). Call it after
        ``loss.backward()`` instead of adding ``penalty()`` to the loss: the same steps,
        schedule and gradient, written as one in-place rank-1 update per dense map (``addr_``;
        a LoRA map's into its factors) and the conv weight-gradient of each conv's (x, y) pair,
        where the autograd route materializes ``u v^T`` first (most of the penalty's cost on a
        784-1024x3 MLP, ``bench/bench_training.py``). ``scale`` multiplies the gradient
        (``scaler.get_scale()`` under a GradScaler, ``1 / accumulation_steps``); it reaches
        ``.grad`` only. A computed weight (``parametrize``, ``extra=``) gets it through
        autograd. Under DDP every rank adds the same term after the all-reduce. ``eig_ub=True``
        needs the activations: use ``penalty()`` then."""
        if self.eig_ub:
            raise ValueError("accumulate_grad() does not support eig_ub=True (its term depends on the activations): "
                             "add penalty() to the loss instead")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self._first_call()
        if not self._ready:
            self._finalize()
        self._eig_terms = []
        upd = self.training and self.update
        active, n_iter = self._schedule(upd, False)
        if not active:
            return self.gammas.new_zeros(())
        with torch.no_grad():
            sig, recs = self._sigmas_or_roll_back(upd, n_iter, True)
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
            self._set.add_grads(recs, coefs)
        return (self._term_gammas(sig) * sig.pow(2)).sum()

    @torch.no_grad()
    def sigmas(self) -> Dict[str, float]:
        """Name -> sigma of the last call (for logging; no computation)."""
        if not self._ready:
            self._finalize()
        self._sel.check_attached(self._layers)
        return {mp.name: float(v) for mp, v in zip(self._layers, self.last_sigmas.tolist())}

    # ------------------------------------------------ integrations (logic: integrations/hooks.py)
    def attach(self, optimizer: torch.optim.Optimizer):
        """Add the penalty's gradient (:meth:`accumulate_grad`) before every ``optimizer.step()``
        (``register_step_pre_hook``); returns the removable handle. It runs inside ``step()``:
        after any gradient clipping and after ``scaler.unscale_``, so the gradient is neither
        clipped nor scaled (:func:`specreg_fast.integrations.hooks.attach`)."""
        from .integrations.hooks import attach
        return attach(self, optimizer)

    def stats(self, sigmas: str = "all") -> Dict[str, float]:
        """For loggers, no computation: ``penalty``, ``sigma_max``, ``sigma_mean`` and each
        map's ``sigma/<name>`` (:func:`specreg_fast.integrations.hooks.stats`)."""
        from .integrations.hooks import stats
        return stats(self, sigmas)

    def bounds(self, n_iter: int = 6, max_dim: int = 4096) -> Dict[str, Tuple[float, float, float]]:
        """Name -> ``(lower, upper, rel_gap)``: a certified bracket of each layer's norm
        (see :func:`specreg_fast.bounds.operator_norm_bounds`; ``max_dim`` caps the convs'
        dense Gram certificate)."""
        if not self._ready:
            self._finalize()
        self._sel.check_attached(self._layers)
        return self._set.bounds(n_iter, max_dim)

    def extra_repr(self) -> str:
        return (f"scope={self._scope!r}, conv_norm={self.conv_norm!r}, n_iter={self.n_iter}, "
                f"start_step={self.start_step}, every={self.every}, eig_ub={self.eig_ub}")


# ---------------------------------------------------------------------- the compiled variant
def _compiled_sigmas(pen: "SpectralPenalty", update: bool, active: torch.Tensor) -> torch.Tensor:
    """``_sigmas`` under torch.compile, with eager's schedule as device-side masks.

    A compiled graph has no data-dependent branch (a host read of a mask is a graph
    break, or a device sync per step) and ``torch.cond`` rejects the in-place power-step
    ops (torch 2.14), so the graph always does the work and masks it: the vectors are
    snapshotted; the warm start's extra ``n_iter_init - n_iter`` steps run and are kept
    only while not ``initialized``; the ``n_iter`` steps run; all of it is kept only where
    ``active``; the caller masks the value. The ops' ``a + b`` steps are ``a`` steps then
    ``b``, so this gives eager's vectors and values bit for bit for dense and
    conv-operator maps (the circular step re-enters the Fourier domain at each call: a
    split warm start differs by rounding). While a warm start may be pending when traced,
    every compiled call runs the extra steps: ``prepare(..., warm_start=True)`` before
    compiling (or one eager call) removes them."""
    if not update:
        return pen._sigmas(False, pen.n_iter)
    b = pen._buffers
    vectors = [b[k] for k in b if _is_vector_key(k)]
    old = [t.clone() for t in vectors]
    extra = pen.n_iter_init - pen.n_iter
    if extra > 0 and not pen._warm_start_done:
        with torch.no_grad():
            pen._sigmas(True, extra)  # only the steps: the estimates are not used
            for t, o in zip(vectors, old):  # (on an inactive call, undone with the rest below)
                t.copy_(torch.where(pen.initialized, o, t))
    sig = pen._sigmas(True, pen.n_iter)
    with torch.no_grad():
        for t, o in zip(vectors, old):
            t.copy_(torch.where(active, t, o))
        pen.initialized.logical_or_(active)
    return sig
