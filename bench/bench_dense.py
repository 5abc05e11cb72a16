"""Dense power step: the grouped C++ op against plain PyTorch, in one run.

    python bench/bench_dense.py [--quick] [--json out.json]

Rows: one power step per weight (the regularizer's per-training-step cost), the MLP
penalty forward+backward, and the LoRA rows: one step of a map W + s B A
(``ops.lowrank_power_step_``) against the dense step on the same W and the PyTorch reference
of the op (the per-map loop of mv products), and the LoRA penalty (``dense.lowrank_sigmas``,
forward + backward into A and B) with the op against the same with the reference kernel. Baselines timed interleaved with ours: the reference loop (two
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


LORA = [((1024, 1024), 16), ((4096, 4096), 16)]  # (W shape, rank)
LORA_PENALTY = (24, (768, 768), 8)  # maps, W shape, rank: ViT-B's q and v projections with LoRA r=8


def _lora_maps(count, shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(count):
        W = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        B = (torch.randn(shape[0], rank, generator=g) / rank ** 0.5).requires_grad_()
        A = (torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5).requires_grad_()
        maps.append(sf.layers.LowRank(W, False, (B,), (A,), (2.0,)))
    return maps


def bench_lora_step(shape, rank, repeats):
    """One power step of a LoRA map W + s B A: the op, the dense op on W alone (what the LoRA
    step costs on top of the base weight's), and the op's PyTorch reference."""
    (M,) = _lora_maps(1, shape, rank)
    W, B, A, s = M.base, M.Bs[0].detach(), M.As[0].detach(), M.scales[0]
    st = sf.init_power_state([W])
    lu, lv = [st.us[0].clone()], [st.vs[0].clone()]
    ru, rv = [st.us[0].clone()], [st.vs[0].clone()]
    fns = {"ours (lowrank op)": lambda: sf.ops.lowrank_power_step_([W], [A], [B], [s], lu, lv, 1, 0.0),
           "dense op on W": lambda: sf.ops.power_step_([W], st.us, st.vs, 1, 0.0),
           "reference": lambda: sf.ops.lowrank_power_step_reference([W], [A], [B], [s], ru, rv, 1, 0.0)}
    t = common.interleaved(fns, repeats=repeats)
    nbytes = W.numel() * W.element_size()
    return [{"case": f"LoRA step {shape[0]}x{shape[1]} r{rank}", "backend": k, "median_s": v["median"],
             "min_s": v["min"], "max_s": v["max"], "samples": v["samples"],
             "ratio_vs_reference": t["reference"]["median"] / v["median"], "gbps": nbytes / v["median"] / 1e9,
             "mbytes": nbytes / 2**20} for k, v in t.items()]


def bench_lora_penalty(repeats):
    """sum sigma^2 of every LoRA map, forward + backward into A and B (dense.lowrank_sigmas, one
    power step): the op against the same route with the op's reference kernel (the per-map loop)."""
    from specreg_fast import dense

    count, shape, rank = LORA_PENALTY
    maps = _lora_maps(count, shape, rank)
    st = dense.init_power_state([M.like() for M in maps])
    ru, rv = [u.clone() for u in st.us], [v.clone() for v in st.vs]
    params = [p for M in maps for p in M.Bs + M.As]
    real = sf.ops.lowrank_power_step_

    def run(us, vs):
        for p in params:
            p.grad = None
        dense.lowrank_sigmas(maps, us, vs, 1, validate=False).pow(2).sum().backward()

    def ours():
        run(st.us, st.vs)

    def reference():
        sf.ops.lowrank_power_step_ = sf.ops.lowrank_power_step_reference
        try:
            run(ru, rv)
        finally:
            sf.ops.lowrank_power_step_ = real

    t = common.interleaved({"ours": ours, "reference": reference}, repeats=repeats)
    nbytes = count * shape[0] * shape[1] * 4
    return [{"case": f"LoRA penalty {count}x{shape[0]}x{shape[1]} r{rank}", "backend": k, "median_s": v["median"],
             "min_s": v["min"], "max_s": v["max"], "samples": v["samples"],
             "ratio_vs_reference": t["reference"]["median"] / v["median"], "gbps": nbytes / v["median"] / 1e9,
             "mbytes": nbytes / 2**20} for k, v in t.items()]


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
    for shape, rank in LORA:
        rows += bench_lora_step(shape, rank, repeats)
    rows += bench_lora_penalty(repeats)
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
    # LoRA rows: paired ratios of the interleaved rounds with their bootstrap interval
    from specreg_fast.benchmarks.timing import bootstrap_ratio_interval
    lora = {}
    for r in rows:
        if r["case"].startswith("LoRA"):
            lora.setdefault(r["case"], {})[r["backend"]] = r["samples"]
    for case, by in lora.items():
        ours = by.get("ours (lowrank op)", by.get("ours"))
        for other in (k for k in by if not k.startswith("ours")):
            q, lo, hi = bootstrap_ratio_interval(ours, by[other])
            print(f"{case}: ours / {other} = {q:.3f} (95% bootstrap interval {lo:.3f}-{hi:.3f})")
    if args.json:
        for r in rows:
            r.pop("samples", None)
        common.save_json(args.json, rows, {"read_bandwidth_Bps": bw})
    return rows


if __name__ == "__main__":
    main()
