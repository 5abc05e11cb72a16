"""Robustness evaluation: linear probe, transfer setting, attacks, and the paper's Lemma 1 bounds.

The paper (Yang, Zavatone-Veth & Pehlevan) measures robustness as the L2 distance from each correctly
classified test point to the nearest adversarial point, after discarding the trained readout and
fitting a fresh linear readout on frozen features (the *linear probe*). This module gives:

* :func:`linear_probe` / :func:`probe_classifier` / :func:`transfer_probe` — the probe and the transfer
  setting (features from one task, readout on another).
* :func:`minimal_l2_distance` — minimal adversarial L2 distance per correctly classified point, with
  maintained libraries: foolbox's HopSkipJump (hard-label, the paper's family of attack), torchattacks
  DeepFool and FAB (white-box). Every returned point is re-checked: a distance is reported only for a
  point the model really misclassifies, and it is ``||x_adv - x||_2`` recomputed here.
* :func:`pgd_accuracy` (torchattacks PGD, L2 and Linf) and :func:`autoattack_accuracy` (pyautoattack,
  optional) — robust accuracy at fixed eps.
* :func:`lemma1_bounds` — margin / (||w_y - w_j|| * L): with L the per-sample feature Jacobian norm
  (:func:`feature_jacobian_norm`, an estimate, not a certificate) and with L a true Lipschitz upper bound
  of the feature map (:func:`feature_lipschitz_bound`, a certificate).

TangentAttack is not included: it is not in a maintained library and was not validated here.
All attacks run the model in eval mode. Models whose inputs are not in [0, 1] (toy coordinates,
mnist1d) are wrapped so torchattacks, which clamps to [0, 1], sees a unit box (:class:`UnitBox`);
distances are always reported in the original input space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ProbedClassifier", "accuracy", "extract_features", "linear_probe", "probe_classifier",
    "transfer_probe", "UnitBox", "pgd_accuracy", "autoattack_accuracy", "MinimalResult",
    "minimal_l2_distance", "activation_max_slope", "dense_layer_norm", "feature_lipschitz_bound",
    "feature_jacobian_norm", "lemma1_bounds", "HAS_AUTOATTACK",
]

try:  # optional: AutoAttack from the pyautoattack distribution
    import pyautoattack as _pyautoattack  # noqa: F401
    HAS_AUTOATTACK = True
except Exception:  # pragma: no cover - environment dependent
    HAS_AUTOATTACK = False


# ----------------------------------------------------------------------------- probe
class ProbedClassifier(nn.Module):
    """``readout(features(x))``: a frozen feature map with a (re)trained linear readout."""

    def __init__(self, features: nn.Module, readout: nn.Linear):
        super().__init__()
        self.features = features
        self.readout = readout

    def forward(self, x):
        return self.readout(self.features(x))


def _batches(n, batch_size):
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


@torch.no_grad()
def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    correct = 0
    for s in _batches(len(x), batch_size):
        correct += int((model(x[s]).argmax(1) == y[s]).sum())
    return correct / len(x)


@torch.no_grad()
def extract_features(features: Callable, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``features(x)`` in batches, flattened to ``(N, D)``, without autograd."""
    return torch.cat([features(x[s]).reshape(x[s].shape[0], -1) for s in _batches(len(x), batch_size)])


