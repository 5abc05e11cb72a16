"""The penalty's cost on real models: per model, the penalty alone (reference loop,
``penalty()`` + backward, ``accumulate_grad()``, ``accumulate_grad()`` at ``every=k``) as a share
of an unpenalized training step at batch 32, with a bootstrap interval, and against the floor.
What is timed and how: ``specreg_fast/benchmarks/models.py``.

    python bench/bench_models.py [--models resnet50,vit_b_16,...] [--batch 32] [--rounds 15] [--every 4]
        [--image-size 64] [--json out.json]
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
    ap.add_argument("--rounds", type=int, default=models.MIN_ROUNDS)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = models.run(args.models.split(","), batch=args.batch, rounds=args.rounds, every=args.every,
                     image_size=args.image_size,
                     progress=lambda s: print(f"... {s}", file=sys.stderr, flush=True))
    models.print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
