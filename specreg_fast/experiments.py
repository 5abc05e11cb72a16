"""The paper's comparison on data that ships with packages: vanilla vs end-to-end spectral
penalty (``scope="all"``, ll-spectral) vs hidden-layers-only (``scope="hidden"``,
rep-spectral), with the readout refitted on frozen features before the attacks.

``specreg-fast reproduce`` runs it (``make demo`` runs the compact default); results are
printed as a table and written to ``results.json`` and PNG plots in the output folder.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import data as D
from . import robust as R
from . import stats
from .bounds import conv_upper_bound
from .fft import to_circular_padding
from .penalty import SpectralPenalty

ARMS = ("vanilla", "ll-spectral", "rep-spectral")  # none / scope="all" / scope="hidden"


@dataclass
class Config:
    """One experiment's budget. The compact default fits `make demo` (a few minutes on 2
    CPU cores); :func:`full_config` follows the authors' recipe where it fits."""

    seeds: Sequence[int] = (0,)
    cases: Sequence[str] = ("toy-xor", "toy-sine", "mnist-mlp", "mnist-cnn", "mnist-cnn-circular", "transfer")
    mlp_width: int = 2000
    mlp_epochs: int = 30
    cnn_epochs: int = 8
    toy_epochs: int = 1500
    gamma_mlp: float = 1e-2
    gamma_cnn: float = 1e-2
    gamma_toy: float = 1e-3
    burn_in: float = 0.8          # unregularized fraction of the epochs (the authors use 80%)
    attack_points: int = 20       # points whose minimal L2 distance HopSkipJump measures
    pgd_points: int = 40          # points of the PGD accuracies (cheap: many more than attack_points)
    attack_steps: int = 10
    hsj_max_evals: int = 200      # HopSkipJump gradient-estimation queries per step (foolbox default 1000)
    pgd_eps_linf: Sequence[float] = (0.02, 0.05, 0.1)
    pgd_eps_l2: Sequence[float] = (0.5, 1.0, 2.0)
    batch_size: int = 1024
    mlp_batch_size: Optional[int] = None  # MNIST MLPs (None: batch_size); the budget is in optimizer steps
    lr: float = 0.1
    toy_lr: Sequence[float] = (0.1, 0.1)  # (XOR, sine); the authors use (1.0, 0.05)
    toy_burn_in: Optional[float] = None   # None: burn_in (the authors' toys: 10500 of 15000 epochs, 0.7)
    toy_eig_ub: bool = False              # the authors' toy runs add the activation-aware term (eig_ub)
    toy_weight_decay: float = 0.0         # SGD weight decay of the toys (the authors' XOR script: 1e-4)
    cnn_seeds: Optional[Sequence[int]] = None  # seeds of the CNN and transfer cases (None: seeds)
    attacks: Sequence[str] = ("hsj",)     # minimal-distance attacks; a point's distance is the min over them
    whitebox_points: Optional[int] = None  # FAB/DeepFool on the first N attacked points only (None: all)
    trajectory_points: int = 60           # logged points per training run (sigmas, feature scale, loss)
    out_dir: str = "demo_out"
    progress: bool = True
    data_dir: Optional[str] = None  # folder with full MNIST idx / CIFAR-10 pickle files (cases mnist-full-mlp, cifar-cnn)
    data_limit_train: Optional[int] = None  # subsample the full datasets' training sets (None: all)


#: Every case; the last two need ``data_dir``.
CASES = ("toy-xor", "toy-sine", "mnist-mlp", "mnist-cnn", "mnist-cnn-circular", "transfer", "mnist-full-mlp",
         "cifar-cnn")
TOY_CASES = ("toy-xor", "toy-sine")
DATA_DIR_CASES = ("mnist-full-mlp", "cifar-cnn")


def full_config(out_dir: str = "reproduce_out") -> Config:
    """The authors' recipe where it fits a 2-core CPU in under two hours, budgeted by
    optimizer steps: the MNIST-5k MLP at batch 128 for 320 epochs (10,240 steps, 2,048 of them
    penalized after the 80% burn-in; the authors' full-MNIST run has about 2,360), 5 seeds for
    the MLP and the toys, 3 for the CNNs and transfer; the toys as the authors ran them
    ([8, 8, 8] GELU, lr 1 XOR / 0.05 sine, 15,000 epochs with burn-in 10,500, gamma 1e-3,
    the eig_ub variant); each attacked point's distance bracketed by the minimum over
    HopSkipJump (the authors' 40 iterations, at most 200 queries per gradient estimate,
    40 points) and FAB and DeepFool (the first 3 of those points: 3-10 s per point each
    on the MNIST models) above and the certified Lemma-1 bound below; PGD on 1000 points."""
    return Config(seeds=(0, 1, 2, 3, 4), cnn_seeds=(0, 1, 2), cases=CASES[:6], mlp_epochs=320, mlp_batch_size=128,
                  cnn_epochs=20, toy_epochs=15000, toy_lr=(1.0, 0.05), toy_burn_in=0.7, toy_eig_ub=True, toy_weight_decay=1e-4,
                  attack_points=40, pgd_points=1000, attack_steps=40, hsj_max_evals=200,
                  attacks=("hsj", "fab", "deepfool"), whitebox_points=3, trajectory_points=100, out_dir=out_dir)


def sweep_gamma_config(out_dir: str = "sweep_out") -> Config:
    """The authors' gamma sweep (1e-3, 1e-2, 1e-1, one run of this config per value) on the
    MNIST-5k MLP at the full config's step budget."""
    cfg = full_config(out_dir)
    cfg.cases = ("mnist-mlp",)
    return cfg


SWEEP_GAMMAS = (1e-3, 1e-2, 1e-1)


