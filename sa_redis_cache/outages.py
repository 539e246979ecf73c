"""How one cache lives through Redis outages and restarts.

* **Failures** (:meth:`RedisOutages.redis_failed`) feed the circuit breaker, which keeps
  reads away from a Redis that does not answer, and are logged once per interval.
* **Undelivered invalidations**: a write whose invalidation could not reach Redis leaves its
  tables in :attr:`RedisOutages.undelivered`; this process does not trust the cache for them
  until their versions and generations have been bumped (:meth:`deliver_undelivered`).
* **Restarts**: every new connection reads the server's ``run_id``; a server that restarted
  may have lost invalidations or come back with old entries (AOF, a promoted replica), so
  every table the process knows is bumped on that connection before it serves a read. A
  server that refuses ``INFO`` (an ACL) leaves restarts unnoticed, said once; one that
  refuses the scripting commands leaves the tables undelivered instead.

:class:`~sa_redis_cache.context.CacheContext` inherits these; the read and write paths
call them through it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeAlias

from redis.exceptions import NoPermissionError, RedisError, ResponseError

from . import compat
from .protocol import scripts
from .redis_io import is_cluster
from .slot_owners import OWNER_QUERY, SlotOwners, own_ranges, tables_in
from .undelivered import EVERY_NAME, MAX_REMEMBERED, Undelivered

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence

    from .breaker import CircuitBreaker
    from .models import ModelRegistry
    from .protocol import KeyScheme, ScriptCall
    from .protocol.scripts import Command
    from .redis_io import AsyncClient, RedisIO, SyncClient
    from .stats import Stats

    # a connect-time check: yields the commands of each round trip, receives their replies
    _Steps: TypeAlias = Generator[Sequence[Command], list[Any], None]

log = logging.getLogger(__name__)

_FAILURE_LOG_INTERVAL = 10.0


class RedisOutages:
    """Outage and restart handling, mixed into :class:`~sa_redis_cache.context.CacheContext`.

    Example::

        context.redis_failed(exc)            # a read fell back to the database
        context.keep_undelivered({"products"})
        context.deliver_undelivered()        # True once Redis took every bump
    """

    # provided by the context
    client: SyncClient
    keys: KeyScheme
    models: ModelRegistry
    counters: Stats

    def io(self) -> RedisIO:  # pragma: no cover - the context's
        raise NotImplementedError

    def _init_outages(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self._last_failure_log = float("-inf")
        # tables whose invalidation could not be delivered (Redis was away): this process
        # does not trust the cache for them until the bumps have been delivered
        self.pending_bumps = Undelivered()
        self.undelivered: set[str] = self.pending_bumps.names  # read on every lookup
        # each cached function's failed invalidations (cached_functions.py)
        self._function_deliveries: weakref.WeakSet[Undelivered] = weakref.WeakSet()
        self._functions_lock = threading.Lock()
        # guards what connections report: the run id, restarts, slot map refreshes
        self._seen_lock = threading.Lock()
        self.run_id: str | None = None
        # a Redis Cluster's nodes each have a run id: by node address
        self.node_run_ids: dict[str, str] = {}
        # who served each slot, by (node id, run id) from connections and by address from
        # the client's slot map (slot_owners.py)
        self.slot_owners = SlotOwners()
        self.slot_addresses = SlotOwners()
        # slot map changes under way (:meth:`answered_across_a_move`)
        self.slot_map_refreshes = 0
        self._restart_lock = threading.Lock()
        self._detection_off_logged = False
        self.restarts_seen = 0
        self._watch_restarts()

    def _watch_restarts(self) -> None:
        """Check the server's run id on every new connection.

        A server that restarted may have lost writes' invalidations or come back with
        old entries (AOF, a replica promoted): every table this process knows is bumped,
        on that connection, before it serves a single read. On a Redis Cluster, every
        node's connections are checked (:meth:`_check_node_run_id`).
        """
        if is_cluster(self.client):
            compat.install_connect_hook(self.client, self._check_node_run_id)
            self._watch_slot_map(self.client)
        else:
            compat.install_connect_hook(self.client, self._check_run_id)
        # a connection opened before the hook never told this process what it serves: a
        # restart (or a failover) seen later would look like a first meeting, and bump
        # nothing
        compat.drop_idle_connections(self.client)

    def _watch_restarts_async(self, client: AsyncClient) -> None:
        """:meth:`_watch_restarts` for an asyncio client (its connect hook is a coroutine)."""
        if is_cluster(client):
            compat.install_connect_hook(client, self._check_node_run_id_async)
            self._watch_slot_map(client)
        else:
            compat.install_connect_hook(client, self._check_run_id_async)

    def _check_node_run_id(self, connection: Any) -> None:
        """A new connection to one node of a Redis Cluster: check who serves its slots.

        One round trip asks the node's run id, its id and the slot map
        (:data:`~sa_redis_cache.slot_owners.OWNER_QUERY`). Every slot it serves as primary
        whose last known owner was another ``(node id, run id)`` (a replica promoted by a
        failover, a restart, a resharding) changed hands: the tables whose keys live there
        are bumped on this connection before it serves a command, as a single server's
        restart bumps every table (:meth:`_owners_changed`). A slot seen for the first
        time is only recorded. Held under a lock across the bump, as on a single server.
        """
        _drive(connection, self._owner_steps(connection, self._restart_lock))

    async def _check_node_run_id_async(self, connection: Any) -> None:
        """:meth:`_check_node_run_id` on an asyncio connection (no lock across awaits:
        two connections that see the same change both bump, which is harmless)."""
        await _drive_async(connection, self._owner_steps(connection, nullcontext()))

    def _owner_steps(self, connection: Any, lock: AbstractContextManager[Any]) -> _Steps:
        """The round trips of :meth:`_check_node_run_id`, for either driver."""
        info, myid, slots = yield list(OWNER_QUERY)
        with lock:
            plan = self._owner_plan(connection, info, myid, slots)
            if plan is None:
                return
            node, run_id, tables, call, record = plan
            marks = self.pending_bumps.marks(tables)
            failure = None
            if call:
                try:
                    loaded, *ran = yield call
                except BaseException:
                    # the connection died under the bump: the owner is not recorded, so
                    # the tables must be delivered before they are trusted (the slots
                    # may go back to an owner that would look unchanged)
                    self.keep_undelivered(tables)
                    raise
                failure = _bump_failure(
                    _error(loaded), next((e for e in map(_error, ran) if e), None)
                )
            self._owners_changed(node, run_id, marks, failure, record, sent=bool(call))

    def _owner_plan(
        self, connection: Any, info: Any, myid: Any, slots: Any
    ) -> tuple[str, str, list[str], list[Command], Callable[..., bool]] | None:
        """What a new connection to a cluster node must bump: None, or
        ``(node, run id, tables, commands, record)`` (SCRIPT LOAD, then one EVALSHA per
        table). ``record()`` remembers the node's run id and slots, and says whether that
        changed what was known (``record(write=False)`` only says it): called once the bump
        landed, so that another connection that sees the same change meanwhile (an
        asyncio one holds no lock) bumps too rather than serve before the bump."""
        if isinstance(info, ResponseError):
            self._detection_off(info)
            return None
        run_id = _run_id_of(info)
        if run_id is None:
            return None
        node = f"{connection.host}:{connection.port}"
        known = self.node_run_ids.get(node)
        known_tables = set(self.models.known_tables()) | self.undelivered
        if isinstance(myid, ResponseError) or isinstance(slots, ResponseError):
            # CLUSTER refused (an ACL): a node seen again under another run id restarted,
            # and which slots it served is unknown, so every table is undelivered
            def record_run_id(write: bool = True) -> bool:
                changed = self.node_run_ids.get(node) != run_id
                if write:
                    self.node_run_ids[node] = run_id
                return changed

            if known is None or known == run_id:
                record_run_id()
                return None
            return node, run_id, sorted(known_tables), [], record_run_id
        owner, ranges = (myid, run_id), own_ranges(slots, myid)

        def record(write: bool = True) -> bool:
            if write:
                self.node_run_ids[node] = run_id
            return bool(self.slot_owners.claim(owner, ranges, record=write))

        changed = self.slot_owners.claim(owner, ranges, record=False)
        if not changed:
            record()
            return None
        tables = tables_in(changed, known_tables, self.keys.version_key)
        calls = [
            scripts.bump_all([self.keys.version_key(t), self.keys.generation_key(t)])
            for t in tables
        ]
        commands: list[Command] = []
        for call in calls:
            loaded, run = scripts.load_and_run(call)
            commands += [loaded] if not commands else []
            commands.append(run)
        return node, run_id, tables, commands, record

    def _owners_changed(
        self,
        node: str,
        run_id: str,
        marks: dict[str, int],
        failure: ResponseError | None,
        record: Callable[..., bool],
        *,
        sent: bool,
    ) -> None:
        """Slots now served by ``node`` (run ``run_id``) had another owner: the tables of
        ``marks`` (:meth:`Undelivered.marks`) were bumped there (``sent``, ``failure``
        None), or are kept undelivered until they are; then the new owner is recorded."""
        tables = list(marks)
        if tables and (failure is not None or not sent):
            self.keep_undelivered(tables)
        elif tables:
            self.pending_bumps.forget_delivered(marks)
        if not record(write=False):
            return  # another connection met the same change and reported it meanwhile
        # before the owner is recorded: a connection that finds it known serves
        self.distrust_cached_functions()
        with self._seen_lock:
            if not record(write=True):
                return
            self.restarts_seen += 1
        self.on_restart()
        log.warning(
            "redis cluster node %s restarted or took over slots (run id %s now serves slots "
            "another node or run served): %d cached tables in them %s",
            node,
            run_id,
            len(tables),
            "invalidated"
            if not tables or (sent and failure is None)
            else "are read from the database until their invalidation is delivered"
            + (f" ({failure})" if failure is not None else " (CLUSTER refused)"),
        )

    def _watch_slot_map(self, client: Any) -> None:
        """Refreshes of a cluster client's slot map, sync or asyncio (a MOVED, a failed
        node): a slot whose primary is now at another address changed hands (a failover
        whose new primary was connected before, a resharding); its tables become
        undelivered, bumped before the cache is trusted for them again."""
        compat.watch_slot_map(client, self._slot_map_seen, self._slot_map_refreshing)

    def _slot_map_refreshing(self, step: int) -> None:
        with self._seen_lock:
            self.slot_map_refreshes += step
        if step > 0:
            self.pending_bumps.touch()

    def trust_epoch(self) -> int:
        """A number that moves whenever a table is made undelivered or delivered, or a
        slot map change begins: taken before a read asks Redis, for
        :meth:`answered_across_a_move` (the hot path reads ``pending_bumps.changes``)."""
        return self.pending_bumps.changes

    def answered_across_a_move(self, tables: Iterable[str], epoch: int) -> bool:
        """Whether a reply for ``tables``, asked for when :meth:`trust_epoch` was
        ``epoch``, may come from a node that took their slots over with an old state: a
        table was made undelivered or delivered since, a slot map refresh began or is
        under way, or one of ``tables`` is undelivered.

        redis-py refreshes its slot map inside a command (a node that failed, a
        ``MOVED``) and sends the command again, by the new map, on a connection it may
        have opened before the node was promoted (which no connection check sees). The
        move is noticed (:meth:`_slot_map_seen`) only after the read was let through; and
        another thread may deliver the bump the move called for after the promoted node
        answered this read, but before the read looks.
        """
        return (
            bool(self.slot_map_refreshes)
            or self.trust_epoch() != epoch
            or self.undelivered_in(tables)
        )

    def undelivered_in(self, tables: Iterable[str]) -> bool:
        """Whether a write of one of ``tables`` still waits to be delivered to Redis."""
        undelivered = self.undelivered
        return bool(undelivered) and not undelivered.isdisjoint(tables)

    def _slot_map_seen(self, slots: dict[int, str]) -> None:
        changed = self.slot_addresses.claim_map(slots)
        if not changed:
            return
        known_tables = set(self.models.known_tables()) | self.undelivered
        tables = tables_in(changed, known_tables, self.keys.version_key)
        if tables:
            self.keep_undelivered(tables)
        self.distrust_cached_functions()
        log.warning(
            "redis cluster: %d slots moved to other primaries; %d cached tables in them are "
            "read from the database until their invalidation is delivered",
            len(changed),
            len(tables),
        )

    def _check_run_id(self, connection: Any) -> None:
        # held across the bump: another connection of this process that notices the same
        # restart must not serve a read before the bump has landed
        _drive(connection, self._run_id_steps(self._restart_lock))

    async def _check_run_id_async(self, connection: Any) -> None:
        """:meth:`_check_run_id` on an asyncio connection.

        No lock is held across the bump (a thread lock must not be held across an
        ``await``); another connection that notices the same restart meanwhile sees the
        old run id still and bumps too, which is harmless, and the restart is counted once.
        """
        await _drive_async(connection, self._run_id_steps(nullcontext()))

    def _run_id_steps(self, lock: AbstractContextManager[Any]) -> _Steps:
        """The round trips of :meth:`_check_run_id`, for either driver."""
        (info,) = yield [("INFO", "server")]
        if isinstance(info, ResponseError):
            self._detection_off(info)
            return
        run_id = _run_id_of(info)
        with lock:
            plan = self._restart_plan(run_id)
            if plan is None:
                return
            known, tables, call = plan
            marks = self.pending_bumps.marks(tables)
            failure = None
            if call is not None:
                loaded, ran = yield list(scripts.load_and_run(call))
                failure = _bump_failure(_error(loaded), _error(ran))
            self._restarted(known, run_id, marks, failure)

    def _detection_off(self, exc: ResponseError) -> None:
        """INFO was refused (an ACL, a renamed command): restarts go unnoticed; said once."""
        if self._detection_off_logged:
            return
        self._detection_off_logged = True
        log.warning(
            "redis refused INFO (%s): this process cannot notice a restart of the server, "
            "which may bring back entries older than the database; grant the cache's Redis "
            "user +info (see the ACL in docs/security.md)",
            exc,
        )

    def _restart_plan(self, run_id: str | None) -> tuple[str, list[str], ScriptCall | None] | None:
        """What a connection that saw ``run_id`` must do: None, or bump every known table.

        The run id is remembered only after the bump has landed (:meth:`_restarted`), so a
        connection that sees it unchanged never serves a read before the bump.
        """
        known = self.run_id
        if known is None or run_id is None or run_id == known:
            self.run_id = run_id or known
            return None
        tables = sorted(set(self.models.known_tables()) | self.undelivered)
        keys = [k for t in tables for k in (self.keys.version_key(t), self.keys.generation_key(t))]
        return known, tables, scripts.bump_all(keys) if keys else None

    def _restarted(
        self, known: str, run_id: str | None, marks: dict[str, int], failure: ResponseError | None
    ) -> None:
        """The bump of the tables of ``marks`` (:meth:`Undelivered.marks`) after a restart
        landed (``failure`` None) or was refused.

        Refused (an ACL without the scripting commands, out of memory), the tables become
        undelivered: this process reads them from the database until a delivery lands.
        The connection itself stays usable either way.
        """
        tables = list(marks)
        if failure is not None:
            self.keep_undelivered(tables)
        else:
            self.pending_bumps.forget_delivered(marks)
        # before the new run id is published: a connection that finds it known serves
        if self.run_id != run_id:
            self.distrust_cached_functions()
        with self._seen_lock:
            if self.run_id == run_id:
                return  # another connection reported this restart already
            self.run_id = run_id
            self.restarts_seen += 1
        self.on_restart()
        if failure is not None:
            log.warning(
                "redis restarted (run id %s -> %s) and refused the invalidation of %d cached "
                "tables (%s): they are read from the database until it is delivered; grant "
                "the cache's Redis user +evalsha and +script|load (see the ACL in "
                "docs/security.md)",
                known,
                run_id,
                len(tables),
                failure,
            )
            return
        log.warning(
            "redis restarted (run id %s -> %s): %d cached tables invalidated",
            known,
            run_id,
            len(tables),
        )

    def on_restart(self) -> None:
        """What else a restart means (the local tier is emptied, commits wait a lease)."""

    def distrust_cached_functions(self) -> None:
        """Redis restarted, or a slot changed hands: an ``invalidate()`` tombstone it
        acknowledged may be lost (AOF ``everysec``, asynchronous replication), bringing
        back a result it retired. Every cached function of this cache deletes its results
        (``invalidate_all``) on its next call, before it looks; a call runs uncached until
        that lands, as for an ``invalidate_all()`` that failed."""
        with self._functions_lock:
            functions = list(self._function_deliveries)
        for deliveries in functions:
            deliveries.keep((EVERY_NAME,))

    def watch_function(self, deliveries: Undelivered) -> None:
        """Register a cached function's :class:`Undelivered` for
        :meth:`distrust_cached_functions` (held weakly: a function that goes is dropped)."""
        with self._functions_lock:
            self._function_deliveries.add(deliveries)

    def keep_undelivered(self, tables: Iterable[str]) -> None:
        """Remember tables whose writes could not be announced to Redis."""
        kept = set(tables)
        if len(self.undelivered | kept) > MAX_REMEMBERED:
            # past the bound, every table this process knows is treated as written
            kept.update(self.models.known_tables())
        self.pending_bumps.keep(kept)

    def invalidation_failed(self, exc: RedisError, tables: Iterable[str]) -> None:
        """An invalidation of ``tables`` Redis did not take: the failure recorded and
        counted, and the tables kept undelivered (their reads go to the database until
        Redis takes the bump)."""
        self.redis_failed(exc)
        self.counters.incr_total("errors")
        self.keep_undelivered(tables)

    def deliver_undelivered(self) -> bool:
        """Bump the versions and generations of the undelivered tables; True when none is left.

        Called before the cache is trusted again for those tables, so no entry filled
        before the outage can be read as current after it.
        """
        marks = self.pending_bumps.marks()
        tables = sorted(marks)
        if not tables:
            return True
        keys = self.keys
        try:
            self.io().run_batch(
                [
                    scripts.bump_all([keys.version_key(table), keys.generation_key(table)])
                    for table in tables
                ]
            )
        except RedisError as exc:
            self.redis_failed(exc)
            self.counters.incr_total("errors")
            return False
        self.breaker.success()
        return self.pending_bumps.forget_delivered(marks)

    def redis_failed(self, exc: RedisError) -> None:
        """Record a Redis failure on a path that degrades to the database.

        Logged at most once per ``_FAILURE_LOG_INTERVAL`` seconds: while Redis is down
        every cached call fails, and one line per call would flood the log. The caller
        counts the failure in ``errors`` (in its scope, or the total): every failure the
        breaker counts towards opening is one there.
        """
        self.breaker.failure()
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL:
            self._last_failure_log = now
            if isinstance(exc, NoPermissionError):
                log.warning(
                    "redis refused a command to the cache's user (%s), using the database; "
                    "grant the commands of the ACL in docs/security.md",
                    exc,
                )
            else:
                log.warning("redis unavailable, using the database: %s", exc)


def _bump_failure(loaded: ResponseError | None, ran: ResponseError | None) -> ResponseError | None:
    """Why the restart bump did not land: None when EVALSHA succeeded, else the load's
    error (the cause of the NOSCRIPT that follows) or the run's own."""
    return None if ran is None else loaded or ran


