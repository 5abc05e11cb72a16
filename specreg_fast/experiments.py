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
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from . import data as D
from . import robust as R
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
    lr: float = 0.1
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
    """The authors' recipe where it fits a 2-core CPU in under an hour: 3 seeds, every
    packaged-data case (the small CNN with both conv norms), PGD on 1000 points, HopSkipJump
    with the authors' 40 iterations on 40 points per arm and seed with at most 200
    gradient-estimation queries per iteration (the authors attack 1000 points with up to 1000
    queries: about 80x this attack budget, days on this machine), 60 MLP epochs of MNIST-5k
    (the authors run 200 on full MNIST), gamma 1e-2 (their sweep over 1e-3 / 1e-2 / 1e-1 is
    ``--gamma``, one run per value)."""
    return Config(seeds=(0, 1, 2), cases=CASES[:6], mlp_epochs=60, cnn_epochs=20, toy_epochs=5000,
                  attack_points=40, pgd_points=1000, attack_steps=40, hsj_max_evals=200, out_dir=out_dir)


# Seconds measured on this project's 2-core machine with the compact Config (2026-11-25):
# training per epoch and evaluation per arm (probe, PGD, HopSkipJump) for each case.
_TRAIN_S_PER_EPOCH = {"toy-xor": 0.00055, "toy-sine": 0.00055, "mnist-mlp": 0.15, "mnist-cnn": 1.1, "mnist-cnn-circular": 2.1,
                      "transfer": 0.075, "mnist-full-mlp": 2.3, "cifar-cnn": 18.0}
_EVAL_S = {"toy-xor": 0.5, "toy-sine": 0.5, "mnist-mlp": 6.4, "mnist-cnn": 5.8, "mnist-cnn-circular": 7.5, "transfer": 3.5,
           "mnist-full-mlp": 8.0, "cifar-cnn": 10.0}
# PGD (L-inf and L2, three eps each) per attacked point, per arm
_PGD_S_PER_POINT = {"toy-xor": 0.001, "toy-sine": 0.001, "mnist-mlp": 0.0045, "mnist-cnn": 0.015, "mnist-cnn-circular": 0.02,
                    "transfer": 0.0045, "mnist-full-mlp": 0.0045, "cifar-cnn": 0.05}
_TEST_POINTS = {"toy-xor": 100, "toy-sine": 100, "transfer": 500}  # smaller test sets cap the PGD points


def _hsj_queries(steps: int, max_evals: int) -> float:
    # HopSkipJump's gradient estimate at step i uses min(100 sqrt(i), max_evals) queries
    return sum(min(100 * math.sqrt(i), max_evals) for i in range(1, steps + 1))