def linear_probe(features: Callable, x: torch.Tensor, y: torch.Tensor, n_classes: int, *,
                 weight_decay: float = 1e-4, max_iter: int = 200, batch_size: int = 1024) -> nn.Linear:
    """Fit a fresh linear readout on frozen ``features`` by multinomial logistic regression.

    Full-batch L-BFGS (strong Wolfe line search) from a zero start on the mean cross-entropy plus
    ``weight_decay/2 * ||W||_F^2`` (bias unpenalized) — the logistic-regression head the paper refits.
    Deterministic: no random init, no minibatch order. ``features`` is put in eval mode and not changed.
    """
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if y.dtype != torch.int64 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes)):
        raise ValueError(f"y must be int64 labels in [0, {n_classes}), got dtype {y.dtype}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    was_training = getattr(features, "training", False)
    if isinstance(features, nn.Module):
        features.eval()
    try:
        phi = extract_features(features, x, batch_size).double()
    finally:
        if isinstance(features, nn.Module):
            features.train(was_training)
    d = phi.shape[1]
    y = y.to(phi.device)
    w = torch.zeros(n_classes, d, dtype=torch.float64, device=phi.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, device=phi.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(phi @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ref = next((p for p in features.parameters()), None) if isinstance(features, nn.Module) else None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    lin = nn.Linear(d, n_classes).to(dtype=dtype, device=x.device)
    with torch.no_grad():
        lin.weight.copy_(w.detach())
        lin.bias.copy_(b.detach())
    return lin


def probe_classifier(features: nn.Module, x_train, y_train, n_classes: int, x_test=None, y_test=None,
                     **probe_kwargs) -> Tuple[ProbedClassifier, Optional[float]]:
    """Probe ``features`` on (x_train, y_train); returns the eval-mode classifier and its test accuracy
    (``None`` without test data)."""
    readout = linear_probe(features, x_train, y_train, n_classes, **probe_kwargs)
    clf = ProbedClassifier(features, readout).eval()
    acc = accuracy(clf, x_test, y_test) if x_test is not None else None
    return clf, acc


def transfer_probe(features: nn.Module, target, **probe_kwargs) -> Tuple[ProbedClassifier, float]:
    """The transfer setting: ``features`` learned on a source task, a readout fitted on ``target``
    (a :class:`specreg_fast.data.Dataset`, e.g. the second half of ``data.transfer_split``)."""
    return probe_classifier(features, target.x_train, target.y_train, target.n_classes,
                            target.x_test, target.y_test, **probe_kwargs)


# ----------------------------------------------------------------------------- attacks
class UnitBox(nn.Module):
    """``model(lo + (hi - lo) * u)`` for ``u`` in [0, 1]: lets [0, 1]-only attack libraries attack a
    model whose inputs live in ``bounds``. An L2 distance ``r`` in ``u`` is ``r * (hi - lo)`` in x."""

    def __init__(self, model: nn.Module, bounds: Tuple[float, float]):
        super().__init__()
        lo, hi = float(bounds[0]), float(bounds[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"bounds must be finite (lo, hi) with hi > lo, got {bounds}")
        self.model, self.lo, self.scale = model, lo, hi - lo

    def to_unit(self, x):
        return (x - self.lo) / self.scale

    def from_unit(self, u):
        return self.lo + self.scale * u

    def forward(self, u):
        return self.model(self.from_unit(u))


class _As4D(nn.Module):
    """Presents inputs of any shape as (N, 1, 1, D): torchattacks' PGD-L2 random start assumes 4-D."""

    def __init__(self, model, shape):
        super().__init__()
        self.model, self.shape = model, tuple(shape)

    def forward(self, u):
        return self.model(u.reshape(len(u), *self.shape))


def _check_xy(x, y):
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be tensors")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if y.dtype != torch.int64:
        raise TypeError(f"y must be int64 labels, got {y.dtype}")


def _wrap(model, bounds):
    model.eval()
    if tuple(map(float, bounds)) == (0.0, 1.0):
        return model, (lambda x: x), (lambda u: u), 1.0
    box = UnitBox(model, bounds).eval()
    return box, box.to_unit, box.from_unit, box.scale


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], *,
                 norm: str = "Linf", steps: int = 20, rel_stepsize: float = 2.5 / 20,
                 bounds: Tuple[float, float] = (0.0, 1.0), batch_size: int = 512,
                 seed: int = 0) -> Dict[float, float]:
    """Robust accuracy under torchattacks PGD (``norm`` "Linf" or "L2") at each ``eps`` (in x units).

    Step size ``rel_stepsize * eps`` (the usual 2.5 * eps / steps). eps = 0 gives clean accuracy.
    Deterministic for a given ``seed`` (PGD's random start).
    """
    import torchattacks as ta
    _check_xy(x, y)
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    eps = [float(e) for e in eps]
    if any(e < 0 for e in eps):
        raise ValueError(f"eps must be >= 0, got {eps}")
    net, to_u, _, scale = _wrap(model, bounds)
    # the box map is a uniform scaling, so an eps ball (L2 or Linf) in x is an eps/scale ball in u
    u = to_u(x)
    if u.dim() != 4:
        net = _As4D(net, u.shape[1:]).eval()
        u = u.reshape(len(u), 1, 1, -1)
    out = {}
    for e in eps:
        if e == 0:
            out[e] = accuracy(net, u, y, batch_size)
            continue
        eu = e / scale
        torch.manual_seed(seed)
        if norm == "Linf":
            atk = ta.PGD(net, eps=eu, alpha=rel_stepsize * eu, steps=steps, random_start=True)
        else:
            atk = ta.PGDL2(net, eps=eu, alpha=rel_stepsize * eu, steps=steps, random_start=True)
        correct = 0
        for s in _batches(len(u), batch_size):
            adv = atk(u[s], y[s])
            with torch.no_grad():
                correct += int((net(adv).argmax(1) == y[s]).sum())
        out[e] = correct / len(u)
    return out


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                        norm: str = "L2", version: str = "standard",
                        bounds: Tuple[float, float] = (0.0, 1.0), batch_size: int = 256,
                        seed: int = 0) -> float:
    """Robust accuracy under AutoAttack (pyautoattack) at ``eps`` (``version`` "standard": APGD-CE,
    APGD-T, FAB-T, Square); raises ImportError if pyautoattack is not installed."""
    if not HAS_AUTOATTACK:
        raise ImportError("pyautoattack is not installed: pip install pyautoattack")
    from pyautoattack import AutoAttack
    _check_xy(x, y)
    net, to_u, _, scale = _wrap(model, bounds)
    u = to_u(x)
    attacks = None
    if u.dim() != 4:
        # its Square attack assumes square images (N, C, H, W): run the gradient attacks of the
        # standard set without it on vectors/signals
        net = _As4D(net, u.shape[1:]).eval()
        u = u.reshape(len(u), 1, 1, -1)
        if version == "standard":
            version, attacks = "custom", ["apgd-ce", "apgd-t", "fab-t"]
    aa = AutoAttack(net, attacks=attacks, norm=norm, eps=float(eps) / scale, version=version,
                    device=x.device, seed=seed)
    adv, _ = aa.run_standard_evaluation(u, y, batch_size=batch_size)  # (x_adv, y_adv)
    return accuracy(net, adv, y, batch_size)


@dataclass
class MinimalResult:
    """Minimal-distance attack result on the attacked points.

    ``index``: positions (in the x given) of the correctly classified points that were attacked.
    ``distance``: ``||x_adv - x||_2`` in input units, ``inf`` where the attack found no adversarial point
    within its budget. ``x_adv``: the adversarial points (original point where none was found).
    ``success``: the model misclassifies ``x_adv`` (checked here, not taken from the library).
    """
    index: torch.Tensor
    distance: torch.Tensor
    x_adv: torch.Tensor
    success: torch.Tensor
    method: str

    def summary(self) -> Dict[str, float]:
        d = self.distance[self.success]
        n = len(self.distance)
        return {"n_points": n, "success_rate": float(self.success.float().mean()) if n else float("nan"),
                "mean": float(d.mean()) if len(d) else float("nan"),
                "median": float(d.median()) if len(d) else float("nan")}


def _starting_points(net, u, y, pool_u, pool_pred):
    """For each point the nearest pool point the model labels differently (HopSkipJump's start)."""
    starts = u.clone()
    flat_pool = pool_u.reshape(len(pool_u), -1)
    ok = torch.zeros(len(u), dtype=torch.bool, device=u.device)
    for i in range(len(u)):
        cand = pool_pred != y[i]
        if not cand.any():
            continue
        d = (flat_pool[cand] - u[i].reshape(1, -1)).norm(dim=1)
        starts[i] = pool_u[cand][d.argmin()]
        ok[i] = True
    return starts, ok


def minimal_l2_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str = "hsj",
                        n_points: Optional[int] = None, bounds: Tuple[float, float] = (0.0, 1.0),
                        steps: Optional[int] = None, batch_size: int = 128,
                        max_gradient_eval_steps: int = 1000, initial_gradient_eval_steps: int = 100,
                        gamma: float = 1.0, overshoot: float = 0.02, n_restarts: int = 1,
                        n_classes: Optional[int] = None, starting_pool: Optional[torch.Tensor] = None,
                        seed: int = 0, progress: bool = False) -> MinimalResult:
    """Minimal adversarial L2 distance of the first ``n_points`` correctly classified points of ``x``.

    ``method``:
      * ``"hsj"``: foolbox HopSkipJump (decision-based; ``steps`` iterations, default 40;
        ``max_gradient_eval_steps`` caps queries per gradient estimate; ``gamma`` sets the binary-search
        tolerance theta = gamma / d^1.5). Started from the nearest point of ``starting_pool``
        (default: ``x``) that the model labels differently.
      * ``"deepfool"``: torchattacks DeepFool (white-box; ``steps`` default 50, ``overshoot``).
      * ``"fab"``: torchattacks FAB-L2 (white-box, minimum-norm; ``steps`` default 100).
    Reported distances are recomputed from the returned points and kept only where the model really
    misclassifies them (else ``inf``); attacks may over-estimate the true minimum, never under-estimate.
    """
    _check_xy(x, y)
    if method not in ("hsj", "deepfool", "fab"):
        raise ValueError(f"method must be 'hsj', 'deepfool' or 'fab', got {method!r}")
    if n_points is not None and (not isinstance(n_points, int) or n_points <= 0):
        raise ValueError(f"n_points must be a positive int or None, got {n_points!r}")
    net, to_u, from_u, scale = _wrap(model, bounds)
    with torch.no_grad():
        pred = torch.cat([net(to_u(x[s])).argmax(1) for s in _batches(len(x), 1024)])
    index = torch.nonzero(pred == y).flatten()
    if n_points is not None:
        index = index[:n_points]
    xs, ys = x[index], y[index]
    u = to_u(xs)
    adv_u = u.clone()
    torch.manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(u), desc=f"{method} attack", leave=False)
    if method == "hsj":
        import foolbox as fb
        fmodel = fb.PyTorchModel(net, bounds=(0.0, 1.0))
        pool_u = to_u(starting_pool) if starting_pool is not None else to_u(x)
        with torch.no_grad():
            pool_pred = torch.cat([net(pool_u[s]).argmax(1) for s in _batches(len(pool_u), 1024)])
        starts, has_start = _starting_points(net, u, ys, pool_u, pool_pred)
        attack = fb.attacks.HopSkipJumpAttack(steps=40 if steps is None else steps, gamma=gamma,
                                              initial_gradient_eval_steps=initial_gradient_eval_steps,
                                              max_gradient_eval_steps=max_gradient_eval_steps)
        for s in _batches(len(u), batch_size):
            m = has_start[s]
            if m.any():
                sel = torch.nonzero(m).flatten() + s.start
                _, clipped, _ = attack(fmodel, u[sel], fb.criteria.Misclassification(ys[sel]),
                                       epsilons=None, starting_points=starts[sel])
                adv_u[sel] = clipped.detach()
            if bar:
                bar.update(s.stop - s.start)
    else:
        import torchattacks as ta
        if method == "deepfool":
            atk = ta.DeepFool(net, steps=50 if steps is None else steps, overshoot=overshoot)
        else:
            if n_classes is None:
                with torch.no_grad():
                    n_classes = net(u[:1]).shape[1]
            # eps = the box diagonal, so FAB keeps every adversarial point it finds (it drops those
            # farther than eps)
            diag = math.sqrt(u[0].numel())
            atk = ta.FAB(net, norm="L2", eps=diag, steps=100 if steps is None else steps,
                         n_restarts=n_restarts, n_classes=n_classes, seed=seed)
        for s in _batches(len(u), batch_size):
            adv_u[s] = atk(u[s], ys[s]).detach()
            if bar:
                bar.update(s.stop - s.start)
    if bar:
        bar.close()
    x_adv = from_u(adv_u)
    with torch.no_grad():
        success = (net(adv_u).argmax(1) != ys) if len(u) else torch.zeros(0, dtype=torch.bool)
    dist = (x_adv - xs).flatten(1).norm(dim=1)  # (flatten, not reshape(n, -1): n may be 0)
    dist = torch.where(success, dist, torch.full_like(dist, float("inf")))
    return MinimalResult(index, dist, x_adv, success, method)


