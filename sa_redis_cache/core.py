"""The state every part of one cache shares: Redis clients, keys, scripts, models, counters.

:class:`~sa_redis_cache.Cache` is the front end users hold; the read path, the write path
and the function decorator are built on this object instead of reaching into the front end.
They make every Redis call through :meth:`CacheCore.io`, which picks the asyncio client
inside a SQLAlchemy greenlet (a session run by ``AsyncSession``) and the synchronous one
everywhere else (:mod:`sa_redis_cache.io`).
"""

from __future__ import annotations

import enum
import inspect
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoPermissionError, RedisError, ResponseError
from sqlalchemy import event

from .binds import Binds
from .breaker import CircuitBreaker
from .codec import CodecError
from .io import AsyncClients, SyncRedisIO, in_greenlet, unlink_matching
from .keys import KeyScheme
from .models import ModelInfo, ModelRegistry
from .scripts import Scripts
from .signing import Signer
from .stats import Stats
from .tracing import READ, Measurement

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    import redis
    import redis.asyncio

    from .binds import Database
    from .io import Command, RedisIO, ScriptCall

log = logging.getLogger("sa_redis_cache")

_FAILURE_LOG_INTERVAL = 10.0
COUNTER_TTL_MS = 7 * 24 * 3600 * 1000
# row write counters live an hour at least, and as long as the entity entries they validate
ROW_COUNTER_TTL_MS = 3_600_000
MAX_UNDELIVERED = 10_000
# how many entity scopes per table cache.invalidate() unlinks directly (the row write
# counter it bumps retires the entries of every other scope)
_SCOPES_PER_TABLE = 64
LEASE_SUFFIX = ":lease"
# beside a query entry: moved by invalidate_query(), compared by every fill of the entry
INVALIDATIONS_SUFFIX = ":inv"


class NoCounter(enum.Enum):
    """The type of :data:`NO_COUNTER`."""

    NO_COUNTER = "no counter"


NO_COUNTER = NoCounter.NO_COUNTER
"""``CacheCore.store(seen_invalidations=...)`` left out: the entry has no invalidation
counter (entity entries), so the fill does not compare one."""


