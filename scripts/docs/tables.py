"""Markdown tables generated from the committed results (``results/*.json``) for the docs.

Every number in the Benchmarks and Reproduction pages comes from these functions at build
time (``scripts/docs/hooks.py`` replaces ``<!-- table: NAME -->`` markers with ``TABLES[NAME]()``);
none is copied by hand. Each table is preceded by the machine and date of its run, read from
the same JSON. ``python scripts/docs/tables.py NAME`` prints one table (``headline`` is the
README's; ``python_tests/test_docs.py`` checks that the README holds exactly that output).
"""
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "results")


def load(name, results=None):
    with open(os.path.join(results or RESULTS, name)) as f:
        return json.load(f)


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header, rows):
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def t(seconds):
    """A duration with a unit chosen by its size: 38.8 us, 0.58 ms, 1.23 s."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def x(ratio):
    return "n/a" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}x"


def e(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.1e}"


def nbytes(n):
    return f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def pct(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{v * 100:+.1f}%"


def machine(d):
    """'vm (x86_64, AVX512), 2 threads, torch 2.14.1+cu130; 2026-11-25 04:41:37 UTC' from a result's header."""
    m = d.get("machine")
    if not isinstance(m, dict):  # older files keep the fields at the top level
        m = d
    return (f"machine `{m['machine']}` ({m['processor']}, {m['cpu_capability']}), {m['threads']} thread{'' if m['threads'] == 1 else 's'}, "
            f"torch {m['torch']}; run {m['date']}")


def _source(name, d):
    return f"*From `results/{name}`: {machine(d)}.*\n\n"


def ops(results=None):
    """One row per op and shape of ``specreg-fast bench``: ours against the reference loop, with the other baselines."""
    name = "bench_cpu.json"
    d = load(name, results)
    groups = {}
    for r in d["rows"]:
        if r["group"] == "training":
            continue
        groups.setdefault((r["group"], r["op"], r["shape"]), []).append(r)
    rows = []
    for (group, op, shape), rs in groups.items():
        ours = next(r for r in rs if r["backend"].startswith("ours"))
        ref = next(r for r in rs if r["backend"].startswith("reference"))
        others = "; ".join(f"{r['backend']} {t(r['median_s'])}" + (f" ({r['note']})" if r.get("note") else "")
                           for r in rs if r is not ours and r is not ref)
        rows.append([f"{group} {op}", shape, t(ours["median_s"]), t(ref["median_s"]), x(ours["ratio_vs_reference"]),
                     e(ours["rel_err"]), others])
    return _source(name, d) + table(
        ["op", "shape", "ours", "reference", "speed-up", "rel. err vs exact", "other baselines (median)"], rows)


def training(results=None):
    """The penalty inside full training steps (``bench_cpu.json``'s training group)."""
    name = "bench_cpu.json"
    d = load(name, results)
    rows = [[r["shape"], r["backend"], t(r["median_s"]), r.get("note", "")] for r in d["rows"]
            if r["group"] == "training"]
    return _source(name, d) + table(["model", "arm", "step (median)", "overhead"], rows)


def _per_arm(d):
    """The rows of a ``specreg-fast bench --models`` file (one per model and arm, shares with
    bootstrap intervals, a verdict, the floor, an ``every=k`` arm;
    specreg_fast/benchmarks/models.py) as ``{model: {"maps", arm: row}}``."""
    by = {}
    for r in d["rows"]:
        by.setdefault(r["model"], {"maps": r["maps"]})[r["arm"]] = r
    return by


STEP_ARM = "no penalty (step)"


def _share(r):
    """'4.1% [3.2-5.0]': a share of the step with its bootstrap interval."""
    if "share_of_step" not in r:
        return ""
    return f"{r['share_of_step'] * 100:.1f}% [{r['share_low'] * 100:.1f}-{r['share_high'] * 100:.1f}]"


def _floor(r):
    """'0.31 ms (2.5 MB), 4.2x': the bytes accumulate_grad must move over the read bandwidth, and
    the row's median as a multiple of that."""
    if "floor_s" not in r:
        return ""
    return f"{t(r['floor_s'])} ({nbytes(r['floor_bytes'])}), {x(r['x_floor'])}"


def _per_arm_source(name, d):
    return (_source(name, d).rstrip(".*\n") + f"; batch {d['batch']}, {d['image_size']}x{d['image_size']}, "
            f"{d['rounds']} interleaved rounds, gamma {d['gamma']:g}, read bandwidth "
            f"{d['read_bandwidth'] / 1e9:.1f} GB/s.*\n\n")


