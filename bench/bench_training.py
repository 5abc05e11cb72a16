"""Overhead of the penalty on a full training step (forward, backward, SGD step; batch 128).

    python bench/bench_training.py [--quick] [--json out.json]

Four arms timed interleaved in one run (specreg_fast.benchmarks.suite.training_arms): no
penalty, the reference penalty (Python loop of power iteration per layer, autograd through
u^T W v / <y, conv(x)>), SpectralPenalty added to the loss, and
SpectralPenalty.accumulate_grad() after the backward (gradient in place).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from specreg_fast.benchmarks.suite import make_cnn, make_mlp, training_arms  # noqa: E402


def bench(make, label, repeats):
    t = common.interleaved(training_arms(make), repeats=repeats, min_time=0.0)
    base = t["no penalty"]["median"]
    ref_over = t["reference"]["median"] - base
    rows = []
    for k, v in t.items():
        r = {"model": label, "arm": k, "median_s": v["median"], "min_s": v["min"], "max_s": v["max"],
             "overhead": v["median"] / base - 1}
        if k.startswith("ours"):
            r["overhead_vs_reference"] = (v["median"] - base) / ref_over if ref_over > 0 else float("nan")
        rows.append(r)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    repeats = 7 if args.quick else 25
    rows = bench(make_mlp, "MLP 784-1024x3-10", repeats) + bench(make_cnn, "CNN 3x32x32", repeats)
    m = common.machine()
    print(f"training-step overhead | {m['processor']} | torch {m['torch']} | {m['threads']} threads | {m['date']}")
    head = f"{'model':<20}{'arm':<24}{'median':>12}{'min-max':>24}{'overhead':>10}{'vs ref overhead':>17}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mm = f"{common.fmt_time(r['min_s'])}-{common.fmt_time(r['max_s'])}"
        vs = f"{r['overhead_vs_reference']:.2f}" if "overhead_vs_reference" in r else ""
        print(f"{r['model']:<20}{r['arm']:<24}{common.fmt_time(r['median_s']):>12}{mm:>24}{r['overhead']:>9.1%}"
              f"{vs:>17}")
    if args.json:
        common.save_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
