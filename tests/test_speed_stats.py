"""Paired speed statistics: exact intervals checked against brute force, and the decode verdicts."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from h2o_gates.speed_stats import (
    _rank_sum_counts,
    _signed_rank_counts,
    bracketed_log_ratios,
    drop_verdict,
    one_sample,
    two_sample,
)

finite = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("n", range(1, 9))
def test_signed_rank_distribution_matches_enumeration(n):
    counts = [0] * (n * (n + 1) // 2 + 1)
    for signs in itertools.product((0, 1), repeat=n):
        counts[sum(rank for rank, s in zip(range(1, n + 1), signs) if s)] += 1
    assert list(_signed_rank_counts(n)) == counts


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (3, 3), (4, 2), (5, 5)])
def test_rank_sum_distribution_matches_enumeration(n, m):
    counts = [0] * (n * m + 1)
    for xs in itertools.combinations(range(n + m), n):
        ys = [i for i in range(n + m) if i not in xs]
        counts[sum(x > y for x in xs for y in ys)] += 1
    assert list(_rank_sum_counts(n, m)) == counts


def test_coverage_by_rounds():
    """Few rounds cannot reach 90%: the full range is used and its real coverage reported."""
    assert one_sample([1.0, 2.0, 3.0]).coverage == 0.75
    assert one_sample([1.0, 2.0, 3.0, 4.0]).coverage == 0.875
    assert one_sample([1.0, 2.0, 3.0, 4.0, 5.0]).coverage == 0.9375
    six = one_sample([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # the 3rd of the 21 Walsh averages from each end
    assert six.coverage == pytest.approx(1 - 6 / 64) and (six.lo, six.hi) == (2.0, 5.0)
    assert two_sample([1.0, 2.0, 3.0], [0.0, 0.5, 1.0]).coverage == pytest.approx(0.9)
    assert one_sample([0.3]) == one_sample([0.3]) and one_sample([0.3]).coverage == 0.0


@given(st.lists(finite, min_size=1, max_size=12))
def test_one_sample_interval_holds_the_estimate(values):
    r = one_sample(values)
    assert min(values) <= r.lo <= r.estimate <= r.hi <= max(values)
    shifted = one_sample([v + 0.5 for v in values])  # equivariant under a shift
    assert shifted.estimate == pytest.approx(r.estimate + 0.5) and shifted.lo == pytest.approx(r.lo + 0.5)


@given(st.lists(finite, min_size=1, max_size=8), st.lists(finite, min_size=1, max_size=8))
def test_two_sample_interval_holds_the_estimate(new, old):
    r = two_sample(new, old)
    assert min(new) - max(old) <= r.lo <= r.estimate <= r.hi <= max(new) - min(old)
    assert two_sample(old, new).estimate == pytest.approx(-r.estimate)


def test_one_sample_coverage_is_honest():
    """Simulated coverage of the 90% interval at 8 rounds of skewed noise around a known centre."""
    rng = random.Random(1)
    hits = 0
    trials = 2000
    for _ in range(trials):
        sample = [rng.choice((-1, 1)) * rng.expovariate(20.0) + 0.05 for _ in range(8)]  # symmetric, heavy-ish
        r = one_sample(sample)
        hits += r.lo <= 0.05 <= r.hi
    assert hits / trials >= r.coverage - 0.03


def test_bad_input_raises():
    with pytest.raises(ValueError, match="no values"):
        one_sample([])
    with pytest.raises(ValueError, match="non-finite"):
        two_sample([1.0], [math.nan])
    with pytest.raises(ValueError, match="no 'base' run"):
        bracketed_log_ratios([("c", 1.0)], "base")
    with pytest.raises(ValueError, match="positive"):
        bracketed_log_ratios([("base", 1.0), ("c", 0.0)], "base")


def test_bracketing_pairs_each_candidate_with_its_neighbours():
    seq = [("b", 10.0), ("x", 9.0), ("y", 12.0), ("b", 11.0), ("x", 10.0), ("b", 10.0), ("y", 10.0)]
    logs = bracketed_log_ratios(seq, "b")
    assert logs["x"] == pytest.approx([math.log(9 / math.sqrt(110)), math.log(10 / math.sqrt(110))])
    assert logs["y"] == pytest.approx([math.log(12 / math.sqrt(110)), math.log(10 / 10)])  # last: one neighbour


def test_drop_verdict_states():
    fast = [math.log(r) for r in (1.10, 1.08, 1.12)]
    slow = [math.log(r) for r in (0.85, 0.88, 0.86)]
    near = [math.log(r) for r in (0.97, 0.93, 0.95)]
    assert drop_verdict(fast, 0.05).state == "pass"
    assert drop_verdict(slow, 0.05).state == "fail"
    v = drop_verdict(near, 0.05)
    assert v.state == "undecided" and v.drop_lo <= 0.05 <= v.drop_hi and v.rounds == 3
    one = drop_verdict([math.log(0.9)], 0.05)
    assert one.state == "fail" and one.coverage == 0.0 and one.drop == pytest.approx(0.1)
