"""The flush worker: drains write-behind streams into Postgres (DESIGN.md §5).

Per partition (one stream), at most one worker consumes at a time: it holds the
partition's lease (``lua/wb_lease.lua``; ``SET NX PX``, renewed on every pass). New
entries are read by the lease script itself, so a worker that lost its lease (a pause
longer than the lease) can never be handed new entries of that partition.

Order is kept by one rule: a partition's new entries are read only when the consumer
group has no pending entry left. A worker that takes a partition over first claims the
entries its previous holder read and did not acknowledge (``XAUTOCLAIM`` once they are
idle longer than ``claim_idle_ms``, which must exceed the longest flush) and applies them,
in stream order; the offset row in Postgres makes any of them that the previous holder did
apply a no-op. Only then does it read further.

After a batch's transaction commits, ``lua/wb_flushed.lua`` bumps the table version (cached
queries see the rows), gives the flushed rows' entity entries their TTL (unless a newer
state is queued), removes their pending keys, acknowledges the entries and trims the stream
up to them (``XTRIM MINID``: entries below are all applied; never ``MAXLEN``).
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import DBAPIError, StatementError

from sa_redis_cache.core import COUNTER_TTL_MS
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.keys import KeyScheme
from sa_redis_cache.models import ModelRegistry, mapper_of
from sa_redis_cache.scripts import Scripts
from sa_redis_cache.wb_config import (
    GROUP,
    HEADER,
    is_write_behind,
    lease_key,
    pending_key,
    stream_id,
    stream_key,
)

from .apply import Applier, BatchResult, Entry

if TYPE_CHECKING:
    import threading

    import redis
    from sqlalchemy.engine import Engine

    from sa_redis_cache.models import ModelInfo

log = logging.getLogger("sa_redis_cache.worker")


@dataclass(slots=True)
class Partition:
    """One stream this worker may consume, and what it knows about it."""

    info: ModelInfo
    number: int
    stream: str
    lease: str
    applier: Applier
    held: bool = False
    clean: bool = False  # held, and the group had no pending entry when last looked
    group_ready: bool = False
    retry_at: float = 0.0
    failures: int = 0


class FlushWorker:
    """Applies the queued writes of write-behind models to the database.

    ``models`` are the mapped classes to flush (each with ``strategy="write_behind"``);
    ``namespace`` is the cache's. Several workers, in one process or on several machines,
    share the partitions through leases; give each a distinct ``consumer`` name, and the
    same name again to a worker that replaces a crashed one (it then resumes that one's
    unacknowledged entries at once instead of after ``claim_idle_ms``).

    Example::

        worker = FlushWorker(engine, redis.Redis(), namespace="shop", models=[PageView])
        stop = threading.Event()
        worker.run(stop)            # until stop.set(); or, in tests:
        worker.run_once()           # one pass over every partition
    """

    def __init__(
        self,
        engine: Engine,
        redis_client: redis.Redis,
        *,
        namespace: str,
        models: list[type],
        consumer: str | None = None,
        batch_size: int = 500,
        block_ms: int = 100,
        lease_ms: int = 30_000,
        claim_idle_ms: int = 60_000,
        default_ttl: float = 300,
        max_backoff: float = 5.0,
    ) -> None:
        if not 1 <= batch_size <= 5000:
            raise ConfigurationError(f"batch_size={batch_size} must be from 1 to 5000")
        self.engine = engine
        self.client = redis_client
        self.namespace = namespace
        self.keys = KeyScheme(namespace)
        self.scripts = Scripts(redis_client)
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.lease_ms = lease_ms
        self.claim_idle_ms = claim_idle_ms
        self.default_ttl = default_ttl
        self.max_backoff = max_backoff
        self.partitions: list[Partition] = []
        self._tables: dict[str, list[Partition]] = {}
        self._turn = 0
        # workers start their search for free partitions at different places
        self._offset = zlib.crc32(self.consumer.encode())
        self.applied = 0
        self.errors = 0
        registry = ModelRegistry()
        for model in models:
            mapper = mapper_of(model)
            policy = getattr(model, "__cache__", None)
            info = registry.register(mapper, policy) if mapper is not None else None
            if info is None or not is_write_behind(info) or info.codec is None:
                raise ConfigurationError(
                    f"FlushWorker(models=[...]) got {model!r}, which is not a mapped class with "
                    "__cache__ = CachePolicy(strategy='write_behind')"
                )
            assert info.policy is not None
            applier = Applier(engine, info, namespace)
            parts = [
                Partition(
                    info,
                    number,
                    stream_key(self.keys, info.table, number),
                    lease_key(self.keys, info.table, number),
                    applier,
                )
                for number in range(info.policy.partitions)
            ]
            self._tables[info.table] = parts
            self.partitions += parts

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Flush until ``stop`` is set; then finish the batch in flight and release leases.

        A failure (database or Redis away) is logged and retried with backoff; nothing is
        acknowledged that was not applied.
        """
        delay = 0.0
        log.info(
            "write-behind worker started",
            extra={
                "wb_consumer": self.consumer,
                "wb_pid": os.getpid(),
                "wb_partitions": len(self.partitions),
            },
        )
        try:
            while not stop.is_set():
                failures_before = self.errors
                self.run_once(block_ms=self.block_ms)
                if self.errors > failures_before:
                    delay = min(self.max_backoff, max(0.05, delay * 2))
                    stop.wait(delay * (0.5 + random.random() / 2))
                else:
                    delay = 0.0
        finally:
            self.release()

    def run_once(self, block_ms: int | None = None) -> int:
        """One pass over every partition; returns how many entries it processed.

        With ``block_ms``, waits up to that long for new entries when it found none.
        """
        try:
            done = self._pass()
        except RedisError as exc:
            self._failed(None, exc)
            return 0
        if not done and block_ms:
            self._wait(block_ms)
        return done

    def release(self) -> None:
        """Give up every lease this worker holds, and leave the worker set (on shutdown)."""
        held = [p for p in self.partitions if p.held]
        try:
            if held:
                self._release(held)
            for table in self._tables:
                self.client.zrem(self.keys.table_prefix(table) + "wbw", self.consumer)
        except RedisError as exc:
            log.warning("could not release write-behind leases (they expire): %s", exc)
        for p in held:
            p.held = p.clean = False

    # -- one pass ------------------------------------------------------------------------

    def _pass(self) -> int:
        now = time.monotonic()
        ready = [p for p in self._wanted() if p.retry_at <= now]
        was_clean = {id(p) for p in ready if p.clean}
        done = self._lease_and_read(ready)
        # partitions found clean just now may have new entries: read them in this pass too
        done += self._lease_and_read([p for p in ready if p.clean and id(p) not in was_clean])
        return done

    def _wanted(self) -> list[Partition]:
        """The partitions to hold this pass: a fair share of each table's, per live worker.

        Workers announce themselves in a per-table set (score: when they stop counting);
        each holds at most ``ceil(partitions / live workers)`` and releases the rest, so a
        worker that joins gets partitions as the others' shares shrink. The share is only
        about balance: the leases alone decide who consumes a partition.
        """
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for table in self._tables:
            key = self.keys.table_prefix(table) + "wbw"
            pipe.zadd(key, {self.consumer: now_ms + self.lease_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zcard(key)
            pipe.pexpire(key, self.lease_ms * 2)
            pipe.mget([p.lease for p in self._tables[table]])
        replies = pipe.execute()
        self._turn += 1
        wanted: list[Partition] = []
        for i, parts in enumerate(self._tables.values()):
            live = max(1, int(replies[i * 5 + 2]))
            holders = replies[i * 5 + 4]
            limit = -(-len(parts) // live)
            held = [p for p in parts if p.held]
            if len(held) > limit:
                self._release(held[limit:])
                held = held[:limit]
            free = [p for p, h in zip(parts, holders, strict=True) if not p.held and h is None]
            if free:
                start = (self._turn + self._offset) % len(free)
                free = free[start:] + free[:start]
            wanted += held + free[: limit - len(held)]
        return wanted

    def _release(self, parts: list[Partition]) -> None:
        self.scripts.run_batch(
            [(self.scripts.wb_lease, [p.lease, p.stream], [self.consumer, 0, 0]) for p in parts]
        )
        for p in parts:
            p.held = p.clean = False

    def _lease_and_read(self, ready: list[Partition]) -> int:
        for p in ready:
            if not p.group_ready:
                self._ensure_group(p)
        calls = [
            (
                self.scripts.wb_lease,
                [p.lease, p.stream],
                [
                    self.consumer,
                    self.lease_ms,
                    self.batch_size if p.clean else 0,
                    GROUP,
                    self.consumer,
                ],
            )
            for p in ready
        ]
        try:
            replies = self.scripts.run_batch(calls) if calls else []
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data: recreate groups next pass
                for p in self.partitions:
                    p.group_ready = p.clean = False
            raise
        done = 0
        for p, reply in zip(ready, replies, strict=True):
            if reply == 0:
                p.held = p.clean = False
                continue
            if not p.held:
                p.held, p.clean = True, False
            if isinstance(reply, list) and reply:
                done += self._process(p, reply)
            elif not p.clean:
                done += self._drain_pending(p)
        return done

    def _ensure_group(self, p: Partition) -> None:
        try:
            self.client.xgroup_create(p.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        p.group_ready = True

    def _drain_pending(self, p: Partition) -> int:
        """Apply the group's pending entries of a partition we now hold, in stream order."""
        summary = self.client.xpending(p.stream, GROUP)
        if not summary["pending"]:
            p.clean = True
            return 0
        me = self.consumer.encode()
        if any(c["name"] != me for c in summary["consumers"]):
            start: Any = "0-0"
            while True:
                start, _, _ = self.client.xautoclaim(
                    p.stream, GROUP, self.consumer, self.claim_idle_ms, start, count=1000
                )
                if start in (b"0-0", "0-0"):
                    break
            summary = self.client.xpending(p.stream, GROUP)
            if any(c["name"] != me for c in summary["consumers"]):
                return 0  # entries read by a holder that may still be alive: not yet idle
        got: Any = self.client.xreadgroup(
            GROUP, self.consumer, {p.stream: "0"}, count=self.batch_size
        )
        entries: list[Any] = got[0][1] if got else []
        if not entries:
            p.clean = True
            return 0
        return self._process(p, entries)

    def _process(self, p: Partition, raw: list[Any]) -> int:
        """Apply one batch, then acknowledge it; on failure leave it pending for a retry."""
        applier = p.applier
        entries = [applier.decode(entry_id, _fields(fields)) for entry_id, fields in raw]
        started = time.perf_counter()
        try:
            result = applier.apply(p.stream, entries)
        except (DBAPIError, StatementError) as exc:
            p.clean = False
            self._failed(p, exc)
            return 0
        db_ms = (time.perf_counter() - started) * 1000
        try:
            self._after_flush(p, entries, result)
        except RedisError as exc:
            # applied, not acknowledged: the redelivery is skipped by the offset row
            p.clean = False
            self._failed(p, exc)
            return 0
        p.failures = 0
        self.applied += result.applied
        log.info(
            "write-behind batch flushed",
            extra={
                "wb_table": p.info.table,
                "wb_partition": p.number,
                "wb_entries": len(entries),
                "wb_applied": result.applied,
                "wb_skipped": result.skipped,
                "wb_dead_letters": len(result.dead),
                "wb_first_id": entries[0].id,
                "wb_last_id": entries[-1].id,
                "wb_db_ms": round(db_ms, 2),
                "wb_total_ms": round((time.perf_counter() - started) * 1000, 2),
                "wb_consumer": self.consumer,
            },
        )
        return len(entries)

    def _after_flush(self, p: Partition, entries: list[Entry], result: BatchResult) -> None:
        info = p.info
        keys = self.keys
        row_keys: list[str] = []
        row_args: list[Any] = []
        for pk, entry in result.final.items():
            row_keys += [
                pending_key(keys, info.table, info.schema_hash, pk),
                keys.entity_key(info.table, info.schema_hash, pk),
            ]
            if entry.id in result.dead or entry.error is not None:
                data = b"x"
            elif entry.op == "u":
                data = b"u" + entry.data
            else:
                data = b"d"
            row_args += [entry.id, data]
        newest = max(stream_id(e.id) for e in entries)
        ttl = info.policy.ttl if info.policy and info.policy.ttl else self.default_ttl
        self.scripts.run(
            self.scripts.wb_flushed,
            [p.stream, keys.version_key(info.table), keys.generation_key(info.table), *row_keys],
            [
                GROUP,
                f"{newest[0]}-{newest[1] + 1}",
                int(ttl * 1000),
                HEADER,
                COUNTER_TTL_MS,
                random.getrandbits(62),
                len(entries),
                *(e.id for e in entries),
                *row_args,
            ],
        )

    def _wait(self, block_ms: int) -> None:
        """Block until a held partition may have new entries (or ``block_ms`` passed)."""
        streams: dict[Any, Any] = {p.stream: "$" for p in self.partitions if p.held and p.clean}
        if not streams:
            return
        try:
            self.client.xread(streams, count=1, block=block_ms)
        except RedisError as exc:
            self._failed(None, exc)

    def _failed(self, p: Partition | None, exc: Exception) -> None:
        self.errors += 1
        for part in [p] if p is not None else self.partitions:
            part.failures += 1
            delay = min(self.max_backoff, 0.05 * 2 ** min(part.failures, 10))
            part.retry_at = time.monotonic() + delay
            if p is None:
                part.clean = False
        log.warning(
            "write-behind flush failed, will retry: %s",
            exc,
            extra={
                "wb_table": p.info.table if p else None,
                "wb_partition": p.number if p else None,
            },
        )


def _fields(raw: Any) -> dict[bytes, bytes] | None:
    """Entry fields as a dict: redis-py parses XREADGROUP replies, a script returns pairs."""
    if raw is None or isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2], strict=True))
