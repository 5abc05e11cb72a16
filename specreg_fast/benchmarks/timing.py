"""Timing helpers of the benchmark suite (``specreg-fast bench``) and the scripts in ``bench/``.

Reference and ours are timed interleaved (A B A B ...) so that machine drift (other load,
frequency changes) hits both alike and cancels in their ratio; each row reports the median
with the min-max range.
"""
from __future__ import annotations

import json
import math
import platform
import random
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3,
                min_time: float = 0.02) -> Dict[str, Dict[str, float]]:
    """Median / min / max seconds per call of each function, timed round-robin, and the
    per-round ``samples`` (for :func:`paired_overhead`). Each sample runs the function
    enough times to last about ``min_time`` seconds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    inner = {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        f()
        dt = max(time.perf_counter() - t0, 1e-7)
        inner[k] = max(1, int(min_time / dt))
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            samples[k].append((time.perf_counter() - t0) / n)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for k, v in samples.items()}


def paired_overhead(t: Dict[str, Dict[str, object]], arm: str, base: str) -> float:
    """Median over the rounds of ``interleaved`` of ``arm / base - 1``, each ratio taken within
    one round: a machine whose speed drifts between rounds (a shared VM) moves both sides of
    a ratio together, where the ratio of two medians mixes rounds."""
    return statistics.median(a / b - 1 for a, b in zip(t[arm]["samples"], t[base]["samples"]))


def bootstrap_ratio_interval(num: Sequence[float], den: Sequence[float], level: float = 0.95,
                             n_boot: int = 2000, seed: int = 0) -> Tuple[float, float, float]:
    """``(ratio, low, high)``: ``median(num) / median(den)`` and its percentile bootstrap interval.

    ``num[i]`` and ``den[i]`` are the times of round ``i`` of :func:`interleaved` (paired): each
    resample draws rounds with replacement and takes the same rounds of both. ``low`` and
    ``high`` are the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
    ratios (``n_boot`` resamples from ``random.Random(seed)``: the same numbers every run)."""
    num, den = [float(x) for x in num], [float(x) for x in den]
    if len(num) != len(den):
        raise ValueError(f"num and den must have one time per round each, got {len(num)} and {len(den)}")
    if len(num) < 2:
        raise ValueError(f"num and den need at least 2 rounds for a bootstrap interval, got {len(num)}")
    if not all(math.isfinite(x) and x > 0 for x in num + den):
        raise ValueError("num and den must hold positive finite times")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = random.Random(seed)
    n = len(num)
    ratios = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx))
    ratios.sort()
    lo = ratios[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = ratios[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return statistics.median(num) / statistics.median(den), lo, hi


def verdict(low: float, high: float, threshold: float = 0.05) -> str:
    """``"below 5%"`` / ``"above 5%"`` where the whole interval ``[low, high]`` of a share is
    on one side of ``threshold``, else ``"unresolved (low-high)"`` (in percent)."""
    t = f"{100 * threshold:g}%"
    if high < threshold:
        return f"below {t}"
    if low > threshold:
        return f"above {t}"
    return f"unresolved ({100 * low:.1f}-{100 * high:.1f}%)"


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> float:
    """Measured read bandwidth of this machine in bytes/s: a float32 sum over a buffer far
    larger than the caches, with all of torch's threads."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def machine() -> Dict[str, object]:
    return {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def save_json(path: str, rows, extra=None) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine(), **(extra or {}), "rows": rows}, f, indent=2)


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} us"
