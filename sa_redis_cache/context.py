"""The state every part of one cache shares: Redis clients, keys, scripts, models, counters.

:class:`~sa_redis_cache.Cache` is the front end users hold; the read path, the write path
and the function decorator are built on this object instead of reaching into the front end.
They make every Redis call through :meth:`CacheContext.io`, which picks the asyncio client
inside a SQLAlchemy greenlet (a session run by ``AsyncSession``) and the synchronous one
everywhere else (:mod:`sa_redis_cache.redis_io`).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import weakref
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import event

from . import compat
from .binds import Binds
from .breaker import CircuitBreaker
from .cluster_io import async_io_for, io_for
from .codec import CodecError
from .local import Fences, LocalTier
from .models import ModelInfo, ModelRegistry
from .outages import RedisOutages
from .protocol import KeyScheme, scripts
from .protocol.scripts import NO_COUNTER, NoCounter, ScriptCall
from .redis_io import AsyncClients, OwedReplies
from .signing import Signer
from .stats import Stats
from .tracing import READ, Measurement

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from .binds import Database
    from .local.tier import Consistency
    from .redis_io import AsyncClient, Pending, RedisIO, SyncClient

log = logging.getLogger(__name__)

OWED_WAIT = 1.0
"""How long taking the counters waits, in all, for fill replies not yet read (a Redis
that stopped answering delays ``cache.stats()`` no longer than this)."""

# how many entity scopes per table cache.invalidate() unlinks directly (the row write
# counter it bumps retires the entries of every other scope)
_SCOPES_PER_TABLE = 64
# listener records (CacheContext.listen) at which the first scan for freed targets runs
_LISTENERS_PRUNED_AT = 64


def _same(target: Any) -> Any:
    """A strong stand-in for ``weakref.ref(target)()``."""
    return target


class CacheContext(RedisOutages):
    """Shared collaborators and the few operations every path needs (TTLs, stores).

    ``async_client`` (a ``redis.asyncio.Redis``) or ``async_factory`` (makes one per event
    loop) gives the sessions run by ``AsyncSession`` a client that does not block the loop.

    Example::

        core = CacheContext(redis.Redis(), namespace="shop", default_ttl=300)
        core.keys.version_key("products")
        core.io().mget([core.keys.version_key("products")])
    """

    def __init__(
        self,
        client: SyncClient,
        *,
        async_client: AsyncClient | None = None,
        async_factory: Callable[[], AsyncClient] | None = None,
        namespace: str,
        default_ttl: float,
        ttl_jitter: float,
        max_entry_bytes: int,
        breaker: CircuitBreaker | None = None,
        hit_rate_warning: float | None = 0.8,
        signing_key: bytes | None = None,
        local_lease: float = 2.0,
        local_consistency: Consistency = "strict",
        slot_groups: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        # a cluster client gets the cluster variant, chosen once here: no per-call branch
        self.sync_io = io_for(client)
        self.namespace = namespace
        # table -> slot group; attach() adds the models' CachePolicy(slot_group=...)
        self.keys = KeyScheme(namespace, dict(slot_groups or {}))
        self.default_ttl = float(default_ttl)
        self.ttl_jitter = ttl_jitter
        self.max_entry_bytes = max_entry_bytes
        self.signer = None if signing_key is None else Signer(signing_key)
        # fills sent without waiting for their replies; the counters read them first
        self.owed = OwedReplies()
        self.counters = Stats(warn_below=hit_rate_warning, before_snapshot=self.settle_owed)
        self.models = ModelRegistry()
        self.binds = Binds()
        # the entity scopes this process read or wrote each table in
        self.entity_scopes: dict[str, set[str]] = {}
        self._listeners: list[tuple[Callable[[], Any], str, Callable[..., Any]]] = []
        # the length at which listen() next drops the listeners of targets that are gone
        self._listeners_pruned_at = _LISTENERS_PRUNED_AT
        # sessions register the engines they begin on from any thread
        self._listeners_lock = threading.Lock()
        self.fences = Fences(self, lease=local_lease, strict=local_consistency == "strict")
        # the local tier, when the cache has one (Cache(local=True): enable_local)
        self.local: LocalTier | None = None
        self._init_outages(breaker or CircuitBreaker())
        self.async_clients: AsyncClients | None = None
        if async_client is not None or async_factory is not None:
            self.async_clients = AsyncClients(
                async_client,
                factory=async_factory,
                prepare=self._watch_restarts_async,
                make_io=async_io_for,
            )

    def enable_local(self, *, max_entries: int, max_bytes: int) -> LocalTier:
        """Give this cache its local tier (started by the first ``attach``)."""
        self.local = LocalTier(
            self,
            max_entries=max_entries,
            max_bytes=max_bytes,
            lease=self.fences.lease,
            consistency="strict" if self.fences.strict else "bounded",
        )
        return self.local

    def on_restart(self) -> None:
        """Redis restarted: empty the local tier, make commits wait one lease, send no
        script unwaited until it ran on the new server (:meth:`RedisIO.send_later
        <sa_redis_cache.redis_io.RedisIO.send_later>`). (Every cached function was made
        to delete its results before its next look already: :meth:`distrust_cached_functions`,
        before the restart was published.)"""
        self.sync_io.scripts_seen.clear()
        self.fences.restarted()
        if self.local is not None:
            self.local.reset("redis restarted")

    def io(self) -> RedisIO:
        """The Redis operations for the calling code: asyncio inside a SQLAlchemy greenlet.

        Session events that ``AsyncSession`` runs (and Core events of an ``AsyncEngine``)
        run in a greenlet spawned from the event loop: there the asyncio client is used
        through the greenlet bridge, so the loop keeps serving other tasks while Redis
        answers. Everywhere else, and when the cache has no asyncio client, the
        synchronous client is used.
        """
        clients = self.async_clients
        if clients is None or not compat.in_greenlet():
            if self.owed.by_thread:
                self.owed.settle_own()  # this thread's calls come after its fills
            return self.sync_io
        return clients.current()

    def settle_owed(self) -> None:
        """Read every thread's unread fill replies (:class:`~sa_redis_cache.redis_io.
        OwedReplies`) that arrive within a second, so the counters count those fills."""
        if self.owed.by_thread:
            self.owed.settle_all(wait=OWED_WAIT)

    def async_client(self) -> AsyncClient:
        """The asyncio client for the running event loop (``await`` its methods directly).

        Raises ``RuntimeError`` when the cache was given no way to make one.
        """
        clients = self.async_clients
        if clients is None:
            raise RuntimeError("this cache has no asyncio Redis client")
        client: AsyncClient = clients.current().client
        return client

    def listen(self, target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        """``event.listen``, remembered so that :meth:`remove_listeners` can undo it.

        Remembered weakly: an engine a session began on (``binds=``, one per tenant) must
        be freed with its last reference, as SQLAlchemy's own event registry lets it be.
        """
        event.listen(target, name, fn, **kw)
        try:
            held: Callable[[], Any] = weakref.ref(target)
        except TypeError:  # not weakly referenceable: kept until remove_listeners()
            held = functools.partial(_same, target)
        with self._listeners_lock:
            listeners = self._listeners
            if len(listeners) >= self._listeners_pruned_at:
                # the records of freed engines' listeners go too, or an engine per tenant
                # or request would leave a few each, for the life of the cache; at twice
                # the live ones, so that the scans cost O(1) a call
                listeners[:] = [entry for entry in listeners if entry[0]() is not None]
                self._listeners_pruned_at = max(_LISTENERS_PRUNED_AT, 2 * len(listeners))
            listeners.append((held, name, fn))

    def remove_listeners(self) -> None:
        """Remove every listener this cache added (sessions and engines) to targets that
        still exist."""
        with self._listeners_lock:
            while self._listeners:
                held, name, fn = self._listeners.pop()
                target = held()
                if target is not None and event.contains(target, name, fn):
                    event.remove(target, name, fn)
            self._listeners_pruned_at = _LISTENERS_PRUNED_AT

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
        by_table = self.models.by_table
        found = {info.scope for table in tables if (info := by_table.get(table)) is not None}
        scopes = sorted(found)
        return self.measure(scopes[0] if scopes else None, operation, also=tuple(scopes[1:]))

    def invalidate_entries(self, keys: Sequence[str], ttl_ms: int, tables: Iterable[str]) -> int:
        """Delete query entries and move their invalidation counters; how many there were.

        ``lua/invalidate_entries.lua``: a fill whose look came before this call finds the
        counter moved and is refused; one that looked after it may store. ``tables`` are
        the tables the entries read: the local tiers holding them drop the entries before
        this returns (:meth:`run_fenced`). Raises ``RedisError``: the caller asked for this
        invalidation and must know.
        """
        if not keys:
            return 0
        reply = self.run_fenced([scripts.invalidate_entries(self.keys, keys, ttl_ms)], tables)
        return int(reply[0])

    def run_fenced(self, calls: Sequence[ScriptCall], tables: Iterable[str]) -> list[Any]:
        """Run invalidation ``calls``; return once no local tier serves what they changed.

        The fences of ``tables`` go in the same round trip, after the calls
        (:mod:`sa_redis_cache.local.fences`). The calls' replies are returned. Raises
        ``RedisError``.

        Example::

            core.run_fenced([scripts.bump_all([core.keys.version_key("products")])], ["products"])
        """
        return self.fences.run(calls, tables)

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
        """Compare-and-set fill (``lua/fill.lua``): True when stored or sent, False when
        refused or failed, None when not tried (oversized: the caller still holds its
        lease).

        Where the client allows it (:meth:`RedisIO.send_later
        <sa_redis_cache.redis_io.RedisIO.send_later>`) and no span is traced, the fill is
        sent and its reply read at the calling thread's next call (:attr:`owed`): the
        read returns a round trip sooner. Whatever the reply says is counted then
        (``fills``, ``fill_refused``, ``errors``); the ``fill`` histogram records the
        sending.

        ``seen_invalidations`` is the entry's invalidation counter as the caller read it
        before its database read (None: it did not exist); left out, the entry has none
        (an entity entry) and it is not compared.
        """
        blob = self.sealed(key, blob)
        if len(blob) > self.max_entry_bytes:
            self.counters.incr(scope, "oversize", also=also)
            return None
        measured = self.measure(scope, "fill", also=also)
        call = scripts.fill(
            self.keys,
            key,
            version_keys,
            writers_keys,
            ttl_ms=physical_ttl_ms or self.jittered_ms(ttl),
            blob=blob,
            lease_token=lease_token,
            invalidations=seen_invalidations,
            captured=captured,
        )
        io = self.io()
        try:
            pending = None if measured.traced else io.send_later(call)
        except RedisError:
            pending = None  # not sent: run_script sends it under the client's retries
        try:
            if pending is not None:
                measured.done()
                self.owed.owe(
                    pending, lambda sent, *, resend: self._fill_replied(sent, resend, scope, also)
                )
                return True
            stored = io.run_script(*call)
        except RedisError as exc:
            measured.done("error")
            self._fill_failed(exc, scope, also)
            return False
        measured.done("stored" if stored else "refused")
        self.counters.incr(scope, "fills" if stored else "fill_refused", also=also)
        return bool(stored)

    def _fill_replied(self, sent: Pending, resend: bool, scope: str, also: tuple[str, ...]) -> None:
        """Count what a fill sent without waiting came to (:meth:`store`). Never raises:
        it runs at the start of another call, or in ``cache.stats()``."""
        try:
            stored = sent.replies(resend=resend)[0]
        except RedisError as exc:
            self._fill_failed(exc, scope, also)
            return
        except Exception:
            # redis-py raises these for a connection closed under an unread reply
            # (client.close() in another thread): Pending dropped it and let it go
            log.warning("a fill's reply could not be read; counted as an error", exc_info=True)
            self.counters.incr(scope, "errors", also=also)
            return
        self.counters.incr(scope, "fills" if stored else "fill_refused", also=also)

    def _fill_failed(self, exc: RedisError, scope: str, also: tuple[str, ...]) -> None:
        self.redis_failed(exc)
        self.counters.incr(scope, "errors", also=also)

    def unlink_matching(self, pattern: str, only: Callable[[bytes], bool] | None = None) -> int:
        """UNLINK every key matching ``pattern`` that ``only`` accepts (all when None;
        SCAN, in batches); returns how many."""
        return self.io().unlink_matching(pattern, only=only)
