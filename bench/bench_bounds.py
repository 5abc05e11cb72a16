"""Certified upper bounds on the ResNet-18/CIFAR conv shapes (zero padding, the model as it
is): the Gram iteration on the Fourier blocks of the enlarged circular conv
(``bounds.conv_upper_bound``) against the exact norm, and its time against the time the
reference power-iteration loop (F.conv2d + F.conv_transpose2d, float32) takes to get within
1e-3 of the exact value from a cold start.

"exact" = float64 power iteration on the operator run to a relative change < 1e-9.

    python bench/bench_bounds.py [--iters 4,6] [--json out.json]
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

RESNET18_CIFAR = [
    (3, 64, 3, 1, 1, 32), (64, 64, 3, 1, 1, 32), (64, 128, 3, 2, 1, 32), (128, 128, 3, 1, 1, 16),
    (128, 256, 3, 2, 1, 16), (256, 256, 3, 1, 1, 8), (256, 512, 3, 2, 1, 8), (512, 512, 3, 1, 1, 4),
    (64, 128, 1, 2, 0, 32), (128, 256, 1, 2, 0, 16), (256, 512, 1, 2, 0, 8),
]


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", default="4,6", help="Gram iterations to report")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    iters = [int(t) for t in args.iters.split(",")]
    info = machine()
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"certified upper bounds, ResNet-18/CIFAR convs, zero padding, {info['threads']} threads")
    head = (f"{'layer':<22}{'exact':>9}{'ref->1e-3':>11}" + "".join(f"{f'gram{t} ub/ex':>14}{'time':>9}" for t in iters))
    print(head)
    print("-" * len(head))
    for cin, cout, k, s, p, n in RESNET18_CIFAR:
        m = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / (cin * k * k)) ** 0.5)
        shape = (cin, n, n)
        m64 = m.double()
        exact = float(conv.conv_operator_norm(m64, shape, tol=1e-9, max_iter=20000).detach())
        t_ref, steps = reference_time_to_tol(m, shape, exact)
        row = dict(layer=f"{cin}->{cout} k{k} s{s} @{n}", exact=exact, reference_s=t_ref, reference_steps=steps,
                   gram={})
        line = f"{row['layer']:<22}{exact:>9.4f}{t_ref * 1e3:>9.1f}ms"
        for t in iters:
            t0 = time.perf_counter()
            ub = bounds.conv_upper_bound(m64, shape, n_iter=t)
            dt = time.perf_counter() - t0
            row["gram"][t] = dict(upper=ub, ratio=ub / exact, seconds=dt)
            line += f"{ub / exact:>14.4f}{dt * 1e3:>7.0f}ms"
        print(line)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(**info, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