# ----------------------------------------------------------------------------- Lemma 1
_SLOPE_CACHE: Dict[str, float] = {}


def activation_max_slope(act: Union[nn.Module, Callable], lo: float = -20.0, hi: float = 20.0,
                         n: int = 400001) -> float:
    """sup |act'(t)| of an elementwise activation, computed numerically (float64 autograd on a grid
    with step (hi-lo)/(n-1)), times (1 + 1e-6) so grid error cannot make it an under-estimate for the
    smooth activations used here (GELU: 1.12899..., tanh: 1, sigmoid: 1/4). ReLU/LeakyReLU are exact:
    max(1, |slope|)."""
    if isinstance(act, nn.ReLU) or act is F.relu or act is torch.relu:
        return 1.0
    if isinstance(act, nn.LeakyReLU):
        return max(1.0, abs(act.negative_slope))
    if isinstance(act, (nn.Identity,)):
        return 1.0
    key = repr(act)
    if key in _SLOPE_CACHE:
        return _SLOPE_CACHE[key]
    t = torch.linspace(lo, hi, n, dtype=torch.float64, requires_grad=True)
    out = act(t)
    if out.shape != t.shape:
        raise TypeError(f"activation {act!r} is not elementwise")
    (g,) = torch.autograd.grad(out.sum(), t)
    val = float(g.abs().max()) * (1 + 1e-6)
    _SLOPE_CACHE[key] = val
    return val


