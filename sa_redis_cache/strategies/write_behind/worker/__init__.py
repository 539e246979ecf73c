"""The write-behind flush worker, dead-letter replay, and ``python -m sa_redis_cache.worker``.

* :class:`FlushWorker` drains the write-behind streams into Postgres
  (:meth:`FlushWorker.stats` reports the queue and its counters);
* :func:`replay_dead_letters` applies dead letters again once their cause is fixed;
* :class:`.metrics.WorkerCollector` publishes a worker's stats to
  Prometheus.

Example::

    from sa_redis_cache import FlushWorker
    FlushWorker(engine, redis.Redis(), namespace="shop", models=[PageView]).run(stop_event)

    from sa_redis_cache.worker import replay_dead_letters
    replay_dead_letters(engine, redis.Redis(), "shop", [PageView])
"""

from __future__ import annotations

from .flush import FlushWorker
from .replay import ReplayResult, replay_dead_letters
from .stats import PartitionStats, WorkerStats

__all__ = [
    "FlushWorker",
    "PartitionStats",
    "ReplayResult",
    "WorkerStats",
    "replay_dead_letters",
]
