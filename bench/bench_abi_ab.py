"""Old build against new build, interleaved: the CPU kernels as two trees have them compiled.

    python bench/bench_abi_ab.py --old /path/to/old/tree --new . --rounds 15 [--json out.json]

Each tree runs in a worker process of its own (one process cannot hold two builds of the
specreg_fast ops); the parent alternates them round by round (old, new, old, new, ...), so
drifting machine load hits both alike. In a round a worker times every case: the median of
`--calls` calls after a warm-up. A case's ratio is median(new) / median(old) over the rounds, with
a percentile bootstrap interval that resamples rounds; the case fails when the interval's lower
end is above `--fail-above` (1.05: certainly more than 5% slower).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import textwrap
import time

WORKER = textwrap.dedent(r"""
    import json, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch
    import specreg_fast as sf
    from specreg_fast import ops
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def dense(shapes, dtype=torch.float32, n_iter=1):
        ws = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
        st = sf.init_power_state(ws, generator=torch.Generator().manual_seed(1))
        return lambda: ops.power_step_(ws, st.us, st.vs, n_iter, 0.0)

    def sigma(shapes):
        ws = [torch.randn(*s, generator=g) for s in shapes]
        st = sf.init_power_state(ws, generator=torch.Generator().manual_seed(1))
        return lambda: ops.sigma(ws, st.us, st.vs)

    def batched():
        P = torch.randn(300, 16, 24, generator=g, dtype=torch.complex64)
        u = torch.randn(300, 16, generator=g, dtype=torch.complex64)
        v = torch.randn(300, 24, generator=g, dtype=torch.complex64)
        return lambda: ops.batched_power_step_(P, u, v, 4)

    def cholesky():
        A = torch.randn(64, 32, 32, generator=g, dtype=torch.complex128)
        H = A @ A.conj().transpose(1, 2)
        shift = torch.linalg.eigvalsh(H)[:, -1] * 1.01
        return lambda: ops.shifted_cholesky_info(H, shift)

    def conv():
        spec = sf.ConvSpec.from_module(torch.nn.Conv2d(64, 64, 3, padding=1), (64, 16, 16))
        st = sf.init_conv_state([spec], generator=torch.Generator().manual_seed(1))
        params, modes = ops.pack_conv_params([spec])
        w = [spec.weight.detach()]
        return lambda: ops.conv_power_step_(w, st.xs, st.ys, params, modes, 1, 0.0)

    def penalty():
        model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 10))
        pen = sf.SpectralPenalty(model, gamma=0.01, seed=0)
        model(torch.randn(2, 784))  # the forward order tells the penalty which layer is the readout
        def step():
            for p in model.parameters():
                p.grad = None
            pen().backward()
        return step

    CASES = {
        "power_step_ MLP 784-1024-1024-1024 f32": dense([(1024, 784), (1024, 1024), (1024, 1024)]),
        "power_step_ 2048x2048 f32": dense([(2048, 2048)]),
        "power_step_ 1024x1024 bf16": dense([(1024, 1024)], torch.bfloat16),
        "power_step_ 512x512 f64 x10 steps": dense([(512, 512)], torch.float64, 10),
        "sigma MLP": sigma([(1024, 784), (1024, 1024), (1024, 1024)]),
        "batched_power_step_ 300x16x24 c64 x4": batched(),
        "shifted_cholesky_info 64x32x32 c128": cholesky(),
        "conv_power_step_ 64->64 3x3 16x16": conv(),
        "SpectralPenalty fwd+bwd MLP": penalty(),
    }
    calls = int(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps({"ready": True, "has_cpp": sf.HAS_CPP_EXT}), flush=True)
    for line in sys.stdin:
        out = {}
        for name, fn in CASES.items():
            fn(); fn()
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            out[name] = ts[len(ts) // 2]
        print(json.dumps(out), flush=True)
""")


def _start(tree, calls, threads):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(calls), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, cwd=os.path.abspath(tree))
    hello = json.loads(p.stdout.readline())
    assert hello["has_cpp"], f"{tree}: compiled extension not loaded"
    return p


def _round(p):
    p.stdin.write("go\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def _bootstrap_ratio(old, new, n_boot=4000, level=0.95, seed=0):
    rng = random.Random(seed)
    n = len(old)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(new[i] for i in idx) / statistics.median(old[i] for i in idx))
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * n_boot)]
    hi = ratios[int((1 + level) / 2 * n_boot) - 1]
    return lo, hi


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=15)
    # 1 by default: on a machine whose cores other processes hold, a parallel region waits for a
    # descheduled thread (100x outliers with 2 threads under load 15 on 2 cores)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fail-above", type=float, default=1.05)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workers = {"old": _start(args.old, args.calls, args.threads), "new": _start(args.new, args.calls, args.threads)}
    times = {"old": [], "new": []}
    t0 = time.time()
    for r in range(args.rounds):
        for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
            times[which].append(_round(workers[which]))
        print(f"round {r + 1}/{args.rounds} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    for p in workers.values():
        p.stdin.close()
        p.wait()
    rows, failed = [], False
    print(f"{'case':44s} {'old ms':>9s} {'new ms':>9s} {'ratio':>7s}  95% interval")
    for name in times["old"][0]:
        old = [t[name] for t in times["old"]]
        new = [t[name] for t in times["new"]]
        ratio = statistics.median(new) / statistics.median(old)
        lo, hi = _bootstrap_ratio(old, new)
        fail = lo > args.fail_above
        failed |= fail
        rows.append({"case": name, "old_ms": 1e3 * statistics.median(old), "new_ms": 1e3 * statistics.median(new),
                     "ratio": ratio, "lo": lo, "hi": hi, "fail": fail})
        print(f"{name:44s} {1e3 * statistics.median(old):9.3f} {1e3 * statistics.median(new):9.3f} {ratio:7.3f}  "
              f"[{lo:.3f}, {hi:.3f}]{'  FAIL' if fail else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "calls": args.calls, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
