"""The benchmark statistics (specreg_fast.benchmarks.timing): the bootstrap interval of a ratio
of medians and the 5% verdict, on synthetic times with known answers (nothing is timed)."""
import pytest

from specreg_fast.benchmarks.timing import bootstrap_ratio_interval, verdict


def test_exact_ratio_gives_a_point_interval():
    # every round exactly 2x, the rounds themselves spread over 3 decades: only paired
    # resampling (the same rounds of both) gives exactly [2, 2]
    den = [0.5, 5.0, 50.0, 0.7, 3.0]
    num = [2 * d for d in den]
    assert bootstrap_ratio_interval(num, den) == (2.0, 2.0, 2.0)


def test_interval_spans_the_resampled_medians():
    # num's rounds are 1, 2, 3 against 1: a resample's median is 1, 2 or 3, and 1 and 3 each
    # come out with probability 7/27, far more than the 2.5% tails
    assert bootstrap_ratio_interval([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == (2.0, 1.0, 3.0)


def test_seeded():
    a, b = [1.0, 1.3, 0.9, 1.1, 1.7, 1.2], [1.0, 1.1, 1.0, 0.95, 1.2, 1.0]
    assert bootstrap_ratio_interval(a, b, seed=3) == bootstrap_ratio_interval(a, b, seed=3)
    r, lo, hi = bootstrap_ratio_interval(a, b)
    assert lo <= r <= hi


@pytest.mark.parametrize("kw,msg", [(dict(num=[1.0], den=[1.0]), "at least 2 rounds"),
                                    (dict(num=[1.0, 2.0], den=[1.0]), "one time per round"),
                                    (dict(num=[1.0, -2.0], den=[1.0, 1.0]), "positive finite"),
                                    (dict(num=[1.0, 2.0], den=[1.0, 1.0], level=1.0), "level"),
                                    (dict(num=[1.0, 2.0], den=[1.0, 1.0], n_boot=0), "n_boot")])
def test_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        bootstrap_ratio_interval(**kw)


def test_verdict():
    assert verdict(0.01, 0.049) == "below 5%"
    assert verdict(0.051, 0.2) == "above 5%"
    assert verdict(0.03, 0.07) == "unresolved (3.0-7.0%)"
