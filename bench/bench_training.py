"""Overhead of the penalty on a full training step (forward, backward, SGD step; batch 128).

    python bench/bench_training.py [--quick] [--json out.json]

Four arms timed interleaved in one run: no penalty, the reference penalty (Python loop of
power iteration per layer, autograd through u^T W v / <y, conv(x)>), SpectralPenalty added to
the loss, and SpectralPenalty.accumulate_grad() after the backward (gradient in place).
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
from specreg_fast import reference as ref  # noqa: E402


def make_mlp():
    return nn.Sequential(nn.Linear(784, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 1024),
                         nn.GELU(), nn.Linear(1024, 10)), (784,)


def make_cnn():
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)), (3, 32, 32)


class ReferencePenalty:
    """The plain way: a Python loop over the hidden layers, one power step each under
    no_grad, then sigma by autograd through u^T W v (dense) or <y, conv(x)> (conv)."""

    def __init__(self, model, shapes, gamma):
        self.gamma = gamma
        layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
        self.items = []
        for m in layers:
            if isinstance(m, nn.Conv2d):
                spec = ref.ConvSpec.from_module(m, shapes[m])
                x = torch.randn(shapes[m])
                self.items.append((m, spec, x / x.norm(), None))
            else:
                v = torch.randn(m.weight.shape[1])
                self.items.append((m, None, v / v.norm(), torch.zeros(m.weight.shape[0])))

    def __call__(self):
        total = 0.0
        for i, (m, spec, x, u) in enumerate(self.items):
            if spec is None:
                with torch.no_grad():
                    t = m.weight @ x
                    u = t / t.norm()
                    a = m.weight.t() @ u
                    x = a / a.norm()
                s = u @ m.weight @ x
            else:
                with torch.no_grad():
                    y = ref.conv_apply(spec, x[None])
                    y = y / y.norm()
                    x = ref.conv_adjoint(spec, y)[0]
                    x = x / x.norm()
                s = (y[0] * nn.functional.conv2d(x[None], m.weight, None, m.stride, m.padding)[0]).sum()
            self.items[i] = (m, spec, x, u)
            total = total + s ** 2
        return self.gamma * total


def bench(make, label, repeats):
    torch.manual_seed(0)
    model, in_shape = make()
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a: shapes.__setitem__(mod, tuple(a[0].shape[1:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(128, *in_shape)
    y = torch.randint(0, 10, (128,))
    model(x)
    for h in hooks:
        h.remove()
    refpen = ReferencePenalty(model, shapes, 1e-2)
    pen = sf.SpectralPenalty(model, gamma=1e-2)
    model(x)
    pen()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()

    def step(extra, after=None):
        def run():
            loss = crit(model(x), y)
            if extra is not None:
                loss = loss + extra()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after is not None:
                after()
            opt.step()
        return run

    t = common.interleaved({"no penalty": step(None), "reference penalty": step(refpen),
                            "SpectralPenalty": step(pen), "accumulate_grad": step(None, pen.accumulate_grad)},
                           repeats=repeats, min_time=0.0)
    base = t["no penalty"]["median"]
    rows = []
    for k, v in t.items():
        rows.append({"model": label, "arm": k, "median_s": v["median"], "min_s": v["min"], "max_s": v["max"],
                     "overhead": v["median"] / base - 1})
    ref_over = t["reference penalty"]["median"] - base
    for r in rows[2:]:
        ours_over = r["median_s"] - base
        r["overhead_vs_reference"] = ours_over / ref_over if ref_over > 0 else float("nan")
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
    head = f"{'model':<20}{'arm':<20}{'median':>12}{'min-max':>24}{'overhead':>10}{'vs ref overhead':>17}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mm = f"{common.fmt_time(r['min_s'])}-{common.fmt_time(r['max_s'])}"
        vs = f"{r['overhead_vs_reference']:.2f}" if "overhead_vs_reference" in r else ""
        print(f"{r['model']:<20}{r['arm']:<20}{common.fmt_time(r['median_s']):>12}{mm:>24}{r['overhead']:>9.1%}"
              f"{vs:>17}")
    if args.json:
        common.save_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