def _models_per_arm(name, d, by):
    rows = []
    for model, m in by.items():
        for arm, r in m.items():
            if arm == "maps":
                continue
            rows.append([f"{model} ({m['maps']})" if arm == STEP_ARM else "", arm, t(r["median_s"]),
                         x(r["ratio_to_reference"]) if "ratio_to_reference" in r else "", _share(r),
                         r.get("verdict", ""), _floor(r)])
    return _per_arm_source(name, d) + table(
        ["model (maps)", "arm", "median", "/ reference", f"share of the step, batch {d['batch']} [95% CI]", "verdict",
         "floor (bytes), median / floor"], rows)


def models(results=None, name="bench_models_cpu.json"):
    """The penalty's cost on real models (``specreg-fast bench --models``): every arm of every model."""
    d = load(name, results)
    return _models_per_arm(name, d, _per_arm(d))


def headline(results=None):
    """The README's one table: the penalty's cost on real models, as a fraction of the reference
    loop's, and ``accumulate_grad()``'s share of the step with its interval and verdict."""
    name = "bench_models_cpu.json"
    d = load(name, results)
    rows = []
    for model, m in _per_arm(d).items():
        acc = m["ours (accumulate_grad)"]
        rows.append([model, t(m["reference"]["median_s"]), x(m["ours (SpectralPenalty)"]["ratio_to_reference"]),
                     x(acc["ratio_to_reference"]), f"{_share(acc)}, {acc['verdict']}"])
    return table(["model (64x64, random weights)", "reference loop", "`penalty()`", "`accumulate_grad()`",
                  f"`accumulate_grad()`: share of a batch-{d['batch']} step [95% CI]"], rows)


def distributed(results=None):
    """FSDP2 shards: one all-reduce per power iteration against gathering the weights."""
    name = "bench_distributed_cpu.json"
    d = load(name, results)
    rows = []
    for r in d["rows"]:
        rows.append([r["model"], r["ranks"], ", ".join(f"{n} x{c}" for n, c in r["collectives_ours"].items()),
                     nbytes(r["payload_bytes_ours"]),
                     ", ".join(f"{n} x{c}" for n, c in r["collectives_naive"].items()),
                     nbytes(r["payload_bytes_naive"]), f"{r['payload_ratio_naive_to_ours']:.1f}",
                     t(r.get("ours_s")), t(r.get("naive_s"))])
    return _source(name, d) + table(
        ["model", "ranks", "ours: collectives", "ours: payload", "naive: collectives", "naive: payload",
         "naive / ours bytes", "ours: time", "naive: time"], rows)


_SHARDING = {"mlp": "FSDP2 per layer", "resnet18": "FSDP2 per layer", "llama_fsdp2": "FSDP2 per decoder layer",
             "llama_tp": "ColwiseParallel q/k/v, gate, up; RowwiseParallel o, down",
             "gpt2_fsdp2": "FSDP2 per block (`Conv1D`: column blocks)"}


def distributed_counts(results=None):
    """The Distributed page's table: collectives and payload per penalty step at 2 ranks, per model."""
    name = "bench_distributed_cpu.json"
    d = load(name, results)
    rows = []
    for r in d["rows"]:
        if r["ranks"] != 2:
            continue
        rows.append([r["model"], _SHARDING.get(r["model"], ""), str(sum(r["collectives_ours"].values())),
                     nbytes(r["payload_bytes_ours"]),
                     f"{sum(r['collectives_naive'].values())} ({nbytes(r['payload_bytes_naive'])})",
                     f"{r['payload_ratio_naive_to_ours']:.1f}"])
    return _source(name, d) + table(
        ["model", "sharding", "all-reduces per step (ours)", "payload per step (ours)",
         "naive: all-gathers (payload)", "payload, naive / ours"], rows)


def bounds(results=None):
    """Certified upper bounds on the ResNet-18/CIFAR conv shapes against the exact norm."""
    name = "bench_bounds.json"
    d = load(name, results)
    rows = []
    for r in d["rows"]:
        c, dn = r.get("cholesky") or {}, r.get("dense") or {}
        rows.append([r["layer"], f"{r['exact']:.4f}",
                     f"{c['ratio']:.4f} ({t(c['seconds'])})" if c else "n/a",
                     f"{dn['ratio']:.4f} ({t(dn['seconds'])})" if dn else "n/a",
                     f"{t(r['reference_s'])} ({r['reference_steps']} steps)", "yes" if r["target_met"] else "no"])
    return _source(name, d) + table(
        ["layer", "exact norm", "circular Cholesky: upper / exact (time)", "dense Cholesky: upper / exact (time)",
         "reference loop to 1e-3", "within 5% in less time"], rows)