def case_seeds(case: str, cfg: Config) -> Sequence[int]:
    """The seeds a case runs: ``cfg.seeds`` for the MLPs and toys, ``cfg.cnn_seeds`` (when
    set) for the CNNs and transfer."""
    if cfg.cnn_seeds is not None and case in ("mnist-cnn", "mnist-cnn-circular", "cifar-cnn", "transfer"):
        return cfg.cnn_seeds
    return cfg.seeds


# Seconds measured on this project's 2-core machine with the compact Config (2026-11-25):
# training per epoch (batch 1024) and evaluation per arm (probe, PGD, HopSkipJump) for each case.
_TRAIN_S_PER_EPOCH = {"toy-xor": 0.00055, "toy-sine": 0.00055, "mnist-mlp": 0.15, "mnist-cnn": 1.1, "mnist-cnn-circular": 2.1,
                      "transfer": 0.075, "mnist-full-mlp": 2.3, "cifar-cnn": 18.0}
# Each optimizer step beyond an epoch's steps at batch 1024 (smaller batches): the MNIST MLP
# at batch 128 took 7.4 ms per unpenalized and 10.4 ms per penalized step (2026-11-30), i.e.
# 0.256 s per 32-step epoch at the 80/20 mix against 0.15 s per 4-step epoch at batch 1024.
_STEP_OVERHEAD_S = (0.256 - 0.15) / (32 - 4)
_EVAL_S = {"toy-xor": 0.5, "toy-sine": 0.5, "mnist-mlp": 6.4, "mnist-cnn": 5.8, "mnist-cnn-circular": 7.5, "transfer": 3.5,
           "mnist-full-mlp": 8.0, "cifar-cnn": 10.0}
# PGD (L-inf and L2, three eps each) per attacked point, per arm
_PGD_S_PER_POINT = {"toy-xor": 0.001, "toy-sine": 0.001, "mnist-mlp": 0.0045, "mnist-cnn": 0.015, "mnist-cnn-circular": 0.02,
                    "transfer": 0.0045, "mnist-full-mlp": 0.0045, "cifar-cnn": 0.05}
# The white-box attacks of the bracket, seconds per attacked point, measured on 2026-11-30 on
# 10 points of an untrained model of each case with 2 threads (load average about 4; /tmp
# script timing robust.minimal_l2_distance); toy-sine is taken as toy-xor's, the circular
# CNN as the zero-padded one's, the full-data cases as their MNIST-5k models'.
_ATTACK_S_PER_POINT = {"fab": {"toy-xor": 0.41, "toy-sine": 0.41, "mnist-mlp": 3.5, "transfer": 3.2, "mnist-cnn": 10.3,
                               "mnist-cnn-circular": 10.3, "mnist-full-mlp": 3.5, "cifar-cnn": 10.3},
                       "deepfool": {"toy-xor": 0.022, "toy-sine": 0.022, "mnist-mlp": 9.4, "transfer": 3.6,
                                    "mnist-cnn": 5.2, "mnist-cnn-circular": 5.2, "mnist-full-mlp": 9.4,
                                    "cifar-cnn": 5.2}}
_TEST_POINTS = {"toy-xor": 100, "toy-sine": 100, "transfer": 500}  # smaller test sets cap the PGD points


def _hsj_queries(steps: int, max_evals: int) -> float:
    # HopSkipJump's gradient estimate at step i uses min(100 sqrt(i), max_evals) queries
    return sum(min(100 * math.sqrt(i), max_evals) for i in range(1, steps + 1))


def estimate_minutes(cfg: Config) -> float:
    """Wall-clock estimate of :func:`reproduce` on a 2-core CPU, scaled from runs measured
    here: training linear in epochs plus a per-step overhead for batches below 1024,
    HopSkipJump linear in its queries, PGD and the white-box attacks in their points."""
    base = Config()
    hsj_x = (cfg.attack_points * _hsj_queries(cfg.attack_steps, cfg.hsj_max_evals)) / (
        base.attack_points * _hsj_queries(base.attack_steps, base.hsj_max_evals))
    total = 0.0
    for case in cfg.cases:
        if case in TOY_CASES:
            ep, bs = cfg.toy_epochs, cfg.batch_size
        elif case in ("mnist-cnn", "mnist-cnn-circular", "cifar-cnn"):
            ep, bs = cfg.cnn_epochs, cfg.batch_size
        else:
            ep, bs = cfg.mlp_epochs, cfg.mlp_batch_size or cfg.batch_size
        n_train = {"toy-xor": 400, "toy-sine": 400, "mnist-full-mlp": 60000, "cifar-cnn": 50000}.get(case, 4000)
        extra_steps = max(0, math.ceil(n_train / bs) - math.ceil(n_train / base.batch_size))
        train_s = ep * (_TRAIN_S_PER_EPOCH[case] + extra_steps * _STEP_OVERHEAD_S)
        pgd = max(0, min(cfg.pgd_points, _TEST_POINTS.get(case, 10 ** 9)) - base.pgd_points)
        n_wb = min(cfg.attack_points, cfg.whitebox_points or cfg.attack_points)
        attacks = sum(_ATTACK_S_PER_POINT[a][case] * n_wb for a in cfg.attacks if a != "hsj")
        hsj = _EVAL_S[case] * hsj_x if "hsj" in cfg.attacks else _EVAL_S[case]
        total += len(ARMS) * len(case_seeds(case, cfg)) * (train_s + hsj + _PGD_S_PER_POINT[case] * pgd + attacks)
    return total / 60


