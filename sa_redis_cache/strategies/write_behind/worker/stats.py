"""What a flush worker reports: the queue per partition, and its own counters.

Read by :meth:`FlushWorker.stats <sa_redis_cache.worker.FlushWorker.stats>` and published
by :class:`~sa_redis_cache.strategies.write_behind.worker.metrics.WorkerCollector`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from sa_redis_cache.protocol import stream_id
from sa_redis_cache.redis_io import is_cluster

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis


@dataclass(frozen=True, slots=True)
class PartitionStats:
    """One partition's stream.

    ``length`` is ``XLEN`` (applied entries are trimmed, so: entries not yet applied);
    ``pending`` the entries the reporting worker has read and not yet trimmed (being
    applied, or applied and not yet acknowledged; 0 for partitions it does not hold);
    ``lag_seconds`` the age of the oldest entry still in the stream (0 when empty), from
    the time in its stream id and the Redis server's clock; ``held`` whether the worker
    that reported it holds the partition's lease.
    """

    table: str
    partition: int
    length: int
    pending: int
    lag_seconds: float
    held: bool


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A snapshot of :meth:`FlushWorker.stats`; the counters count since the worker started.

    Example::

        stats = worker.stats()
        stats.length, stats.pending, stats.lag_seconds     # the whole queue
        stats.rows_applied, stats.dead_letter_count        # this worker / the database
        stats.database_up, stats.database_down_seconds     # False, 42.0 in an outage

    ``fenced`` counts the batches the database refused because another worker had taken
    the partition (this worker paused past its lease); none of them was applied.
    """

    namespace: str
    consumer: str
    partitions: list[PartitionStats] = field(default_factory=list)
    rows_applied: int = 0
    entries: int = 0
    batches: int = 0
    skipped: int = 0
    errors: int = 0
    dead_letters: int = 0
    superseded: int = 0
    fenced: int = 0
    open_dead_letters: int | None = None
    database_up: bool = True
    database_down_seconds: float = 0.0

    @property
    def length(self) -> int:
        """Entries in every partition's stream."""
        return sum(p.length for p in self.partitions)

    @property
    def pending(self) -> int:
        """Entries this worker read and has not yet trimmed, in every partition."""
        return sum(p.pending for p in self.partitions)

    @property
    def lag_seconds(self) -> float:
        """The largest lag of any partition."""
        return max((p.lag_seconds for p in self.partitions), default=0.0)

    @property
    def held(self) -> int:
        """Partitions whose lease this worker holds."""
        return sum(1 for p in self.partitions if p.held)

    @property
    def dead_letter_count(self) -> int:
        """Unreplayed dead letters in the database, or this worker's own count without one."""
        return self.dead_letters if self.open_dead_letters is None else self.open_dead_letters


def queue_stats(
    client: redis.Redis, partitions: Sequence[tuple[str, int, str, bool, int]]
) -> list[PartitionStats]:
    """``(table, number, stream key, held, pending)`` per partition -> their stats.

    ``pending`` is what the reporting worker has read from the partition and not yet
    acknowledged (0 for a partition it does not hold). One round trip (two on a cluster).

    Example::

        queue_stats(client, [("views", 0, "sarc:shop:{shop:views}:wb:00ff:0", True, 0)])
    """
    pipe = client.pipeline(transaction=False)
    if is_cluster(client):
        # a cluster pipeline takes keyed commands only: the clock is one node's (entry ids
        # are their own primary's milliseconds; the nodes' clocks are assumed close)
        replies: list[Any] = [client.time()]
    else:
        pipe.time()
        replies = []
    for _, _, stream, _, _ in partitions:
        pipe.xlen(stream)
        pipe.xrange(stream, count=1)
    replies += pipe.execute(raise_on_error=False)
    now = replies[0]
    if isinstance(now, Exception):
        raise now
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    out = []
    for i, (table, number, _, held, pending) in enumerate(partitions):
        length, first = replies[1 + 2 * i : 3 + 2 * i]
        out.append(
            PartitionStats(
                table=table,
                partition=number,
                length=_count(length),
                pending=pending if held else 0,
                lag_seconds=_lag(first, now_ms),
                held=held,
            )
        )
    return out


def _count(reply: Any) -> int:
    if isinstance(reply, Exception):
        _raise_unless_missing(reply)
        return 0
    return int(reply)


def _lag(reply: Any, now_ms: int) -> float:
    if isinstance(reply, Exception):
        _raise_unless_missing(reply)
        return 0.0
    if not reply:
        return 0.0
    oldest_ms, _ = stream_id(reply[0][0])
    return max(0.0, (now_ms - oldest_ms) / 1000)


def _raise_unless_missing(exc: Exception) -> None:
    # WRONGTYPE: the stream key holds another type; the worker reports it on every pass
    if not (isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc)):
        raise exc
