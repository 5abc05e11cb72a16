"""The depthwise kernels (csrc/cpu/depthwise_cpu.cpp) against ATen on the model zoo's depthwise
layers (MobileNetV3-small, EfficientNet-B0, ConvNeXt-tiny at 64x64 input): per distinct shape,
one power step plus the weight-gradient of (x, y), the work ``accumulate_grad()`` does per
depthwise layer, timed interleaved, one thread:

  * ``direct``: ``depthwise_power_step_`` + ``depthwise_weight_grad_add_``;
  * ``conv op``: ``conv_power_step_`` + ``conv_weight_grad_add_``, the conv group's path
    (ATen's depthwise kernels inside the C++ loop; needs specreg_fast._C_conv);
  * ``aten``: the same step written with ``F.conv2d(groups=C)``, ``F.conv_transpose2d``,
    two norms and two divisions, and ``aten.convolution_backward`` for the weight-gradient.

Reported: the medians and ``direct / conv op`` and ``direct / aten`` as ratios of medians with
a seeded bootstrap interval, and per pass the arithmetic (2 C Ho Wo kh kw flops over all taps,
and over the taps whose input is in bounds) and the bytes (input vector, weight, output).

    python bench/bench_depthwise.py [--rounds 15] [--clock wall|thread] [--json out.json]

``--clock thread`` times each sample in the calling thread's CPU time (time.thread_time) instead
of wall time: on a machine other processes load, a descheduled sample then costs nothing (one
thread does all the work here). Both clocks interleave the arms round by round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from specreg_fast import ops  # noqa: E402
from specreg_fast.benchmarks.timing import bootstrap_ratio_interval, fmt_time, interleaved, machine  # noqa: E402
from specreg_fast.geometry import ConvSpec, pack_conv_params  # noqa: E402

ZOO = ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny")


def zoo_shapes(image_size: int = 64):
    """``{(C, H, W, k, stride, pad): [model, count]}`` of the zoo's depthwise layers."""
    import torchvision.models as tvm

    out = {}
    for name in ZOO:
        m = getattr(tvm, name)(num_classes=10).eval()
        seen = []
        hooks = [mod.register_forward_hook(lambda mod, inp, o: seen.append((mod, tuple(inp[0].shape[1:]))))
                 for mod in m.modules()
                 if isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels > 1 and mod.out_channels == mod.groups]
        with torch.no_grad():
            m(torch.randn(1, 3, image_size, image_size))
        for h in hooks:
            h.remove()
        for mod, (C, H, W) in seen:
            key = (C, H, W, mod.kernel_size[0], mod.stride[0], mod.padding[0])
            out.setdefault(key, [name, 0])[1] += 1
    return out


def case(C, H, W, k, s, p, seed=0):
    torch.manual_seed(seed)
    m = nn.Conv2d(C, C, k, stride=s, padding=p, groups=C, bias=False)
    Wt = m.weight.detach().contiguous()
    spec = ConvSpec.from_module(m, (C, H, W), weight=Wt)
    params, modes = pack_conv_params([spec])
    x = torch.randn(C, H, W)
    x /= x.norm()
    y = F.conv2d(x[None], Wt, stride=s, padding=p, groups=C)[0]
    y /= y.norm()
    return Wt, x, y, params, modes


def arms(C, H, W, k, s, p):
    Wt, x, y, params, modes = case(C, H, W, k, s, p)
    G = torch.zeros_like(Wt)
    xd, yd, xc, yc, xa, ya = (t.clone() for t in (x, y, x, y, x, y))

    def direct():
        torch.ops.specreg_fast.depthwise_power_step_([Wt], [xd], [yd], params, modes, 1, 0.0)
        torch.ops.specreg_fast.depthwise_weight_grad_add_([G], [Wt], [xd], [yd], params, modes)

    def conv_op():
        torch.ops.specreg_fast.conv_power_step_([Wt], [xc], [yc], params, modes, 1, 0.0)
        torch.ops.specreg_fast.conv_weight_grad_add_([G], [Wt], [xc], [yc], params, modes)

    def aten():
        with torch.no_grad():
            t = F.conv2d(xa[None], Wt, stride=s, padding=p, groups=C)
            op = [H - ((t.shape[2] - 1) * s - 2 * p + k), W - ((t.shape[3] - 1) * s - 2 * p + k)]
            a = F.conv_transpose2d(t, Wt, stride=s, padding=p, output_padding=op, groups=C)
            ya.copy_(t[0] / t.norm())
            xa.copy_(a[0] / a.norm())
            gw = torch.ops.aten.convolution_backward(ya[None], xa[None], Wt, None, [s, s], [p, p], [1, 1], False,
                                                     [0, 0], C, [False, True, False])[1]
            G.add_(gw)

    out = {"direct": direct, "aten": aten}
    if ops.HAS_CONV_EXT:
        out["conv op"] = conv_op
    return out


def work(C, H, W, k, s, p):
    """Per pass: flops counted over every tap (2 C Ho Wo k^2), taps in bounds only, and bytes
    (the pass's input vector, the weight, its output), float32."""
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    inb = 0
    for oy in range(Ho):
        for ox in range(Wo):
            for ky in range(k):
                for kx in range(k):
                    iy, ix = oy * s - p + ky, ox * s - p + kx
                    inb += 0 <= iy < H and 0 <= ix < W
    return {"flops_all_taps": 2 * C * Ho * Wo * k * k, "flops_in_bounds": 2 * C * inb,
            "bytes": 4 * (C * H * W + C * Ho * Wo + C * k * k)}


def _interleaved(fns, rounds, clock, inner=20, warmup=3):
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = clock()
            for _ in range(inner):
                f()
            samples[k].append((clock() - t0) / inner)
    return {k: {"median": statistics.median(v), "samples": v} for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'shape (C,H,W,k,s,p)':<26}{'model x n':<24}{'direct':>10}{'conv op':>10}{'aten':>10}  "
          f"{'direct/conv op [95%]':<24}{'direct/aten [95%]':<24}{'MFLOP/pass':>11}")
    for key, (model, n) in zoo_shapes(args.image_size).items():
        if args.clock == "wall":
            t = interleaved(arms(*key), repeats=args.rounds, warmup=3, min_time=0.01)
        else:
            t = _interleaved(arms(*key), args.rounds, time.thread_time)
        row = {"shape": list(key), "model": model, "count": n, **work(*key),
               **{f"{a}_median_s": r["median"] for a, r in t.items()},
               **{f"{a}_samples_s": r["samples"] for a, r in t.items()}}
        cells = []
        for base in ("conv op", "aten"):
            if base in t:
                r, lo, hi = bootstrap_ratio_interval(t["direct"]["samples"], t[base]["samples"])
                row[f"direct_over_{base.replace(' ', '_')}"] = [r, lo, hi]
                cells.append(f"{r:.2f} [{lo:.2f}-{hi:.2f}]")
            else:
                cells.append("-")
        rows.append(row)
        co = fmt_time(t["conv op"]["median"]) if "conv op" in t else "-"
        print(f"{str(key):<26}{model + ' x' + str(n):<24}{fmt_time(t['direct']['median']):>10}{co:>10}"
              f"{fmt_time(t['aten']['median']):>10}  {cells[0]:<24}{cells[1]:<24}"
              f"{row['flops_all_taps'] / 1e6:>6.2f} ({row['flops_in_bounds'] / 1e6:.2f} in bounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rounds": args.rounds, "threads": 1, "clock": args.clock, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