# ----------------------------------------------------------------------------- models
def mlp(d_in: int, width: int, n_classes: int, depth: int = 1, init_std: Optional[float] = 0.01) -> nn.Sequential:
    """GELU MLP; weights N(0, init_std^2) (0.01 as in the authors' MNIST runs; None keeps
    PyTorch's default init, which the deep narrow toy nets need to train at all);
    features = all but the last Linear (the readout)."""
    layers: List[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.GELU()]
        d = width
    feats = nn.Sequential(*layers)
    model = nn.Sequential(feats, nn.Linear(d, n_classes))
    for m in model.modules():
        if isinstance(m, nn.Linear) and init_std is not None:
            nn.init.normal_(m.weight, 0.0, init_std)
            nn.init.zeros_(m.bias)
    return model


def small_cnn(in_ch: int, n_classes: int, size: int = 28, circular: bool = False) -> nn.Sequential:
    """Three 3x3 GELU convs (strides 1, 2, 2) and a linear readout; ``circular=True`` switches
    the convs to wrap-around padding (the paper's setting for its FFT norm)."""
    feats = nn.Sequential(nn.Conv2d(in_ch, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.GELU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GELU(), nn.Flatten())
    if circular:
        to_circular_padding(feats)
    with torch.no_grad():
        n_feat = feats(torch.zeros(1, in_ch, size, size)).shape[1]
    return nn.Sequential(feats, nn.Linear(n_feat, n_classes))


# ----------------------------------------------------------------------------- training
def _equilibrium(trajectory: List[Dict[str, object]], layers: Sequence[str], start_step: int,
                 tail: float = 0.1) -> Dict[str, object]:
    """Has the penalty settled by the end of training? The largest relative change of a
    penalized layer's sigma over the last ``tail`` of the penalized steps (``drift``), and the
    layer it belongs to; ``reached`` when it is below 1%."""
    pts = [p for p in trajectory if p["step"] >= start_step]
    if len(pts) < 2 or not layers:
        return {"drift": float("nan"), "layer": None, "reached": False, "logged_points": len(pts)}
    last = pts[-1]
    cut = last["step"] - tail * (last["step"] - start_step)
    ref = min(pts, key=lambda p: abs(p["step"] - cut))
    drifts = {n: abs(last["sigmas"][n] - ref["sigmas"][n]) / max(abs(last["sigmas"][n]), 1e-12) for n in layers}
    worst = max(drifts, key=drifts.get)
    return {"drift": drifts[worst], "layer": worst, "reached": drifts[worst] < 0.01, "logged_points": len(pts)}


def train(model: nn.Sequential, ds: D.Dataset, arm: str, epochs: int, gamma: float, cfg: Config, seed: int,
          lr: Optional[float] = None, conv_norm: str = "operator", desc: str = "", batch_size: Optional[int] = None,
          burn_in: Optional[float] = None, eig_ub: bool = False, weight_decay: float = 0.0) -> Dict[str, object]:
    """SGD with momentum 0.9 (and ``weight_decay``); the penalty (if any) from ``burn_in * epochs`` on.

    Logs ``cfg.trajectory_points`` points over training (every arm, the readout included):
    every layer's sigma (the penalty's own notion: operator or circular norm for convs; a
    separate tracker with its own persistent vectors, stepped only at the log points), the
    mean feature norm on a fixed batch of 256 training inputs, and the mean cross-entropy
    since the previous point.

    A run whose loss or weights turn non-finite stops there and is returned with
    ``diverged`` = the step (None otherwise), its sigmas NaN: the caller records it instead
    of evaluating a NaN model (lr 1 on the toys without weight decay does this)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr or cfg.lr, momentum=0.9, weight_decay=weight_decay)
    crit = nn.CrossEntropyLoss()
    n = len(ds.x_train)
    bs = min(batch_size or cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total_steps = epochs * steps_per_epoch
    start_step = int((cfg.burn_in if burn_in is None else burn_in) * epochs) * steps_per_epoch
    pen = None
    if arm != "vanilla":
        pen = SpectralPenalty(model, gamma=gamma, scope="all" if arm == "ll-spectral" else "hidden",
                              conv_norm=conv_norm, start_step=start_step, seed=seed, eig_ub=eig_ub)
    # the trajectories' sigmas: every layer, the penalty's conv norm, its own vectors
    tracker = SpectralPenalty(model, gamma=1.0, scope="all", conv_norm=conv_norm, n_iter=2, n_iter_init=50,
                              seed=seed + 1).eval()
    x_fixed = ds.x_train[:256]
    with torch.no_grad():
        model(x_fixed[:2])  # one forward: the penalties find the readout and the conv input sizes
    log_every = max(1, total_steps // max(1, cfg.trajectory_points))
    trajectory: List[Dict[str, object]] = []
    loss_sum, loss_n = 0.0, 0

    def finite_weights():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())

    def log(step):
        with torch.no_grad():
            tracker(update=True)
            feat = float(model[0](x_fixed).flatten(1).norm(dim=1).mean())
        trajectory.append({"step": step, "sigmas": tracker.sigmas(), "feature_norm": feat,
                           "loss": loss_sum / loss_n if loss_n else float("nan")})

    g = torch.Generator().manual_seed(seed)
    t_pen = 0.0
    t0 = time.perf_counter()
    step = 0
    diverged = None
    log(0)
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not cfg.progress)
    for ep in bar:
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            ce = crit(model(ds.x_train[idx]), ds.y_train[idx])
            if not math.isfinite(float(ce.detach())):
                diverged = step
                break
            loss = ce
            if pen is not None:
                tp = time.perf_counter()
                loss = loss + pen()
                t_pen += time.perf_counter() - tp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(ce.detach())
            loss_n += 1
            if step % log_every == 0 or step == total_steps:
                if not finite_weights():  # a finite loss can still step into inf/NaN weights
                    diverged = step
                    break
                model.eval()
                log(step)
                model.train()
                loss_sum, loss_n = 0.0, 0
        if diverged is not None:
            break
        bar.set_postfix(loss=f"{loss.item():.3f}")
    total = time.perf_counter() - t0
    if diverged is None and not finite_weights():
        diverged = step
    penalized = pen.layer_names if pen is not None else []
    sig = _layer_sigmas(model, diverged=diverged is not None)
    return {"train_time_s": total, "penalty_time_s": t_pen, "gamma": gamma if pen is not None else 0.0,
            "diverged": diverged, "steps": total_steps, "batch_size": bs,
            "penalized_steps": max(0, total_steps - start_step) if pen is not None else 0,
            "start_step": start_step, "penalized_layers": penalized, "trajectory": trajectory,
            "equilibrium": _equilibrium(trajectory, penalized, start_step), "sigmas": sig}


@torch.no_grad()
def _layer_sigmas(model: nn.Module, diverged: bool = False) -> Dict[str, float]:
    """Exact sigma of each Linear (SVD) and the matrix norm of each conv kernel (for a
    per-layer report that is the same quantity in every arm); NaN for a diverged model
    (an SVD of non-finite weights raises)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return {n: float("nan") if diverged else
            float(torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1).double(), 2)) for n, m in layers}


