"""Noise-robust speed statistics: paired per-round ratios, Hodges-Lehmann estimates and exact intervals.

A shared runner's speed drifts by tens of percent within minutes, so a candidate's decode speed is
only ever compared with baseline runs *adjacent in time*: :func:`bracketed_log_ratios` pairs every
candidate run with the nearest baseline run before and after it (``log c - mean(log b_before,
log b_after)``). One log-ratio per round is then summarised without assuming normality:

- :func:`one_sample` (the paired ratios of one run): the Hodges-Lehmann estimate (median of the Walsh
  averages) with the exact distribution-free interval of the Wilcoxon signed-rank test
  (Hollander, Wolfe & Chicken, *Nonparametric Statistical Methods*, 3rd ed., section 3.2);
- :func:`two_sample` (the paired ratios of two runs, e.g. today against a stored run): the
  Hodges-Lehmann shift (median of all pairwise differences) with the exact Mann-Whitney interval
  (ibid., section 4.3).

Both intervals are exact for any continuous distribution symmetric about its centre (one sample) or
for a pure shift (two samples). Few rounds cannot reach every confidence: the narrowest interval
whose coverage is at least the one asked for is used, and with too few rounds for that the widest
one (from the smallest to the largest value), whose real coverage (75% at 3 paired rounds, 87.5% at
4, 93.75% at 5) is reported beside it. Everything is deterministic: the same numbers give the same
interval. Pure Python, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

DEFAULT_CONFIDENCE = 0.90
SpeedState = Literal["pass", "fail", "undecided"]


@dataclass(frozen=True)
class Interval:
    """A location estimate with its exact interval; ``coverage`` is the interval's real confidence
    (0 when one value gives no interval)."""

    estimate: float
    lo: float
    hi: float
    coverage: float
    n: int


@lru_cache(maxsize=None)
def _signed_rank_counts(n: int) -> tuple[int, ...]:
    """``counts[w]``: subsets of ``{1..n}`` whose sum is ``w`` (the null distribution of Wilcoxon's W)."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    for rank in range(1, n + 1):
        for w in range(len(counts) - 1, rank - 1, -1):
            counts[w] += counts[w - rank]
    return tuple(counts)


@lru_cache(maxsize=None)
def _rank_sum_counts(n: int, m: int) -> tuple[int, ...]:
    """``counts[u]``: arrangements of ``n`` x's among ``n + m`` values with Mann-Whitney ``U = u``."""
    # table[i][j][u] by the recurrence on the largest value: it is an x (adds j to U) or a y
    table = [[[1] if i == 0 or j == 0 else [] for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            with_x, with_y = table[i - 1][j], table[i][j - 1]
            row = [0] * (i * j + 1)
            for u, c in enumerate(with_x):
                row[u + j] += c
            for u, c in enumerate(with_y):
                row[u] += c
            table[i][j] = row
    return tuple(table[n][m])


def _depth(counts: Sequence[int], confidence: float) -> tuple[int, float]:
    """``k`` (1-based) such that ``[sorted[k-1], sorted[M-k]]`` covers at least ``confidence``, as
    narrow as that allows, and its real coverage; ``k = 1`` (the full range) when none does."""
    total = sum(counts)
    alpha_half = (1.0 - confidence) / 2.0
    tail, k = 0, 0
    while k < len(counts) and (tail + counts[k]) / total <= alpha_half:
        tail += counts[k]
        k += 1
    if k == 0:
        return 1, 1.0 - 2.0 * counts[0] / total
    return k, 1.0 - 2.0 * tail / total


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def one_sample(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Hodges-Lehmann estimate and exact signed-rank interval of the centre of ``values``.

    ValueError when ``values`` is empty or holds a non-finite number."""
    values = _finite(values)
    n = len(values)
    walsh = sorted((values[i] + values[j]) / 2.0 for i in range(n) for j in range(i, n))
    estimate = _median(walsh)
    if n == 1:
        return Interval(estimate, estimate, estimate, 0.0, 1)
    k, coverage = _depth(_signed_rank_counts(n), confidence)
    return Interval(estimate, walsh[k - 1], walsh[len(walsh) - k], coverage, n)


def two_sample(new: Sequence[float], old: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Hodges-Lehmann shift ``new - old`` and its exact Mann-Whitney interval.

    ValueError when either side is empty or holds a non-finite number."""
    new, old = _finite(new), _finite(old)
    diffs = sorted(x - y for x in new for y in old)
    estimate = _median(diffs)
    if len(diffs) == 1:
        return Interval(estimate, estimate, estimate, 0.0, 1)
    k, coverage = _depth(_rank_sum_counts(len(new), len(old)), confidence)
    return Interval(estimate, diffs[k - 1], diffs[len(diffs) - k], coverage, min(len(new), len(old)))


def _finite(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError("no values")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"non-finite value in {out}")
    return out


def bracketed_log_ratios(sequence: Sequence[tuple[str, float]], baseline: str) -> dict[str, list[float]]:
    """Per candidate, one ``log(c / sqrt(b_before * b_after))`` per run, in run order.

    ``sequence`` is every run in the order it ran, as ``(name, tok/s)``; runs named ``baseline`` are
    the baseline. Each candidate run is paired with the nearest baseline run before it and the nearest
    after it (just one of them at either end of the sequence). ValueError when the sequence holds no
    baseline run or a speed that is not positive."""
    if not any(name == baseline for name, _ in sequence):
        raise ValueError(f"no {baseline!r} run in the sequence")
    if any(not speed > 0 for _, speed in sequence):
        raise ValueError("every speed must be positive")
    logs = [(name, math.log(speed)) for name, speed in sequence]
    out: dict[str, list[float]] = {}
    for i, (name, value) in enumerate(logs):
        if name == baseline:
            continue
        before = next((v for n, v in reversed(logs[:i]) if n == baseline), None)
        after = next((v for n, v in logs[i + 1:] if n == baseline), None)
        sides = [v for v in (before, after) if v is not None]
        out.setdefault(name, []).append(value - sum(sides) / len(sides))
    return out


@dataclass(frozen=True)
class DropVerdict:
    """A decode-speed drop ``1 - candidate/baseline`` with its interval, against a limit.

    ``state``: ``pass`` (the whole interval is within the limit), ``fail`` (the whole interval is
    beyond it) or ``undecided`` (the interval straddles the limit)."""

    state: SpeedState
    drop: float
    drop_lo: float
    drop_hi: float
    coverage: float
    rounds: int
    limit: float


def drop_verdict(log_ratios: Sequence[float], limit: float, confidence: float = DEFAULT_CONFIDENCE) -> DropVerdict:
    """Judge the paired log-ratios of one candidate against a maximum drop ``limit`` (0.05 = 5%).

    With one round the interval is the single value (coverage 0) and the verdict is that value's."""
    interval = one_sample(log_ratios, confidence)
    drop, drop_lo, drop_hi = (1.0 - math.exp(x) for x in (interval.estimate, interval.hi, interval.lo))
    state: SpeedState = "pass" if drop_hi <= limit else "fail" if drop_lo > limit else "undecided"
    return DropVerdict(state, drop, drop_lo, drop_hi, interval.coverage, interval.n, limit)
