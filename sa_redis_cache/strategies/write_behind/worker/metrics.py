"""Prometheus metrics of a flush worker, read from :meth:`FlushWorker.stats` at scrape time.

Nothing is added to the flush path: each scrape costs one Redis round trip (``XLEN``,
the lease and the oldest entry of every partition; a second one counts the entries read
and not yet trimmed) and, with ``database=True``, one ``count(*)`` of the open dead
letters. Needs the ``prometheus`` extra.

=====================================  =======  =============================================
metric                                 type     labels, meaning
=====================================  =======  =============================================
``sarc_wb_queue_length``               gauge    namespace, table, partition: ``XLEN``
``sarc_wb_queue_pending``              gauge    ... entries delivered and not acknowledged
``sarc_wb_lag_seconds``                gauge    ... age of the oldest entry not yet applied
``sarc_wb_partition_held``             gauge    ... 1 when this worker holds the lease
``sarc_wb_rows_applied_total``         counter  namespace, consumer: rows written
``sarc_wb_entries_total``              counter  ... stream entries processed
``sarc_wb_batches_total``              counter  ... batches committed and acknowledged
``sarc_wb_errors_total``               counter  ... failed attempts (retried)
``sarc_wb_dead_letters_total``         counter  ... operations this worker dead-lettered
``sarc_wb_dead_letters_unreplayed``    gauge    namespace, source: unreplayed dead letters
                                                (``source="database"``), or this worker's
                                                count when the database cannot be asked
                                                (``source="worker"``)
``sarc_wb_fenced_total``               counter  namespace, consumer: batches refused because
                                                another worker had taken the partition
``sarc_wb_queue_up``                   gauge    namespace: 0 when Redis did not answer
``sarc_wb_database_up``                gauge    namespace, consumer: 0 while the worker
                                                cannot reach its database (it retries)
``sarc_wb_database_down_seconds``      gauge    ... how long it has not reached it (0 when up)
=====================================  =======  =============================================

Example::

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(WorkerCollector(worker))
    start_http_server(9109)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .flush import FlushWorker
    from .stats import WorkerStats

log = logging.getLogger(__name__)

_COUNTERS = (
    ("rows_applied", "rows_applied", "Rows the write-behind worker wrote to the database"),
    ("entries", "entries", "Write-behind stream entries the worker processed"),
    ("batches", "batches", "Write-behind batches committed and acknowledged"),
    ("errors", "errors", "Failed write-behind flush attempts (retried with backoff)"),
    ("dead_letters", "dead_letters", "Write-behind operations this worker dead-lettered"),
    ("fenced", "fenced", "Write-behind batches refused: another worker held the partition"),
)
_PARTITION_GAUGES = (
    ("queue_length", "length", "Entries in a write-behind stream (not yet applied)"),
    ("queue_pending", "pending", "Write-behind entries delivered and not acknowledged"),
    ("lag_seconds", "lag_seconds", "Age of the oldest write-behind entry not yet applied"),
)


class WorkerCollector:
    """A Prometheus collector for one :class:`~sa_redis_cache.FlushWorker`.

    ``database=False`` skips the dead-letter ``count(*)`` (the gauge then reports the
    worker's own count, ``source="worker"``).

    Example::

        from prometheus_client import REGISTRY
        REGISTRY.register(WorkerCollector(worker))
    """

    def __init__(self, worker: FlushWorker, *, database: bool = True) -> None:
        self.worker = worker
        self.database = database

    def collect(self) -> Iterator[Any]:
        """Build the metric families from the worker's stats (called at scrape time)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        worker = self.worker
        namespace = worker.namespace
        up = 1.0
        try:
            stats = worker.stats(database=self.database)
        except RedisError as exc:
            log.debug("write-behind metrics: Redis did not answer: %s", exc)
            stats = None
            up = 0.0
        if stats is not None:
            for name, attr, documentation in _PARTITION_GAUGES:
                family = GaugeMetricFamily(
                    f"sarc_wb_{name}", documentation, labels=["namespace", "table", "partition"]
                )
                for part in stats.partitions:
                    family.add_metric(
                        [namespace, part.table, str(part.partition)], getattr(part, attr)
                    )
                yield family
            held = GaugeMetricFamily(
                "sarc_wb_partition_held",
                "1 when this write-behind worker holds the partition's lease",
                labels=["namespace", "table", "partition"],
            )
            for part in stats.partitions:
                held.add_metric([namespace, part.table, str(part.partition)], float(part.held))
            yield held
        labels = [namespace, worker.consumer]
        for name, attr, documentation in _COUNTERS:
            counter = CounterMetricFamily(
                f"sarc_wb_{name}", documentation, labels=["namespace", "consumer"]
            )
            counter.add_metric(labels, _counter(worker, stats, attr))
            yield counter
        letters = GaugeMetricFamily(
            "sarc_wb_dead_letters_unreplayed",
            "Unreplayed write-behind dead letters (the database's count, or the worker's own)",
            labels=["namespace", "source"],
        )
        open_letters = None if stats is None else stats.open_dead_letters
        if open_letters is None:
            letters.add_metric([namespace, "worker"], worker.dead_letters)
        else:
            letters.add_metric([namespace, "database"], open_letters)
        yield letters
        queue_up = GaugeMetricFamily(
            "sarc_wb_queue_up", "1 when Redis answered this scrape", labels=["namespace"]
        )
        queue_up.add_metric([namespace], up)
        yield queue_up
        outage = worker.database
        database_up = GaugeMetricFamily(
            "sarc_wb_database_up",
            "0 while the write-behind worker cannot reach its database (it retries)",
            labels=["namespace", "consumer"],
        )
        database_up.add_metric(labels, float(outage.up))
        yield database_up
        down = GaugeMetricFamily(
            "sarc_wb_database_down_seconds",
            "How long the write-behind worker has not reached its database (0 when it does)",
            labels=["namespace", "consumer"],
        )
        down.add_metric(labels, outage.down_seconds())
        yield down


def _counter(worker: FlushWorker, stats: WorkerStats | None, attr: str) -> float:
    if stats is not None:
        return float(getattr(stats, attr))
    return float(getattr(worker, "applied" if attr == "rows_applied" else attr))


def expose_worker(
    worker: FlushWorker, *, port: int | None = None, addr: str = "127.0.0.1", registry: Any = None
) -> WorkerCollector:
    """Register a collector for ``worker``; serve Prometheus on ``port`` if given.

    Example::

        expose_worker(worker, port=9109)   # then scrape http://127.0.0.1:9109/metrics
    """
    from prometheus_client import REGISTRY, start_http_server

    collector = WorkerCollector(worker)
    target = REGISTRY if registry is None else registry
    target.register(collector)
    if port is not None:
        start_http_server(port, addr=addr, registry=target)
    return collector