def _error(reply: Any) -> ResponseError | None:
    """The error a reply holds, or None."""
    return reply if isinstance(reply, ResponseError) else None


def _reply_or_error(read: Callable[[], Any]) -> Any:
    """Read one reply from a connection: the reply, or the ``ResponseError`` it holds
    (every reply of a round trip is read, so the connection stays in step)."""
    try:
        return read()
    except ResponseError as exc:
        return exc


def _drive(connection: Any, steps: _Steps) -> None:
    """Run a connect-time check on a synchronous connection: each step's commands are
    sent together, their replies (errors as values) sent back into the check.

    The check is closed however this ends: a connection error between two steps must not
    leave it suspended inside its ``with lock`` (every later connection would wait on
    the lock for as long as the traceback keeps the check alive).
    """
    try:
        commands = next(steps)
        while True:
            for command in commands:
                connection.send_command(*command)
            replies = [_reply_or_error(connection.read_response) for _ in commands]
            commands = steps.send(replies)
    except StopIteration:
        return
    finally:
        steps.close()


async def _reply_or_error_async(read: Callable[[], Awaitable[Any]]) -> Any:
    """:func:`_reply_or_error` on an asyncio connection."""
    try:
        return await read()
    except ResponseError as exc:
        return exc


async def _drive_async(connection: Any, steps: _Steps) -> None:
    """:func:`_drive` on an asyncio connection."""
    try:
        commands = next(steps)
        while True:
            for command in commands:
                await connection.send_command(*command)
            replies = [await _reply_or_error_async(connection.read_response) for _ in commands]
            commands = steps.send(replies)
    except StopIteration:
        return
    finally:
        steps.close()


def _run_id_of(info: Any) -> str | None:
    """The ``run_id`` line of an ``INFO server`` reply."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")),
        None,
    )
