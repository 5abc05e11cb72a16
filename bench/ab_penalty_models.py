"""Before/after of the penalty's own time (``accumulate_grad()``, n_iter=1, gamma 1e-4, 64x64)
on zoo models, two source trees (or one tree in two settings) in worker processes, interleaved
round by round, one thread each, timed in the worker thread's CPU time (the machine is shared:
a descheduled worker then costs nothing; with one thread the calling thread does all the work).

    python bench/ab_penalty_models.py --arm main=/work/main --arm new=. [--arm new-aten=.:aten]
        [--models mobilenet_v3_small,efficientnet_b0] [--rounds 15] [--json out.json]

An arm ``NAME=TREE[:aten]`` imports specreg_fast from TREE; ``:aten`` sets
``ops.set_depthwise_kernel('aten')`` there first. Reported per model: each arm's median and its
ratio to the first arm with a seeded bootstrap interval."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

READOUT = {"mobilenet_v3_small": "classifier.3", "efficientnet_b0": "classifier.1", "convnext_tiny": "classifier.2",
           "resnet50": "fc", "regnet_x_400mf": "fc", "densenet121": "classifier", "resnext50_32x4d": "fc"}


def worker(model: str, inner: int, setting: str) -> None:
    import time
    import warnings

    import torch
    import torchvision.models as tvm

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from specreg_fast import ops
    from specreg_fast.penalty import SpectralPenalty

    if setting == "aten":
        ops.set_depthwise_kernel("aten")
    torch.manual_seed(0)
    m = getattr(tvm, model)(num_classes=10)
    pen = SpectralPenalty(m, gamma=1e-4, readout=READOUT[model])
    with torch.no_grad():
        m(torch.randn(2, 3, 64, 64))
    pen()
    for q in m.parameters():
        if q.requires_grad:
            q.grad = torch.zeros_like(q)
    for _ in range(3):
        pen.accumulate_grad()
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        t0 = time.thread_time()
        for _ in range(inner):
            pen.accumulate_grad()
        print((time.thread_time() - t0) / inner, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arm", action="append", required=True)
    ap.add_argument("--models", default="mobilenet_v3_small,efficientnet_b0")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from specreg_fast.benchmarks.timing import bootstrap_ratio_interval

    arms = []
    for a in args.arm:
        name, spec = a.split("=", 1)
        tree, _, setting = spec.partition(":")
        arms.append((name, os.path.abspath(tree), setting or "auto"))
    out = {"arms": arms, "rounds": args.rounds, "clock": "thread", "threads": 1, "models": {}}
    for model in args.models.split(","):
        procs = {}
        for name, tree, setting in arms:
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--arm", "x=.", "--worker", model,
                                            str(args.inner), setting], cwd=tree, env=env, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            assert procs[name].stdout.readline().strip() == "ready"
        samples = {name: [] for name, _, _ in arms}
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for name, _, _ in order:
                p = procs[name]
                p.stdin.write("go\n")
                p.stdin.flush()
                samples[name].append(float(p.stdout.readline()))
        for p in procs.values():
            p.stdin.write("\n")
            p.stdin.close()
            p.wait()
        base = arms[0][0]
        res = {}
        for name, _, _ in arms:
            ratio, lo, hi = bootstrap_ratio_interval(samples[name], samples[base])
            med = sorted(samples[name])[len(samples[name]) // 2]
            res[name] = {"median_s": med, "ratio": ratio, "low": lo, "high": hi, "samples_s": samples[name]}
            print(f"{model:<22}{name:<12}{med * 1e3:8.2f} ms  {ratio:.3f}x [{lo:.3f}-{hi:.3f}] of {base}", flush=True)
        out["models"][model] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
