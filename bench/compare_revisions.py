"""Same-run speed comparison of two source trees of specreg_fast: is B slower than A?

    python bench/compare_revisions.py --a OLD_TREE --b NEW_TREE [--rounds 15] [--cases PATTERN ...]
                                      [--size quick] [--threads 2] [--json out.json]
    make bench-compare BASE=main          # A = a worktree of BASE (build/compare-base), B = this tree

Each tree is a source checkout of specreg_fast with its compiled extension built in place
(``specreg_fast/_C*.so``). One long-lived worker process per tree (this script, the same
python, ``PYTHONPATH=TREE``, ``cwd=TREE``, the same thread count) imports that tree's package
and builds every case once from the same seeds (same weights, inputs and power-iteration
start in both), then answers "run case X" requests over a pipe with per-call times. The case
definitions are this file's, so both trees run the same code around the package; they use
only public API that both sides of a refactor keep: ``specreg_fast.ops.power_step_``,
``spectral_norms``, ``conv_operator_norms``, ``circular_conv_norms``, ``SpectralPenalty``
(``__call__``, ``accumulate_grad``) and ``specreg_fast.benchmarks.suite.make_*`` /
``build_penalized``.

The cases mirror ``specreg-fast bench --quick`` (dense, conv and circular rows, training rows)
and ``bench/bench_training.py`` (penalty cost, training step):

  * ``dense_step/<shape>``: one grouped power step (``ops.power_step_``) on the quick suite's
    dense shapes and on its MLP list (``dense_step/mlp``, one call for the three layers);
  * ``spectral_norms/mlp``: ``spectral_norms`` on the MLP list, forward and backward;
  * ``conv_norms/<layer>``: ``conv_operator_norms`` on each quick conv layer, forward and backward;
  * ``circular_norms/<layer>``: ``circular_conv_norms`` on each quick circular layer, forward
    and backward;
  * ``penalty/<model>``: ``SpectralPenalty()`` + backward, and ``accumulate_grad/<model>``,
    for the MLP, CNN and ResNet-18 of ``suite.make_*`` (built as ``bench_training.py`` does,
    from a batch of 2);
  * ``train_step/<model>``: one SGD training step (forward, backward, ``accumulate_grad()``,
    step), batch 128 for the MLP and CNN as in ``bench_training.py``, 8 for ResNet-18 (a
    batch-128 step takes seconds on a CPU; the penalty's share is larger at 8, so a slowdown
    shows more).

Timing. Each round runs every case on A and on B back to back, alternating which tree goes
first from round to round; per case and tree, a few untimed warm-up calls, then ``--calls``
samples, each the mean of ``inner`` calls (``inner`` chosen once, the same for both trees,
so that a sample lasts about ``--min-time``). A round's time is the median of its samples
(``--round-stat min``: the fastest; in an A/A run of the quick cases on a loaded 2-core machine
it gave intervals as wide as the median's). Machine drift (other load,
frequency) then hits A and B alike within a round. Both workers run with
``OMP_WAIT_POLICY=PASSIVE`` unless told otherwise (see ``WAIT_POLICIES``).

Per case: the median over rounds of A and of B, the ratio of medians B/A, and a 95% percentile
bootstrap interval of that ratio (rounds resampled with replacement, the same rounds for A
and B since they are paired; 2000 resamples, seeded). A case FAILS when the interval's lower
end is above 1.05 (B is slower by more than 5% with 95% confidence); the exit status is 1
when any case fails. An A/A run (the same tree twice) shows the noise floor: its intervals
should straddle 1.0 (about one case in twenty will not, by chance, at 95%).

On a loaded machine, fewer threads resolve more: in A/A runs of the quick cases (15 rounds,
load 11-16 on 2 cores) the interval's high/low was 2.8-4.1 for the median case at
``--threads 2`` and 1.4 at ``--threads 1``. There a 5% slowdown is resolved only at one
thread; the two-thread kernels need a quieter machine.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

#: Rounds the regression guard asks for (fewer run, with a warning).
GUARD_ROUNDS = 15
#: A case fails when its interval's lower end is above this ratio.
THRESHOLD = 1.05
#: OMP_WAIT_POLICY of both workers ("inherit": the environment's). PASSIVE by default: on a shared,
#: oversubscribed machine, OpenMP threads that spin at barriers wait for a descheduled partner,
#: and a call then takes 10-30x its time at random (penalty/mlp at 2 threads under a load of
#: 11 on 2 cores: 35 ms and 308 ms with the default policy, 16 ms and 13 ms with PASSIVE).
WAIT_POLICIES = ("PASSIVE", "ACTIVE", "inherit")
#: A round's time from its samples.
ROUND_STATS = {"min": min, "median": statistics.median}

# (C_in, C_out, kernel, stride, padding, input size): the layers of ``suite.SIZES`` (RESNET18_CIFAR
# rows 1 and 7 for conv, row 1 for circular in "quick"; a test checks that they still match).
SIZES = {
    "quick": dict(dense=[(1024, 1024), (4096, 4096)], mlp=[(1024, 784), (1024, 1024), (1024, 1024)],
                  conv=[(64, 64, 3, 1, 1, 32), (512, 512, 3, 1, 1, 4)], circular=[(64, 64, 3, 1, 1, 32)],
                  models=dict(mlp=128, cnn=128, resnet18=8)),
    # for the tool's own tests: small shapes, the same models at batch 2
    "tiny": dict(dense=[(64, 48)], mlp=[(32, 16), (32, 32)], conv=[(4, 8, 3, 2, 1, 8)],
                 circular=[(4, 8, 3, 2, 1, 8)], models=dict(mlp=2, cnn=2, resnet18=2)),
}


# ----------------------------------------------------------------------------- statistics
def _quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of sorted ``xs``, linear between order statistics (numpy's default)."""
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def ratio_interval(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Dict[str, float]:
    """``median(b) / median(a)`` with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are the times of round ``i`` (paired): each resample draws rounds
    with replacement and takes the same rounds of both. Returns ``median_a``, ``median_b``,
    ``ratio``, ``low``, ``high`` (the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    the resampled ratios).
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"a and b must have one time per round each, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a and b need at least 2 rounds for a bootstrap interval, got {len(a)}")
    if not all(math.isfinite(x) and x > 0 for x in a + b):
        raise ValueError("a and b must hold positive finite times")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = random.Random(seed)
    n = len(a)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(b[i] for i in idx) / statistics.median(a[i] for i in idx))
    ratios.sort()
    ma, mb = statistics.median(a), statistics.median(b)
    return {"median_a": ma, "median_b": mb, "ratio": mb / ma, "low": _quantile(ratios, (1 - level) / 2),
            "high": _quantile(ratios, (1 + level) / 2)}


def verdict(low: float, threshold: float = THRESHOLD) -> str:
    """FAIL when the interval's lower end is above ``threshold`` (B slower with confidence)."""
    return "FAIL" if low > threshold else "PASS"


# ----------------------------------------------------------------------------- cases (worker side)
def _layer_id(layer) -> str:
    cin, cout, k, s, _, n = layer
    return f"{cin}-{cout}k{k}s{s}@{n}"


def case_names(size: str) -> List[str]:
    """Every case of a size preset, in run order."""
    cfg = SIZES[size]
    names = [f"dense_step/{m}x{n}" for m, n in cfg["dense"]] + ["dense_step/mlp", "spectral_norms/mlp"]
    names += [f"conv_norms/{_layer_id(l)}" for l in cfg["conv"]]
    names += [f"circular_norms/{_layer_id(l)}" for l in cfg["circular"]]
    for model in cfg["models"]:
        names += [f"penalty/{model}", f"accumulate_grad/{model}", f"train_step/{model}"]
    return names


def select_cases(size: str, patterns: Optional[Sequence[str]]) -> List[str]:
    """The cases matching any of the glob ``patterns`` (all when None); a pattern that matches
    no case is an error."""
    names = case_names(size)
    if not patterns:
        return names
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"--cases: {p!r} matches no case of size {size!r}; the cases are: {', '.join(names)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def build_cases(size: str, names: Sequence[str]) -> Dict[str, Callable[[], object]]:
    """One zero-argument function per case (imports the package on ``sys.path``)."""
    import torch
    import torch.nn as nn

    import specreg_fast as sf
    from specreg_fast import ops
    from specreg_fast.benchmarks import suite

    cfg = SIZES[size]
    wanted = set(names)
    fns: Dict[str, Callable[[], object]] = {}

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    for m, n in cfg["dense"]:
        name = f"dense_step/{m}x{n}"
        if name in wanted:
            Ws = [torch.randn(m, n, generator=gen(0))]
            st = sf.init_power_state(Ws, generator=gen(1))
            fns[name] = lambda Ws=Ws, st=st: ops.power_step_(Ws, st.us, st.vs, 1, 0.0)
    if "dense_step/mlp" in wanted:
        g = gen(0)
        Ws = [torch.randn(m, n, generator=g) for m, n in cfg["mlp"]]
        st = sf.init_power_state(Ws, generator=gen(1))
        fns["dense_step/mlp"] = lambda Ws=Ws, st=st: ops.power_step_(Ws, st.us, st.vs, 1, 0.0)
    if "spectral_norms/mlp" in wanted:
        g = gen(0)
        Ws = [(torch.randn(m, n, generator=g) / n ** 0.5).requires_grad_() for m, n in cfg["mlp"]]
        st = sf.init_power_state(Ws, generator=gen(1))
        fns["spectral_norms/mlp"] = lambda Ws=Ws, st=st: sf.spectral_norms(Ws, st).square().sum().backward()

    def conv_weight(cin, cout, k, g):
        return (torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5).requires_grad_()

    for layer in cfg["conv"]:
        name = f"conv_norms/{_layer_id(layer)}"
        if name in wanted:
            cin, cout, k, s, p, n = layer
            mod = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
            spec = sf.ConvSpec.from_module(mod, (cin, n, n), weight=conv_weight(cin, cout, k, gen(0)))
            st = sf.init_conv_state([spec], generator=gen(1))
            fns[name] = lambda spec=spec, st=st: sf.conv_operator_norms([spec], st).square().sum().backward()
    for layer in cfg["circular"]:
        name = f"circular_norms/{_layer_id(layer)}"
        if name in wanted:
            cin, cout, k, s, _, n = layer
            mod = nn.Conv2d(cin, cout, k, stride=s, padding=(k - 1) // 2, bias=False, padding_mode="circular")
            spec = sf.ConvSpec.from_module(mod, (cin, n, n), weight=conv_weight(cin, cout, k, gen(0)))
            st = sf.init_circular_state([spec], generator=gen(1))
            fns[name] = lambda spec=spec, st=st: sf.circular_conv_norms([spec], st).square().sum().backward()

    makers = {"mlp": suite.make_mlp, "cnn": suite.make_cnn, "resnet18": suite.make_resnet18}
    for model, batch in cfg["models"].items():
        if {f"penalty/{model}", f"accumulate_grad/{model}"} & wanted:
            net, _, _, pen = suite.build_penalized(makers[model], "cpu", 2)
            for q in net.parameters():  # gradients added into existing .grad, as bench_training does
                q.grad = torch.zeros_like(q)
            if f"penalty/{model}" in wanted:
                fns[f"penalty/{model}"] = lambda pen=pen: pen().backward()
            if f"accumulate_grad/{model}" in wanted:
                # a model of its own: penalty/ and accumulate_grad/ then do not move each other's state
                if f"penalty/{model}" in wanted:
                    net, _, _, pen = suite.build_penalized(makers[model], "cpu", 2)
                    for q in net.parameters():
                        q.grad = torch.zeros_like(q)
                fns[f"accumulate_grad/{model}"] = pen.accumulate_grad
        if f"train_step/{model}" in wanted:
            net, x, _, pen = suite.build_penalized(makers[model], "cpu", batch)
            y = torch.randint(0, 10, (batch,), generator=gen(2))
            opt = torch.optim.SGD(net.parameters(), lr=1e-3)
            crit = nn.CrossEntropyLoss()

            def step(net=net, x=x, y=y, pen=pen, opt=opt, crit=crit):
                loss = crit(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                pen.accumulate_grad()
                opt.step()

            fns[f"train_step/{model}"] = step
    return {n: fns[n] for n in names}


def _machine() -> dict:
    try:
        from specreg_fast.benchmarks.timing import machine
        return machine()
    except ImportError:
        import platform

        import torch
        return {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": torch.get_num_threads()}


def worker() -> None:
    """Answer JSON-line requests on stdin; replies go to the original stdout, and anything the
    package prints goes to stderr so it cannot corrupt the protocol."""
    import gc
    import traceback

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    fns: Dict[str, Callable[[], object]] = {}

    def reply(obj):
        out.write(json.dumps(obj) + "\n")

    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["cmd"] == "setup":
                import torch

                torch.set_num_threads(req["threads"])
                import specreg_fast as sf

                fns = build_cases(req["size"], req["cases"])
                reply({"package": os.path.abspath(sf.__file__), "has_cpp_ext": bool(sf.HAS_CPP_EXT),
                       "machine": _machine()})
            elif req["cmd"] == "run":
                f = fns[req["case"]]
                for _ in range(req["warmup"]):
                    f()
                inner = req["inner"]
                gc.collect()
                gc.disable()
                try:
                    times = []
                    for _ in range(req["calls"]):
                        t0 = time.perf_counter()
                        for _ in range(inner):
                            f()
                        times.append((time.perf_counter() - t0) / inner)
                finally:
                    gc.enable()
                reply({"times": times})
            elif req["cmd"] == "quit":
                reply({})
                return
            else:
                raise ValueError(f"unknown request {req['cmd']!r}")
        except Exception:  # the driver raises with the worker's traceback
            reply({"error": traceback.format_exc()})


# ----------------------------------------------------------------------------- driver
class Worker:
    """One tree's worker process."""

    def __init__(self, label: str, tree: str, threads: int, omp_wait_policy: str = "PASSIVE"):
        self.label, self.tree = label, tree
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, **req) -> dict:
        self.send(**req)
        return self.receive()

    def send(self, **req) -> None:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker of {self.label} ({self.tree}) exited with status {self.proc.wait()}")
        rep = json.loads(line)
        if "error" in rep:
            raise RuntimeError(f"the worker of {self.label} ({self.tree}) failed:\n{rep['error']}")
        return rep

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(cmd="quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _git_rev(tree: str) -> Optional[str]:
    try:
        rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def check_tree(arg: str, tree: str) -> str:
    """``tree`` as an absolute path, after checking it is a specreg_fast tree with its extension built."""
    tree = os.path.abspath(tree)
    pkg = os.path.join(tree, "specreg_fast")
    if not os.path.isfile(os.path.join(pkg, "__init__.py")):
        raise ValueError(f"{arg}: {tree} is not a specreg_fast source tree (no specreg_fast/__init__.py)")
    if not any(f.startswith("_C") and f.endswith(".so") for f in os.listdir(pkg)):
        raise ValueError(f"{arg}: no compiled extension specreg_fast/_C*.so in {tree}; build it there with "
                         "`FORCE_CUDA=0 python setup.py build_ext --inplace`")
    return tree


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"


def compare(a: str, b: str, rounds: int = GUARD_ROUNDS, cases: Optional[Sequence[str]] = None, size: str = "quick",
            threads: int = 2, calls: int = 3, warmup: int = 1, min_time: float = 0.01, n_boot: int = 2000,
            seed: int = 0, omp_wait_policy: str = "PASSIVE", round_stat: str = "median",
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the comparison; returns the JSON-able result (see :func:`print_table`)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    for arg, v, lo in (("rounds", rounds, 2), ("threads", threads, 1), ("calls", calls, 1), ("warmup", warmup, 0),
                       ("n_boot", n_boot, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    if not (isinstance(min_time, (int, float)) and 0 <= min_time < 10):
        raise ValueError(f"min_time must be seconds in [0, 10), got {min_time!r}")
    if omp_wait_policy not in WAIT_POLICIES:
        raise ValueError(f"omp_wait_policy must be one of {WAIT_POLICIES}, got {omp_wait_policy!r}")
    if round_stat not in ROUND_STATS:
        raise ValueError(f"round_stat must be one of {sorted(ROUND_STATS)}, got {round_stat!r}")
    a, b = check_tree("--a", a), check_tree("--b", b)
    names = select_cases(size, cases)
    say = progress or (lambda s: None)
    t_start = time.perf_counter()
    workers = {"A": Worker("A", a, threads, omp_wait_policy), "B": Worker("B", b, threads, omp_wait_policy)}
    try:
        info = {}
        for k, w in workers.items():  # both import and build at once: nothing is timed yet
            say(f"{k}: building {len(names)} cases in {w.tree}")
            w.send(cmd="setup", size=size, cases=names, threads=threads)
        for k, w in workers.items():
            info[k] = w.receive()
            pkg_dir = os.path.dirname(info[k]["package"])
            if pkg_dir != os.path.join(w.tree, "specreg_fast"):
                raise RuntimeError(f"the worker of {k} imported specreg_fast from {pkg_dir}, not from {w.tree}")
        if info["A"]["has_cpp_ext"] != info["B"]["has_cpp_ext"] or not info["A"]["has_cpp_ext"]:
            raise RuntimeError(f"the compiled extension must load in both trees (HAS_CPP_EXT: A "
                               f"{info['A']['has_cpp_ext']}, B {info['B']['has_cpp_ext']})")
        # calls per sample: the same in both trees, from the faster tree's time of one call
        inner = {}
        for n in names:
            one = min(min(w.ask(cmd="run", case=n, calls=3, warmup=warmup, inner=1)["times"])
                      for w in workers.values())
            inner[n] = max(1, int(min_time / max(one, 1e-7)))
        samples = {n: {"A": [], "B": []} for n in names}
        calls_s = {n: {"A": [], "B": []} for n in names}
        order = []
        for r in range(rounds):
            first = ("A", "B") if r % 2 == 0 else ("B", "A")
            order.append("".join(first))
            t0 = time.perf_counter()
            for n in names:
                for k in first:
                    times = workers[k].ask(cmd="run", case=n, calls=calls, warmup=warmup, inner=inner[n])["times"]
                    samples[n][k].append(ROUND_STATS[round_stat](times))
                    calls_s[n][k].append(times)
            say(f"round {r + 1}/{rounds} ({first[0]} first): {time.perf_counter() - t0:.1f} s")
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for n in names:
        st = ratio_interval(samples[n]["A"], samples[n]["B"], n_boot=n_boot, seed=seed)
        rows.append({"case": n, "inner": inner[n], "a_s": samples[n]["A"], "b_s": samples[n]["B"],
                     "a_calls_s": calls_s[n]["A"], "b_calls_s": calls_s[n]["B"],
                     "median_a_s": st["median_a"], "median_b_s": st["median_b"], "ratio": st["ratio"],
                     "ci_low": st["low"], "ci_high": st["high"], "verdict": verdict(st["low"])})
    return {"a": {"tree": a, "rev": _git_rev(a), "package": info["A"]["package"]},
            "b": {"tree": b, "rev": _git_rev(b), "package": info["B"]["package"]},
            "machine": info["A"]["machine"], "size": size, "rounds": rounds, "order": order, "threads": threads,
            "omp_wait_policy": omp_wait_policy, "round_stat": round_stat, "calls": calls, "warmup": warmup,
            "min_time_s": min_time, "n_boot": n_boot, "level": 0.95, "seed": seed, "threshold": THRESHOLD,
            "wall_s": time.perf_counter() - t_start, "rows": rows}


def print_table(res: dict, file=None) -> None:
    m = res["machine"]
    print(f"compare_revisions ({res['size']}, {res['rounds']} rounds, {res['threads']} threads, "
          f"OMP_WAIT_POLICY {res['omp_wait_policy']}, round time: {res['round_stat']} of {res['calls']} samples) "
          "| "
          f"{m.get('machine', '?')} | {m.get('processor', '?')} | torch {m.get('torch', '?')} | "
          f"{m.get('date', '')}", file=file)
    print(f"A = {res['a']['tree']} ({res['a']['rev']})\nB = {res['b']['tree']} ({res['b']['rev']})", file=file)
    head = f"{'case':<34}{'median A':>12}{'median B':>12}{'B/A':>8}{'95% interval':>18}  verdict"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in res["rows"]:
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        print(f"{r['case']:<34}{fmt_time(r['median_a_s']):>12}{fmt_time(r['median_b_s']):>12}{r['ratio']:>7.3f}x"
              f"{ci:>18}  {r['verdict']}", file=file)
    fails = sum(r["verdict"] == "FAIL" for r in res["rows"])
    print(f"B/A: ratio of the medians over rounds of each round's time; interval: percentile bootstrap over "
          f"rounds ({res['n_boot']} resamples); FAIL: lower end above {res['threshold']}x. {fails} of "
          f"{len(res['rows'])} cases fail; {res['wall_s']:.0f} s.", file=file)
    if res["rounds"] < GUARD_ROUNDS:
        print(f"Only {res['rounds']} rounds: too few for the regression guard (at least {GUARD_ROUNDS}); with few "
              "rounds the bootstrap interval is narrower than the noise.", file=file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--a", help="the old tree (the base)")
    p.add_argument("--b", help="the new tree")
    p.add_argument("--rounds", type=int, default=GUARD_ROUNDS)
    p.add_argument("--cases", nargs="+", default=None, metavar="PATTERN",
                   help="glob patterns of the cases to run (default: all), e.g. 'dense_step/*' penalty/mlp")
    p.add_argument("--size", default="quick", choices=sorted(SIZES))
    p.add_argument("--quick", action="store_const", const="quick", dest="size", help="same as --size quick")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in both workers")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=WAIT_POLICIES,
                   help="OMP_WAIT_POLICY of both workers (default PASSIVE; inherit: the environment's)")
    p.add_argument("--round-stat", default="median", choices=sorted(ROUND_STATS),
                   help="a round's time from its samples (default: their median)")
    p.add_argument("--calls", type=int, default=3, help="timed samples per case, tree and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    p.add_argument("--min-time", type=float, default=0.01, help="seconds a sample should last at least")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.list:
        print("\n".join(case_names(args.size)))
        return 0
    if not args.a or not args.b:
        p.error("--a and --b are required")
    if args.rounds < GUARD_ROUNDS:
        print(f"note: {args.rounds} rounds; the regression guard asks for at least {GUARD_ROUNDS}", file=sys.stderr)
    try:
        res = compare(args.a, args.b, rounds=args.rounds, cases=args.cases, size=args.size, threads=args.threads,
                      calls=args.calls, warmup=args.warmup, min_time=args.min_time, n_boot=args.n_boot,
                      seed=args.seed, omp_wait_policy=args.omp_wait_policy,
                      round_stat=args.round_stat,
                      progress=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        p.error(str(e))
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if any(r["verdict"] == "FAIL" for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
