"""The penalty's cost on real models: per model, the penalty alone (reference loop,
``penalty()`` + backward, ``accumulate_grad()``) and its share of a training step at batch 32.
What is timed and how: ``specreg_fast/benchmarks/models.py``.

    python bench/bench_models.py [--models resnet50,vit_b_16,...] [--batch 32] [--reps 7] [--no-step] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from specreg_fast.benchmarks import models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(models.MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-step", action="store_true", help="the penalty cost only, not the training step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = models.run(args.models.split(","), batch=args.batch, repeats=args.reps, step=not args.no_step,
                     progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    models.print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