def _ms(v, digits=3):
    return f"{v[0]:.{digits}f}±{v[1]:.{digits}f}"


def _pc(v):
    return f"{v[0] * 100:.1f}±{v[1] * 100:.1f}%"


def _settled(r):
    if r["penalized_steps"] == 0:
        return ""
    return "settled" if r["equilibrium_reached"] else f"drift {r['max_drift'] * 100:.1f}%"


def _fmt_cert(v):
    return _ms(v) if abs(v[0]) < 1e3 else f"{v[0]:.1e} (a collapsed seed)"


def reproduction(results=None):
    """``specreg-fast reproduce --full``: each case and arm, mean ± std over seeds."""
    name = "reproduce_full/summary.json"
    d = load(name, results)
    rows = [[r["case"], r["arm"], f"{r['steps']:,} / {r['penalized_steps']:,}, {r['batch_size']}", r["seeds"],
             _pc(r["probe_acc"]), _ms(r["min_l2"]), _fmt_cert(r["lemma1_cert"]), _settled(r),
             f"{r['lemma1_points_violated']} of {r['lemma1_points_checked']}"] for r in d["summary"]]
    return (f"*From `results/{name}`: {d['note'].rstrip('.;')}; wall time {d['wall_time_s'] / 60:.0f} min.*\n\n"
            + table(["case", "arm", "steps / penalized, batch", "seeds", "probe acc", "min L2", "certified LB",
                     "penalty settled", "Lemma-1 violations"], rows))


def _num(v):
    return f"{v:.3f}" if abs(v) < 1e3 else f"{v:.2e}"


def _paired_rows(ps, only_resolved=False):
    return [[p["metric"], f"{p['a']} − {p['b']}", p["n"], ("+" if p["mean"] > 0 else "") + _num(p["mean"]),
             f"[{_num(p['lo_holm'])}, {_num(p['hi_holm'])}]", f"{p['p_adj']:.3g}", p["verdict"]]
            for p in ps if not only_resolved or p["verdict"] != "no difference resolved"]


PAIRED_HEADER = ["metric", "difference", "seeds", "mean", "Holm 95% interval", "p (Holm)", "verdict"]


def reproduction_paired(results=None):
    """Every paired comparison of the ``--full`` run, Holm-corrected over all of them."""
    d = load("reproduce_full/summary.json", results)
    ps = d["paired"]["t_holm"]
    resolved = sum(p["verdict"] != "no difference resolved" for p in ps)
    return (f"*{len(ps)} comparisons, {resolved} resolved after the Holm correction.*\n\n"
            + table(PAIRED_HEADER, _paired_rows(ps)))


def sweep(results=None):
    """The gamma sweep on the MNIST MLP (``results/sweep_gamma/sweep.json``)."""
    name = "sweep_gamma/sweep.json"
    d = load(name, results)
    rows, paired = [], []
    for g in sorted((k for k in d if not k.startswith("_")), key=float):
        for r in d[g]["summary"]:
            rows.append([g, r["arm"], f"{r['steps']:,} / {r['penalized_steps']:,}, {r['batch_size']}", r["seeds"],
                         _pc(r["probe_acc"]), _ms(r["min_l2"]), _ms(r["lemma1_cert"]), _settled(r)])
        paired += [[g] + row for row in _paired_rows(d[g]["paired"])]
    return (f"*From `results/{name}` (vanilla runs shared by every gamma: those of gamma "
            f"{d['_sources']['vanilla_runs_of_gamma']}).*\n\n"
            + table(["gamma", "arm", "steps / penalized, batch", "seeds", "probe acc", "min L2", "certified LB",
                     "penalty settled"], rows)
            + "\n\nPaired comparisons, Holm-corrected over each gamma's six:\n\n"
            + table(["gamma"] + PAIRED_HEADER, paired))


TABLES = {f.__name__: f for f in (ops, training, models, headline, distributed, distributed_counts,
                                  bounds, reproduction, reproduction_paired, sweep)}

if __name__ == "__main__":
    for n in sys.argv[1:] or sorted(TABLES):
        print(TABLES[n]())
        print()
