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
)


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

    def incr(self, scope: str, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to ``counter`` of ``scope``."""
        with self._lock:
            self._counts[scope][counter] += amount

    def snapshot(self) -> dict[str, Any]:
        """All counters with hit rates: ``{"total", "models", "regions", "functions"}``."""
        with self._lock:
            counts = {scope: dict(values) for scope, values in self._counts.items()}
        out: dict[str, Any] = {
            "total": _with_rate({}),
            "models": {},
            "regions": {},
            "functions": {},
        }
        total: dict[str, int] = defaultdict(int)
        groups = {"model": "models", "region": "regions", "function": "functions"}
        for scope, values in counts.items():
            kind, _, name = scope.partition(":")
            out[groups.get(kind, kind)][name] = _with_rate(values)
            for counter, value in values.items():
                total[counter] += value
        out["total"] = _with_rate(dict(total))
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