# ----------------------------------------------------------------------------- evaluation
def _certified_layer_bound(feats: nn.Module, x: torch.Tensor):
    """Per-layer certified norm upper bounds for the Lipschitz certificate: for each conv the
    Cholesky certificate on the Fourier blocks of the circular conv that contains its operator
    at the input size it sees (bounds.conv_upper_bound: the circular norm itself for circular
    padding, the enlarged circular conv for zero padding, within 1e-3); Linear layers get
    their exact SVD norm (None)."""
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: shapes.__setitem__(mod, tuple(a[0].shape[1:])))
             for m in feats.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        feats(x)
    for h in hooks:
        h.remove()

    def bound(m: nn.Module) -> Optional[float]:
        if isinstance(m, nn.modules.conv._ConvNd):
            return conv_upper_bound(m, shapes[m])
        return None

    return bound



def evaluate(model: nn.Sequential, ds: D.Dataset, cfg: Config, seed: int, probe_data: Optional[D.Dataset] = None
             ) -> Dict[str, object]:
    """Clean accuracy, then on the probed classifier (fresh readout on frozen features):
    PGD accuracies, minimal L2 adversarial distance (HopSkipJump, decision-based) and the
    Lemma-1 lower bounds (empirical and certified) on the attacked points: per point, the
    minimal distance is bracketed by the certified bound below and the shortest adversarial
    perturbation any of ``cfg.attacks`` found above."""
    model.eval()
    feats, _ = model[0], model[1]
    target = probe_data or ds
    clean = R.accuracy(model, ds.x_test, ds.y_test) if probe_data is None else float("nan")
    clf, probe_acc = R.probe_classifier(feats, target.x_train, target.y_train, target.n_classes, target.x_test,
                                        target.y_test)
    x, y = target.x_test, target.y_test
    pgd_inf = R.pgd_accuracy(clf, x[:cfg.pgd_points], y[:cfg.pgd_points], cfg.pgd_eps_linf,
                             norm="Linf", bounds=target.bounds, seed=seed)
    pgd_l2 = R.pgd_accuracy(clf, x[:cfg.pgd_points], y[:cfg.pgd_points], cfg.pgd_eps_l2, norm="L2",
                            bounds=target.bounds, seed=seed)
    # every attack finds an adversarial point, so each gives an upper bound on a point's
    # minimal distance: the bracket's upper end is the minimum over the attacks (on the same
    # points: the first attack_points correctly classified ones), its lower end the certified
    # Lemma-1 bound
    # (the white-box attacks, seconds per point, may run on the first whitebox_points of them:
    # the points they skip count as unbroken (inf) for them)
    by_method = {}
    for method in cfg.attacks:
        n = cfg.attack_points
        if method == "hsj":
            kw = dict(steps=cfg.attack_steps, max_gradient_eval_steps=cfg.hsj_max_evals,
                      starting_pool=target.x_train[:2000])
        else:
            kw, n = {}, min(n, cfg.whitebox_points or n)
        by_method[method] = R.minimal_l2_distance(clf, x, y, method=method, n_points=n, bounds=target.bounds,
                                                  seed=seed, **kw)
    first = max(by_method.values(), key=lambda r: len(r.index))
    dists = {m: torch.cat([r.distance, r.distance.new_full((len(first.index) - len(r.index),), float("inf"))])
             for m, r in by_method.items()}
    upper = torch.stack(list(dists.values())).min(dim=0).values
    xa, ya = x[first.index], y[first.index]
    lip = R.feature_lipschitz_bound(feats, layer_bound=_certified_layer_bound(feats, target.x_test[:1]))
    lb = R.lemma1_bounds(feats, clf.readout, xa, ya, lipschitz=lip)
    broken = torch.isfinite(upper)
    out = {"clean_acc": clean, "probe_acc": probe_acc, "pgd_linf": {str(k): v for k, v in pgd_inf.items()},
           "pgd_l2": {str(k): v for k, v in pgd_l2.items()},
           "min_l2": _distance_summary(upper),
           "min_l2_by_method": {m: _distance_summary(r.distance) for m, r in by_method.items()},
           "points": {"index": first.index.tolist(), "upper": upper.tolist(),
                      "by_method": {m: d.tolist() for m, d in dists.items()},
                      "lemma1_empirical": lb["empirical"].tolist()},
           "lemma1_empirical_mean": float(lb["empirical"][broken].mean()) if broken.any() else float("nan"),
           "lipschitz_bound": lip}
    if "certified" in lb:
        cert = lb["certified"]
        out["points"]["lemma1_certified"] = cert.tolist()
        out["lemma1_certified_mean"] = float(cert[broken].mean()) if broken.any() else float("nan")
        out["lemma1_certified_median"] = float(cert.median()) if len(cert) else float("nan")
        # every point an attack broke: the certified bound must stay below its bracket's upper end
        out.update(lemma1_check(cert[broken], upper[broken]))
        out["certified_le_measured"] = out["lemma1_points_violated"] == 0
    return out


