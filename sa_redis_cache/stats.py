"""Counters behind ``cache.stats()``, per model and per FromCache region."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

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

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )

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
