"""Dense power step: the grouped C++ op against plain PyTorch, in one run.

    python bench/bench_dense.py [--quick] [--json out.json]

Rows: one power step per weight (the regularizer's per-training-step cost), and the MLP
penalty forward+backward. Baselines timed interleaved with ours: the reference loop (two
mv + normalize per layer), torch.nn.utils.parametrizations.spectral_norm (one training-mode
forward = one power step, plus the division W / sigma it always does), and
torch.linalg.matrix_norm(ord=2) (exact). GB/s counts the bytes of W read once per step.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import specreg_fast as sf  # noqa: E402
from specreg_fast.benchmarks.suite import dense_reference_step  # noqa: E402

SHAPES = [(1000, 784), (1024, 1024), (4096, 4096), (8192, 2048)]
MLP = [(1024, 784), (1024, 1024), (1024, 1024)]  # hidden weights of 784-1024-1024-1024-10


reference_step = dense_reference_step  # the suite's plain loop (two mv + normalize per layer)


def bench_step(shapes, label, with_exact, repeats):
    Ws = [torch.randn(*s) for s in shapes]
    st = sf.init_power_state(Ws)
    ref_u = [u.clone() for u in st.us]
    ref_v = [v.clone() for v in st.vs]
    fns = {
        "ours": lambda: sf.ops.power_step_(Ws, st.us, st.vs, 1, 0.0),
        "reference": lambda: reference_step(Ws, ref_u, ref_v),
    }
    if len(shapes) == 1:
        lin = nn.Linear(shapes[0][1], shapes[0][0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(Ws[0])
        sn = torch.nn.utils.parametrizations.spectral_norm(lin)
        fns["torch spectral_norm"] = lambda: sn.weight
        if with_exact:
            fns["matrix_norm(ord=2)"] = lambda: torch.linalg.matrix_norm(Ws[0], ord=2)
    t = common.interleaved(fns, repeats=repeats)
    nbytes = sum(W.numel() * W.element_size() for W in Ws)
    return [{"case": label, "backend": k, "median_s": v["median"], "min_s": v["min"], "max_s": v["max"],
             "ratio_vs_reference": t["reference"]["median"] / v["median"], "gbps": nbytes / v["median"] / 1e9,
             "mbytes": nbytes / 2**20} for k, v in t.items()]


def bench_mlp_penalty(repeats):
    """gamma * sum sigma^2 forward + backward, one power step per call."""
    Ws = [torch.randn(*s, requires_grad=True) for s in MLP]
    st = sf.init_power_state(Ws)
    ru = [u.clone() for u in st.us]
    rv = [v.clone() for v in st.vs]

    def ours():
        for W in Ws:
            W.grad = None
        sf.spectral_norms(Ws, st).pow(2).sum().backward()

    def reference():
        for W in Ws:
            W.grad = None
        reference_step([W.detach() for W in Ws], ru, rv)
        sum((u @ W @ v) ** 2 for W, u, v in zip(Ws, ru, rv)).backward()

    t = common.interleaved({"ours": ours, "reference": reference}, repeats=repeats)
    nbytes = sum(W.numel() * 4 for W in Ws)
    return [{"case": "MLP penalty fwd+bwd", "backend": k, "median_s": v["median"], "min_s": v["min"],
             "max_s": v["max"], "ratio_vs_reference": t["reference"]["median"] / v["median"],
             "gbps": nbytes / v["median"] / 1e9, "mbytes": nbytes / 2**20} for k, v in t.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every candidate (on a machine loaded by other "
                        "processes, 1 avoids timing the scheduler's wake-up of a second thread)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    bw = common.read_bandwidth()
    rows = []
    for s in SHAPES:
        rows += bench_step([s], f"step {s[0]}x{s[1]}", with_exact=not args.quick and s[0] * s[1] <= 1 << 20,
                           repeats=repeats)
    rows += bench_step(MLP, "step MLP list (3 layers)", False, repeats)
    rows += bench_mlp_penalty(repeats)
    for r in rows:
        r["frac_read_bw"] = r["gbps"] * 1e9 / bw
    m = common.machine()
    print(f"dense power step | {m['processor']} | torch {m['torch']} | {m['threads']} threads | "
          f"{m['cpu_capability']} | measured read bandwidth {bw / 1e9:.1f} GB/s | {m['date']}")
    head = f"{'case':<26}{'backend':<22}{'median':>12}{'min-max':>22}{'vs ref':>8}{'GB/s':>8}{'of BW':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mm = f"{common.fmt_time(r['min_s'])}-{common.fmt_time(r['max_s'])}"
        print(f"{r['case']:<26}{r['backend']:<22}{common.fmt_time(r['median_s']):>12}{mm:>22}"
              f"{r['ratio_vs_reference']:>7.2f}x{r['gbps']:>8.1f}{r['frac_read_bw']:>7.0%}")
    if args.json:
        common.save_json(args.json, rows, {"read_bandwidth_Bps": bw})
    return rows


if __name__ == "__main__":
    main()
