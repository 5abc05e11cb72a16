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
from . import ops as _ops

__all__ = ["SpectralPenalty", "spectral_constraint", "SpectralNormalize"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SUPPORTED = (nn.Linear,) + _CONV
_SKIP_WARN = (nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.Bilinear)
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


def _act_slope_sq_max(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Batch mean of max_j phi'(z_j)^2 for one nonlinearity (the released code's eig-ub
    term), differentiable in z."""
    zz = z if z.requires_grad else z.detach().requires_grad_(True)
    with torch.enable_grad():
        # act.forward, not act(): calling the module would re-enter the hook
        (d,) = torch.autograd.grad(act.forward(zz).sum(), zz, create_graph=z.requires_grad)
    return (d.flatten(1) ** 2).amax(dim=1).mean()


class _HotPlan(NamedTuple):
    key: tuple
    us: List[torch.Tensor]
    vs: List[torch.Tensor]
    xs: List[torch.Tensor]
    ys: List[torch.Tensor]
    params: List[int]  # packed conv geometry of all conv layers (ops.pack_conv_params)
    modes: List[str]
    layer_params: List[List[int]]  # the same, layer by layer (conv_weight_grad on a subset)


class SpectralPenalty(nn.Module):
    """``gamma * sum_l sigma_max(W_l)^2`` over a model's layers, with persistent vectors.

    The penalty carries no 1/2, as in the authors' released code, so their gamma values
    (1e-3 ... 1e-1 for MLPs, 1e-2 for ResNets) carry over unchanged.

    Args:
        model: the network (a DDP/DataParallel/compiled wrapper is unwrapped).
        gamma: float, ``{layer_name: gamma}`` (missing names get 0 and are left out) or a
            callable ``(name, module) -> gamma``.
        scope: ``"hidden"`` (default, the paper): every supported layer except the readout,
            the last one in forward order, found from the first forward pass; ``"all"``: every
            layer (the end-to-end baseline); a module name or list of names: exactly the
            supported layers inside those modules (e.g. ``"features"``).
        exclude: names of modules (and their children) to leave out.
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
    the model never averages them: average ``model``, keep the penalty as it is.
    """

    def __init__(self, model: nn.Module, gamma: Union[float, Dict[str, float], Callable] = 1e-2,
                 scope: Union[str, Sequence[str]] = "hidden", exclude: Iterable[str] = (),
                 conv_norm: str = "operator", n_iter: int = 1, n_iter_init: int = 20, start_step: int = 0,
                 every: int = 1, auto_step: bool = True, eig_ub: bool = False,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None, seed: int = 0):
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
        self._initialized_seen = False  # host copy of `initialized` once it reads True (see _needs_warm_start)

        root = self._model[0]
        names = {m: n for n, m in root.named_modules()}  # dedupes shared modules: counted once
        self._candidates: List[Tuple[str, nn.Module]] = []
        seen_weights = set()
        for m, n in names.items():
            if isinstance(m, _SUPPORTED):
                if any(n == e or n.startswith(e + ".") for e in self._exclude):
                    continue
                w = m.weight
                if isinstance(w, nn.parameter.UninitializedParameter):
                    warnings.warn(f"SpectralPenalty: skipping {n} ({type(m).__name__}): lazy module not materialized "
                                  f"yet; construct the penalty after the first forward")
                    continue
                if id(w) in seen_weights:  # tied weights
                    continue
                seen_weights.add(id(w))
                self._candidates.append((n, m))
            elif isinstance(m, _SKIP_WARN):
                warnings.warn(f"SpectralPenalty: skipping {n or '<root>'} ({type(m).__name__}): its weights are not "
                              f"regularized")
        if not self._candidates:
            raise ValueError("model has no supported layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d)")
        if not isinstance(scope, str) or scope not in ("hidden", "all"):
            wanted = [scope] if isinstance(scope, str) else list(scope)
            for s in wanted:
                if s not in dict(root.named_modules()):
                    raise ValueError(f"scope: no module named {s!r} in the model")
        for e in self._exclude:
            if e not in dict(root.named_modules()):
                raise ValueError(f"exclude: no module named {e!r} in the model")

        self._input_shapes: Dict[str, Tuple[int, ...]] = {k: tuple(v) for k, v in (input_shapes or {}).items()}
        self._order: List[str] = []
        self._hooks = []
        self._eig_terms: List[torch.Tensor] = []
        for n, m in self._candidates:
            self._hooks.append(m.register_forward_pre_hook(self._make_record_hook(n)))
        if eig_ub:
            acts = (nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus)
            for m in names:
                if isinstance(m, acts):
                    m.register_forward_hook(self._make_eig_hook(m))
        self._ready = False
        self._layers: List[Tuple[str, nn.Module]] = []
        self._plan: Optional[_HotPlan] = None

    # ------------------------------------------------------------------ discovery
    def _make_record_hook(self, name):
        def hook(mod, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            if name not in self._order:
                self._order.append(name)
            if isinstance(mod, _CONV):
                shp = tuple(args[0].shape[1:]) if args[0].dim() == mod.weight.dim() else tuple(args[0].shape)
                old = self._input_shapes.get(name)
                # several sizes: the largest (its zero-padding norm is the largest)
                if old is None or math.prod(shp) > math.prod(old):
                    self._input_shapes[name] = shp
        return hook

    def _make_eig_hook(self, act):
        def hook(mod, args, out):
            if self.training and torch.is_grad_enabled():
                self._eig_terms.append(_act_slope_sq_max(act, args[0]))
        return hook

    def _in_scope(self, name: str) -> bool:
        scope = self._scope
        if scope in ("hidden", "all"):
            return True
        wanted = [scope] if isinstance(scope, str) else list(scope)
        return any(name == s or name.startswith(s + ".") for s in wanted)

    def _gamma_of(self, name, m) -> float:
        g = self._gamma_arg
        if callable(g):
            val = float(g(name, m))
        elif isinstance(g, dict):
            val = float(g.get(name, 0.0))
        else:
            val = float(g)
        if val < 0 or not math.isfinite(val):
            raise ValueError(f"gamma for {name}: must be a finite number >= 0, got {val}")
        return val

    def _finalize(self):
        """Select the layers and create the persistent vectors (first call)."""
        layers = [(n, m) for n, m in self._candidates if self._in_scope(n)]
        if self._scope == "hidden":
            if not self._order:
                raise RuntimeError("SpectralPenalty(scope='hidden') finds the readout from the forward order: run one "
                                   "forward pass of the model before the first penalty() call")
            readout = self._order[-1]
            layers = [(n, m) for n, m in layers if n != readout]
        gammas = {n: self._gamma_of(n, m) for n, m in layers}
        layers = [(n, m) for n, m in layers if gammas[n] > 0]
        if not layers:
            raise ValueError(f"scope={self._scope!r} with exclude={self._exclude} and this gamma selects no layer")
        dev = layers[0][1].weight.device
        g = torch.Generator().manual_seed(self.seed)
        self._dense, self._convs = [], []
        for n, m in layers:
            if isinstance(m, _CONV) and self.conv_norm != "matrix":
                if n not in self._input_shapes:
                    raise RuntimeError(f"input size of {n} is unknown: run one forward pass of the model first, or "
                                       f"pass input_shapes={{'{n}': (C_in, *spatial)}}")
                self._convs.append((n, m))
            else:
                self._dense.append((n, m))
        self._layers = self._dense + self._convs
        dst = _dense.init_power_state([_dense.as_matrix(m.weight.detach()) for _, m in self._dense], generator=g)
        for i, (n, m) in enumerate(self._dense):
            self._set_buf(f"u_{i}", dst.us[i].to(dev), n)
            self._set_buf(f"v_{i}", dst.vs[i].to(dev), n)
        specs = self._conv_specs()
        if self.conv_norm == "operator":
            cst = init_conv_state(specs, generator=g)
            for i in range(len(specs)):
                self._set_buf(f"x_{i}", cst.xs[i], self._convs[i][0])
                self._set_buf(f"y_{i}", cst.ys[i], self._convs[i][0])
        elif self.conv_norm == "fft":
            cst = init_circular_state(specs, generator=g)
            for i in range(len(specs)):
                self._set_buf(f"x_{i}", cst.xs[i], self._convs[i][0])
        self.register_buffer("gammas", torch.tensor([gammas[n] for n, _ in self._layers], dtype=torch.float32,
                                                    device=dev))
        self.register_buffer("last_sigmas", torch.zeros(len(self._layers), dtype=torch.float32, device=dev))
        self._ready = True
        # forward order and conv sizes are known: the discovery hooks are no longer needed
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _set_buf(self, key, value, layer_name):
        old = self._pending_state.pop(key, None) if hasattr(self, "_pending_state") else None
        if old is not None:
            if old.shape != value.shape:
                raise ValueError(f"state_dict entry {key} for {layer_name} has shape {tuple(old.shape)}, expected "
                                 f"{tuple(value.shape)}")
            value = old.to(value.dtype).to(value.device)
        self.register_buffer(key, value.contiguous())

    def _conv_specs(self) -> List[ConvSpec]:
        return [ConvSpec.from_module(m, self._input_shapes[n]) for n, m in self._convs]

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._initialized_seen = False  # the checkpoint's `initialized` is read again
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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self):
        return {"conv_input_shapes": dict(self._input_shapes), "order": list(self._order)}

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
        self._initialized_seen = False
        self._ready = False
        self._plan = None
        self._pending_state = {}

    @property
    def layer_names(self) -> List[str]:
        if not self._ready:
            self._finalize()
        return [n for n, _ in self._layers]

    # ------------------------------------------------------------------ compute
    def _sigmas_or_roll_back(self, update: bool, n_iter: int, conv_pairs: Optional[list]) -> torch.Tensor:
        """``_sigmas``; if it raises, the step counter this call advanced goes back (the ops
        themselves leave their vectors as they were on a failed step)."""
        try:
            return self._sigmas(update, n_iter, conv_pairs)
        except Exception:
            if self.training and self.auto_step and not torch.compiler.is_compiling():
                self.step_count.sub_(1)
            raise

    def _plan_key(self, dense_ws, conv_ws) -> tuple:
        """What the hot plan depends on: every weight's shape/dtype/device, each conv's
        hyperparameters and recorded input size, and the state buffers (by identity:
        ``.to()`` replaces them, ``load_state_dict`` copies into them)."""
        b = self._buffers
        return (tuple((w.shape, w.dtype, w.device) for w in dense_ws + conv_ws),
                tuple((m.stride, m.padding, m.dilation, m.groups, m.padding_mode, m.output_padding,
                       self._input_shapes[n]) for n, m in self._convs),
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
        _dense._validate(dense_ws, _dense.PowerState(us, vs), [n for n, _ in self._dense])
        params, modes, layer_params = [], [], []
        if nc and self.conv_norm == "operator":
            specs = self._conv_specs()
            _validate_convs(specs, ConvState(xs, ys), [n for n, _ in self._convs])
            params, modes = _ops.pack_conv_params(specs)
            layer_params = [_ops.pack_conv_params([sp])[0] for sp in specs]
        plan = _HotPlan(key, us, vs, xs, ys, params, modes, layer_params)
        if not compiling:
            self._plan = plan
        return plan

    def _sigmas(self, update: bool, n_iter: int, conv_pairs: Optional[list] = None) -> torch.Tensor:
        """The sigmas of every layer (dense first), through the ops directly with the plan of
        :meth:`_hot_plan`. The convs are computed first, so that their checks (e.g. circular
        padding for the FFT norm) fail before the dense step writes its vectors. With
        ``conv_pairs`` (a list; call under no_grad), ``conv_pairs`` receives, per conv layer,
        ``(x, y, params, mode)``: the pair whose conv weight-gradient is ``dsigma/dW`` (for
        ``accumulate_grad``), and the values are the steps' estimates, with no differentiable
        wrapper. Only custom ops run here (autocast does not touch them) except on the FFT
        norm's path, which runs with autocast off."""
        dense_ws = [_dense.as_matrix(m.weight) for _, m in self._dense]
        conv_ws = [m.weight for _, m in self._convs]
        plan = self._hot_plan(dense_ws, conv_ws)
        grad = conv_pairs is None and torch.is_grad_enabled()
        parts = []
        if conv_ws and self.conv_norm == "operator":
            if update and n_iter > 0:
                est = _ops.conv_power_step_([w.detach() for w in conv_ws], plan.xs, plan.ys, plan.params,
                                            plan.modes, n_iter, 0.0)
                sig = (_ops.conv_sigma_from_step(conv_ws, plan.xs, plan.ys, plan.params, plan.modes, est)
                       if grad else est)
            else:
                sig = _ops.conv_sigma(conv_ws, plan.xs, plan.ys, plan.params, plan.modes)
            parts.append(sig.float())
            if conv_pairs is not None:
                conv_pairs.extend(zip(plan.xs, plan.ys, plan.layer_params, plan.modes))
        elif conv_ws:
            specs, names = self._conv_specs(), [n for n, _ in self._convs]
            st = CircularState(plan.xs)
            with torch.autocast(device_type=self.gammas.device.type, enabled=False):
                if conv_pairs is None:
                    parts.append(circular_conv_norms(specs, st, n_iter=n_iter, update=update, names=names).float())
                else:
                    est, x_tops, y_tops, _ = circular_power_pairs(specs, st, n_iter, update=update, names=names)
                    parts.append(est.float())
                    conv_pairs.extend((x, y, circular_params(spec), "circular")
                                      for spec, x, y in zip(specs, x_tops, y_tops))
        if dense_ws:
            if update:
                with torch.no_grad():
                    est = _ops.power_step_([w.detach() for w in dense_ws], plan.us, plan.vs, n_iter, 0.0)
            if update and n_iter >= 1 and all(w.device.type == "cpu" for w in dense_ws):
                # as in dense.spectral_norms: u^T W v at the new vectors is the step's estimate
                sig = _ops.sigma_from_step(dense_ws, plan.us, plan.vs, est) if grad else est
            else:
                sig = _ops.sigma(dense_ws, plan.us, plan.vs)
            parts.insert(0, sig.float())
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def forward(self, update: Optional[bool] = None) -> torch.Tensor:
        """The penalty (a differentiable scalar). In training mode (and ``update`` not False)
        the vectors take ``n_iter`` power steps first; ``penalty.eval()`` or
        ``update=False`` evaluates at the current vectors."""
        if not self._ready:
            with torch.autocast(device_type=self._candidates[0][1].weight.device.type, enabled=False):
                self._finalize()
        upd = self.training and self.update if update is None else bool(update)
        eig = self._eig_terms
        self._eig_terms = []
        compiling = torch.compiler.is_compiling()
        active = self._active(compiling)
        if self.training and self.auto_step:
            self.step_count.add_(1)
        if not compiling and not active:
            # burn-in / skipped step: no work at all (under torch.compile the mask below
            # plays this role without a graph break)
            return self.gammas.new_zeros(())
        n_iter = self.n_iter
        if upd and not compiling and self._needs_warm_start():
            n_iter = max(self.n_iter, self.n_iter_init)
        sig = self._sigmas_or_roll_back(upd, n_iter, None)
        if upd:
            self.initialized.fill_(True)
        with torch.no_grad():
            self.last_sigmas.copy_(sig.detach())
        total = (self.gammas * sig.pow(2)).sum()
        if self.eig_ub and eig:
            g = self.gammas.max() if self.gammas.numel() else 0.0
            total = total + g * torch.stack(eig).sum()
        return torch.where(active, total, torch.zeros_like(total)) if compiling else total

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
        if not self._initialized_seen:
            self._initialized_seen = bool(self.initialized)
        return not self._initialized_seen

    def accumulate_grad(self, scale: float = 1.0) -> torch.Tensor:
        """The penalty's gradient added in place into each regularized weight's ``.grad``,
        without autograd; returns the penalty's value (detached, for logging).

        Call it after ``loss.backward()`` instead of adding ``penalty()`` to the loss: the same
        power steps, schedule and gradient, ``2 gamma sigma u v^T`` written with one in-place
        rank-1 update of the existing ``.grad`` per dense layer (``addr_``), where the autograd
        route materializes ``u v^T`` in fresh memory and then adds it: on a 784-1024x3 MLP that
        gradient materialization is most of the penalty's cost (``bench/bench_training.py``).
        Conv layers get the conv weight-gradient of their (x, y) pair, added likewise.

        ``scale`` multiplies the gradient (e.g. ``scaler.get_scale()`` under a GradScaler, or
        ``1 / accumulation_steps``). It only reaches ``.grad``: not for ``torch.autograd.grad``
        flows, nor for weights that are not leaf parameters (``parametrize``); with
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
        nonleaf = [n for n, m in self._layers if not m.weight.is_leaf]
        if nonleaf:
            raise ValueError(f"accumulate_grad() writes .grad of leaf weights; {', '.join(nonleaf)} have computed "
                             f"weights (parametrize): add penalty() to the loss instead")
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
        with torch.no_grad():
            self.last_sigmas.copy_(sig)
            # 2 gamma sigma scale per layer: Python floats on the CPU (one read for all layers);
            # on a device, 0-d tensors folded into a vector, so nothing waits for the device
            coefs = (2.0 * float(scale)) * self.gammas * sig
            host = coefs.device.type == "cpu"
            if host:
                coefs = coefs.tolist()
            for i, (_, m) in enumerate(self._dense):
                W = m.weight
                if not W.requires_grad:  # a frozen layer gets no gradient, as on the autograd route
                    continue
                if W.grad is None:
                    W.grad = torch.zeros_like(W)
                G = W.grad
                u, v = self._buffers[f"u_{i}"].to(G.dtype), self._buffers[f"v_{i}"].to(G.dtype)
                c = coefs[i]
                if not host:
                    u, c = u * c.to(G.dtype), 1.0
                Gm = G if G.dim() == 2 else G.view(G.shape[0], -1) if G.is_contiguous() else None
                if Gm is not None:
                    Gm.addr_(u, v, alpha=c)
                else:  # a non-contiguous .grad (e.g. channels_last): no 2-D view of it
                    G.add_(torch.outer(u, v).reshape(G.shape), alpha=c)
            train = [j for j, (_, m) in enumerate(self._convs) if m.weight.requires_grad]
            if train:
                # dsigma/dW of each conv: the conv weight-gradient of its pair, times 2 gamma
                # sigma scale, as the autograd route's backward computes it (the coefficient
                # scales the output-sized y, not the weight-sized gradient). One op call for
                # the layers with a .grad, added in place (conv_weight_grad_add_: no
                # weight-sized temporary where the direct kernels run), one for those without.
                for fresh in (False, True):
                    js = [j for j in train if (self._convs[j][1].weight.grad is None) == fresh]
                    if not js:
                        continue
                    ws = [self._convs[j][1].weight for j in js]
                    args = ([W.detach() for W in ws], [conv_pairs[j][0] for j in js],
                            [conv_pairs[j][1] * coefs[nd + j] for j in js], [q for j in js for q in conv_pairs[j][2]],
                            [conv_pairs[j][3] for j in js])
                    if fresh:
                        for W, gW in zip(ws, _ops.conv_weight_grad(*args)):
                            W.grad = gW.to(W.dtype)
                    else:
                        _ops.conv_weight_grad_add_([W.grad for W in ws], *args)
        return (self.gammas * sig.pow(2)).sum()

    @torch.no_grad()
    def sigmas(self) -> Dict[str, float]:
        """Name -> sigma of the last call (for logging; no computation)."""
        if not self._ready:
            self._finalize()
        return {n: float(v) for (n, _), v in zip(self._layers, self.last_sigmas.tolist())}

    def bounds(self, n_iter: int = 6, max_dim: int = 4096) -> Dict[str, Tuple[float, float, float]]:
        """Name -> ``(lower, upper, rel_gap)``: a certified bracket of each layer's norm
        (see :func:`specreg_fast.bounds.operator_norm_bounds`; ``max_dim`` caps the convs'
        dense Gram certificate)."""
        if not self._ready:
            self._finalize()
        out = {}
        for n, m in self._layers:
            shape = self._input_shapes.get(n) if isinstance(m, _CONV) and self.conv_norm != "matrix" else None
            out[n] = operator_norm_bounds(m if shape is not None else _dense.as_matrix(m.weight.detach()), shape,
                                          n_iter=n_iter, max_dim=max_dim)
        return out

    def extra_repr(self) -> str:
        return (f"scope={self._scope!r}, conv_norm={self.conv_norm!r}, n_iter={self.n_iter}, "
                f"start_step={self.start_step}, every={self.every}, eig_ub={self.eig_ub}")


# ---------------------------------------------------------------------- constraint mode
class SpectralNormalize(nn.Module):
    """Parametrization ``W -> W / sigma(W)`` with the fast ops: a drop-in for
    ``torch.nn.utils.parametrizations.spectral_norm`` that, for convs, divides by the true
    operator norm at ``input_shape`` instead of the reshaped-kernel matrix norm."""

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
        return W / s.to(W.dtype)


def spectral_constraint(module: nn.Module, input_shape: Optional[Sequence[int]] = None, n_iter: int = 1,
                        seed: int = 0) -> nn.Module:
    """Constrain ``module.weight`` to unit spectral norm (operator norm for convs, at
    ``input_shape``) by a parametrization; returns the module."""
    from torch.nn.utils import parametrize

    if not isinstance(module, _SUPPORTED):
        raise TypeError(f"spectral_constraint supports Linear and (transposed) convs, got {type(module).__name__}")
    parametrize.register_parametrization(module, "weight", SpectralNormalize(module, input_shape, n_iter, seed=seed))
    return module