def dense_layer_norm(module: nn.Module) -> float:
    """Exact spectral norm of a dense layer (a valid per-layer Lipschitz bound)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"dense_layer_norm expects nn.Linear, got {type(module).__name__}")
    return float(torch.linalg.matrix_norm(module.weight.detach().double(), ord=2))


_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus)
_NEUTRAL = (nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> float:
    if bn.training:
        raise ValueError("BatchNorm must be in eval mode for a Lipschitz bound (running statistics)")
    if bn.running_var is None:
        raise ValueError("BatchNorm without running statistics has no fixed Lipschitz constant")
    g = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(bn.running_var).double()
    return float((g.abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max())


def feature_lipschitz_bound(features: nn.Module,
                            layer_bound: Optional[Callable[[nn.Module], Optional[float]]] = None,
                            return_factors: bool = False):
    """Certified upper bound on the L2 Lipschitz constant of ``features`` (an ``nn.Sequential``, nested
    allowed): the product of per-layer factors.

    * linear/conv layers: ``layer_bound(module)`` if it returns a float (plug in certified norm upper
      bounds here, e.g. Gram bounds or zero-padding conv norms); otherwise ``nn.Linear`` gets its exact
      spectral norm and a conv layer raises (no certified conv norm is computed here).
    * elementwise activations: :func:`activation_max_slope`.
    * BatchNorm (eval): max |gamma| / sqrt(running_var + eps).
    * Flatten / Identity / Dropout (eval): 1; MaxPool with stride >= kernel (non-overlapping): 1.
    Anything else raises TypeError, so an unknown layer never silently weakens the certificate.
    Returns the bound (and the list of (name, factor) with ``return_factors``).
    """
    if not isinstance(features, nn.Sequential):
        raise TypeError(f"features must be an nn.Sequential, got {type(features).__name__}")
    factors: List[Tuple[str, float]] = []

    def walk(seq, prefix):
        for name, m in seq.named_children():
            full = f"{prefix}{name}"
            if isinstance(m, nn.Sequential):
                walk(m, full + ".")
                continue
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                b = layer_bound(m) if layer_bound is not None else None
                if b is None:
                    if not isinstance(m, nn.Linear):
                        raise ValueError(f"layer {full} ({type(m).__name__}) needs a certified norm bound: "
                                         "pass layer_bound returning a float for it")
                    b = dense_layer_norm(m)
                b = float(b)
                if not b >= 0:
                    raise ValueError(f"layer_bound returned {b} for layer {full}; expected a float >= 0")
                factors.append((full, b))
            elif isinstance(m, _ELEMENTWISE):
                factors.append((full, activation_max_slope(m)))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                factors.append((full, _bn_scale(m)))
            elif isinstance(m, _NEUTRAL):
                if isinstance(m, nn.Dropout) and m.training:
                    raise ValueError(f"Dropout {full} must be in eval mode")
                factors.append((full, 1.0))
            elif isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                k, s = m.kernel_size, m.stride
                k = k if isinstance(k, tuple) else (k,)
                s = s if isinstance(s, tuple) else (s,)
                if any(si < ki for si, ki in zip(s * len(k) if len(s) == 1 else s, k)):
                    raise ValueError(f"{full}: overlapping max pooling has no unit Lipschitz bound here")
                factors.append((full, 1.0))
            else:
                raise TypeError(f"layer {full} ({type(m).__name__}) has no known Lipschitz bound")

    walk(features, "")
    total = 1.0
    for _, f in factors:
        total *= f
    return (total, factors) if return_factors else total


def feature_jacobian_norm(features: Callable, x: torch.Tensor, *, method: str = "auto",
                          n_iter: int = 50, seed: int = 0) -> torch.Tensor:
    """Per-sample operator (spectral) norm of the feature Jacobian d features(x_i) / d x_i, shape (N,).

    ``method="exact"``: per-sample Jacobians (``torch.func.vmap(jacrev)``) and their top singular value;
    ``"power"``: ``n_iter`` power iterations on J^T J with jvp/vjp (a lower estimate that converges to
    the norm); ``"auto"``: exact when in*out <= 2**16. The samples must not interact (eval-mode BatchNorm).
    """
    if method not in ("auto", "exact", "power"):
        raise ValueError(f"method must be 'auto', 'exact' or 'power', got {method!r}")
    if isinstance(features, nn.Module):
        features.eval()
    x = x.detach()
    if len(x) == 0:  # no attacked point (e.g. none classified correctly)
        return torch.zeros(0, dtype=x.dtype, device=x.device)
    d_in = x[0].numel()
    with torch.no_grad():
        d_out = features(x[:1]).numel()
    if method == "auto":
        method = "exact" if d_in * d_out <= 2 ** 16 else "power"
    if method == "exact":
        def single(xi):
            return features(xi.unsqueeze(0)).reshape(-1)
        jac = torch.func.vmap(torch.func.jacrev(single))(x).reshape(len(x), d_out, d_in)
        return torch.linalg.matrix_norm(jac.detach().double(), ord=2).to(x.dtype)
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    v = v / v.reshape(len(x), -1).norm(dim=1).reshape(-1, *[1] * (x.dim() - 1))
    sigma = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        xr = x.clone().requires_grad_(True)
        out = features(xr)
        _, jv = torch.func.jvp(features, (x,), (v,))
        (jtjv,) = torch.autograd.grad(out, xr, grad_outputs=jv)
        sigma = jv.reshape(len(x), -1).norm(dim=1)
        nrm = jtjv.reshape(len(x), -1).norm(dim=1).clamp_min(1e-30)
        v = jtjv / nrm.reshape(-1, *[1] * (x.dim() - 1))
    return sigma.detach()


@torch.no_grad()
def _margin_terms(features, readout: nn.Linear, x, y):
    phi = features(x).flatten(1)
    logits = readout(phi)
    w = readout.weight
    wy = w[y]  # (N, D)
    diff_norm = (wy.unsqueeze(1) - w.unsqueeze(0)).norm(dim=2)  # (N, C)
    margin = logits.gather(1, y[:, None]) - logits  # (N, C)
    return margin, diff_norm, logits


def lemma1_bounds(features: nn.Module, readout: nn.Linear, x: torch.Tensor, y: torch.Tensor, *,
                  lipschitz: Optional[float] = None, jacobian_method: str = "auto",
                  n_iter: int = 50) -> Dict[str, torch.Tensor]:
    """The paper's Lemma 1 distance bound per point: min over j != y of
    (z_y - z_j) / (||w_y - w_j||_2 * L), with z = readout(features(x)).

    Returns ``{"empirical": ..., "certified": ... (only if lipschitz given), "jacobian_norm": ...,
    "correct": bool mask}``; points the model misclassifies get 0.
    * empirical: L = the per-sample feature Jacobian norm (local; not a guarantee).
    * certified: L = ``lipschitz``, a true upper bound of the feature map's Lipschitz constant (e.g.
      :func:`feature_lipschitz_bound`); then no perturbation shorter than the bound changes the class.
    """
    _check_xy(x, y)
    if not isinstance(readout, nn.Linear):
        raise TypeError(f"readout must be nn.Linear, got {type(readout).__name__}")
    if lipschitz is not None and not (float(lipschitz) > 0):
        raise ValueError(f"lipschitz must be a float > 0, got {lipschitz!r}")
    features.eval()
    margin, diff_norm, logits = _margin_terms(features, readout, x, y)
    correct = logits.argmax(1) == y
    other = torch.ones_like(margin, dtype=torch.bool)
    other[torch.arange(len(y), device=y.device), y] = False
    ratio = torch.where(other, margin / diff_norm.clamp_min(1e-30), torch.full_like(margin, float("inf")))
    base = ratio.min(1).values.clamp_min(0)
    base = torch.where(correct, base, torch.zeros_like(base))
    jn = feature_jacobian_norm(features, x, method=jacobian_method, n_iter=n_iter)
    out = {"empirical": base / jn.clamp_min(1e-30), "jacobian_norm": jn, "correct": correct}
    if lipschitz is not None:
        out["certified"] = base / float(lipschitz)
    return out
