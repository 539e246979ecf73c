"""Counters and latency histograms behind ``cache.stats()``, per model and per region."""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

Counter = Literal[
    "hits",
    "misses",
    "fills",
    "fill_refused",
    "errors",
    "decode_errors",
    "oversize",
    "uncacheable",
    "bypassed",
    "invalidations",
    "lease_waits",
    "early_refreshes",
    "stale_served",
    "queued",
    "pending_hits",
    "local_hits",
    "local_misses",
    "fence_waits",
    "fence_timeouts",
    "write_through_fallbacks",
]
"""Every counter of ``cache.stats()``: a name outside this list does not type-check."""

COUNTERS: tuple[Counter, ...] = get_args(Counter)
"""The counters, in the order ``cache.stats()`` and Prometheus list them."""

ScopeKind = Literal["model", "region", "function"]
"""What a scope of ``cache.stats()`` counts for: ``model:<class>``, ``region:<FromCache
region>`` or ``function:<cache.cached prefix>``."""


def scope(kind: ScopeKind, name: str) -> str:
    """The scope name of one model, region or cached function.

    Example::

        >>> scope("model", "Product")
        'model:Product'
    """
    return f"{kind}:{name}"


# upper bounds in seconds: a hit takes about 150 us, a miss a database read (milliseconds),
# a call stuck on a Redis timeout 250 ms; the last bucket (+Inf) takes the rest
BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

Operation = Literal["read", "hit", "miss", "fill", "invalidate", "write_behind_enqueue"]
"""An operation timed by the library; a read is recorded under its outcome (``hit``,
``miss``, or ``error`` when Redis failed)."""

OPERATIONS: tuple[str, ...] = ("hit", "miss", "fill", "invalidate", "write_behind_enqueue")
"""The operations histograms are kept for (a read appears under its outcome)."""

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

_TOTAL = "\x00total"
_GROUPS = {"model": "models", "region": "regions", "function": "functions"}