def estimate_minutes(cfg: Config) -> float:
    """Wall-clock estimate of :func:`reproduce` on a 2-core CPU, scaled from the compact run
    measured here (training linear in epochs, HopSkipJump linear in its queries, PGD in its
    points)."""
    base = Config()
    attack_x = (cfg.attack_points * _hsj_queries(cfg.attack_steps, cfg.hsj_max_evals)) / (
        base.attack_points * _hsj_queries(base.attack_steps, base.hsj_max_evals))
    epochs = {"toy-xor": cfg.toy_epochs, "toy-sine": cfg.toy_epochs, "mnist-cnn": cfg.cnn_epochs, "mnist-cnn-circular": cfg.cnn_epochs,
              "cifar-cnn": cfg.cnn_epochs}
    total = 0.0
    for case in cfg.cases:
        ep = epochs.get(case, cfg.mlp_epochs)
        pgd = max(0, min(cfg.pgd_points, _TEST_POINTS.get(case, 10 ** 9)) - base.pgd_points)
        total += len(ARMS) * (_TRAIN_S_PER_EPOCH[case] * ep + _EVAL_S[case] * attack_x + _PGD_S_PER_POINT[case] * pgd)
    return total * len(cfg.seeds) / 60


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
def train(model: nn.Sequential, ds: D.Dataset, arm: str, epochs: int, gamma: float, cfg: Config, seed: int,
          lr: Optional[float] = None, conv_norm: str = "operator", desc: str = "") -> Dict[str, object]:
    """SGD with momentum 0.9; the penalty (if any) from ``burn_in * epochs`` on."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr or cfg.lr, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    n = len(ds.x_train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    pen = None
    if arm != "vanilla":
        model(ds.x_train[:2])  # one forward: finds the readout and the conv input sizes
        pen = SpectralPenalty(model, gamma=gamma, scope="all" if arm == "ll-spectral" else "hidden",
                              conv_norm=conv_norm, start_step=int(cfg.burn_in * epochs) * steps_per_epoch, seed=seed)
    history = []
    g = torch.Generator().manual_seed(seed)
    t_pen = 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not cfg.progress)
    for ep in bar:
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            loss = crit(model(ds.x_train[idx]), ds.y_train[idx])
            if pen is not None:
                tp = time.perf_counter()
                p = pen()
                loss = loss + p
                t_pen += time.perf_counter() - tp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if pen is not None and pen.step_count.item() > pen.start_step:
            history.append({"epoch": ep, **pen.sigmas()})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    total = time.perf_counter() - t0
    sig = _layer_sigmas(model)
    return {"train_time_s": total, "penalty_time_s": t_pen, "sigma_history": history, "sigmas": sig}


@torch.no_grad()
def _layer_sigmas(model: nn.Module) -> Dict[str, float]:
    """Exact sigma of each Linear (SVD) and the matrix norm of each conv kernel (for a
    per-layer report that is the same quantity in every arm)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            out[n] = float(torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1).double(), 2))
    return out


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
    Lemma-1 lower bounds (empirical and certified) on the attacked points."""
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
    res = R.minimal_l2_distance(clf, x, y, method="hsj", n_points=cfg.attack_points, bounds=target.bounds,
                                steps=cfg.attack_steps, max_gradient_eval_steps=cfg.hsj_max_evals,
                                starting_pool=target.x_train[:2000], seed=seed)
    xa, ya = x[res.index], y[res.index]
    lip = R.feature_lipschitz_bound(feats, layer_bound=_certified_layer_bound(feats, target.x_test[:1]))
    lb = R.lemma1_bounds(feats, clf.readout, xa, ya, lipschitz=lip)
    dist = res.distance[res.success]
    out = {"clean_acc": clean, "probe_acc": probe_acc, "pgd_linf": {str(k): v for k, v in pgd_inf.items()},
           "pgd_l2": {str(k): v for k, v in pgd_l2.items()}, "min_l2": res.summary(),
           "lemma1_empirical_mean": float(lb["empirical"][res.success].mean()) if len(dist) else float("nan"),
           "lipschitz_bound": lip}
    if "certified" in lb:
        cert = lb["certified"][res.success]
        out["lemma1_certified_mean"] = float(cert.mean()) if len(cert) else float("nan")
        out.update(lemma1_check(cert, dist))
        out["certified_le_measured"] = out["lemma1_points_violated"] == 0
    return out


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


def run_case(case: str, cfg: Config, seed: int) -> Dict[str, Dict[str, object]]:
    ds, probe = _case_data(case, seed, cfg)
    out = {}
    for arm in ARMS:
        torch.manual_seed(seed)
        if case in TOY_CASES:
            model = mlp(2, 8, ds.n_classes, depth=3, init_std=None)
            tr = train(model, ds, arm, cfg.toy_epochs, cfg.gamma_toy, cfg, seed, lr=0.1, desc=f"{case}/{arm}")
        elif case in ("mnist-cnn", "mnist-cnn-circular", "cifar-cnn"):
            # the circular case uses the paper's FFT norm on a model with wrap-around padding;
            # the other CNNs the true operator norm of their zero padding
            circ = case == "mnist-cnn-circular"
            model = small_cnn(ds.input_shape[0], ds.n_classes, size=ds.input_shape[-1], circular=circ)
            tr = train(model, ds, arm, cfg.cnn_epochs, cfg.gamma_cnn, cfg, seed, lr=0.05,
                       conv_norm="fft" if circ else "operator", desc=f"{case}/{arm}")
        else:
            model = mlp(ds.input_shape[0], cfg.mlp_width, ds.n_classes)
            tr = train(model, ds, arm, cfg.mlp_epochs, cfg.gamma_mlp, cfg, seed, desc=f"{case}/{arm}")
        t_ev = time.perf_counter()
        ev = evaluate(model, ds, cfg, seed, probe)
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


def summarize(all_runs: Dict[str, Dict[int, Dict[str, Dict[str, object]]]], cfg: Config) -> List[Dict[str, object]]:
    rows = []
    for case, by_seed in all_runs.items():
        for arm in ARMS:
            runs = [by_seed[s][arm] for s in by_seed]
            row = {"case": case, "arm": arm}
            for key, get in (("probe_acc", lambda r: r["probe_acc"]),
                             ("clean_acc", lambda r: r["clean_acc"]),
                             ("min_l2", lambda r: r["min_l2"]["mean"]),
                             ("lemma1_cert", lambda r: r.get("lemma1_certified_mean", float("nan"))),
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


def print_table(rows, cfg: Config) -> None:
    eps_cols = [f"pgd_linf_{e}" for e in cfg.pgd_eps_linf] + [f"pgd_l2_{e}" for e in cfg.pgd_eps_l2]
    head = (f"{'case':<20}{'arm':<14}{'probe acc':>11}{'min L2 (HSJ)':>15}{'cert. LB':>10}"
            + "".join(f"{c.replace('pgd_', ''):>11}" for c in eps_cols) + f"{'pen. time':>11}")
    print(head)
    print("-" * len(head))

    def f(ms, pct=False):
        m, s = ms
        if math.isnan(m):
            return "n/a"
        return f"{100 * m:.1f}±{100 * s:.1f}" if pct else f"{m:.3f}±{s:.3f}"

    for r in rows:
        line = (f"{r['case']:<20}{r['arm']:<14}{f(r['probe_acc'], True):>11}{f(r['min_l2']):>16}"
                f"{f(r['lemma1_cert']):>16}" + "".join(f"{f(r[c], True):>11}" for c in eps_cols)
                + f"{r['penalty_s'][0]:>10.2f}s")
        print(line)


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

    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        seed0 = next(iter(all_runs[case]))
        for arm in ARMS[1:]:
            hist = all_runs[case][seed0][arm]["sigma_history"]
            if not hist:
                continue
            for layer in [k for k in hist[0] if k != "epoch"]:
                ax.plot([h["epoch"] for h in hist], [h[layer] for h in hist], label=f"{arm} {layer}")
        ax.set_title(f"{case}: sigma per penalized layer")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    files.append(_save(fig, cfg, "sigma_over_training.png"))

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
                ax.set_title(f"{case}: {arm} (min L2 {run['min_l2']['mean']:.3f})")
        files.append(_save(fig, cfg, "toy_decision_boundaries.png"))
    return files


def reproduce(cfg: Config) -> Dict[str, object]:
    os.makedirs(cfg.out_dir, exist_ok=True)
    all_runs: Dict[str, Dict[int, Dict[str, Dict[str, object]]]] = {}
    t0 = time.perf_counter()
    for case in cfg.cases:
        all_runs[case] = {}
        for seed in cfg.seeds:
            all_runs[case][seed] = run_case(case, cfg, seed)
    rows = summarize(all_runs, cfg)
    print()
    print_table(rows, cfg)
    files = plots(all_runs, rows, cfg)
    clean = {c: {s: {a: {k: v for k, v in r.items() if not k.startswith("_")} for a, r in by_arm.items()}
                 for s, by_arm in by_seed.items()} for c, by_seed in all_runs.items()}
    out = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
           "summary": rows, "runs": clean, "wall_time_s": time.perf_counter() - t0}
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"\nwrote {path} and {', '.join(files)} ({out['wall_time_s']:.0f} s)")
    return out
