"""Certified upper bounds on the ResNet-18/CIFAR conv shapes (zero padding, the model as it
is), against the exact norm, and their time against the time the reference power-iteration
loop (F.conv2d + F.conv_transpose2d, float32) takes to get within 1e-3 of the exact value
from a cold start. Two certificates on the Fourier blocks of the enlarged circular conv
(``bounds.conv_upper_bound``): the Cholesky test (default, ``method="cholesky"``) and
``--iters`` Gram iterations (``method="gram"``). Also, where the operator's Gram matrix has
side <= ``--dense-max`` (the small images), the dense certificate on the operator itself
(``method="dense"``, timed with its own power-iteration lower bound). Times are medians of
``--repeats`` runs, the methods taking turns (the dense one: one run).

"exact" = float64 power iteration on the operator run to a relative change < 1e-9.

    python bench/bench_bounds.py [--iters 5] [--repeats 3] [--dense-max 8192] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

from specreg_fast import bounds, conv  # noqa: E402
from specreg_fast.reference import ConvSpec  # noqa: E402
from specreg_fast.benchmarks.suite import RESNET18_CIFAR  # noqa: E402  (C_in, C_out, k, stride, pad, size)


def reference_time_to_tol(m: nn.Conv2d, shape, exact: float, tol: float = 1e-3, limit: int = 5000):
    """Seconds and steps of the plain float32 loop until within ``tol`` of ``exact``."""
    W = m.weight.detach().float()
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(7))
    x = x / x.norm()
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(1, limit + 1):
            y = F.conv2d(x, W, None, m.stride, m.padding)
            sig = y.norm()
            y = y / sig
            op = tuple(shape[1 + i] - ((y.shape[2 + i] - 1) * m.stride[i] - 2 * m.padding[i] + W.shape[2 + i])
                       for i in range(2))
            a = F.conv_transpose2d(y, W, None, m.stride, m.padding, op)
            x = a / a.norm()
            if abs(sig.item() - exact) <= tol * exact:
                break
    return time.perf_counter() - t0, k


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", default="5", help="Gram iterations to report (comma-separated; empty: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=8192, help="largest Gram side for the dense certificate")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    iters = [int(t) for t in args.iters.split(",") if t]
    info = machine()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"certified upper bounds, ResNet-18/CIFAR convs, zero padding, {info['threads']} threads, "
          f"medians of {args.repeats}")
    head = (f"{'layer':<22}{'exact':>8}{'ref->1e-3':>11}{'chol ub/ex':>12}{'time':>9}{'vs ref':>8}"
            + f"{'dense ub/ex':>13}{'time':>9}{'vs ref':>8}"
            + "".join(f"{f'gram{t} ub/ex':>13}{'time':>9}" for t in iters))
    print(head)
    print("-" * len(head))
    for cin, cout, k, s, p, n in RESNET18_CIFAR:
        m = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / (cin * k * k)) ** 0.5)
        shape = (cin, n, n)
        m64 = m.double()
        exact = float(conv.conv_operator_norm(m64, shape, tol=1e-9, max_iter=20000).detach())
        t_ref, t_chol, t_gram = [], [], {t: [] for t in iters}
        for _ in range(args.repeats):
            dt, steps = reference_time_to_tol(m, shape, exact)
            t_ref.append(dt)
            t0 = time.perf_counter()
            ub = bounds.conv_upper_bound(m64, shape)
            t_chol.append(time.perf_counter() - t0)
        gram_ub = {}
        for t in iters:  # (one run each: the Gram iteration is the slow baseline)
            t0 = time.perf_counter()
            gram_ub[t] = bounds.conv_upper_bound(m64, shape, n_iter=t, method="gram")
            t_gram[t].append(time.perf_counter() - t0)
        row = dict(layer=f"{cin}->{cout} k{k} s{s} @{n}", stride=s, exact=exact, reference_s=_median(t_ref),
                   reference_steps=steps, cholesky=dict(upper=ub, ratio=ub / exact, seconds=_median(t_chol)),
                   gram={t: dict(upper=gram_ub[t], ratio=gram_ub[t] / exact, seconds=_median(t_gram[t]))
                         for t in iters})
        row["dense"] = None
        if bounds.dense_gram_dim(m64, shape) <= args.dense_max:
            t0 = time.perf_counter()
            dub = bounds.conv_upper_bound(m64, shape, method="dense", max_dim=args.dense_max)
            row["dense"] = dict(upper=dub, ratio=dub / exact, seconds=time.perf_counter() - t0)

        def met(r):
            return bool(r is not None and r["ratio"] <= 1.05 and r["seconds"] < row["reference_s"])
        row["target_met"] = met(row["cholesky"]) or met(row["dense"])
        line = (f"{row['layer']:<22}{exact:>8.4f}{row['reference_s'] * 1e3:>9.1f}ms{ub / exact:>12.4f}"
                f"{row['cholesky']['seconds'] * 1e3:>7.1f}ms{row['cholesky']['seconds'] / row['reference_s']:>7.2f}x")
        d = row["dense"]
        line += (f"{d['ratio']:>13.4f}{d['seconds'] * 1e3:>7.0f}ms{d['seconds'] / row['reference_s']:>7.2f}x" if d
                 else f"{'-':>13}{'-':>9}{'-':>8}")
        for t in iters:
            line += f"{gram_ub[t] / exact:>13.4f}{row['gram'][t]['seconds'] * 1e3:>7.0f}ms"
        print(line, flush=True)
        rows.append(row)
    s1 = [r for r in rows if r["stride"] == 1]
    print(f"\nstride-1 layers with a certified bound (Cholesky or dense) within 5% of exact in less time than "
          f"the reference takes to 1e-3: {sum(r['target_met'] for r in s1)} of {len(s1)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**info, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
