"""Prometheus metrics for a cache, read from its counters at scrape time.

Nothing is added to the read path: a collector turns ``cache.stats()`` and the latency
histograms (:meth:`Stats.histograms <sa_redis_cache.stats.Stats.histograms>`) into metric
families when Prometheus scrapes. Needs the ``prometheus`` extra
(``pip install 'sa-redis-cache[prometheus]'``).

A write-behind flush worker has a collector of its own, :class:`WorkerCollector` (queue
depth, pending entries and lag per partition, rows applied, dead letters), re-exported
here from :mod:`sa_redis_cache.strategies.write_behind.worker.metrics` with :func:`expose_worker`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .stats import BUCKETS, COUNTERS
from .strategies.write_behind.worker.metrics import WorkerCollector, expose_worker

__all__ = ["CacheCollector", "WorkerCollector", "expose", "expose_worker"]

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .cache import Cache

_GROUPS = (("models", "model"), ("regions", "region"), ("functions", "function"))


class CacheCollector:
    """A Prometheus collector for one :class:`~sa_redis_cache.Cache`.

    Counters are ``sarc_<event>_total`` labelled by namespace, scope kind (model, region,
    function) and scope name; gauges give the breaker's state (0 closed, 0.5 half-open,
    1 open), how many times it opened, and the tables whose invalidations wait for Redis;
    with a local tier, ``sarc_local_*`` gauges (entries, bytes, evictions, invalidation
    messages, seconds since the last one, lapses, reconnects, ready).
    ``sarc_latency_seconds`` is a histogram with the same labels and ``operation`` (``hit``,
    ``miss``, ``error``, ``fill``, ``invalidate``, ``write_behind_enqueue``).

    Example::

        from prometheus_client import REGISTRY, start_http_server
        REGISTRY.register(CacheCollector(cache))
        start_http_server(9108)
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Any]:
        """Build the metric families from the cache's counters (called at scrape time)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        namespace = self.cache.namespace
        snapshot = self.cache.stats()
        labels = ["namespace", "kind", "scope"]
        for counter in COUNTERS:
            family = CounterMetricFamily(
                f"sarc_{counter}", f"sa_redis_cache {counter.replace('_', ' ')}", labels=labels
            )
            for group, kind in _GROUPS:
                for name, values in snapshot[group].items():
                    family.add_metric([namespace, kind, name], values.get(counter, 0))
            family.add_metric([namespace, "total", ""], snapshot["total"].get(counter, 0))
            yield family
        inspector = self.cache.inspector
        yield self._latency(HistogramMetricFamily, inspector.latency())
        state = {"closed": 0.0, "half-open": 0.5, "open": 1.0}[inspector.breaker_state()]
        yield _gauge(
            GaugeMetricFamily,
            "sarc_breaker_open",
            "Redis circuit breaker: 0 closed, 0.5 half-open, 1 open",
            namespace,
            state,
        )
        yield _gauge(
            GaugeMetricFamily,
            "sarc_breaker_opened",
            "How many times the Redis circuit breaker opened",
            namespace,
            inspector.breaker_openings(),
        )
        yield _gauge(
            GaugeMetricFamily,
            "sarc_undelivered_tables",
            "Tables whose invalidations wait for Redis (the cache is not trusted for them)",
            namespace,
            len(inspector.undelivered_tables()),
        )
        local = snapshot.get("local")
        if local is not None:
            for name, key, documentation in _LOCAL_GAUGES:
                value = local[key]
                if value is None:
                    continue
                yield _gauge(GaugeMetricFamily, name, documentation, namespace, float(value))

    def _latency(self, family_type: Any, histograms: dict[str, Any]) -> Any:
        family = family_type(
            "sarc_latency_seconds",
            "sa_redis_cache call latency by operation (a read by its outcome)",
            labels=["namespace", "kind", "scope", "operation"],
        )
        bounds = [*map(str, BUCKETS), "+Inf"]
        namespace = self.cache.namespace
        scoped = [
            (kind, name, operations)
            for group, kind in _GROUPS
            for name, operations in histograms[group].items()
        ]
        scoped.append(("total", "", histograms["total"]))
        for kind, name, operations in scoped:
            for operation, histogram in sorted(operations.items()):
                family.add_metric(
                    [namespace, kind, name, operation],
                    list(zip(bounds, histogram.cumulative(), strict=True)),
                    histogram.sum,
                )
        return family


_LOCAL_GAUGES = (
    ("sarc_local_ready", "ready", "1 while the local tier receives invalidations, else 0"),
    ("sarc_local_entries", "entries", "Entries held by the local tier"),
    ("sarc_local_bytes", "bytes", "Estimated bytes held by the local tier"),
    ("sarc_local_evictions", "evictions", "Local entries evicted by the LRU limits, so far"),
    (
        "sarc_local_invalidation_messages",
        "invalidations",
        "Invalidation messages the local tier received from Redis, so far",
    ),
    (
        "sarc_local_seconds_since_invalidation",
        "seconds_since_invalidation",
        "Seconds since the local tier's last invalidation message",
    ),
    ("sarc_local_lapses", "lapses", "Times the local tier's lease lapsed and it was emptied"),
    (
        "sarc_local_reconnects",
        "reconnects",
        "Times the local tier lost its invalidation connection and was emptied",
    ),
)
"""The gauges of ``cache.stats()["local"]`` (``Cache(local=True)``) and their metric names."""


def _gauge(family_type: Any, name: str, documentation: str, namespace: str, value: float) -> Any:
    family = family_type(name, documentation, labels=["namespace"])
    family.add_metric([namespace], value)
    return family


def expose(cache: Cache, *, port: int | None = None, addr: str = "127.0.0.1") -> CacheCollector:
    """Register a collector for ``cache`` with Prometheus; serve it on ``port`` if given.

    Example::

        expose(cache, port=9108)   # then scrape http://127.0.0.1:9108/metrics
    """
    from prometheus_client import REGISTRY, start_http_server

    collector = CacheCollector(cache)
    REGISTRY.register(collector)
    if port is not None:
        start_http_server(port, addr=addr)
    return collector