class Histogram:
    """Observations of one operation in one scope: per-bucket counts, their sum and count.

    ``counts[i]`` counts the observations in bucket ``i`` alone (at most ``BUCKETS[i]``,
    above ``BUCKETS[i - 1]``); the last holds those above every bound.

    Example::

        >>> h = Histogram()
        >>> h.add(bisect_left(BUCKETS, 0.0003), 0.0003)  # bucket 2: (0.00025, 0.0005]
        >>> h.cumulative()[1:3], h.quantile(0.5)
        ([0, 1], 0.000375)
    """

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, slot: int, seconds: float) -> None:
        """Count one observation of ``seconds`` in bucket ``slot`` (``bisect_left(BUCKETS, s)``)."""
        self.counts[slot] += 1
        self.sum += seconds
        self.count += 1

    def copy(self) -> Histogram:
        """An independent copy (snapshots are taken under the lock, read outside it)."""
        other = Histogram()
        other.counts = self.counts.copy()
        other.sum = self.sum
        other.count = self.count
        return other

    def cumulative(self) -> list[int]:
        """Observations at most each bound of ``BUCKETS``, then all of them (``+Inf``)."""
        out: list[int] = []
        seen = 0
        for n in self.counts:
            seen += n
            out.append(seen)
        return out

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated inside its bucket as Prometheus does; None if empty.

        Observations above the last bound are reported at that bound: the estimate says
        "at least 2.5 s" there, not how much more.
        """
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        lower = 0.0
        for upper, n in zip(BUCKETS, self.counts, strict=False):
            if n and seen + n >= rank:
                return lower + (upper - lower) * (rank - seen) / n
            seen += n
            lower = upper
        return BUCKETS[-1]

    def summary(self) -> dict[str, Any]:
        """``count``, ``sum`` (seconds) and the ``p50``, ``p95`` and ``p99`` estimates."""
        out: dict[str, Any] = {"count": self.count, "sum": self.sum}
        for name, q in QUANTILES:
            out[name] = self.quantile(q)
        return out


class Stats:
    """Thread-safe event counters grouped by scope (``model:Product``, ``region:books``).

    Example::

        >>> s = Stats()
        >>> s.incr("region:default", "hits")
        >>> s.snapshot()["regions"]["default"]["hits"]
        1
    """

    def __init__(
        self,
        *,
        warn_below: float | None = 0.8,
        warn_min_lookups: int = 200,
        warn_window: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        before_snapshot: Callable[[], None] | None = None,
    ) -> None:
        # counts still owed by Redis (a fill's reply not read yet) are read before a snapshot
        self._before_snapshot = before_snapshot
        self._lock = threading.Lock()
        self._counts: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._latency: dict[tuple[str, str], Histogram] = {}
        self.warn_below = warn_below
        self.warn_min_lookups = warn_min_lookups
        self.warn_window = warn_window
        self._clock = clock
        # per model: when the current window began, and its hits and misses then
        self._windows: dict[str, tuple[float, int, int]] = {}

    def incr(
        self, scope: str, counter: Counter, amount: int = 1, *, also: tuple[str, ...] = ()
    ) -> None:
        """Add ``amount`` to ``counter`` of ``scope`` (and of the ``also`` scopes).

        One event is counted once in the total, however many scopes it is reported in:
        a FromCache hit counts in its region and in each model it read.
        """
        with self._lock:
            counts = self._counts
            counts[scope][counter] += amount
            for other in also:
                counts[other][counter] += amount
            counts[_TOTAL][counter] += amount
            if counter == "misses" and self.warn_below is not None:
                # judged on misses only: a model with a low hit rate misses often, and
                # the hit path pays nothing for the watch
                for name in (scope, *also):
                    if name.startswith("model:"):
                        self._judge(name, counts[name])

    def incr_each(
        self, scope: str, counters: tuple[Counter, ...], also: tuple[str, ...] = ()
    ) -> None:
        """Add one to each of ``counters`` (not ``misses``) under one lock, as :meth:`incr`.

        Example::

            stats.incr_each("region:default", ("hits", "local_hits"))
        """
        with self._lock:
            counts = self._counts
            for name in (scope, *also, _TOTAL):
                values = counts[name]
                for counter in counters:
                    values[counter] += 1

    def _judge(self, scope: str, values: defaultdict[str, int]) -> None:
        now = self._clock()
        hits, misses = values["hits"], values["misses"]
        window = self._windows.get(scope)
        if window is None:
            self._windows[scope] = (now, hits, misses)
            return
        started, hits_then, misses_then = window
        if now - started < self.warn_window:
            return
        self._windows[scope] = (now, hits, misses)
        looked = (hits - hits_then) + (misses - misses_then)
        if looked < self.warn_min_lookups or self.warn_below is None:
            return
        rate = (hits - hits_then) / looked
        if rate < self.warn_below:
            log.warning(
                "cache hit rate of %s is %.0f%% over the last %d lookups (below %.0f%%): "
                "the TTL may be too short, or the data changes too often to cache",
                scope.partition(":")[2],
                rate * 100,
                looked,
                self.warn_below * 100,
                extra={"sarc_scope": scope, "sarc_hit_rate": rate, "sarc_lookups": looked},
            )

    def hit(
        self,
        scope: str | None,
        seconds: float,
        *,
        also: tuple[str, ...] = (),
        counters: tuple[Counter, ...] = ("hits",),
    ) -> None:
        """Count a hit (``counters``) and record its latency under ``"hit"``, under one lock:
        :meth:`incr_each` and :meth:`observe` at once, for the path every hit takes.

        Example::

            >>> s = Stats()
            >>> s.hit("model:Product", 0.0001)
            >>> s.snapshot()["models"]["Product"]["hits"]
            1
        """
        slot = bisect_left(BUCKETS, seconds)
        names = (*also, _TOTAL) if scope is None else (scope, *also, _TOTAL)
        with self._lock:
            counts = self._counts
            latency = self._latency
            for name in names:
                values = counts[name]
                for counter in counters:
                    values[counter] += 1
                histogram = latency.get((name, "hit"))
                if histogram is None:
                    histogram = latency[name, "hit"] = Histogram()
                histogram.counts[slot] += 1
                histogram.sum += seconds
                histogram.count += 1

    def observe(
        self, scope: str | None, operation: str, seconds: float, *, also: tuple[str, ...] = ()
    ) -> None:
        """Record that ``operation`` took ``seconds`` in ``scope`` (and the ``also`` scopes).

        Counted once in the total, as :meth:`incr` does; ``scope`` None records in the
        ``also`` scopes and the total only. :meth:`CacheContext.measure
        <sa_redis_cache.context.CacheContext.measure>` times a call and calls this.

        Example::

            >>> s = Stats()
            >>> s.observe("model:Product", "fill", 0.0004)
            >>> s.snapshot()["latency"]["models"]["Product"]["fill"]["count"]
            1
        """
        slot = bisect_left(BUCKETS, seconds)
        names = (*also, _TOTAL) if scope is None else (scope, *also, _TOTAL)
        with self._lock:
            latency = self._latency
            for name in names:
                histogram = latency.get((name, operation))
                if histogram is None:
                    histogram = latency[name, operation] = Histogram()
                # Histogram.add, inlined: this runs on every cache call
                histogram.counts[slot] += 1
                histogram.sum += seconds
                histogram.count += 1

    def histograms(self) -> dict[str, Any]:
        """Copies of the latency histograms, grouped as :meth:`snapshot` groups counters.

        ``{"total": {operation: Histogram}, "models": {name: {operation: Histogram}},
        "regions": {...}, "functions": {...}}``; the Prometheus collector exports these.
        """
        with self._lock:
            copies = [(key, histogram.copy()) for key, histogram in self._latency.items()]
        out: dict[str, Any] = {"total": {}, "models": {}, "regions": {}, "functions": {}}
        for (scope, operation), histogram in copies:
            if scope == _TOTAL:
                out["total"][operation] = histogram
                continue
            kind, _, name = scope.partition(":")
            group = out.setdefault(_GROUPS.get(kind, kind), {})
            group.setdefault(name, {})[operation] = histogram
        return out

    def incr_total(self, counter: Counter, amount: int = 1) -> None:
        """Count an event that belongs to no model or region (a failed commit script)."""
        with self._lock:
            self._counts[_TOTAL][counter] += amount

    def snapshot(self, *, settled: bool = True) -> dict[str, Any]:
        """All counters with hit rates: ``{"total", "models", "regions", "functions"}``.

        ``settled``: the counts Redis still owes (a fill's reply not read yet) are read
        first; False for a caller that must not wait on Redis for counts it does not use.

        ``"latency"`` holds the histograms' summaries in the same groups:
        ``{"total": {operation: summary}, "models": {name: {operation: summary}}, ...}``
        with each summary as :meth:`Histogram.summary` gives it.
        """
        if settled:
            self._settle()
        with self._lock:
            counts = {scope: dict(values) for scope, values in self._counts.items()}
        total = counts.pop(_TOTAL, {})
        out: dict[str, Any] = {
            "total": _with_rate(total),
            "models": {},
            "regions": {},
            "functions": {},
        }
        for scope, values in counts.items():
            kind, _, name = scope.partition(":")
            out.setdefault(_GROUPS.get(kind, kind), {})[name] = _with_rate(values)
        histograms = self.histograms()
        latency: dict[str, Any] = {
            "total": {op: h.summary() for op, h in histograms.pop("total").items()}
        }
        for group, scopes in histograms.items():
            latency[group] = {
                name: {op: h.summary() for op, h in ops.items()} for name, ops in scopes.items()
            }
        out["latency"] = latency
        return out

    def _settle(self) -> None:
        if self._before_snapshot is not None:
            self._before_snapshot()

    def reset(self) -> None:
        """Forget every counter and histogram, and what Redis still owed them (the fill
        replies that came within the wait of :meth:`snapshot`)."""
        self._settle()
        with self._lock:
            self._counts.clear()
            self._latency.clear()


def _with_rate(values: dict[str, int]) -> dict[str, Any]:
    full: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    full.update(values)
    looked = full["hits"] + full["misses"]
    full["hit_rate"] = full["hits"] / looked if looked else None
    return full
