"""Paired statistics for the reproduction: the arms of one seed share the data split, the
initialization and the batch order, so arm differences are compared seed by seed.

* :func:`paired_t_interval`: mean of per-seed differences with a two-sided t-interval and
  its p-value (H0: mean difference 0).
* :func:`holm`: Holm's step-down correction of a family of p-values, with the matching
  simultaneous confidence level of each comparison (the interval a claim must quote).
* :func:`bootstrap_median_difference`: within one seed, the difference of two arms'
  medians over their attacked points, with a percentile bootstrap interval.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["paired_t_interval", "holm", "bootstrap_median_difference", "compare_arms"]


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_t_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """``a - b`` seed by seed: ``{"n", "mean", "lo", "hi", "p"}`` (t-interval at ``level``,
    two-sided p-value of the one-sample t-test on the differences). Pairs where either side
    is NaN are dropped; with fewer than 2 pairs the interval is infinite and p is 1."""
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up seed by seed: got {len(a)} and {len(b)} values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = [float(x) - float(y) for x, y in zip(a, b) if not (math.isnan(float(x)) or math.isnan(float(y)))]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "lo": -math.inf, "hi": math.inf, "p": 1.0}
    mean = sum(d) / n
    if n < 2:
        return {"n": n, "mean": mean, "lo": -math.inf, "hi": math.inf, "p": 1.0}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        # identical differences: the interval is the point; p is 0 unless it is 0 itself
        return {"n": n, "mean": mean, "lo": mean, "hi": mean, "p": 1.0 if mean == 0 else 0.0}
    from scipy.stats import t

    half = _t_quantile(0.5 + level / 2, n - 1) * se
    p = float(2 * t.sf(abs(mean) / se, n - 1))
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "p": p}


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> List[Dict[str, float]]:
    """Holm's step-down procedure over ``m`` p-values. For each, in input order:
    ``p_adj`` (the Holm-adjusted p-value, ``max_{j<=k} min(1, (m-j+1) p_(j))`` over the sorted
    p-values), ``reject`` (``p_adj < alpha``) and ``level``: the confidence level
    ``1 - alpha / (m - k + 1)`` of the k-th smallest p-value's step, the level at which that
    comparison's interval must be computed for the family-wise error to stay below ``alpha``."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out: List[Optional[Dict[str, float]]] = [None] * m
    running = 0.0
    for k, i in enumerate(order):
        factor = m - k
        running = max(running, min(1.0, factor * float(pvalues[i])))
        out[i] = {"p_adj": running, "reject": running < alpha, "level": 1 - alpha / factor}
    return out  # type: ignore[return-value]


def bootstrap_median_difference(a: torch.Tensor, b: torch.Tensor, n_boot: int = 2000, level: float = 0.95,
                                seed: int = 0) -> Dict[str, float]:
    """``median(a) - median(b)`` with a percentile bootstrap interval, resampling each arm's
    points independently (non-finite entries, e.g. points no attack broke, are dropped)."""
    a = a[torch.isfinite(a)].double()
    b = b[torch.isfinite(b)].double()
    if len(a) == 0 or len(b) == 0:
        return {"diff": float("nan"), "lo": -math.inf, "hi": math.inf}
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(len(a), (n_boot, len(a)), generator=g)
    ib = torch.randint(len(b), (n_boot, len(b)), generator=g)
    diffs = a[ia].median(dim=1).values - b[ib].median(dim=1).values
    lo, hi = torch.quantile(diffs, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=diffs.dtype)).tolist()
    return {"diff": float(a.median() - b.median()), "lo": lo, "hi": hi}


def compare_arms(per_seed: Dict[str, Dict[str, Sequence[float]]], comparisons: Sequence[tuple],
                 alpha: float = 0.05) -> List[Dict[str, object]]:
    """Paired comparisons with a Holm correction across all of them.

    ``per_seed[key][arm]`` lists one value per seed (the same seeds, in the same order, for
    every arm); ``comparisons`` lists ``(key, arm_a, arm_b)``. Each result has the raw
    95% t-interval (``lo``/``hi``), the Holm-adjusted p-value, the Holm-level interval
    (``lo_holm``/``hi_holm``) and ``verdict``: ``"a > b"`` / ``"a < b"`` where the corrected
    interval excludes 0, else ``"no difference resolved"``."""
    raw = [paired_t_interval(per_seed[k][a], per_seed[k][b]) for k, a, b in comparisons]
    adj = holm([r["p"] for r in raw], alpha)
    out = []
    for (k, a, b), r, h in zip(comparisons, raw, adj):
        c = paired_t_interval(per_seed[k][a], per_seed[k][b], level=h["level"])
        if h["reject"] and c["lo"] > 0:
            verdict = f"{a} > {b}"
        elif h["reject"] and c["hi"] < 0:
            verdict = f"{a} < {b}"
        else:
            verdict = "no difference resolved"
        out.append({"metric": k, "a": a, "b": b, **r, "p_adj": h["p_adj"], "lo_holm": c["lo"], "hi_holm": c["hi"],
                    "verdict": verdict})
    return out
