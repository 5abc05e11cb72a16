"""The reproduction's paired statistics against hand-worked answers and scipy's own tests."""
import math

import pytest
import torch

pytest.importorskip("scipy")
from scipy import stats as sst  # noqa: E402

from specreg_fast import stats  # noqa: E402


def test_paired_t_interval_matches_scipy_and_the_textbook_formula():
    a = [1.30, 1.12, 1.45, 1.21, 1.38]
    b = [1.10, 1.08, 1.20, 1.25, 1.11]
    r = stats.paired_t_interval(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4}
    assert r["n"] == 5 and r["mean"] == pytest.approx(mean)
    assert (r["lo"], r["hi"]) == pytest.approx((mean - half, mean + half))
    assert r["p"] == pytest.approx(sst.ttest_rel(a, b).pvalue)
    # a wider level gives a wider interval around the same mean
    r99 = stats.paired_t_interval(a, b, level=0.99)
    assert r99["lo"] < r["lo"] and r99["hi"] > r["hi"]


def test_paired_t_interval_edge_cases():
    assert stats.paired_t_interval([1.0], [0.0])["p"] == 1.0  # one pair: nothing resolved
    r = stats.paired_t_interval([1.0, float("nan"), 2.0], [0.5, 0.1, 1.5])  # the NaN pair is dropped
    assert r["n"] == 2 and r["lo"] == r["hi"] == 0.5 and r["p"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_t_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        stats.paired_t_interval([1.0, 2.0], [1.0, 2.0], level=1.5)


def test_holm_hand_worked():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, monotone)
    out = stats.holm([0.03, 0.01, 0.04, 0.02])
    assert [o["p_adj"] for o in out] == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert [o["reject"] for o in out] == [False, True, False, False]
    assert [o["level"] for o in out] == pytest.approx([1 - 0.05 / 2, 1 - 0.05 / 4, 1 - 0.05 / 1, 1 - 0.05 / 3])


def test_compare_arms_resolves_only_what_survives_the_correction():
    clear = {"rep": [2.0, 2.1, 2.2, 2.05, 2.15], "ll": [1.0, 1.1, 1.05, 1.0, 1.1]}
    noisy = {"rep": [1.0, 1.3, 0.9, 1.2, 1.0], "ll": [1.1, 1.0, 1.0, 1.1, 1.05]}
    out = stats.compare_arms({"clear": clear, "noisy": noisy}, [("clear", "rep", "ll"), ("noisy", "rep", "ll"),
                                                                 ("clear", "ll", "rep")])
    assert out[0]["verdict"] == "rep > ll" and out[2]["verdict"] == "ll < rep"
    assert out[1]["verdict"] == "no difference resolved"
    # the corrected interval is wider than the raw one
    assert out[0]["lo_holm"] < out[0]["lo"] and out[0]["hi_holm"] > out[0]["hi"]


def test_bootstrap_median_difference_brackets_the_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, generator=g, dtype=torch.float64) + 1.0
    b = torch.randn(200, generator=g, dtype=torch.float64) + 3.0
    r = stats.bootstrap_median_difference(torch.cat([a, torch.tensor([math.inf])]), b)
    assert r["diff"] == pytest.approx(float(a.median() - b.median()))  # the inf (unbroken point) is dropped
    assert r["lo"] < r["diff"] < r["hi"] and r["lo"] > -2.5 and r["hi"] < -1.5
    same = stats.bootstrap_median_difference(b, b)
    assert same["lo"] < 0 < same["hi"]
