"""Overhead of the penalty on a full training step (forward, backward, SGD step; batch 128).

    python bench/bench_training.py [--quick] [--json out.json]

Then the penalty's own cost, forward and backward, outside the training step (same model,
gradients written into existing .grad): the reference penalty + backward, penalty() +
backward, and accumulate_grad(), timed interleaved; the ratio to the reference is the
"< 1/3 of the reference's overhead" the issue asks for, without the step's noise.

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

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from specreg_fast import SpectralPenalty  # noqa: E402
from specreg_fast.benchmarks.suite import ReferencePenalty, make_cnn, make_mlp, training_arms  # noqa: E402


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


def penalty_cost(make, label, repeats):
    """Penalty alone: reference (+ backward), penalty() (+ backward), accumulate_grad()."""
    torch.manual_seed(0)
    model, in_shape = make()
    x = torch.randn(128, *in_shape)
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: shapes.__setitem__(mod, tuple(a[0].shape[1:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model(x)
    for h in hooks:
        h.remove()
    ref = ReferencePenalty(model, shapes, 1e-2)
    pen = SpectralPenalty(model, gamma=1e-2)
    model(x)
    pen()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    arms = {"reference": lambda: ref().backward(), "ours (SpectralPenalty)": lambda: pen().backward(),
            "ours (accumulate_grad)": pen.accumulate_grad}
    t = common.interleaved(arms, repeats=repeats)
    base = t["reference"]["median"]
    return [{"model": label, "arm": k, "median_s": v["median"], "min_s": v["min"], "max_s": v["max"],
             "vs_reference": v["median"] / base} for k, v in t.items()]


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
    cost = penalty_cost(make_mlp, "MLP 784-1024x3-10", 3 * repeats) + penalty_cost(make_cnn, "CNN 3x32x32",
                                                                                  3 * repeats)
    print(f"\npenalty cost alone (forward + backward, interleaved, medians of {3 * repeats})")
    head = f"{'model':<20}{'arm':<24}{'median':>12}{'min-max':>24}{'vs reference':>14}"
    print(head)
    print("-" * len(head))
    for r in cost:
        mm = f"{common.fmt_time(r['min_s'])}-{common.fmt_time(r['max_s'])}"
        print(f"{r['model']:<20}{r['arm']:<24}{common.fmt_time(r['median_s']):>12}{mm:>24}{r['vs_reference']:>13.2f}x")
    if args.json:
        common.save_json(args.json, {"training_step": rows, "penalty_cost": cost})
    return rows, cost


if __name__ == "__main__":
    main()
