"""The flush worker: drains write-behind streams into Postgres (docs/design.md, "Write-behind").

Per partition (one stream), at most one worker applies batches at a time, enforced in two
layers:

* **A lease in Redis** (``lua/wb_lease.lua``, ``SET PX``) says who should consume the
  partition. A heartbeat thread renews every lease the worker holds several times per
  lease period, so a live worker keeps its partitions however long a batch takes, and a
  dead one's expire within ``lease_ms``; a replacement started under the same
  ``consumer`` name takes its predecessor's leases at once.
* **A fencing token in Postgres** (``sarc_wb_offsets.lease_token``) decides who may apply.
  A worker that takes a lease moves the partition's token on and keeps the new value;
  each of its batches locks the offset row and checks the token in the batch's own
  transaction. A worker that paused past its lease (and whose partition another worker
  took meanwhile) wakes up to find the token moved: its batch is rolled back
  (:class:`~.apply.LeaseLost`) and it drops the partition.

Workers read from the head of the stream (``XRANGE``, no consumer group): entries are
trimmed only after the transaction that applied them committed, so the head is always the
oldest entry not known to be applied, whoever read it before. Entries at or below the
partition's offset row (a batch applied by a worker that died before trimming) are skipped
by the offset check and trimmed by the next batch.

After a batch's transaction commits, ``lua/wb_flushed.lua`` bumps the table version (cached
queries see the rows), gives the flushed rows' entity entries their TTL (unless a newer
state is queued), removes their pending keys and trims the stream up to them
(``XTRIM MINID``: entries below are all applied; never ``MAXLEN``).

:meth:`FlushWorker.stats` reports the queue (length, pending entries and lag per
partition) and the worker's own counters; :class:`.metrics.
WorkerCollector` publishes them to Prometheus.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import secrets
import socket
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError, StatementError

from sa_redis_cache.binds import Binds, translate_map_of
from sa_redis_cache.cluster_io import io_for
from sa_redis_cache.compat import key_slot
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.models import ModelRegistry, mapper_of
from sa_redis_cache.protocol import HEADER, KeyScheme, scripts
from sa_redis_cache.redis_io import is_cluster
from sa_redis_cache.schema import dead_letters
from sa_redis_cache.slot_groups import model_groups
from sa_redis_cache.strategies.write_behind.checks import redis_problems
from sa_redis_cache.strategies.write_behind.columns import is_write_behind

from .apply import (
    Applier,
    BatchResult,
    Entry,
    LeaseLost,
    condemned_at_last_attempt,
    error_text,
    is_timeout,
)
from .outage import DatabaseOutage, is_unreachable
from .stats import WorkerStats, queue_stats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import redis
    from sqlalchemy.engine import Engine

    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.protocol.scripts import LeaseMode, ScriptCall
    from sa_redis_cache.redis_io import SyncClient

log = logging.getLogger(__name__)

LEASE_MS = 5_000
"""How long a partition lease lasts without renewal: a dead worker's partitions are taken
over within this time. Its heartbeat renews it every fifth of it."""

LEASE_MAX_MS = 600_000
"""The longest ``lease_ms`` a worker takes. A worker's announcement in the worker set is
scored at most this far ahead of its clock (plus :data:`scripts.CLOCK_STEP_MS` between
hosts' clocks): one scored further was planted, and is removed rather than counted as a
live worker, which would shrink every worker's share of the partitions for good."""

_ANNOUNCED = 5  # commands per table in an announcement; the live count is the last but one


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


def _as_sent(reply: Any, **options: Any) -> Any:
    """A response callback that leaves the reply as Redis sent it (nested lists)."""
    del options
    return reply


@dataclass(slots=True)
class Partition:
    """One stream this worker may consume, and what it knows about it."""

    info: ModelInfo
    scope: str  # the database and schema the worker's engine writes the rows to
    number: int
    stream: str
    lease: str
    applier: Applier
    held: bool = False  # this worker holds the lease in Redis
    token: int | None = None  # its fencing token, once moved on in the database
    lost: bool = False  # the heartbeat found the lease taken: drop it on the next pass
    caught_up: bool = False  # the last read found less than a batch
    unacked: int = 0  # entries read and not yet trimmed (being applied or acknowledged)
    # where the next read starts: "-" (the head) after a takeover or a failure, else just
    # after the last entry read (its acknowledgement may still be running)
    cursor: str = "-"
    retry_at: float = 0.0
    failures: int = 0
    # entries read per batch; below the worker's batch_size after a statement timeout
    # (0: the worker's batch_size), doubled back after each batch applied
    limit: int = 0
    # times the entry ``failing`` failed alone in a row, by an error the worker counts
    # attempts of (a statement timeout, an exception raised outside the database)
    attempts: int = 0
    failing: str = ""


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
    same name again to a worker that replaces a crashed one: it then takes that one's
    partitions at once instead of after ``lease_ms``. A worker that dies is replaced by the
    others within ``lease_ms`` (5 s); :meth:`run` renews the leases it holds every
    ``heartbeat_ms`` (a fifth of ``lease_ms``) from a thread of its own. A batch that
    exceeds the database's ``statement_timeout`` is read again at half the size, down to
    one entry; an operation that times out alone ``timeout_attempts`` times in a row is
    dead-lettered (docs/write-behind.md, "Errors"), and so is one that raises an error
    outside the database (a column type's bind processor) as many times.

    Example::

        worker = FlushWorker(engine, redis.Redis(), namespace="shop", models=[PageView])
        stop = threading.Event()
        worker.run(stop)            # until stop.set(); or, in tests:
        worker.run_once()           # one pass over every partition
        worker.stats().lag_seconds  # the queue and this worker's counters

    The counters (``rows_applied``, ``entries``, ``batches``, ``skipped``, ``errors``,
    ``dead_letters``, ``superseded``, ``fenced``) count since the worker was made; see
    :meth:`stats`.
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
        lease_ms: int = LEASE_MS,
        heartbeat_ms: int | None = None,
        default_ttl: float = 300,
        max_backoff: float = 5.0,
        timeout_attempts: int = 5,
    ) -> None:
        if not 1 <= batch_size <= 5000:
            raise ConfigurationError(f"batch_size={batch_size} must be from 1 to 5000")
        if lease_ms < 200:
            raise ConfigurationError(
                f"lease_ms={lease_ms} is too short to be renewed reliably; give at least 200"
            )
        if lease_ms > LEASE_MAX_MS:
            raise ConfigurationError(
                f"lease_ms={lease_ms} is longer than {LEASE_MAX_MS}: a worker set member "
                "scored further ahead is taken for planted"
            )
        if not (math.isfinite(max_backoff) and max_backoff >= 0):
            raise ConfigurationError(
                f"max_backoff={max_backoff} must be a finite number of seconds, 0 or more"
            )
        if timeout_attempts < 1:
            raise ConfigurationError(
                f"timeout_attempts={timeout_attempts} must be at least 1: the times one "
                "operation may exceed the database's statement_timeout before it is "
                "dead-lettered"
            )
        heartbeat_ms = lease_ms // 5 if heartbeat_ms is None else heartbeat_ms
        if not 0 < heartbeat_ms <= lease_ms // 2:
            raise ConfigurationError(
                f"heartbeat_ms={heartbeat_ms} must be above 0 and at most half of "
                f"lease_ms={lease_ms}, so that one late renewal does not lose a lease"
            )
        self.engine = engine
        # a cluster client shares redis.Redis's key commands and pipelines: each command
        # and each pipelined command goes to its key's slot's primary
        self.client = cast("redis.Redis", redis_client)
        self.cluster = is_cluster(redis_client)
        self._reader = self.client
        if not self.cluster:
            # the same connections, with XRANGE replies left as Redis sends them: redis-py's
            # parsing into tuples and dicts cost more than the rest of reading a batch (a
            # cluster client parses them: Applier.decode_batch reads both forms)
            self._reader = Redis(connection_pool=self.client.connection_pool)
            self._reader.set_response_callback("XRANGE", _as_sent)
        self.namespace = namespace
        self.keys = KeyScheme(namespace, model_groups(models))
        self.io = io_for(redis_client)
        # an empty name is refused, never replaced: a replacement started with the name of
        # the worker it replaces (``--consumer "$NAME"``) must not get a random one
        self.consumer = (
            consumer
            if consumer is not None
            else f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        )
        if "\n" in self.consumer or not self.consumer.strip():
            raise ConfigurationError(
                f"consumer={self.consumer!r}: give a non-empty name without newlines, "
                "e.g. the host name"
            )
        # this worker object, among the workers that share its consumer name (a replacement)
        self.instance = secrets.token_hex(6)
        self.owner = scripts.lease_owner(self.instance, self.consumer)
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.lease_ms = lease_ms
        self.heartbeat_ms = heartbeat_ms
        self.default_ttl = default_ttl
        self.max_backoff = max_backoff
        self.timeout_attempts = timeout_attempts
        self.partitions: list[Partition] = []
        self._tables: dict[str, list[Partition]] = {}
        self._live_counts: dict[str, int] = {}  # workers per table, as last announced
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
        self.fenced = 0
        self._shrunk = 0  # of the errors, batches read again smaller after a timeout
        self.database = DatabaseOutage()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: _InFlight | None = None
        registry = ModelRegistry()
        # a model named twice (``--model`` repeated, a factory that returns it again) is
        # flushed once: twice, each of its streams was two partitions, counted twice in
        # the queue's length, the backlog and the metrics
        self._infos = [write_behind_info(model, registry) for model in dict.fromkeys(models)]
        self._binds = Binds()
        try:
            self._resolve()
        except SQLAlchemyError as exc:  # Postgres is away: named on the first pass instead
            self.database.failed(exc)

    def _resolve(self) -> None:
        """Name this worker's streams, once: they belong to the database and schema its
        engine writes to (one connection, the first time; raises when Postgres is away)."""
        if self._tables:
            return
        database = self._binds.database_of_engine(self.engine)
        if database is None:
            # the server went away between connecting and answering the identity query:
            # an outage like any other, retried by the loop (never a startup failure)
            raise DisconnectionError("the database did not say which database it is")
        translate = translate_map_of(self.engine)
        for info in self._infos:
            assert info.policy is not None
            scope = self._binds.scope(database, info.table_schema, translate)
            applier = Applier(self.engine, info, self.namespace, idle_timeout_ms=self.lease_ms)
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
        self.database.answered()

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, on_pass: Callable[[], None] | None = None) -> None:
        """Flush until ``stop`` is set; then finish the batch in flight and release leases.

        A failure (database or Redis away) is logged and retried with backoff; nothing is
        acknowledged that was not applied. While the database cannot be reached, a warning
        says so when the outage starts, then every 15 s (at each retry after that, with a
        ``max_backoff`` longer than 15 s), and :meth:`stats` reports it.
        A heartbeat thread renews the leases meanwhile. ``on_pass`` is called after every
        pass (the runner's backlog progress uses it).
        """
        delay = 0.0
        self._warn_volatile()
        log.info(
            "write-behind worker started",
            extra={
                "wb_consumer": self.consumer,
                "wb_pid": os.getpid(),
                "wb_lease_ms": self.lease_ms,
                "wb_partitions": sum(
                    info.policy.partitions for info in self._infos if info.policy is not None
                ),
            },
        )
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat_loop, args=(beat_stop,), name="sarc-wb-heartbeat", daemon=True
        )
        beat.start()
        try:
            while not stop.is_set():
                # a batch shrunk after a statement timeout is retried at once, smaller
                failures_before = self.errors - self._shrunk
                self.run_once(block_ms=self.block_ms, settle=False)
                if on_pass is not None:
                    on_pass()
                if self.errors - self._shrunk > failures_before:
                    delay = min(self.max_backoff, max(0.05, delay * 2))
                    stop.wait(delay * (0.5 + random.random() / 2))
                else:
                    delay = 0.0
        finally:
            beat_stop.set()
            beat.join()
            self.release()

    def _warn_volatile(self) -> None:
        """Warn when the Redis server cannot keep the queue across a restart.

        ``attach()`` refuses such a server, but only in the processes that attach, and
        when they attach; the worker runs for as long as the queue lives, and is where a
        server restarted with other settings (``CONFIG SET appendonly yes`` that was never
        written to the config file) is seen. Never fatal: the worker drains what is queued.
        """
        seen: set[str] = set()
        for info in self._infos:
            if info.policy is None:
                continue
            for problem in redis_problems(self.client, info.policy):
                # the worker's minimal ACL (docs/security.md) has no INFO: say only
                # what is known to be wrong
                if "cannot tell" not in problem and problem not in seen:
                    seen.add(problem)
                    log.warning(
                        "write-behind worker: %s (model %s)",
                        problem,
                        info.mapper.class_.__name__,
                        extra={"wb_consumer": self.consumer},
                    )

    def run_once(self, block_ms: int | None = None, *, settle: bool = True) -> int:
        """One pass over every partition; returns how many entries it processed.

        With ``block_ms``, waits up to that long for new entries when it found none.
        ``settle=False`` leaves the acknowledgement of the pass's last batch running into
        the next pass (:meth:`run` does: the next reads need not wait for it); it is then
        counted by the pass that settles it.
        """
        try:
            self._resolve()
            done = self._pass(settle=settle)
        except (RedisError, SQLAlchemyError) as exc:
            self._failed(None, exc)
            return 0
        if not done and block_ms:
            self._wait(block_ms)
        return done

    def heartbeat(self) -> None:
        """Renew every lease this worker holds, and its place in the worker sets.

        :meth:`run` calls it every ``heartbeat_ms`` from a thread of its own, so that a
        batch slower than the lease (a slow database) does not lose the partition. A lease
        found taken by another worker is dropped on the next pass.
        """
        held = [p for p in self.partitions if p.held]
        kept = {id(p) for p in self._renew(held)}
        for p in held:
            if id(p) not in kept and p.held:
                p.lost = True
        self._announce()

    def _lease_calls(self, parts: list[Partition], mode: LeaseMode) -> list[ScriptCall]:
        """One ``wb_lease.lua`` call per partition, taking or renewing as this worker."""
        return [
            scripts.wb_lease(
                p.lease,
                p.stream,
                mode=mode,
                owner=self.owner,
                name=self.consumer,
                lease_ms=self.lease_ms,
            )
            for p in parts
        ]

    def _renew(self, parts: list[Partition]) -> list[Partition]:
        """Extend the leases of ``parts``; those that are still this worker's."""
        replies = self.io.run_batch(self._lease_calls(parts, "renew")) if parts else []
        return [p for p, reply in zip(parts, replies, strict=True) if reply == 1]

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_ms / 1000):
            self._beat()

    def _beat(self) -> None:
        try:
            self.heartbeat()
        except RedisError as exc:
            # the leases expire unless a later beat gets through; the pass reports it
            log.debug("write-behind heartbeat failed: %s", exc)
        except Exception:
            # a heartbeat thread that died on a bug would let every lease lapse
            log.exception("write-behind heartbeat raised")

    def release(self) -> None:
        """Give up every lease this worker holds, and leave the worker set (on shutdown)."""
        held = [p for p in self.partitions if p.held]
        try:
            self._settle()
            if held:
                self._release(held)
            for table in self._tables:
                self.client.zrem(self._workers_key(table), self.consumer)
        except RedisError as exc:
            log.warning("could not release write-behind leases (they expire): %s", exc)
        for p in held:
            self._forget(p)
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

        Per partition: entries in the stream (``XLEN``), entries a worker has read and not
        yet trimmed (pending), and the lag: the age of the oldest entry not yet applied,
        from its stream id's time (Redis server clock). Counters: rows applied, entries
        processed, batches, errors, dead letters written by this worker, batches refused
        by the fencing token. With ``database``, ``open_dead_letters`` counts the
        unreplayed dead letters of its tables in ``sarc_dead_letters`` (None when the
        database cannot be asked). ``database_up`` is False while the worker cannot reach
        the database (the count is an attempt too: an idle worker reports an outage).
        One or two Redis round trips, plus one query with ``database``.

        Example::

            s = worker.stats()
            print(s.length, s.pending, s.lag_seconds, s.rows_applied)
        """
        try:
            self._resolve()
        except SQLAlchemyError as exc:  # which streams are this worker's is not known yet
            self.database.failed(exc)
        parts = queue_stats(
            self.client,
            [(p.info.table, p.number, p.stream, p.held, p.unacked) for p in self.partitions],
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
            fenced=self.fenced,
            open_dead_letters=open_letters,
            database_up=self.database.up,
            database_down_seconds=self.database.down_seconds(),
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
                count = int(conn.execute(stmt).scalar_one())
        except SQLAlchemyError as exc:
            log.debug("could not count the dead letters: %s", exc)
            if is_unreachable(exc):
                # a worker with nothing to apply asks the database nothing else: without
                # this, an outage while the queue is empty showed database_up (and
                # sarc_wb_database_up 1) until the next write came
                self.database.failed(exc, retry_in=self.max_backoff)
            return None
        self.database.answered()
        return count

    # -- one pass ------------------------------------------------------------------------

    def _pass(self, *, settle: bool) -> int:
        for p in self.partitions:
            if p.lost:
                self._dropped(p, "its lease was taken by another worker")
        shards = self._shards()
        if len(shards) == 1:
            return self._pass_over(shards[0], settle=settle)
        # A cluster pipeline fails as a whole when one node cannot be reached: passing over
        # every slot at once would stop the queues of every primary while one is down
        # (docs/cluster.md#write-behind). A slot that failed waits out its backoff.
        done = 0
        now = time.monotonic()
        for tables in shards:
            parts = [p for found in tables.values() for p in found]
            if all(p.retry_at > now for p in parts):
                continue
            try:
                done += self._pass_over(tables, settle=settle)
            except RedisError as exc:
                self._failed(None, exc, among=parts)
        return done

    def _shards(self) -> list[dict[str, list[Partition]]]:
        """The tables by the slot of their keys on a cluster (every key of a table shares
        its hash tag); all of them together on a single server."""
        if not self.cluster:
            return [self._tables]
        slots: dict[int, dict[str, list[Partition]]] = {}
        for table, parts in self._tables.items():
            slots.setdefault(key_slot(parts[0].stream), {})[table] = parts
        return list(slots.values())

    def _pass_over(self, tables: dict[str, list[Partition]], *, settle: bool) -> int:
        now = time.monotonic()
        wanted = [p for p in self._wanted(tables) if p.retry_at <= now]
        self._take([p for p in wanted if not p.held])
        self._fence([p for p in wanted if p.held and p.token is None])
        ready = [p for p in wanted if p.held and p.token is not None]
        return self._lease_and_read(ready, settle=settle)

    def _wanted(self, tables: dict[str, list[Partition]]) -> list[Partition]:
        """The partitions to hold this pass: a fair share of each table's, per live worker.

        Workers announce themselves in a per-table set (score: when they stop counting);
        each holds at most ``ceil(partitions / live workers)`` and releases the rest, so a
        worker that joins gets partitions as the others' shares shrink. The share is only
        about balance: the leases and fencing tokens decide who consumes a partition.

        A lease is free when absent, foreign (another Redis type, no expiry, not written by
        a worker), or held by an earlier worker of this consumer name: a replacement
        resumes at once. Those of an earlier worker of this name come first.
        """
        pipe = self.client.pipeline(transaction=False)
        self._announce_into(pipe, tables)
        for parts in tables.values():
            for p in parts:
                pipe.get(p.lease)
                pipe.pttl(p.lease)
        replies = pipe.execute(raise_on_error=False)
        self._turn += 1
        wanted: list[Partition] = []
        at = 0
        for table in tables:
            self._live_workers(table, replies[at : at + _ANNOUNCED])
            at += _ANNOUNCED
        for table, parts in tables.items():
            leases = replies[at : at + 2 * len(parts)]
            at += 2 * len(parts)
            live = self._live_counts[table]
            limit = -(-len(parts) // live)
            mine: list[Partition] = []
            earlier: list[Partition] = []
            free: list[Partition] = []
            for p, value, ttl in zip(parts, leases[::2], leases[1::2], strict=True):
                state = self._lease_state(value, ttl)
                if p.held:
                    if state in ("mine", "free"):
                        mine.append(p)  # a lapsed lease is taken again by the lease script
                    else:
                        self._dropped(p, "its lease expired and another worker took it")
                elif state == "earlier":
                    earlier.append(p)
                elif state == "free":
                    free.append(p)
            if len(mine) > limit:
                self._release(mine[limit:])
                mine = mine[:limit]
            if free:
                start = (self._turn + self._offset) % len(free)
                free = free[start:] + free[:start]
            wanted += mine + (earlier + free)[: max(0, limit - len(mine))]
        return wanted

    def _lease_state(self, value: Any, ttl: Any) -> str:
        """``mine``, ``earlier`` (a previous worker of this name), ``busy`` or ``free``."""
        if isinstance(value, Exception) or value is None or ttl == -1:
            return "free"  # absent, another Redis type, or without the expiry leases have
        parsed = scripts.parse_lease(value)
        if parsed is None:
            return "busy"  # a string with an expiry: another program's, left alone
        instance, name = parsed
        if name != self.consumer:
            return "busy"
        return "mine" if instance == self.instance else "earlier"

    def _announce_into(self, pipe: Any, tables: Iterable[str]) -> None:
        now_ms = int(time.time() * 1000)
        for table in tables:
            key = self._workers_key(table)
            pipe.zadd(key, {self.consumer: now_ms + self.lease_ms})
            pipe.zremrangebyscore(key, "-inf", now_ms)
            pipe.zremrangebyscore(key, f"({now_ms + LEASE_MAX_MS + scripts.CLOCK_STEP_MS}", "+inf")
            pipe.zcard(key)
            pipe.pexpire(key, self.lease_ms * 2)

    def _announce(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        self._announce_into(pipe, self._tables)
        replies = pipe.execute(raise_on_error=False)
        for i, table in enumerate(self._tables):
            self._live_workers(table, replies[_ANNOUNCED * i : _ANNOUNCED * (i + 1)])

    def _workers_key(self, table: str) -> str:
        return self.keys.workers_key(table, self._tables[table][0].scope)

    def _live_workers(self, table: str, replies: list[Any]) -> int:
        """How many workers share ``table`` (the ZCARD), from the announcement's replies.

        The set only balances partitions between workers: one of another Redis type holds
        no announcement, and is deleted so that the next pass recreates it.
        """
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            live = max(1, int(replies[-2]))
        elif not all(str(e).startswith("WRONGTYPE") for e in errors):
            raise errors[0]
        else:
            key = self._workers_key(table)
            log.warning("write-behind worker set %s was not a sorted set: recreated", key)
            self.client.delete(key)
            live = 1
        self._live_counts[table] = live
        return live

    def _release(self, parts: list[Partition]) -> None:
        self.io.run_batch(
            [
                scripts.wb_lease(
                    p.lease,
                    p.stream,
                    mode="release",
                    owner=self.owner,
                    name=self.consumer,
                    lease_ms=self.lease_ms,
                )
                for p in parts
            ]
        )
        for p in parts:
            self._forget(p)

    @staticmethod
    def _forget(p: Partition) -> None:
        p.held = p.lost = p.caught_up = False
        p.token = None
        p.unacked = 0
        p.limit = p.attempts = 0
        p.cursor = "-"

    def _dropped(self, p: Partition, why: str) -> None:
        """This worker no longer holds ``p``: forget it (the lease is someone else's)."""
        if p.held:
            log.warning(
                "write-behind partition %s/%s dropped: %s",
                p.info.table,
                p.number,
                why,
                extra={
                    "wb_table": p.info.table,
                    "wb_partition": p.number,
                    "wb_consumer": self.consumer,
                },
            )
        self._forget(p)

    def _take(self, parts: list[Partition]) -> None:
        """Take the leases of free partitions (Redis); their tokens come next (database)."""
        if not parts:
            return
        for p, reply in zip(
            parts, self.io.run_batch(self._lease_calls(parts, "take")), strict=True
        ):
            if reply == -1:
                self._not_a_stream(p)
            elif reply == 1:
                p.held, p.token, p.lost = True, None, False

    def _fence(self, parts: list[Partition]) -> None:
        """Move the fencing token of partitions whose lease was just taken; keep the new one.

        From then on a batch of any previous holder is refused by the database. A previous
        holder stopped inside its batch's transaction holds the offset row: the update
        gives up after a heartbeat period, and is tried again on a later pass. Leases lost
        since they were taken (this worker paused) are dropped first, so that a token is
        moved on only by the lease's holder, save for a pause between the two steps.
        """
        if not parts:
            return
        kept = self._renew(parts)
        renewed = {id(p) for p in kept}
        for p in parts:
            if id(p) not in renewed:
                self._dropped(p, "its lease was taken by another worker")
        for p in kept:
            try:
                p.token = p.applier.acquire(p.stream, lock_timeout_ms=self.heartbeat_ms)
            except (DBAPIError, StatementError) as exc:
                self._failed(p, exc)
                continue
            self.database.answered()
            log.info(
                "write-behind partition %s/%s taken",
                p.info.table,
                p.number,
                extra={
                    "wb_table": p.info.table,
                    "wb_partition": p.number,
                    "wb_token": p.token,
                    "wb_consumer": self.consumer,
                },
            )

    def _lease_and_read(self, ready: list[Partition], *, settle: bool) -> int:
        """Renew the leases of ``ready`` and read their streams from where this worker's
        last read ended; apply what was read where the lease is still this worker's. One
        round trip for all of them. Without ``settle``, the last batch's acknowledgement
        stays in flight, unless nothing new was read."""
        if not ready:
            return self._settle()
        replies = self._take_and_read(ready)
        done = 0
        read_any = False
        try:
            for p, (lease, reply) in zip(ready, replies, strict=True):
                if isinstance(lease, Exception):
                    raise lease
                if lease == 0:
                    self._dropped(p, "another worker holds its lease")
                    continue
                if lease == -1:
                    self._not_a_stream(p)
                    continue
                if isinstance(reply, Exception):
                    raise reply
                p.caught_up = len(reply) < (p.limit or self.batch_size)
                if reply:
                    read_any = True
                    done += self._process(p, reply)
        finally:
            if settle or not read_any:
                done += self._settle()
        return done

    def _take_and_read(self, parts: list[Partition]) -> list[tuple[Any, Any]]:
        """Per partition, the lease script's reply and ``XRANGE - + COUNT batch_size``
        (fewer after a statement timeout: :meth:`_timed_out`).

        Plain ``XRANGE`` rather than a read inside the script: a script would turn each
        entry into Lua values and back. Reading changes nothing, so reading a partition
        whose lease turns out to be lost costs only the transfer.
        """
        calls = [
            scripts.wb_lease(
                p.lease,
                p.stream,
                mode="take",
                owner=self.owner,
                name=self.consumer,
                lease_ms=self.lease_ms,
            )
            for p in parts
        ]
        for attempt in range(2):
            pipe = self._reader.pipeline(transaction=False)
            for p, (script, keys, args) in zip(parts, calls, strict=True):
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.xrange(p.stream, min=p.cursor, count=p.limit or self.batch_size)
            replies = pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies[::2]):
                break
            self.client.script_load(calls[0][0].source)  # a restarted or flushed server
        return list(zip(replies[::2], replies[1::2], strict=True))

    def _not_a_stream(self, p: Partition) -> None:
        """The partition's stream key holds another Redis type: report it, leave it alone.

        Never deleted nor replaced here: whatever overwrote the stream took the writes
        queued in it, and an operator must see that (their rows' pending keys still hold
        the states). Commits to the partition are refused meanwhile (``wb_enqueue.lua``);
        the other partitions go on. Retried with backoff, and logged at each retry.
        """
        self._forget(p)
        self._failed(
            p,
            ResponseError(
                f"write-behind stream {p.stream} holds another Redis type, not a stream: the "
                "writes queued in it are lost and new commits to it are refused; see what "
                "wrote it, then delete it (docs/write-behind.md)"
            ),
        )

    def _process(self, p: Partition, raw: list[Any]) -> int:
        """Apply one batch, then acknowledge it; on failure leave it queued for a retry.

        The acknowledgement (``lua/wb_flushed.lua``) runs on a helper thread while the
        next batch, of another partition, is applied: Redis and Postgres work at the same
        time. One acknowledgement is in flight at most; :meth:`_settle` waits for it.
        Returns the entries of the batch settled here (the previous one), or 0.
        """
        applier = p.applier
        entries = applier.decode_batch(raw)
        p.unacked = len(entries)
        p.cursor = f"({entries[-1].id}"
        started = time.perf_counter()
        try:
            result = self._apply(p, entries)
        except LeaseLost as exc:
            self.fenced += 1
            if self._renew([p]):
                # the lease is still ours: the token was moved by a worker that took the
                # lease, paused, and then lost it; that one drops the partition on its
                # next pass, so move the token on again rather than orphan the partition
                log.warning(
                    "write-behind partition %s/%s: %s; the lease is still this worker's, "
                    "so it takes the token back",
                    p.info.table,
                    p.number,
                    exc,
                    extra={"wb_table": p.info.table, "wb_partition": p.number},
                )
                p.token, p.cursor = None, "-"  # the batch is read again under the new token
            else:
                self._dropped(p, str(exc))
            return 0
        except (DBAPIError, StatementError) as exc:
            if is_unreachable(exc) and not self._renew([p]):
                # stopped inside the batch's transaction past the lease: the database ended
                # it (idle_in_transaction_session_timeout), nothing was applied, and the
                # partition is another worker's now. Fenced off, not a database outage.
                self.fenced += 1
                self._dropped(p, f"its lease was lost while its batch waited: {exc}")
                return 0
            self._failed(p, exc)
            return 0
        except Exception as exc:  # noqa: BLE001 - the worker must outlive it; logged
            # not a database error: a column type's bind processor that raises in this
            # process (a key it lacks), a driver that cannot adapt a value. Raised out of
            # run_once, it ended the worker, and every restart, for every partition: this
            # one is retried with backoff, logged each time; the others go on. (A batch's
            # own such error is counted in _apply; this is one its last attempt raised.)
            _log_outside_error(p, exc, "retrying with backoff")
            self._failed(p, exc)
            return 0
        if result is None:  # timed out: read again, fewer entries or after a backoff
            return 0
        if p.limit:  # a smaller batch passed: grow back towards batch_size
            p.limit = 0 if p.limit * 2 >= self.batch_size else p.limit * 2
        p.attempts = 0
        self.database.answered()
        db_ms = (time.perf_counter() - started) * 1000
        # committed: what the database now holds counts even if the ack is lost (the
        # entries are read again, skipped by the offset, and counted as skipped)
        self.applied += result.applied
        self.dead_letters += len(result.dead)
        self.superseded += result.superseded
        done = self._settle()
        if p.cursor == "-":
            # this partition's previous acknowledgement failed: acknowledging this batch
            # would trim that one's entries too, whose pending keys it left behind. Both
            # are read again from the head, skipped by the offset, and acknowledged then.
            return done
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sarc-wb-ack")
        future = self._executor.submit(self._after_flush, p, entries, result)
        self._inflight = _InFlight(p, entries, result, started, db_ms, future)
        return done

    def _apply(self, p: Partition, entries: list[Entry]) -> BatchResult | None:
        """Apply a batch; None when it failed and is to be read again (:meth:`_failing_alone`)."""
        try:
            return p.applier.apply(p.stream, entries, token=p.token)
        except Exception as exc:
            if not condemned_at_last_attempt(exc):
                raise
            if not is_timeout(exc):
                # not a database error: a column type's bind processor that raises in this
                # process (a key it lacks), a driver that cannot adapt a value. Raised out
                # of run_once, it ended the worker, and every restart, for every partition
                _log_outside_error(p, exc, "retrying")
            return self._failing_alone(p, entries, exc)

    def _failing_alone(
        self, p: Partition, entries: list[Entry], exc: Exception
    ) -> BatchResult | None:
        """The batch failed with an error the worker counts attempts of
        (:func:`.condemned_at_last_attempt`): it exceeded the database's
        ``statement_timeout`` (SQLSTATE 57014), or raised an exception that is not a
        database error (a column type's bind processor that raises in this process).

        Retried as it is, it would fail again on every pass and hold the partition for
        good. A batch of several entries is read again at half the size (down to one), so
        the operations that pass are applied. One entry that still fails alone is retried
        with backoff; its ``timeout_attempts``-th attempt (:meth:`.Applier.apply_alone`)
        dead-letters it if it fails so again, with the error's text (replayable once the
        cause is fixed: a slow trigger, a row lock held for long, a timeout set too short,
        a key the worker's process lacks), so the rest of the partition goes on. Returns
        that attempt's batch result, else None (read again later).
        """
        reason = (error_text(exc).splitlines() or [type(exc).__name__])[0]
        timeout = is_timeout(exc)
        failed = "timed out" if timeout else f"raised {type(exc).__name__}"
        where = {"wb_table": p.info.table, "wb_partition": p.number}
        entry = entries[0]
        if len(entries) > 1:
            self.errors += 1
            self._shrunk += 1
            p.cursor = "-"  # read again from the head, without a backoff: a smaller batch
            p.limit = max(1, len(entries) // 2)
            p.attempts = 0
            log.warning(
                "write-behind batch of %s entries %s (%s); retrying %s at a time",
                len(entries),
                failed,
                reason,
                p.limit,
                extra=where,
            )
            return None
        p.limit = 1
        p.attempts = p.attempts + 1 if p.failing == entry.id else 1
        p.failing = entry.id
        if p.attempts < self.timeout_attempts - 1:
            self._failed(p, exc)  # read again from the head after a backoff
            return None
        # the last attempt holds the partition's offset row first: a timeout then is the
        # operation's own, not a wait for that lock (which a dead-letter replay holds)
        self.errors += 1
        why = "statement_timeout" if timeout else "an error raised outside the database"
        note = (
            f" (the operation {failed} alone {p.attempts + 1} times in a row: {why}; "
            "dead-lettered so that the partition goes on)"
        )
        result = p.applier.apply_alone(p.stream, entry, token=p.token, note=note)
        if result.dead:
            log.warning(
                "write-behind operation %s (entry %s) %s alone %s times (%s): dead-lettered",
                entry.pk,
                entry.id,
                failed,
                p.attempts + 1,
                reason,
                extra=where,
            )
        return result

    def _settle(self) -> int:
        """Wait for the acknowledgement in flight; count, log or retry its batch."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return 0
        p, entries, result = flight.partition, flight.entries, flight.result
        try:
            flight.future.result()
        except RedisError as exc:
            # applied, not trimmed: read again from the head, skipped by the offset row
            self._failed(p, exc)
            return 0
        p.failures = 0
        p.unacked = 0
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
                "wb_token": p.token,
            },
        )
        return len(entries)

    def _after_flush(self, p: Partition, entries: list[Entry], result: BatchResult) -> None:
        info = p.info
        keys = self.keys
        # the last entry of each row per schema hash: an entry queued by another version of
        # the model (dead-lettered) has its pending key and entity entry under that
        # version's hash, where that version's processes would serve it for ever (they have
        # no TTL) although the database never got it
        last: dict[tuple[str, str], Entry] = {}
        for entry in entries:
            last[entry.pk, _queued_under(entry, info.schema_hash)] = entry
        rows = [
            scripts.FlushedRow(
                pending_key=keys.pending_key(info.table, schema, p.scope, pk),
                entity_key=keys.entity_key(info.table, schema, p.scope, pk),
                last_id=entry.id,
                write_key=keys.row_write_key(info.table, pk),
            )
            for (pk, schema), entry in last.items()
        ]
        newest = entries[-1].sid  # entries are in stream order
        call = scripts.wb_flushed(
            keys,
            info.table,
            p.stream,
            rows,
            trim_below=f"{newest[0]}-{newest[1] + 1}",
            header=HEADER,
        )
        self.io.run_script(*call)

    def _wait(self, block_ms: int) -> None:
        """Block until a held partition may have new entries (or ``block_ms`` passed).

        On a cluster one ``XREAD`` may name the streams of one slot only: the slots are
        waited on in turn, each for its share of ``block_ms``, so an entry is noticed
        within ``block_ms`` wherever it lands (docs/cluster.md#write-behind).
        """
        streams = [p.stream for p in self.partitions if p.held and p.token is not None]
        if not streams:
            return
        groups: dict[int, dict[Any, Any]] = {}
        for stream in streams:
            slot = key_slot(stream) if self.cluster else 0
            groups.setdefault(slot, {})[stream] = "$"
        share = max(1, block_ms // len(groups))
        try:
            for group in groups.values():
                if self.client.xread(group, count=1, block=share):
                    return
        except RedisError as exc:
            self._failed(None, exc)

    def _failed(
        self, p: Partition | None, exc: Exception, *, among: list[Partition] | None = None
    ) -> None:
        """Count and log a failure; ``p`` (or the partitions ``among``, or every one) wait
        out a backoff before they are tried again."""
        self.errors += 1
        for part in [p] if p is not None else self.partitions if among is None else among:
            part.cursor = "-"  # whatever was read and not acknowledged is read again
            part.failures += 1
            delay = min(self.max_backoff, 0.05 * 2 ** min(part.failures, 10))
            part.retry_at = time.monotonic() + delay
        if is_unreachable(exc):
            # logged by the outage tracker: once when it starts, then every few seconds
            self.database.failed(exc, retry_in=self.max_backoff)
            return
        log.warning(
            "write-behind flush failed, will retry: %s",
            exc,
            extra={
                "wb_table": p.info.table if p else None,
                "wb_partition": p.number if p else None,
            },
        )


_SCHEMA_HASH = re.compile(r"[0-9a-f]{12}")


def _queued_under(entry: Entry, own: str) -> str:
    """The schema hash whose keys ``entry``'s row was queued under: the one it names when
    it has the form of one (:func:`sa_redis_cache.models.table_schema_hash`), else ``own``
    (an undecodable entry: no other key can be told)."""
    return entry.schema if _SCHEMA_HASH.fullmatch(entry.schema) else own


def _log_outside_error(p: Partition, exc: Exception, then: str) -> None:
    """Log, with its traceback, an error a batch of ``p`` raised outside the database
    (called in the ``except`` block that caught ``exc``), and what happens ``then``."""
    log.error(
        "write-behind batch of %s/%s raised %s; %s",
        p.info.table,
        p.number,
        type(exc).__name__,
        then,
        exc_info=True,
        extra={"wb_table": p.info.table, "wb_partition": p.number},
    )
