"""Counters, totals, the low-hit-rate warning (once per window, with enough traffic), and
the latency histograms: buckets, quantile estimates, scopes, measurements."""

from __future__ import annotations

import logging
import sys
import threading
from bisect import bisect_left

import pytest

from sa_redis_cache.stats import BUCKETS, Histogram, Stats
from sa_redis_cache.tracing import READ, Measurement


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


# -- latency histograms -----------------------------------------------------------------------


def test_an_observation_lands_in_the_first_bucket_whose_bound_holds_it() -> None:
    histogram = Histogram()
    for seconds in (0.0, 0.0001, 0.00010001, 2.5, 3.0):
        histogram.add(bisect_left(BUCKETS, seconds), seconds)
    # bounds are inclusive, as Prometheus' "le" is: 0.0001 is in the first bucket
    assert histogram.counts[0] == 2
    assert histogram.counts[1] == 1
    assert histogram.counts[len(BUCKETS) - 1] == 1  # 2.5
    assert histogram.counts[-1] == 1  # 3.0, above every bound
    cumulative = histogram.cumulative()
    assert cumulative == sorted(cumulative)
    assert cumulative[-1] == histogram.count == 5
    assert histogram.sum == pytest.approx(5.50020001)


def test_quantiles_interpolate_inside_their_bucket() -> None:
    histogram = Histogram()
    assert histogram.quantile(0.5) is None
    for _ in range(100):
        histogram.add(2, 0.0003)  # (0.00025, 0.0005]
    assert histogram.quantile(0.5) == pytest.approx(0.000375)
    assert histogram.quantile(0.99) == pytest.approx(0.0004975)
    for _ in range(100):
        histogram.add(len(BUCKETS), 10.0)  # above the last bound
    # half the observations are below 0.0005, the other half "at least 2.5 s"
    assert histogram.quantile(0.5) == pytest.approx(0.0005)
    assert histogram.quantile(0.99) == BUCKETS[-1]
    summary = histogram.summary()
    assert summary["count"] == 200
    assert summary["p95"] == BUCKETS[-1]


def test_an_observation_counts_once_in_the_total_and_in_every_scope() -> None:
    stats = Stats()
    stats.observe("region:r", "hit", 0.0002, also=("model:Product", "model:Category"))
    stats.observe(None, "invalidate", 0.001)
    latency = stats.snapshot()["latency"]
    assert latency["total"]["hit"]["count"] == 1
    assert latency["regions"]["r"]["hit"]["count"] == 1
    assert latency["models"]["Product"]["hit"]["count"] == 1
    assert latency["models"]["Category"]["hit"]["sum"] == pytest.approx(0.0002)
    assert latency["total"]["invalidate"]["count"] == 1  # no scope: the total only
    assert "invalidate" not in latency["models"]["Product"]
    histograms = stats.histograms()
    assert histograms["regions"]["r"]["hit"].cumulative()[1] == 1
    stats.reset()
    assert stats.snapshot()["latency"] == {
        "total": {},
        "models": {},
        "regions": {},
        "functions": {},
    }


def test_a_read_is_recorded_under_its_outcome_and_only_once() -> None:
    stats = Stats()
    read = Measurement(stats, "region:r", READ, ("model:Product",), "ns")
    read.done("hit")
    read.done("miss")  # already ended: nothing more is recorded
    fill = Measurement(stats, "model:Product", "fill", (), "ns")
    fill.done("refused")  # the outcome of any other operation goes to its span only
    with Measurement(stats, "model:Product", "invalidate", (), "ns"):
        pass
    with pytest.raises(ConnectionError), Measurement(stats, "region:r", READ, (), "ns"):
        raise ConnectionError
    latency = stats.snapshot()["latency"]
    assert {op: s["count"] for op, s in latency["total"].items()} == {
        "hit": 1,
        "fill": 1,
        "invalidate": 1,
        "error": 1,
    }
    assert set(latency["models"]["Product"]) == {"hit", "fill", "invalidate"}


def test_counts_and_histograms_lose_nothing_under_threads() -> None:
    """Hits, misses and their latencies from many threads at once are all counted:
    each call updates every scope's counters and histograms under the one lock."""
    stats = Stats(warn_below=None)
    threads, calls = 8, 2000
    start = threading.Barrier(threads)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            stats.hit("model:Product", 0.0001, also=("region:r",))
            stats.incr("model:Product", "misses", also=("region:r",))
            stats.observe("model:Product", "miss", 0.002, also=("region:r",))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        workers = [threading.Thread(target=work) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    total = threads * calls
    snap = stats.snapshot()
    for counts in (snap["total"], snap["models"]["Product"], snap["regions"]["r"]):
        assert (counts["hits"], counts["misses"]) == (total, total)
    histograms = stats.histograms()
    for ops in (histograms["total"], histograms["models"]["Product"], histograms["regions"]["r"]):
        assert ops["hit"].count == sum(ops["hit"].counts) == total
        assert ops["miss"].count == sum(ops["miss"].counts) == total