def _not_evaluated(cfg: Config) -> Dict[str, object]:
    """:func:`evaluate`'s fields for a run that diverged: NaN everywhere, no attacked point,
    so that the table's means and the paired intervals leave the run out."""
    nan = float("nan")
    return {"clean_acc": nan, "probe_acc": nan, "pgd_linf": {str(e): nan for e in cfg.pgd_eps_linf},
            "pgd_l2": {str(e): nan for e in cfg.pgd_eps_l2}, "min_l2": _distance_summary(torch.empty(0)),
            "min_l2_by_method": {}, "points": {"index": [], "upper": [], "by_method": {}, "lemma1_empirical": []},
            "lemma1_empirical_mean": nan, "lipschitz_bound": nan}


def _distance_summary(d: torch.Tensor) -> Dict[str, float]:
    """Mean and median of the finite distances (points an attack broke) and the share broken."""
    f = d[torch.isfinite(d)]
    n = len(d)
    return {"n_points": n, "success_rate": float(len(f) / n) if n else float("nan"),
            "mean": float(f.mean()) if len(f) else float("nan"),
            "median": float(f.median()) if len(f) else float("nan")}


def lemma1_check(certified: torch.Tensor, measured: torch.Tensor) -> Dict[str, object]:
    """The certified Lemma-1 bound checked point by point against the measured minimal
    distance (a certified lower bound can never exceed a distance at which the class really
    changes): how many points were checked, how many violate it (bound above the distance by
    more than 1e-6 relative), and the smallest ratio measured / certified (over the points
    with a positive bound; nan if none)."""
    certified, measured = certified.double().flatten(), measured.double().flatten()
    if certified.shape != measured.shape:
        raise ValueError(f"certified and measured must have the same length, got {certified.numel()} and "
                         f"{measured.numel()}")
    pos = certified > 0
    return {"lemma1_points_checked": int(measured.numel()),
            "lemma1_points_violated": int((certified > measured * (1 + 1e-6)).sum()),
            "lemma1_min_ratio": float((measured[pos] / certified[pos]).min()) if bool(pos.any()) else float("nan")}


# ----------------------------------------------------------------------------- cases
def _case_data(case: str, seed: int, cfg: Optional[Config] = None):
    if case in DATA_DIR_CASES:
        if cfg is None or not cfg.data_dir:
            raise ValueError(f"case {case!r} reads the original dataset files: give --data-dir (a folder with the "
                             f"{'MNIST idx' if case.startswith('mnist') else 'CIFAR-10 python pickle'} files)")
        lim = cfg.data_limit_train
        if case == "mnist-full-mlp":
            return D.load_mnist(cfg.data_dir, flatten=True, limit_train=lim), None
        return D.load_cifar10(cfg.data_dir, limit_train=lim), None
    if case == "toy-xor":
        return D.toy_xor(n=400, seed=seed), None
    if case == "toy-sine":
        return D.toy_sine(n=400, seed=seed), None
    if case in ("mnist-mlp",):
        return D.mnist5k(seed=seed, flatten=True), None
    if case in ("mnist-cnn", "mnist-cnn-circular"):
        return D.mnist5k(seed=seed, flatten=False), None
    if case == "transfer":
        src, tgt = D.transfer_split(D.mnist5k(seed=seed, flatten=True))
        return src, tgt
    raise ValueError(f"unknown case {case!r}; expected one of {', '.join(CASES)}")


def run_case(case: str, cfg: Config, seed: int, done: Optional[Dict[str, Dict[str, object]]] = None
             ) -> Dict[str, Dict[str, object]]:
    """Train and evaluate the three arms of one case and seed; the arms in ``done`` (runs of
    this case, seed and config from elsewhere) are taken as they are."""
    ds, probe = _case_data(case, seed, cfg)
    out = {}
    for arm in ARMS:
        if done and arm in done:
            out[arm] = done[arm]
            continue
        torch.manual_seed(seed)
        if case in TOY_CASES:
            # [8, 8, 8] GELU; the eig_ub variant is the authors' rep-spectral on the toys (their
            # ll-spectral baseline is the plain sum over all layers)
            model = mlp(2, 8, ds.n_classes, depth=3, init_std=None)
            tr = train(model, ds, arm, cfg.toy_epochs, cfg.gamma_toy, cfg, seed,
                       lr=cfg.toy_lr[0 if case == "toy-xor" else 1], burn_in=cfg.toy_burn_in,
                       eig_ub=cfg.toy_eig_ub and arm == "rep-spectral", weight_decay=cfg.toy_weight_decay,
                       desc=f"{case}/{arm}")
        elif case in ("mnist-cnn", "mnist-cnn-circular", "cifar-cnn"):
            # the circular case uses the paper's FFT norm on a model with wrap-around padding;
            # the other CNNs the true operator norm of their zero padding
            circ = case == "mnist-cnn-circular"
            model = small_cnn(ds.input_shape[0], ds.n_classes, size=ds.input_shape[-1], circular=circ)
            tr = train(model, ds, arm, cfg.cnn_epochs, cfg.gamma_cnn, cfg, seed, lr=0.05,
                       conv_norm="fft" if circ else "operator", desc=f"{case}/{arm}")
        else:
            model = mlp(ds.input_shape[0], cfg.mlp_width, ds.n_classes)
            tr = train(model, ds, arm, cfg.mlp_epochs, cfg.gamma_mlp, cfg, seed, batch_size=cfg.mlp_batch_size,
                       desc=f"{case}/{arm}")
        t_ev = time.perf_counter()
        ev = evaluate(model, ds, cfg, seed, probe) if tr["diverged"] is None else _not_evaluated(cfg)
        out[arm] = {**tr, **ev, "eval_time_s": time.perf_counter() - t_ev}
        if case in TOY_CASES:
            out[arm]["_model"] = model
            out[arm]["_data"] = ds
    return out


