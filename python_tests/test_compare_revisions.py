"""bench/compare_revisions.py: the statistics of the same-run comparison on inputs whose answer
is known, and the tool end to end on two trees (tiny cases, 3 rounds; no timed assertions)."""
import importlib.util
import json
import os
import shutil
import statistics

import numpy as np
import pytest

import specreg_fast
from specreg_fast.benchmarks import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("compare_revisions", os.path.join(ROOT, "bench", "compare_revisions.py"))
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)


# ----------------------------------------------------------------------------- statistics
def test_b_exactly_twice_a_gives_the_interval_2_2_and_fails():
    # rounds that differ (machine drift) but B = 2 A within each round: every resample of the
    # paired rounds has ratio exactly 2 (resampling A and B independently would spread it)
    a = [1.0 + 0.37 * i + 0.05 * (i % 3) for i in range(15)]
    b = [2 * x for x in a]
    st = cr.ratio_interval(a, b)
    assert (st["ratio"], st["low"], st["high"]) == (2.0, 2.0, 2.0)
    assert st["median_a"] == statistics.median(a) and st["median_b"] == 2 * statistics.median(a)
    assert cr.verdict(st["low"]) == "FAIL"


def test_equal_times_give_the_interval_1_1_and_pass():
    a = [3.0, 1.0, 2.0, 5.0, 4.0, 2.5]
    st = cr.ratio_interval(a, list(a))
    assert (st["ratio"], st["low"], st["high"]) == (1.0, 1.0, 1.0)
    assert cr.verdict(st["low"]) == "PASS"


def test_interval_of_two_rounds_is_the_known_resampling_distribution():
    # a = (1, 1), b = (1, 3): a resample of the 2 rounds is (0,0) with probability 1/4 (ratio 1),
    # (1,1) with 1/4 (ratio 3), mixed with 1/2 (median of b = 2): the 2.5% and 97.5% quantiles
    # of 2000 resamples are 1 and 3
    st = cr.ratio_interval([1.0, 1.0], [1.0, 3.0], n_boot=2000, seed=5)
    assert (st["ratio"], st["low"], st["high"]) == (2.0, 1.0, 3.0)
    # a 50% interval lies in the middle atom
    st = cr.ratio_interval([1.0, 1.0], [1.0, 3.0], level=0.5, seed=5)
    assert (st["low"], st["high"]) == (2.0, 2.0)


def test_quantile_matches_numpys_linear_quantile():
    xs = sorted(np.random.default_rng(0).standard_normal(37).tolist())
    for q in (0.0, 0.025, 0.3, 0.5, 0.975, 1.0):
        assert cr._quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)), rel=0, abs=1e-12)


def test_the_rule_fails_only_above_the_threshold():
    assert cr.verdict(1.05) == "PASS"
    assert cr.verdict(1.0501) == "FAIL"
    assert cr.verdict(0.5) == "PASS"


def test_statistics_errors_name_the_argument():
    with pytest.raises(ValueError, match="a and b must have one time per round"):
        cr.ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 rounds"):
        cr.ratio_interval([1.0], [1.0])
    with pytest.raises(ValueError, match="positive finite"):
        cr.ratio_interval([1.0, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="n_boot"):
        cr.ratio_interval([1.0, 2.0], [1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="level"):
        cr.ratio_interval([1.0, 2.0], [1.0, 2.0], level=1.5)


# ----------------------------------------------------------------------------- cases
def test_quick_shapes_are_the_suites():
    for key in ("dense", "mlp", "conv", "circular"):
        assert cr.SIZES["quick"][key] == suite.SIZES["quick"][key], key


def test_case_filter():
    assert cr.select_cases("tiny", ["dense_step/*", "penalty/mlp"]) == ["dense_step/64x48", "dense_step/mlp",
                                                                       "penalty/mlp"]
    assert cr.select_cases("quick", None) == cr.case_names("quick")
    with pytest.raises(ValueError, match="--cases: 'nope/\\*' matches no case"):
        cr.select_cases("tiny", ["dense_step/*", "nope/*"])


def test_bad_trees_and_options(tmp_path, capsys):
    with pytest.raises(ValueError, match="--a: .* is not a specreg_fast source tree"):
        cr.check_tree("--a", str(tmp_path))
    (tmp_path / "specreg_fast").mkdir()
    (tmp_path / "specreg_fast" / "__init__.py").write_text("")
    with pytest.raises(ValueError, match="--b: no compiled extension specreg_fast/_C\\*.so"):
        cr.check_tree("--b", str(tmp_path))
    with pytest.raises(ValueError, match="rounds must be an int >= 2"):
        cr.compare(ROOT, ROOT, rounds=1)
    with pytest.raises(ValueError, match="round_stat must be one of"):
        cr.compare(ROOT, ROOT, round_stat="mean")
    with pytest.raises(SystemExit) as e:
        cr.main(["--a", str(tmp_path), "--b", ROOT, "--size", "tiny"])
    assert e.value.code == 2
    assert "--a: no compiled extension" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not specreg_fast.HAS_CPP_EXT, reason="the tool compares builds of the compiled extension")
def test_two_trees_end_to_end(tmp_path, capsys):
    # B: a copy of this tree's package (with its extension), so each worker must import its own
    other = tmp_path / "other"
    shutil.copytree(os.path.join(ROOT, "specreg_fast"), other / "specreg_fast",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "cmp.json"
    rc = cr.main(["--a", ROOT, "--b", str(other), "--rounds", "3", "--size", "tiny", "--cases", "dense_step/*",
                  "conv_norms/*", "accumulate_grad/mlp", "--n-boot", "200", "--min-time", "0", "--json", str(out)])
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["a"]["package"] == os.path.join(ROOT, "specreg_fast", "__init__.py")
    assert res["b"]["package"] == str(other / "specreg_fast" / "__init__.py")
    assert res["rounds"] == 3 and res["order"] == ["AB", "BA", "AB"] and res["threads"] == 2
    assert {"torch", "threads"} <= set(res["machine"])
    names = ["dense_step/64x48", "dense_step/mlp", "conv_norms/4-8k3s2@8", "accumulate_grad/mlp"]
    assert [r["case"] for r in res["rows"]] == names
    assert res["round_stat"] == "median" and res["calls"] == 3
    for r in res["rows"]:
        assert len(r["a_s"]) == len(r["b_s"]) == 3 and r["inner"] == 1  # --min-time 0: one call a sample
        # a round's time is the median of its samples
        assert r["a_s"] == [statistics.median(c) for c in r["a_calls_s"]]
        assert r["b_s"] == [statistics.median(c) for c in r["b_calls_s"]]
        assert all(len(c) == 3 for c in r["a_calls_s"] + r["b_calls_s"])
        assert r["median_a_s"] == statistics.median(r["a_s"]) and r["median_b_s"] == statistics.median(r["b_s"])
        assert r["ratio"] == r["median_b_s"] / r["median_a_s"]
        assert r["ci_low"] <= r["ci_high"]
        assert r["verdict"] == ("FAIL" if r["ci_low"] > 1.05 else "PASS")
        assert r["case"] in table
    assert rc == (1 if any(r["verdict"] == "FAIL" for r in res["rows"]) else 0)
    assert "95% interval" in table and "verdict" in table
    assert "Only 3 rounds: too few for the regression guard" in table