class CacheCore:
    """Shared collaborators and the few operations every path needs (TTLs, stores).

    ``async_client`` (a ``redis.asyncio.Redis``) or ``async_factory`` (makes one per event
    loop) gives the sessions run by ``AsyncSession`` a client that does not block the loop.

    Example::

        core = CacheCore(redis.Redis(), namespace="shop", default_ttl=300)
        core.keys.version_key("products")
        core.io().mget([core.keys.version_key("products")])
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        async_client: redis.asyncio.Redis | None = None,
        async_factory: Callable[[], redis.asyncio.Redis] | None = None,
        namespace: str,
        default_ttl: float,
        ttl_jitter: float,
        max_entry_bytes: int,
        breaker: CircuitBreaker | None = None,
        hit_rate_warning: float | None = 0.8,
        signing_key: bytes | None = None,
    ) -> None:
        self.client = client
        self.sync_io = SyncRedisIO(client)
        self.namespace = namespace
        self.keys = KeyScheme(namespace)
        self.default_ttl = float(default_ttl)
        self.ttl_jitter = ttl_jitter
        self.max_entry_bytes = max_entry_bytes
        self.signer = None if signing_key is None else Signer(signing_key)
        self.counters = Stats(warn_below=hit_rate_warning)
        self.scripts = Scripts(client)
        self.models = ModelRegistry()
        self.binds = Binds()
        # the entity scopes this process read or wrote each table in
        self.entity_scopes: dict[str, set[str]] = {}
        self._last_failure_log = float("-inf")
        # counters outlive entries by far, but still expire: a namespace nobody uses any
        # more leaves nothing behind, and an expired counter only turns entries into misses
        self.counter_ttl_ms = COUNTER_TTL_MS
        self._listeners: list[tuple[Any, str, Callable[..., Any]]] = []
        self.breaker = breaker or CircuitBreaker()
        # tables whose invalidation could not be delivered (Redis was away): this process
        # does not trust the cache for them until the bumps have been delivered
        self.undelivered: set[str] = set()
        self._undelivered_lock = threading.Lock()
        self.run_id: str | None = None
        self._restart_lock = threading.Lock()
        self._detection_off_logged = False
        self.restarts_seen = 0
        self._watch_restarts()
        self.async_clients: AsyncClients | None = None
        if async_client is not None or async_factory is not None:
            self.async_clients = AsyncClients(
                async_client, factory=async_factory, prepare=self._watch_restarts_async
            )

    def io(self) -> RedisIO:
        """The Redis operations for the calling code: asyncio inside a SQLAlchemy greenlet.

        Session events that ``AsyncSession`` runs (and Core events of an ``AsyncEngine``)
        run in a greenlet spawned from the event loop: there the asyncio client is used
        through the greenlet bridge, so the loop keeps serving other tasks while Redis
        answers. Everywhere else, and when the cache has no asyncio client, the
        synchronous client is used.
        """
        clients = self.async_clients
        if clients is None or not in_greenlet():
            return self.sync_io
        return clients.current()

    def async_client(self) -> redis.asyncio.Redis:
        """The asyncio client for the running event loop (``await`` its methods directly).

        Raises ``RuntimeError`` when the cache was given no way to make one.
        """
        clients = self.async_clients
        if clients is None:
            raise RuntimeError("this cache has no asyncio Redis client")
        client: redis.asyncio.Redis = clients.current().client
        return client

    def listen(self, target: Any, name: str, fn: Callable[..., Any]) -> None:
        """``event.listen``, remembered so that :meth:`remove_listeners` can undo it."""
        event.listen(target, name, fn)
        self._listeners.append((target, name, fn))

    def remove_listeners(self) -> None:
        """Remove every listener this cache added (sessions and engines)."""
        while self._listeners:
            target, name, fn = self._listeners.pop()
            if event.contains(target, name, fn):
                event.remove(target, name, fn)

    def measure(
        self, scope: str | None, operation: str = READ, *, also: tuple[str, ...] = ()
    ) -> Measurement:
        """Start timing ``operation`` in ``scope``: a latency histogram, and a span if traced.

        End it with ``done(outcome)``, or use it as a context manager; a read (the
        default operation) is recorded under its outcome, ``hit``, ``miss`` or ``error``
        (:class:`~sa_redis_cache.tracing.Measurement`).

        Example::

            m = core.measure("region:books", also=("model:Product",))
            ...
            m.done("hit")

            with core.measure("model:Product", "invalidate"):
                core.io().pipeline(commands)
        """
        return Measurement(self.counters, scope, operation, also, self.namespace)

    def measure_tables(self, tables: Iterable[str], operation: str) -> Measurement:
        """:meth:`measure` in the scopes of the models of ``tables`` (the total alone if none).

        Example::

            with core.measure_tables(["products", "categories"], "invalidate"):
                ...
        """
        scopes = sorted(
            {
                "model:" + info.mapper.class_.__name__
                for table in tables
                if (info := self.models.by_table.get(table)) is not None
            }
        )
        scope = scopes.pop(0) if scopes else None
        return self.measure(scope, operation, also=tuple(scopes))

    def invalidate_entries(self, keys: Sequence[str], ttl_ms: int) -> int:
        """Delete query entries and move their invalidation counters; how many there were.

        ``lua/invalidate_entries.lua``: a fill whose look came before this call finds the
        counter moved and is refused; one that looked after it may store. Raises
        ``RedisError``: the caller asked for this invalidation and must know.
        """
        if not keys:
            return 0
        paired = [k for key in keys for k in (key, key + INVALIDATIONS_SUFFIX)]
        start = str(random.getrandbits(62))
        return int(self.io().run_script(self.scripts.invalidate_entries, paired, [ttl_ms, start]))

    def entity_scope(self, info: ModelInfo, database: Database, translate: Any) -> str:
        """The scope of ``info``'s rows in ``database`` under ``translate``
        (:meth:`~sa_redis_cache.binds.Binds.scope`), remembered per table so that
        ``cache.invalidate()`` can unlink the entries this process knows of.

        Example::

            core.entity_scope(info, core.binds.database_of(connection), None)
        """
        scope = self.binds.scope(database, info.table_schema, translate)
        scopes = self.entity_scopes.get(info.table)
        if scopes is None:
            scopes = self.entity_scopes[info.table] = set()
        if scope not in scopes and len(scopes) < _SCOPES_PER_TABLE:
            scopes.add(scope)
        return scope

    def ttl_for_info(self, info: ModelInfo) -> float:
        """The model's TTL, or the cache default."""
        if info.policy is not None and info.policy.ttl is not None:
            return float(info.policy.ttl)
        return self.default_ttl

    def ttl_for_tables(self, tables: Iterable[str]) -> float:
        """The shortest TTL among the models of ``tables`` (an entry lives no longer)."""
        ttls = [
            self.ttl_for_info(info)
            for table in tables
            if (info := self.models.by_table.get(table)) is not None
        ]
        return min(ttls) if ttls else self.default_ttl

    def jittered_ms(self, ttl: float) -> int:
        """``ttl`` seconds in milliseconds, shortened at random by up to ``ttl_jitter``."""
        return max(1, int(ttl * 1000 * (1 - random.random() * self.ttl_jitter)))

    def sealed(self, key: str, blob: bytes) -> bytes:
        """``blob`` as it is stored under ``key``: signed when the cache has a signing key."""
        signer = self.signer
        return blob if signer is None else signer.seal(key, blob)

    def opened(self, key: str, raw: bytes, *, scripted: bool = False) -> bytes:
        """The document of a value read under ``key``, before anything decodes it.

        Raises :class:`~sa_redis_cache.codec.CodecError` (the caller deletes the value and
        counts a decode error) when it is larger than ``max_entry_bytes``, which no writer
        of this library stores, or, with a signing key, when its signature does not verify
        (``scripted``: see :meth:`~sa_redis_cache.signing.Signer.open`).
        """
        if len(raw) > self.max_entry_bytes:
            raise CodecError(
                f"{len(raw)} bytes, above max_entry_bytes={self.max_entry_bytes}: not written "
                "by this cache"
            )
        signer = self.signer
        return raw if signer is None else signer.open(key, raw, scripted=scripted)

    def store(
        self,
        key: str,
        blob: bytes,
        version_keys: list[str],
        writers_keys: list[str],
        captured: Sequence[bytes],
        ttl: float,
        scope: str,
        *,
        also: tuple[str, ...] = (),
        lease_token: str = "",
        physical_ttl_ms: int | None = None,
        seen_invalidations: bytes | NoCounter | None = NO_COUNTER,
    ) -> bool | None:
        """Compare-and-set fill (``lua/fill.lua``): True when stored, False when refused
        or failed, None when not tried (oversized: the caller still holds its lease).

        ``seen_invalidations`` is the entry's invalidation counter as the caller read it
        before its database read (None: it did not exist); left out, the entry has none
        (an entity entry) and it is not compared.
        """
        blob = self.sealed(key, blob)
        if len(blob) > self.max_entry_bytes:
            self.counters.incr(scope, "oversize", also=also)
            return None
        if seen_invalidations is NO_COUNTER:
            invalidations = b"n"
        else:
            invalidations = b"=" + (seen_invalidations or b"")
        measured = self.measure(scope, "fill", also=also)
        try:
            stored = self.io().run_script(
                self.scripts.fill,
                [
                    key,
                    key + LEASE_SUFFIX,
                    key + INVALIDATIONS_SUFFIX,
                    *version_keys,
                    *writers_keys,
                ],
                [
                    physical_ttl_ms or self.jittered_ms(ttl),
                    blob,
                    lease_token,
                    invalidations,
                    random.getrandbits(62),
                    *captured,
                ],
            )
        except RedisError as exc:
            measured.done("error")
            self.redis_failed(exc)
            self.counters.incr(scope, "errors", also=also)
            return False
        measured.done("stored" if stored else "refused")
        self.counters.incr(scope, "fills" if stored else "fill_refused", also=also)
        return bool(stored)

    def bump_call(self, counters: Sequence[str], unlink: Sequence[str] = ()) -> ScriptCall:
        """``lua/bump_all.lua`` for ``counters`` (versions, generations), deleting ``unlink``.

        A counter that does not exist starts at a random value, never at 1: a counter
        lost and recreated must not come back at a value an entry was stored under. One
        of another Redis type, or holding what INCR refuses, is reseeded the same way
        instead of failing the call. Give the keys of one table per call (one cluster
        slot); run it with ``io().run_script(*call)`` or several in ``io().run_batch``.

        Example::

            keys = core.keys
            core.io().run_script(*core.bump_call([keys.version_key("products")]))
        """
        starts = [random.getrandbits(62) for _ in counters]
        return (
            self.scripts.bump_all,
            [*counters, *unlink],
            [self.counter_ttl_ms, len(counters), *starts],
        )

    def _watch_restarts(self) -> None:
        """Check the server's run id on every new connection.

        A server that restarted may have lost writes' invalidations or come back with
        old entries (AOF, a replica promoted): every table this process knows is bumped,
        on that connection, before it serves a single read.
        """
        pool = self.client.connection_pool
        previous = pool.connection_kwargs.get("redis_connect_func")

        def on_connect(connection: Any) -> None:
            if previous is not None:
                previous(connection)
            else:
                connection.on_connect()
            self._check_run_id(connection)

        pool.connection_kwargs["redis_connect_func"] = on_connect
        # connections the pool already made reconnect with their own copy of the hook
        for name in ("_available_connections", "_in_use_connections"):
            for connection in list(getattr(pool, name, ())):
                connection.redis_connect_func = on_connect

    def _watch_restarts_async(self, client: redis.asyncio.Redis) -> None:
        """:meth:`_watch_restarts` for an asyncio client (its connect hook is a coroutine)."""
        pool = client.connection_pool
        previous = pool.connection_kwargs.get("redis_connect_func")

        async def on_connect(connection: Any) -> None:
            if previous is not None:
                done = previous(connection)
                if inspect.isawaitable(done):
                    await done
            else:
                await connection.on_connect()
            await self._check_run_id_async(connection)

        pool.connection_kwargs["redis_connect_func"] = on_connect
        for name in ("_available_connections", "_in_use_connections"):
            for connection in list(getattr(pool, name, ())):
                connection.redis_connect_func = on_connect

    def _check_run_id(self, connection: Any) -> None:
        try:
            connection.send_command("INFO", "server")
            info = connection.read_response()
        except ResponseError as exc:
            self._detection_off(exc)
            return
        run_id = _run_id_of(info)
        # held across the bump: another connection of this process that notices the same
        # restart must not serve a read before the bump has landed
        with self._restart_lock:
            plan = self._restart_plan(run_id)
            if plan is None:
                return
            known, tables, call = plan
            failure = None
            if call is not None:
                for command in _restart_bump_commands(call):
                    connection.send_command(*command)
                loaded = _error_of(connection.read_response)
                failure = _bump_failure(loaded, _error_of(connection.read_response))
            self._restarted(known, run_id, tables, failure)

    async def _check_run_id_async(self, connection: Any) -> None:
        """:meth:`_check_run_id` on an asyncio connection.

        No lock is held across the bump (a thread lock must not be held across an
        ``await``); another connection that notices the same restart meanwhile sees the
        old run id still and bumps too, which is harmless, and the restart is counted once.
        """
        try:
            await connection.send_command("INFO", "server")
            info = await connection.read_response()
        except ResponseError as exc:
            self._detection_off(exc)
            return
        run_id = _run_id_of(info)
        plan = self._restart_plan(run_id)
        if plan is None:
            return
        known, tables, call = plan
        failure = None
        if call is not None:
            for command in _restart_bump_commands(call):
                await connection.send_command(*command)
            loaded = await _error_of_async(connection.read_response)
            failure = _bump_failure(loaded, await _error_of_async(connection.read_response))
        self._restarted(known, run_id, tables, failure)

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
        return known, tables, self.bump_call(keys) if keys else None

    def _restarted(
        self, known: str, run_id: str | None, tables: list[str], failure: ResponseError | None
    ) -> None:
        """The bump after a restart landed (``failure`` None) or was refused.

        Refused (an ACL without the scripting commands, out of memory), the tables become
        undelivered: this process reads them from the database until a delivery lands.
        The connection itself stays usable either way.
        """
        with self._undelivered_lock:
            if failure is None:
                self.undelivered.difference_update(tables)
            else:
                self.undelivered.update(tables)
            if self.run_id == run_id:
                return  # another connection reported this restart already
            self.run_id = run_id
            self.restarts_seen += 1
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

    def keep_undelivered(self, tables: Iterable[str]) -> None:
        """Remember tables whose writes could not be announced to Redis."""
        with self._undelivered_lock:
            self.undelivered.update(tables)
            if len(self.undelivered) > MAX_UNDELIVERED:
                # past the bound, every table this process knows is treated as written
                self.undelivered.update(self.models.known_tables())

    def deliver_undelivered(self) -> bool:
        """Bump the versions and generations of the undelivered tables; True when none is left.

        Called before the cache is trusted again for those tables, so no entry filled
        before the outage can be read as current after it.
        """
        with self._undelivered_lock:
            tables = sorted(self.undelivered)
        if not tables:
            return True
        keys = self.keys
        try:
            self.io().run_batch(
                [
                    self.bump_call([keys.version_key(table), keys.generation_key(table)])
                    for table in tables
                ]
            )
        except RedisError as exc:
            self.redis_failed(exc)
            return False
        self.breaker.success()
        with self._undelivered_lock:
            self.undelivered.difference_update(tables)
            return not self.undelivered

    def redis_failed(self, exc: RedisError) -> None:
        """Record a Redis failure on a path that degrades to the database.

        Logged at most once per ``_FAILURE_LOG_INTERVAL`` seconds: while Redis is down
        every cached call fails, and one line per call would flood the log.
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

    def unlink_matching(self, pattern: str) -> int:
        """UNLINK every key matching ``pattern`` (SCAN, in batches); returns how many."""
        return unlink_matching(self.client, pattern)


def _restart_bump_commands(call: ScriptCall) -> list[Command]:
    """The restart bump on a new connection: load ``bump_all`` (a restarted server has lost
    its scripts), then run it by its SHA1; both are sent before either reply is read."""
    script, keys, args = call
    return [
        ("SCRIPT", "LOAD", script.script),
        ("EVALSHA", script.sha, len(keys), *keys, *args),
    ]


def _bump_failure(loaded: ResponseError | None, ran: ResponseError | None) -> ResponseError | None:
    """Why the restart bump did not land: None when EVALSHA succeeded, else the load's
    error (the cause of the NOSCRIPT that follows) or the run's own."""
    return None if ran is None else loaded or ran


def _error_of(read: Callable[[], Any]) -> ResponseError | None:
    """Read one reply from a connection: the error it holds, or None."""
    try:
        read()
    except ResponseError as exc:
        return exc
    return None


async def _error_of_async(read: Callable[[], Awaitable[Any]]) -> ResponseError | None:
    """:func:`_error_of` on an asyncio connection."""
    try:
        await read()
    except ResponseError as exc:
        return exc
    return None


def _run_id_of(info: Any) -> str | None:
    """The ``run_id`` line of an ``INFO server`` reply."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    return next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")),
        None,
    )
