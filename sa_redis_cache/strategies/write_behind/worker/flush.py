"""The flush worker: drains write-behind streams into Postgres (docs/design.md, "Write-behind").

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

:meth:`FlushWorker.stats` reports the queue (length, pending entries and lag per
partition) and the worker's own counters; :class:`.metrics.
WorkerCollector` publishes them to Prometheus.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError, ResponseError
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError

from sa_redis_cache.binds import Binds, translate_map_of
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.models import ModelRegistry, mapper_of
from sa_redis_cache.protocol import GROUP, HEADER, KeyScheme, scripts
from sa_redis_cache.redis_io import SyncRedisIO, refuse_cluster
from sa_redis_cache.schema import dead_letters
from sa_redis_cache.strategies.write_behind.columns import is_write_behind

from .apply import Applier, BatchResult, Entry
from .stats import WorkerStats, queue_stats

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    import redis
    from sqlalchemy.engine import Engine

    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.redis_io import SyncClient

log = logging.getLogger(__name__)


def write_behind_info(model: type, registry: ModelRegistry | None = None) -> ModelInfo:
    """The :class:`ModelInfo` of a mapped class with ``strategy="write_behind"``.

    Raises :class:`ConfigurationError` for anything else.

    Example::

        write_behind_info(PageView).table  # 'page_views'
    """
    mapper = mapper_of(model)
    policy = getattr(model, "__cache__", None)
    registry = registry if registry is not None else ModelRegistry()
    info = registry.register(mapper, policy) if mapper is not None else None
    if info is None or not is_write_behind(info) or info.codec is None:
        raise ConfigurationError(
            f"{model!r} is not a mapped class with __cache__ = CachePolicy(strategy='write_behind')"
        )
    return info


@dataclass(slots=True)
class Partition:
    """One stream this worker may consume, and what it knows about it."""

    info: ModelInfo
    scope: str  # the database and schema the worker's engine writes the rows to
    number: int
    stream: str
    lease: str
    applier: Applier
    held: bool = False
    clean: bool = False  # held, and the group had no pending entry when last looked
    group_ready: bool = False
    retry_at: float = 0.0
    failures: int = 0


@dataclass(slots=True)
class _InFlight:
    """A batch committed to the database whose acknowledgement is running."""

    partition: Partition
    entries: list[Entry]
    result: BatchResult
    started: float
    db_ms: float
    future: Future[None]


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
        worker.stats().lag_seconds  # the queue and this worker's counters

    The counters (``applied`` rows, ``entries``, ``batches``, ``skipped``, ``errors``,
    ``dead_letters``, ``superseded``) count since the worker was made; see :meth:`stats`.
    """

    def __init__(
        self,
        engine: Engine,
        redis_client: SyncClient,
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
        refuse_cluster(redis_client, "FlushWorker")
        # a single server from here on (a cluster client was refused just above)
        self.client = cast("redis.Redis", redis_client)
        self.namespace = namespace
        self.keys = KeyScheme(namespace)
        self.io = SyncRedisIO(redis_client)
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
        self.entries = 0
        self.batches = 0
        self.skipped = 0
        self.dead_letters = 0
        self.superseded = 0
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: _InFlight | None = None
        registry = ModelRegistry()
        self._infos = [write_behind_info(model, registry) for model in models]
        self._binds = Binds()
        try:
            self._resolve()
        except SQLAlchemyError as exc:  # Postgres is away: named on the first pass instead
            log.warning("write-behind worker cannot reach the database yet: %s", exc)

    def _resolve(self) -> None:
        """Name this worker's streams, once: they belong to the database and schema its
        engine writes to (one connection, the first time; raises when Postgres is away)."""
        if self._tables:
            return
        database = self._binds.database_of_engine(self.engine)
        if database is None:
            raise ConfigurationError("cannot tell which database the worker's engine reaches")
        translate = translate_map_of(self.engine)
        for info in self._infos:
            assert info.policy is not None
            scope = self._binds.scope(database, info.table_schema, translate)
            applier = Applier(self.engine, info, self.namespace)
            parts = [
                Partition(
                    info,
                    scope,
                    number,
                    self.keys.stream_key(info.table, scope, number),
                    self.keys.partition_lease_key(info.table, scope, number),
                    applier,
                )
                for number in range(info.policy.partitions)
            ]
            self._tables[info.table] = parts
            self.partitions += parts

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, on_pass: Callable[[], None] | None = None) -> None:
        """Flush until ``stop`` is set; then finish the batch in flight and release leases.

        A failure (database or Redis away) is logged and retried with backoff; nothing is
        acknowledged that was not applied. ``on_pass`` is called after every pass (the
        runner's backlog progress uses it).
        """
        delay = 0.0
        log.info(
            "write-behind worker started",
            extra={
                "wb_consumer": self.consumer,
                "wb_pid": os.getpid(),
                "wb_partitions": sum(
                    info.policy.partitions for info in self._infos if info.policy is not None
                ),
            },
        )
        try:
            while not stop.is_set():
                failures_before = self.errors
                self.run_once(block_ms=self.block_ms)
                if on_pass is not None:
                    on_pass()
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
            self._resolve()
            done = self._pass()
        except (RedisError, SQLAlchemyError) as exc:
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
                self.client.zrem(self._workers_key(table), self.consumer)
        except RedisError as exc:
            log.warning("could not release write-behind leases (they expire): %s", exc)
        for p in held:
            p.held = p.clean = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- what the queue and the worker look like ----------------------------------------

    def backlog(self) -> int:
        """Entries waiting in this worker's streams (every partition of its models).

        One pipelined ``XLEN`` per partition; streams are trimmed as they are applied, so
        this is what is left to flush, whoever flushes it.

        Example::

            if worker.backlog() > 10_000: ...
        """
        try:
            self._resolve()
        except SQLAlchemyError:
            # Postgres is away, so which scope this worker drains is not known yet: count
            # the streams of its tables in every database and schema
            return self._backlog_of_every_scope()
        pipe = self.client.pipeline(transaction=False)
        for p in self.partitions:
            pipe.xlen(p.stream)
        return sum(int(n) for n in pipe.execute())

    def _backlog_of_every_scope(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for info in self._infos:
            pattern = self.keys.stream_pattern(info.table)
            for stream in self.client.scan_iter(match=pattern, count=1000):
                pipe.xlen(stream)
        return sum(int(n) for n in pipe.execute())

    def stats(self, *, database: bool = True) -> WorkerStats:
        """The queue per partition, and what this worker did since it started.

        Per partition: entries in the stream (``XLEN``), entries delivered to a worker and
        not yet acknowledged (``XPENDING``), and the lag: the age of the oldest entry not
        yet acknowledged, from its stream id's time (Redis server clock). Counters: rows
        applied, entries processed, batches, errors, dead letters written by this worker.
        With ``database``, ``open_dead_letters`` counts the unreplayed dead letters of its
        tables in ``sarc_dead_letters`` (None when the database cannot be asked). One Redis
        round trip, plus one query with ``database``.

        Example::

            s = worker.stats()
            print(s.length, s.pending, s.lag_seconds, s.rows_applied)
        """
        self._resolve()
        parts = queue_stats(
            self.client, [(p.info.table, p.number, p.stream, p.held) for p in self.partitions]
        )
        open_letters: int | None = None
        if database:
            open_letters = self._open_dead_letters()
        return WorkerStats(
            namespace=self.namespace,
            consumer=self.consumer,
            partitions=parts,
            rows_applied=self.applied,
            entries=self.entries,
            batches=self.batches,
            skipped=self.skipped,
            errors=self.errors,
            dead_letters=self.dead_letters,
            superseded=self.superseded,
            open_dead_letters=open_letters,
        )

    def _open_dead_letters(self) -> int | None:
        stmt = (
            select(func.count())
            .select_from(dead_letters)
            .where(
                dead_letters.c.namespace == self.namespace,
                dead_letters.c.table_name.in_([info.table for info in self._infos]),
                dead_letters.c.replayed_at.is_(None),
            )
        )
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(stmt).scalar_one())
        except SQLAlchemyError as exc:
            log.debug("could not count the dead letters: %s", exc)
            return None

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
            key = self._workers_key(table)
            pipe.zadd(key, {self.consumer: now_ms + self.lease_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zcard(key)
            pipe.pexpire(key, self.lease_ms * 2)
            for p in self._tables[table]:
                # -2: free; -1: a key without expiry, which no worker sets (wb_lease.lua
                # takes it over); else a lease someone holds
                pipe.pttl(p.lease)
        replies = pipe.execute(raise_on_error=False)
        self._turn += 1
        wanted: list[Partition] = []
        at = 0
        for table, parts in self._tables.items():
            announced, lease_ttls = replies[at : at + 4], replies[at + 4 : at + 4 + len(parts)]
            at += 4 + len(parts)
            live = self._live_workers(table, announced)
            limit = -(-len(parts) // live)
            held = [p for p in parts if p.held]
            if len(held) > limit:
                self._release(held[limit:])
                held = held[:limit]
            free = [
                p
                for p, ttl in zip(parts, lease_ttls, strict=True)
                if not p.held and not isinstance(ttl, Exception) and ttl < 0
            ]
            if free:
                start = (self._turn + self._offset) % len(free)
                free = free[start:] + free[:start]
            wanted += held + free[: limit - len(held)]
        return wanted

    def _workers_key(self, table: str) -> str:
        return self.keys.workers_key(table, self._tables[table][0].scope)

    def _live_workers(self, table: str, replies: list[Any]) -> int:
        """How many workers share ``table`` (the ZCARD), from the announcement's replies.

        The set only balances partitions between workers: one of another Redis type holds
        no announcement, and is deleted so that the next pass recreates it.
        """
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            return max(1, int(replies[2]))
        if not all(str(e).startswith("WRONGTYPE") for e in errors):
            raise errors[0]
        key = self._workers_key(table)
        log.warning("write-behind worker set %s was not a sorted set: recreated", key)
        self.client.delete(key)
        return 1

    def _release(self, parts: list[Partition]) -> None:
        self.io.run_batch([scripts.wb_lease(p.lease, p.stream, self.consumer, 0) for p in parts])
        for p in parts:
            p.held = p.clean = False

    def _lease_and_read(self, ready: list[Partition]) -> int:
        ready = [p for p in ready if p.group_ready or self._ensure_group(p)]
        calls = [
            scripts.wb_lease(
                p.lease,
                p.stream,
                self.consumer,
                self.lease_ms,
                read=self.batch_size if p.clean else 0,
                group=GROUP,
            )
            for p in ready
        ]
        try:
            replies = self.io.run_batch(calls) if calls else []
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis lost its data: recreate groups next pass
                for p in self.partitions:
                    p.group_ready = p.clean = False
            raise
        done = 0
        try:
            for p, reply in zip(ready, replies, strict=True):
                if reply == 0:
                    p.held = p.clean = False
                    continue
                if reply == -1:
                    self._not_a_stream(p)
                    continue
                if not p.held:
                    p.held, p.clean = True, False
                if isinstance(reply, list) and reply:
                    done += self._process(p, reply)
                elif not p.clean:
                    done += self._drain_pending(p)
        finally:
            done += self._settle()
        return done

    def _ensure_group(self, p: Partition) -> bool:
        """Create the consumer group (and the stream); False when the key is not a stream."""
        try:
            self.client.xgroup_create(p.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                self._not_a_stream(p)
                return False
            if "BUSYGROUP" not in str(exc):
                raise
        p.group_ready = True
        return True

    def _not_a_stream(self, p: Partition) -> None:
        """The partition's stream key holds another Redis type: report it, leave it alone.

        Never deleted nor replaced here: whatever overwrote the stream took the writes
        queued in it, and an operator must see that (their rows' pending keys still hold
        the states). Commits to the partition are refused meanwhile (``wb_enqueue.lua``);
        the other partitions go on. Retried with backoff, and logged at each retry.
        """
        p.held = p.clean = p.group_ready = False
        self._failed(
            p,
            ResponseError(
                f"write-behind stream {p.stream} holds another Redis type, not a stream: the "
                "writes queued in it are lost and new commits to it are refused; see what "
                "wrote it, then delete it (docs/write-behind.md)"
            ),
        )

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
        """Apply one batch, then acknowledge it; on failure leave it pending for a retry.

        The acknowledgement (``lua/wb_flushed.lua``) runs on a helper thread while the
        next batch, of another partition, is applied: Redis and Postgres work at the same
        time. One acknowledgement is in flight at most; :meth:`_settle` waits for it.
        Returns the entries of the batch settled here (the previous one), or 0.
        """
        applier = p.applier
        entries = applier.decode_batch(raw)
        started = time.perf_counter()
        try:
            result = applier.apply(p.stream, entries)
        except (DBAPIError, StatementError) as exc:
            p.clean = False
            self._failed(p, exc)
            return 0
        db_ms = (time.perf_counter() - started) * 1000
        # committed: what the database now holds counts even if the ack is lost (the
        # redelivery is then skipped by the offset, and counted as skipped)
        self.applied += result.applied
        self.dead_letters += len(result.dead)
        self.superseded += result.superseded
        done = self._settle()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sarc-wb-ack")
        future = self._executor.submit(self._after_flush, p, entries, result)
        self._inflight = _InFlight(p, entries, result, started, db_ms, future)
        return done

    def _settle(self) -> int:
        """Wait for the acknowledgement in flight; count, log or retry its batch."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return 0
        p, entries, result = flight.partition, flight.entries, flight.result
        try:
            flight.future.result()
        except RedisError as exc:
            # applied, not acknowledged: the redelivery is skipped by the offset row
            p.clean = False
            self._failed(p, exc)
            return 0
        p.failures = 0
        self.entries += len(entries)
        self.batches += 1
        self.skipped += result.skipped
        log.info(
            "write-behind batch flushed",
            extra={
                "wb_table": p.info.table,
                "wb_partition": p.number,
                "wb_entries": len(entries),
                "wb_applied": result.applied,
                "wb_skipped": result.skipped,
                "wb_dead_letters": len(result.dead),
                "wb_superseded": result.superseded,
                "wb_first_id": entries[0].id,
                "wb_last_id": entries[-1].id,
                "wb_db_ms": round(flight.db_ms, 2),
                "wb_total_ms": round((time.perf_counter() - flight.started) * 1000, 2),
                "wb_consumer": self.consumer,
            },
        )
        return len(entries)

    def _after_flush(self, p: Partition, entries: list[Entry], result: BatchResult) -> None:
        info = p.info
        keys = self.keys
        dead = result.dead
        final = result.final
        # skipped entries (a redelivery: the prefix at or below the offset) were applied or
        # dead-lettered by the earlier delivery, which one is not known here: their entity
        # entries are dropped, and the next read fills from the database
        unsure = {e.id for e in entries[: result.skipped]} | dead.keys()
        rows = [
            scripts.FlushedRow(
                pending_key=keys.pending_key(info.table, info.schema_hash, p.scope, pk),
                entity_key=keys.entity_key(info.table, info.schema_hash, p.scope, pk),
                pk=pk,
                last_id=entry.id,
                applied=entry.id not in unsure and entry.error is None,
            )
            for pk, entry in final.items()
        ]
        newest = entries[-1].sid  # entries are in stream order
        ttl = info.policy.ttl if info.policy and info.policy.ttl else self.default_ttl
        call = scripts.wb_flushed(
            keys,
            info.table,
            p.stream,
            rows,
            group=GROUP,
            acked=[e.id for e in entries],
            trim_below=f"{newest[0]}-{newest[1] + 1}",
            entity_ttl_ms=int(ttl * 1000),
            header=HEADER,
        )
        self.io.run_script(*call)

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
