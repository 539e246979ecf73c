"""Counters behind ``cache.stats()``, per model and per FromCache region."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("sa_redis_cache")

COUNTERS = (
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
)


_TOTAL = "\x00total"


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
    ) -> None:
        self._lock = threading.Lock()
        self._counts: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self.warn_below = warn_below
        self.warn_min_lookups = warn_min_lookups
        self.warn_window = warn_window
        self._clock = clock
        # per model: when the current window began, and its hits and misses then
        self._windows: dict[str, tuple[float, int, int]] = {}

    def incr(
        self, scope: str, counter: str, amount: int = 1, *, also: tuple[str, ...] = ()
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

    def incr_total(self, counter: str, amount: int = 1) -> None:
        """Count an event that belongs to no model or region (a failed commit script)."""
        with self._lock:
            self._counts[_TOTAL][counter] += amount

    def snapshot(self) -> dict[str, Any]:
        """All counters with hit rates: ``{"total", "models", "regions", "functions"}``."""
        with self._lock:
            counts = {scope: dict(values) for scope, values in self._counts.items()}
        total = counts.pop(_TOTAL, {})
        out: dict[str, Any] = {
            "total": _with_rate(total),
            "models": {},
            "regions": {},
            "functions": {},
        }
        groups = {"model": "models", "region": "regions", "function": "functions"}
        for scope, values in counts.items():
            kind, _, name = scope.partition(":")
            out.setdefault(groups.get(kind, kind), {})[name] = _with_rate(values)
        return out

    def reset(self) -> None:
        """Forget every counter."""
        with self._lock:
            self._counts.clear()


def _with_rate(values: dict[str, int]) -> dict[str, Any]:
    full: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    full.update(values)
    looked = full["hits"] + full["misses"]
    full["hit_rate"] = full["hits"] / looked if looked else None
    return full