def _mean_std(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# the table's paired comparisons: (metric, per-seed value); each arm against the others
_PAIRED_METRICS = (("min_l2_median", lambda r: r["min_l2"]["median"]),
                   ("probe_acc", lambda r: r["probe_acc"]),
                   ("lemma1_cert_median", lambda r: r.get("lemma1_certified_median", float("nan"))))
_PAIRS = (("rep-spectral", "ll-spectral"), ("rep-spectral", "vanilla"))


def summarize(all_runs: Dict[str, Dict[int, Dict[str, Dict[str, object]]]], cfg: Config) -> List[Dict[str, object]]:
    """One row per case and arm: mean and standard deviation over seeds (``min_l2`` is each
    seed's median of the per-point bracket's upper end), the step budget and whether the
    penalty had settled by the end of training in every seed."""
    rows = []
    for case, by_seed in all_runs.items():
        for arm in ARMS:
            runs = [by_seed[s][arm] for s in by_seed]
            done = [r for r in runs if r.get("diverged") is None]  # diverged runs hold NaN metrics
            row = {"case": case, "arm": arm, "seeds": len(runs), "diverged": len(runs) - len(done),
                   "steps": runs[0]["steps"], "penalized_steps": runs[0]["penalized_steps"],
                   "batch_size": runs[0]["batch_size"],
                   "equilibrium_reached": (bool(done) and all(r["equilibrium"]["reached"] for r in done))
                   if arm != "vanilla" else None,
                   "max_drift": max((r["equilibrium"]["drift"] for r in done), default=float("nan"))}
            for key, get in (("probe_acc", lambda r: r["probe_acc"]),
                             ("clean_acc", lambda r: r["clean_acc"]),
                             ("min_l2", lambda r: r["min_l2"]["median"]),
                             ("lemma1_cert", lambda r: r.get("lemma1_certified_median", float("nan"))),
                             ("lemma1_emp", lambda r: r["lemma1_empirical_mean"]),
                             ("train_s", lambda r: r["train_time_s"]),
                             ("penalty_s", lambda r: r["penalty_time_s"])):
                row[key] = _mean_std([get(r) for r in runs])
            # the per-point Lemma-1 check over every seed: points checked, violations, min ratio
            checked = [r for r in runs if "lemma1_points_checked" in r]
            row["lemma1_points_checked"] = sum(r["lemma1_points_checked"] for r in checked)
            row["lemma1_points_violated"] = sum(r["lemma1_points_violated"] for r in checked)
            ratios = [r["lemma1_min_ratio"] for r in checked if not math.isnan(r["lemma1_min_ratio"])]
            row["lemma1_min_ratio"] = min(ratios) if ratios else float("nan")
            for eps in cfg.pgd_eps_linf:
                row[f"pgd_linf_{eps}"] = _mean_std([r["pgd_linf"][str(eps)] for r in runs])
            for eps in cfg.pgd_eps_l2:
                row[f"pgd_l2_{eps}"] = _mean_std([r["pgd_l2"][str(eps)] for r in runs])
            rows.append(row)
    return rows


def paired_comparisons(all_runs: Dict[str, Dict[int, Dict[str, Dict[str, object]]]]) -> Dict[str, object]:
    """rep - ll and rep - vanilla, seed by seed, for every case and metric of
    ``_PAIRED_METRICS``: t-intervals with a Holm correction across the whole table
    (:func:`specreg_fast.stats.compare_arms`), and per seed a bootstrap interval of the
    difference of median distances over the attacked points (a second view)."""
    per_seed, comparisons, boot = {}, [], []
    for case, by_seed in all_runs.items():
        seeds = list(by_seed)
        for metric, get in _PAIRED_METRICS:
            key = f"{case}/{metric}"
            per_seed[key] = {arm: [get(by_seed[s][arm]) for s in seeds] for arm in ARMS}
            comparisons += [(key, a, b) for a, b in _PAIRS]
        for s in seeds:
            for a, b in _PAIRS:
                up = {arm: torch.tensor(by_seed[s][arm]["points"]["upper"], dtype=torch.float64) for arm in (a, b)}
                boot.append({"case": case, "seed": s, "a": a, "b": b,
                             **stats.bootstrap_median_difference(up[a], up[b], seed=s)})
    return {"t_holm": stats.compare_arms(per_seed, comparisons), "bootstrap_min_l2": boot}


def print_table(rows, cfg: Config) -> None:
    eps_cols = [f"pgd_linf_{e}" for e in cfg.pgd_eps_linf] + [f"pgd_l2_{e}" for e in cfg.pgd_eps_l2]
    head = (f"{'case':<20}{'arm':<14}{'steps (pen.)':>14}{'probe acc':>11}{'min L2':>15}{'cert. LB':>10}"
            + "".join(f"{c.replace('pgd_', ''):>11}" for c in eps_cols) + f"{'pen. time':>11}  settled")
    print(head)
    print("-" * len(head))

    def f(ms, pct=False):
        m, s = ms
        if math.isnan(m):
            return "n/a"
        return f"{100 * m:.1f}±{100 * s:.1f}" if pct else f"{m:.3f}±{s:.3f}"

    for r in rows:
        settled = ("-" if r["equilibrium_reached"] is None else "yes" if r["equilibrium_reached"]
                   else f"no ({100 * r['max_drift']:.1f}% drift)")
        if r.get("diverged"):
            settled += f"; diverged in {r['diverged']}/{r['seeds']} seeds (left out)"
        line = (f"{r['case']:<20}{r['arm']:<14}{r['steps']:>8} ({r['penalized_steps']:>4}){f(r['probe_acc'], True):>11}"
                f"{f(r['min_l2']):>16}{f(r['lemma1_cert']):>16}" + "".join(f"{f(r[c], True):>11}" for c in eps_cols)
                + f"{r['penalty_s'][0]:>10.2f}s  {settled}")
        print(line)
    print(f"min L2: per seed the median over the attacked points of the shortest adversarial perturbation found by "
          f"{'/'.join(cfg.attacks)}; cert. LB: median certified Lemma-1 lower bound; settled: every penalized "
          f"layer's sigma moved < 1% over the last 10% of the penalized steps")


def print_paired(paired: Dict[str, object]) -> None:
    print("\npaired differences (a - b, seed by seed): mean, 95% t-interval, Holm-corrected interval over the table")
    for c in paired["t_holm"]:
        print(f"  {c['metric']:<36}{c['a']} - {c['b']:<14}{c['mean']:>9.4f}  [{c['lo']:.4f}, {c['hi']:.4f}]  "
              f"Holm [{c['lo_holm']:.4f}, {c['hi_holm']:.4f}]  p_adj {c['p_adj']:.3f}  {c['verdict']}")


def _save(fig, cfg: Config, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(cfg.out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(all_runs, rows, cfg: Config) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cases = list(all_runs)
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for arm in ARMS:
            r = next(r for r in rows if r["case"] == case and r["arm"] == arm)
            ys = [r[f"pgd_l2_{e}"][0] for e in cfg.pgd_eps_l2]
            ax.plot([0] + list(cfg.pgd_eps_l2), [r["probe_acc"][0]] + ys, marker="o", label=arm)
        ax.set_title(f"{case}: PGD-L2 (probed readout)")
        ax.set_xlabel("eps (L2)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    files.append(_save(fig, cfg, "robust_accuracy.png"))

    files.append(trajectory_plot(all_runs, cfg))

    toys = [c for c in TOY_CASES if c in all_runs]
    if toys:
        fig, axes = plt.subplots(len(toys), 3, figsize=(12, 3.8 * len(toys)), squeeze=False)
        for row, case in zip(axes, toys):
            seed0 = next(iter(all_runs[case]))
            for ax, arm in zip(row, ARMS):
                run = all_runs[case][seed0][arm]
                model, ds = run["_model"], run["_data"]
                lo, hi = ds.x_train.min(0).values - 0.5, ds.x_train.max(0).values + 0.5
                gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200),
                                        indexing="xy")
                with torch.no_grad():
                    z = model(torch.stack([gx.flatten(), gy.flatten()], 1)).argmax(1).reshape(200, 200)
                ax.contourf(gx, gy, z, alpha=0.3, cmap="coolwarm")
                ax.scatter(ds.x_test[:, 0], ds.x_test[:, 1], c=ds.y_test, s=6, cmap="coolwarm")
                ax.set_title(f"{case}: {arm} " + (f"(diverged at step {run['diverged']})" if run.get("diverged")
                                                  is not None else f"(min L2 {run['min_l2']['mean']:.3f})"))
        files.append(_save(fig, cfg, "toy_decision_boundaries.png"))
    return files


_ARM_COLORS = {"vanilla": "tab:gray", "ll-spectral": "tab:blue", "rep-spectral": "tab:red"}


def trajectory_plot(all_runs, cfg: Config, name: str = "trajectories.png") -> str:
    """One row per case: every layer's sigma (readout included; line style per layer),
    the mean feature norm and the training loss against the optimizer step, arms overlaid
    (colour), every seed drawn; the dashed line marks the end of the burn-in."""
    import matplotlib.pyplot as plt

    styles = ("-", "--", ":", "-.")
    cases = list(all_runs)
    fig, axes = plt.subplots(len(cases), 3, figsize=(15, 3.4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        start = None
        for s, by_arm in all_runs[case].items():
            for arm in ARMS:
                tr = by_arm[arm]["trajectory"]
                steps = [p["step"] for p in tr]
                for k, layer in enumerate(tr[0]["sigmas"]):
                    row[0].plot(steps, [p["sigmas"][layer] for p in tr], styles[k % len(styles)],
                                color=_ARM_COLORS[arm], lw=0.9, alpha=0.7,
                                label=f"{arm} {layer}" if s == next(iter(all_runs[case])) else None)
                row[1].plot(steps, [p["feature_norm"] for p in tr], color=_ARM_COLORS[arm], lw=0.9, alpha=0.7,
                            label=arm if s == next(iter(all_runs[case])) else None)
                row[2].plot(steps, [p["loss"] for p in tr], color=_ARM_COLORS[arm], lw=0.9, alpha=0.7)
                if arm != "vanilla":
                    start = by_arm[arm]["start_step"]
        for ax, title in zip(row, ("sigma per layer", "mean feature norm", "training cross-entropy")):
            if start is not None:
                ax.axvline(start, color="k", ls="--", lw=0.8)
            ax.set_title(f"{case}: {title}")
            ax.set_xlabel("optimizer step")
        row[0].set_yscale("log")
        row[0].legend(fontsize=5, ncol=2)
        row[1].legend(fontsize=7)
    return _save(fig, cfg, name)


def reproduce(cfg: Config, done: Optional[Dict[str, Dict[int, Dict[str, Dict[str, object]]]]] = None
              ) -> Dict[str, object]:
    """Every case, seed and arm of ``cfg``: train, evaluate, print the table and the paired
    comparisons, write ``results.json`` and the plots into ``cfg.out_dir``. ``done[case][seed][arm]``:
    runs already made with this config, taken instead of training them again."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    all_runs: Dict[str, Dict[int, Dict[str, Dict[str, object]]]] = {}
    t0 = time.perf_counter()
    for case in cfg.cases:
        all_runs[case] = {}
        for seed in case_seeds(case, cfg):
            all_runs[case][seed] = run_case(case, cfg, seed, (done or {}).get(case, {}).get(seed))
    rows = summarize(all_runs, cfg)
    paired = paired_comparisons(all_runs)
    print()
    print_table(rows, cfg)
    print_paired(paired)
    files = plots(all_runs, rows, cfg)
    clean = {c: {s: {a: {k: v for k, v in r.items() if not k.startswith("_")} for a, r in by_arm.items()}
                 for s, by_arm in by_seed.items()} for c, by_seed in all_runs.items()}
    out = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
           "summary": rows, "paired": paired, "runs": clean, "wall_time_s": time.perf_counter() - t0}
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nwrote {path} and {', '.join(files)} ({out['wall_time_s']:.0f} s)")
    return out


# the config fields a reused run need not share with the sweep: output, cases, gamma, and the
# toys' settings (toy runs are never reused)
_NOT_BUDGET = ("out_dir", "progress", "cases", "gamma_mlp", "gamma_cnn", "gamma_toy")


def load_runs(path: str, cfg: Config, gammas: Sequence[float] = SWEEP_GAMMAS
              ) -> Tuple[float, Dict[str, Dict[int, Dict[str, Dict[str, object]]]]]:
    """The runs of ``cfg.cases`` in an earlier ``results.json`` made with the same budget as
    ``cfg`` (every :class:`Config` field but the output folder, the cases and gamma), and
    the gamma they were trained with, one of ``gammas``. Raises ValueError naming the first
    field that differs, a gamma outside ``gammas``, a missing case, or a toy case (their
    plots need the trained models, which the JSON lacks)."""
    with open(path) as f:
        res = json.load(f)
    theirs, ours = res["config"], {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    for k, v in ours.items():
        if k not in _NOT_BUDGET and not k.startswith("toy_") and theirs.get(k) != v:
            raise ValueError(f"{path} was run with {k}={theirs.get(k)!r}, this sweep uses {k}={v!r}: its runs "
                             f"cannot stand in for this sweep's")
    if theirs["gamma_mlp"] != theirs["gamma_cnn"]:
        raise ValueError(f"{path} used gamma {theirs['gamma_mlp']} (MLP) and {theirs['gamma_cnn']} (CNN); "
                         f"a sweep runs one gamma for both")
    toys = [c for c in cfg.cases if c in TOY_CASES]
    missing = [c for c in cfg.cases if c not in res["runs"]]
    if toys or missing:
        raise ValueError(f"{path}: cannot reuse case(s) {', '.join(toys + missing)} "
                         f"({'toy runs are not reusable' if toys else 'not in that run'})")
    gamma = float(theirs["gamma_mlp"])
    if gamma not in gammas:
        raise ValueError(f"{path} was run with gamma {gamma:g}, not one of the sweep's "
                         f"({', '.join(f'{g:g}' for g in gammas)})")
    runs = {c: {int(s): by_arm for s, by_arm in res["runs"][c].items()} for c in cfg.cases}
    return gamma, runs


def sweep_gamma(cfg: Config, gammas: Sequence[float] = SWEEP_GAMMAS, reuse: Optional[str] = None
                ) -> Dict[float, Dict[str, object]]:
    """:func:`reproduce` once per gamma of the MLP/CNN cases, each in ``out_dir/gamma_<g>``,
    then one table of every gamma's rows and paired verdicts (``sweep.json``).

    The vanilla arm does not depend on gamma: it is trained once and shared by every gamma.
    ``reuse``: a ``results.json`` of an earlier run with the same budget at one of
    ``gammas`` (e.g. ``reproduce --full``): that gamma's runs are taken from it, not trained."""
    base = cfg.out_dir
    done: Dict[float, Dict[str, Dict[int, Dict[str, Dict[str, object]]]]] = {}
    if reuse is not None:
        g_reused, runs = load_runs(reuse, cfg, gammas)
        done[g_reused] = runs
    order = sorted(gammas, key=lambda g: g not in done)  # a reused gamma first: its vanilla runs serve all
    results = {}
    for g in order:
        sub = Config(**{**asdict(cfg), "gamma_mlp": g, "gamma_cnn": g, "out_dir": os.path.join(base, f"gamma_{g:g}")})
        results[g] = reproduce(sub, done.get(g))
        if g != order[0]:
            continue
        # the first gamma's vanilla runs serve the others (not the toys': their plots need the
        # trained models, which the results do not keep, so they train again)
        for c, by_seed in results[g]["runs"].items():
            if c in TOY_CASES:
                continue
            for other in order[1:]:
                for s, by_arm in by_seed.items():
                    done.setdefault(other, {}).setdefault(c, {}).setdefault(s, {})["vanilla"] = by_arm["vanilla"]
    results = {g: results[g] for g in gammas}
    summary = {f"{g:g}": {"summary": r["summary"], "paired": r["paired"]["t_holm"]} for g, r in results.items()}
    summary["_sources"] = {"reused": reuse, "vanilla_runs_of_gamma": f"{order[0]:g}"}
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print(f"\ngamma sweep ({', '.join(f'{g:g}' for g in gammas)}; vanilla runs shared"
          f"{'' if reuse is None else f'; gamma {order[0]:g} from {reuse}'}):")
    for g, r in results.items():
        for row in r["summary"]:
            print(f"  gamma {g:<7g}{row['case']:<20}{row['arm']:<14}probe {100 * row['probe_acc'][0]:5.1f}%  "
                  f"min L2 {row['min_l2'][0]:.3f}±{row['min_l2'][1]:.3f}")
    print(f"wrote {os.path.join(base, 'sweep.json')}")
    return results
