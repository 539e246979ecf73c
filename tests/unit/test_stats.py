"""Counters, totals, and the low-hit-rate warning (once per window, with enough traffic)."""

from __future__ import annotations

import logging

import pytest

from sa_redis_cache.stats import Stats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lookups(stats: Stats, hits: int, misses: int) -> None:
    for _ in range(hits):
        stats.incr("region:r", "hits", also=("model:Product",))
    for _ in range(misses):
        stats.incr("region:r", "misses", also=("model:Product",))


def test_one_event_counts_once_in_the_total() -> None:
    stats = Stats()
    lookups(stats, 3, 1)
    snapshot = stats.snapshot()
    assert snapshot["total"]["hits"] == 3
    assert snapshot["models"]["Product"]["hits"] == 3
    assert snapshot["regions"]["r"]["hit_rate"] == 0.75


def test_low_hit_rate_warns_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    stats = Stats(warn_below=0.8, warn_min_lookups=100, warn_window=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
        lookups(stats, 0, 1)  # opens the window
        lookups(stats, 50, 50)
        clock.now = 61
        lookups(stats, 0, 1)  # judged: 50 / 101 lookups hit
        lookups(stats, 0, 100)  # same window: no second warning
    warnings = [r for r in caplog.records if "hit rate of Product" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].sarc_lookups == 101  # type: ignore[attr-defined]


def test_no_warning_without_enough_traffic_or_with_a_good_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    stats = Stats(warn_below=0.8, warn_min_lookups=100, warn_window=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
        lookups(stats, 0, 1)
        lookups(stats, 5, 5)
        clock.now = 61
        lookups(stats, 0, 1)  # 11 lookups: not enough to judge
        lookups(stats, 950, 49)
        clock.now = 122
        lookups(stats, 0, 1)  # 95% hits
    assert not [r for r in caplog.records if "hit rate" in r.getMessage()]
