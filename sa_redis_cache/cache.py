"""The ``Cache`` front end: the one object most users touch."""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, ParamSpec, cast

from redis.exceptions import RedisError
from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from . import compat
from .admission import ModelAdmission
from .binds import translate_map_of
from .breaker import CircuitBreaker
from .cached_functions import (
    AsyncCachedFunction,
    CacheDecorator,
    CachedFunction,
    callable_name,
    is_async_callable,
)
from .context import CacheContext
from .engine_writes import EngineWrites
from .errors import ConfigurationError
from .inspector import CacheInspector
from .models import ModelInfo, mapper_of, metadata_tables
from .options import FromCache
from .policy import is_ttl
from .protocol import KeyScheme, pk_text, scripts
from .reads import ReadPath
from .redis_io import clients_for
from .referential import referential_actions
from .sessions import SessionHooks
from .slot_groups import table_groups
from .stats_publisher import StatsPublisher
from .strategies.cache_aside import Invalidation
from .strategies.write_behind.session import WriteBehind

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Mapping
    from contextlib import AbstractAsyncContextManager

    from .binds import Database
    from .local import Consistency
    from .protocol.scripts import ScriptCall
    from .redis_io import AsyncClient, SyncClient

log = logging.getLogger(__name__)

P = ParamSpec("P")

_DEFAULT_TIMEOUT = 0.25

# The Cache whose hooks each session class or sessionmaker of the process carries: one at
# most, as a second set of hooks would append RETURNING twice to a write-through UPDATE
# and make every miss wait for the other cache's fill lease.
_HOLDERS: weakref.WeakKeyDictionary[Any, Cache] = weakref.WeakKeyDictionary()
# Session classes, factories and engines a detach() un-hooked, with the namespaces they
# were un-hooked from: the writes made through them since were seen by no cache, so the
# next attach() of one to such a namespace retires what they may have written there. (A
# namespace the target was never attached to in this process never saw its writes: a
# test's fresh namespace has nothing to retire.)
_RELEASED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# The session classes attach() made for async factories: attached again (after a detach,
# or by another cache) the factory keeps its class rather than a subclass of it.
_SCOPED: weakref.WeakSet[type[Session]] = weakref.WeakSet()
# held from a holder's check to its claim (attach() asks the database in between)
_HOLDERS_LOCK = threading.RLock()


class Cache:
    """A Redis cache for SQLAlchemy sessions.

    ``redis_client`` is a ``redis.Redis`` (or ``RedisCluster``) client or a URL; a URL
    gets short socket timeouts so that a slow Redis degrades reads to the database
    instead of stalling them.
    ``async_client`` is a ``redis.asyncio.Redis`` for the sessions ``AsyncSession`` runs
    and for ``async def`` functions under :meth:`cached`: their Redis calls then never
    block the event loop. From a URL the cache makes one itself, one per event loop, when
    first needed (close it with :meth:`aclose`). Attaching an async session factory, or
    caching an ``async def``, needs one or the other.
    ``namespace`` separates applications sharing one Redis; ``default_ttl`` (seconds)
    bounds every entry whose model or option gives no TTL; ``ttl_jitter`` shortens each
    TTL by up to that fraction so entries written together do not expire together;
    ``max_entry_bytes`` is the size above which a result is not cached, and a value read
    from Redis is not decoded (it is deleted as corrupt).
    After ``breaker_threshold`` consecutive Redis failures the cache is not asked for
    ``breaker_reset`` seconds (reads go to the database); writes made meanwhile are
    delivered as invalidations before this process trusts the cache again.
    A model whose hit rate stays below ``hit_rate_warning`` (over 5-minute windows with at
    least 200 lookups) is logged once per window; None turns the warning off.
    Once attached, the cache adds its counters' gains into Redis every
    ``stats_publish_interval`` seconds, from a thread of its own, for ``sa-redis-cache
    stats`` to sum over every process (:mod:`sa_redis_cache.stats_publisher`); 0 turns that off.
    ``signing_key`` (bytes, 16 or more; the same in every process of the namespace) signs
    every entry the cache writes with an HMAC bound to its Redis key, and makes every
    entry that does not verify a miss (deleted): for a Redis shared with less trusted
    writers (:mod:`sa_redis_cache.signing`, docs/guarantees.md's threat model).
    ``slot_groups`` (group name -> table names, as ``Table.fullname``) puts tables without
    a model, such as association tables, in slot groups, as ``CachePolicy(slot_group=...)``
    does for a model's table: on a Redis Cluster a group's keys share one slot
    (docs/cluster.md, "Slot groups").

    Example::

        cache = Cache("redis://localhost:6379/0", namespace="shop", default_ttl=300)
        # tables read and written together, on a Redis Cluster:
        # Cache(url, namespace="shop", slot_groups={"orders": ["order_tags"]})
        # or, where Redis is shared with less trusted writers:
        # Cache(url, namespace="shop", signing_key=os.environb[b"SARC_SIGNING_KEY"])
        Session = sessionmaker(engine)
        cache.attach(Session)
        with Session() as s:
            s.scalars(select(Product).options(FromCache())).all()

        # asyncio: the same cache, and an async session factory
        AsyncSession = async_sessionmaker(create_async_engine(async_url))
        cache.attach(AsyncSession)
        async with AsyncSession() as s:
            (await s.scalars(select(Product).options(FromCache()))).all()
        await cache.aclose()  # before the event loop ends
    """

    def __init__(
        self,
        redis_client: SyncClient | str,
        *,
        async_client: AsyncClient | None = None,
        namespace: str = "default",
        default_ttl: float = 300,
        ttl_jitter: float = 0.1,
        max_entry_bytes: int = 1 << 20,
        breaker_threshold: int = 3,
        breaker_reset: float = 2.0,
        hit_rate_warning: float | None = 0.8,
        stats_publish_interval: float = 1.0,
        signing_key: bytes | None = None,
        local: bool = False,
        local_max_entries: int = 10_000,
        local_max_bytes: int = 64 << 20,
        local_lease: float = 2.0,
        local_consistency: Consistency = "strict",
        slot_groups: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        groups = table_groups(slot_groups)
        redis_client, async_factory = clients_for(redis_client, async_client, _DEFAULT_TIMEOUT)
        if not namespace or any(ch in namespace for ch in "{}:*?[] \n"):
            raise ConfigurationError(
                f"namespace={namespace!r} must be a non-empty name without spaces, ':', "
                "braces or glob characters; use something like 'shop' or 'shop_v2'"
            )
        if not is_ttl(default_ttl):
            raise ConfigurationError(
                f"default_ttl={default_ttl!r}: every entry needs a positive, finite TTL in seconds "
                "(at most 1e9)"
            )
        if not (ttl_jitter == 0 or is_ttl(ttl_jitter)) or not 0 <= ttl_jitter < 1:
            raise ConfigurationError(f"ttl_jitter={ttl_jitter!r} must be a number in [0, 1)")
        _check_limits(max_entry_bytes, breaker_threshold, breaker_reset, hit_rate_warning)
        _check_local(local, local_max_entries, local_max_bytes, local_lease, local_consistency)
        self._core = CacheContext(
            redis_client,
            async_client=async_client,
            async_factory=async_factory,
            namespace=namespace,
            default_ttl=default_ttl,
            ttl_jitter=ttl_jitter,
            max_entry_bytes=max_entry_bytes,
            breaker=CircuitBreaker(threshold=breaker_threshold, reset_after=breaker_reset),
            hit_rate_warning=hit_rate_warning,
            signing_key=signing_key,
            local_lease=local_lease,
            local_consistency=local_consistency,
            slot_groups=groups,
        )
        self._admission = ModelAdmission(self._core, given_groups=groups)
        if local:
            self._core.enable_local(max_entries=local_max_entries, max_bytes=local_max_bytes)
        self._reads = ReadPath(self._core)
        invalidation = Invalidation(self._core)
        self._engine_writes = EngineWrites(self._core, invalidation)
        self._write_behind = WriteBehind(self._core)
        self._hooks = SessionHooks(
            self._core, self._reads, invalidation, self._write_behind, self._engine_writes
        )
        self._publisher = StatsPublisher(self._core, stats_publish_interval)
        self.inspector = CacheInspector(self._core, self._reads)
        """A read-only view of the cache for tools (:mod:`sa_redis_cache.inspector`)."""
        self._attached: list[Any] = []
        self._attached_binds: list[Engine] = []

    @property
    def client(self) -> SyncClient:
        """The synchronous Redis client (sessions run by ``AsyncSession`` use the asyncio one)."""
        return self._core.client

    async def aclose(self) -> None:
        """Close the asyncio Redis client the cache made (from its URL) for this event loop.

        Call it before the loop ends, as ``await engine.dispose()``. An ``async_client``
        given to the cache belongs to the application, which closes it.

        Example::

            async def main() -> None:
                cache = Cache(url)
                ...
                await cache.aclose()
        """
        clients = self._core.async_clients
        if clients is not None:
            await clients.aclose()

    @property
    def namespace(self) -> str:
        """The namespace every key of this cache starts with (after ``sarc:``)."""
        return self._core.namespace

    @property
    def keys(self) -> KeyScheme:
        """The key layout of this cache's namespace."""
        return self._core.keys

    @property
    def default_ttl(self) -> float:
        """TTL in seconds of entries whose model and option give none."""
        return self._core.default_ttl

    # -- attaching ------------------------------------------------------------------------

    def attach(self, target: Any, *, cache_queries: FromCache | bool | None = None) -> None:
        """Enable caching for sessions made by ``target`` and check every model's policy.

        ``target`` is a ``sessionmaker``, a ``Session`` subclass, an
        ``async_sessionmaker`` or an ``AsyncSession`` subclass (a ``scoped_session`` or
        ``async_scoped_session`` stands for its session factory); the engine a session
        factory is bound to is instrumented too, so Core and textual DML on it invalidate.
        An ``Engine`` (or an ``AsyncEngine``) alone may be attached for applications that
        write through Core.
        Every mapped class with a ``__cache__`` attribute is validated; all problems are
        reported at once, each naming the model and the fix, and nothing is attached when
        any is found. Attaching the same target again only checks the models again (and
        sets ``cache_queries``).

        A session class or factory takes one cache: attaching one that another ``Cache``
        of the process is attached to (or a subclass or superclass of its sessions'
        class) raises :class:`ConfigurationError`, naming that cache's namespace, until
        that cache is detached. A target a cache of this namespace detached since it was
        last attached wrote unseen meanwhile: attaching it again retires every table the
        process maps in this namespace (:meth:`detach`).

        ``cache_queries`` caches every eligible select of these sessions as if it carried
        that ``FromCache`` (``True``: ``FromCache()``): not primary-key loads (the entity
        cache's), relationship loads or refreshes, nor statements run with
        ``.execution_options(cache_queries=False)``; a statement's own ``FromCache``
        wins (:mod:`sa_redis_cache.reads.auto`).

        Example::

            Session = sessionmaker(engine)
            cache.attach(Session)
            # or cache every select of these sessions for a minute:
            cache.attach(Session, cache_queries=FromCache(ttl=60))
        """
        if self._attach(target, cache_queries):
            self._retire_unseen()

    def _attach(self, target: Any, cache_queries: FromCache | bool | None) -> bool:
        """:meth:`attach` but the retirement: whether ``target`` (or the engine its
        factory names) was un-hooked by a :meth:`detach` since it was last attached."""
        if isinstance(target, scoped_session | async_scoped_session):
            target = target.session_factory
        elif isinstance(target, AsyncEngine):
            # its Core and textual DML run on the Engine it wraps
            target = target.sync_engine
        if self._core.async_clients is None and (
            isinstance(target, async_sessionmaker)
            or (isinstance(target, type) and issubclass(target, AsyncSession))
        ):
            name = getattr(target, "__name__", type(target).__name__)
            raise ConfigurationError(
                f"cache.attach({name}): sessions run by AsyncSession need an asyncio Redis "
                "client, or every cache lookup would block the event loop; make the cache "
                "from a URL (Cache('redis://...')) or pass one: "
                "Cache(redis.Redis(...), async_client=redis.asyncio.Redis(...))"
            )
        option = _query_option(cache_queries)
        if isinstance(target, Engine):
            if option is not None:
                raise ConfigurationError(
                    "attach(engine, cache_queries=...): an engine runs no ORM selects; pass "
                    "cache_queries= when attaching the session factory"
                )
            self._load_models()
            self._publisher.start()
            self._engine_writes.register(target)
            self._remember_bind(target)
            return self._take_released(target)
        with _HOLDERS_LOCK:
            session_class = self._session_class_of(target)
            held = self._check_holders(target, session_class)
            self._load_models()
            self._publisher.start()
            if self._core.local is not None:
                self._core.local.start()
            # a sessionmaker makes sessions of its own subclass: the option is looked up by it
            made = getattr(session_class, "class_", session_class)
            self._reads.auto.set(made, option)
            if held:
                return False  # listening twice would run every hook twice
            bind = getattr(target, "kw", {}).get("bind")
            if isinstance(bind, AsyncEngine):
                bind = bind.sync_engine
            unseen = self._take_released(session_class)
            if isinstance(bind, Engine):
                self._engine_writes.register(bind)
                self._remember_bind(bind)
                unseen = self._take_released(bind) or unseen
            self._hooks.register(session_class)
            self._attached.append(session_class)
            _HOLDERS[session_class] = self
            return unseen

    def _check_holders(self, target: Any, session_class: Any) -> bool:
        """Whether this cache holds ``session_class`` already; refused
        (:class:`ConfigurationError`) when its sessions would get a second cache's hooks:
        it, a subclass or a superclass of it is attached, to another cache or this one."""
        made = getattr(session_class, "class_", session_class)
        for known, holder in list(_HOLDERS.items()):
            other = getattr(known, "class_", known)
            if known is session_class and holder is self:
                return True
            if known is not session_class and not (
                issubclass(made, other) or issubclass(other, made)
            ):
                continue
            if holder is self:
                raise ConfigurationError(
                    f"attach({target!r}): its sessions are {made.__name__} and "
                    f"{other.__name__} is attached already; one is a subclass of the other, "
                    "so every hook would run twice. Attach one of them (Session itself covers "
                    "every session of the process)"
                )
            what = (
                "this session factory"
                if known is session_class
                else f"{other.__name__}, and one of {made.__name__} and {other.__name__} is a "
                "subclass of the other"
            )
            raise ConfigurationError(
                f"attach({target!r}): another Cache (namespace {holder.namespace!r}) is "
                f"attached to {what}, so every hook would run twice (each write-through "
                "UPDATE given RETURNING twice, each miss waiting for the other's fill). "
                "Detach it first (cache.detach()), or attach one Cache per process: an app "
                "factory called once per test reuses the process's Cache, or detaches the "
                "previous one (docs/integrations.md)"
            )
        return False

    def _take_released(self, target: Any) -> bool:
        """Whether a :meth:`detach` un-hooked ``target`` from this namespace since it was
        last attached to it (forgotten now: it is attached again)."""
        namespaces = _RELEASED.get(target)
        if namespaces is None or self.namespace not in namespaces:
            return False
        namespaces.discard(self.namespace)
        return True

    def _retire_unseen(self) -> None:
        """Retire every table the process maps: a factory or engine attached again after
        a :meth:`detach` wrote unseen meanwhile, and which of its rows it wrote is unknown.

        With Redis away the tables are kept undelivered, as a commit's are: their reads
        go to the database until Redis takes the bump, and the application starts."""
        core = self._core
        tables = core.models.known_tables()
        if not tables:
            return
        log.info(
            "attached again after detach(): %d table(s) retired in namespace %r, as "
            "writes made meanwhile through what was detached went unseen",
            len(tables),
            self.namespace,
        )
        try:
            self._retire(None, list(tables))
        except RedisError as exc:
            core.invalidation_failed(exc, tables)

    def lifespan(
        self, *targets: Any, cache_queries: FromCache | bool | None = None
    ) -> Callable[[Any], AbstractAsyncContextManager[None]]:
        """An ASGI lifespan (FastAPI, Starlette) that attaches ``targets`` and detaches.

        At startup each target (a sessionmaker, an ``async_sessionmaker``, an engine...)
        is attached as by :meth:`attach`, with ``cache_queries`` for the session
        factories; at shutdown the cache is detached (its last counters published) and
        the asyncio Redis client it made for the app's event loop is closed. The
        synchronous client stays open, so an app started again (a test client per test)
        attaches again; what was written while it was stopped reached no cache, so that
        startup retires every table the process maps, once for all targets
        (:meth:`detach`). Nest it in a lifespan of the application's own with ``async with
        cache.lifespan(...)(app):``.

        Example::

            cache = Cache(REDIS_URL, namespace="app")
            app = FastAPI(lifespan=cache.lifespan(SessionLocal, AsyncSessionLocal, engine))
        """
        if not targets:
            raise ConfigurationError(
                "cache.lifespan() needs the session factories (and engines) to attach"
            )

        @contextlib.asynccontextmanager
        async def lifespan(_app: Any) -> AsyncIterator[None]:
            unseen = False
            for target in targets:
                queries = None if isinstance(target, Engine | AsyncEngine) else cache_queries
                unseen = self._attach(target, queries) or unseen
            if unseen:
                self._retire_unseen()  # once for every target started again
            try:
                yield
            finally:
                self.detach()
                await self.aclose()

        return lifespan

    def _remember_bind(self, engine: Engine) -> None:
        """Keep the engines of attached factories: ``invalidate_query`` tries them.

        The database the engine reaches is asked now, once per pool, rather than by the
        first reads (which would each check out a connection to ask); a database that is
        away, or an asyncio engine outside its loop, is asked by the first read instead.
        """
        if all(known is not engine for known in self._attached_binds):
            self._attached_binds.append(engine)
        if engine.dialect.is_async:
            return  # it connects from its event loop only
        try:
            self._core.binds.database_of_engine(engine)
        except Exception as exc:  # noqa: BLE001 - asked again by the first read
            log.debug("the database of %s is asked by its first read: %s", engine, exc)

    def _session_class_of(self, target: Any) -> type[Session]:
        if isinstance(target, sessionmaker):
            return target  # type: ignore[return-value]  # sessionmaker is an event target
        if isinstance(target, async_sessionmaker):
            # the factory's AsyncSession class may name its own (SQLModel's names its Session)
            sync_class: type[Session] = (
                target.kw.get("sync_session_class")
                or getattr(target.class_, "sync_session_class", None)
                or Session
            )
            if sync_class in _SCOPED or _HOLDERS.get(sync_class) is self:
                return sync_class  # attached before (by this cache or another)
            # a subclass of our own scopes the listeners to this factory's sessions
            scoped = self._scoped_class(target, sync_class)
            target.kw["sync_session_class"] = scoped
            return scoped
        if isinstance(target, type) and issubclass(target, AsyncSession):
            sync_class = target.sync_session_class
            if target is AsyncSession or sync_class is not Session:
                return sync_class
            # listening on Session itself would cache every session of the process: give
            # this AsyncSession subclass a sync class of its own, as for async_sessionmaker
            scoped = self._scoped_class(target, sync_class)
            target.sync_session_class = scoped
            return scoped
        if isinstance(target, type) and issubclass(target, Session):
            return target
        hint = (
            "; attach the factory that made it, not a session"
            if isinstance(target, Session | AsyncSession)
            else ""
        )
        raise ConfigurationError(
            f"attach() got {target!r}; pass a sessionmaker, a Session subclass, an "
            f"async_sessionmaker, an AsyncSession subclass or an engine{hint}"
        )

    def _scoped_class(self, target: Any, sync_class: type[Session]) -> type[Session]:
        """A subclass of ``sync_class`` for an async ``target``'s sessions alone; checked
        against the attached classes before the target is given it."""
        scoped = type(f"Cached{sync_class.__name__}", (sync_class,), {})
        self._check_holders(target, scoped)
        _SCOPED.add(scoped)
        return scoped

    def _load_models(self) -> None:
        self._admission.admit_all()
        self._admission.listen()  # a class mapped from now on is checked as it is configured

    # -- explicit invalidation ---------------------------------------------------------

    def invalidate(self, model: type, *pk: Any) -> None:
        """Say that one row changed outside the cache's sight; ``pk`` is its primary key.

        Its entity entry is removed, and the table's version is bumped: cached queries
        that may contain the row are retired, and a fill that read the row before this
        call is refused. Each value is read as its column's type, as a load would give it
        (``"7"`` for an integer column is ``7``, a UUID's text is the UUID); one that
        cannot be raises :class:`~sa_redis_cache.models.PrimaryKeyTypeError` (a
        ``ValueError``). A key whose column takes several forms for one value (``CHAR(n)``
        pads, ``citext`` folds case) retires the whole table's entries, as
        :meth:`invalidate_model` does. Tables that foreign keys with ``ON DELETE`` / ``ON UPDATE``
        actions on the model's table write are retired whole: the row may have been
        deleted, or its key changed, and the rows Postgres wrote in turn cannot be named.

        Example::

            cache.invalidate(Product, 7)
        """
        info = self._model_info(model)
        # keyed as loads give it ("7" for an int column is 7): a key of another type would
        # name another entry and remove nothing (PrimaryKeyTypeError when it cannot be read)
        pk = info.coerce_pk(pk)
        if info.pk_equal_forms:
            # 'ab' for a CHAR(5) key is the row 'ab   ', whose entry is keyed by the form
            # a load gave: the row's entry cannot be named, the table's entries can
            self._retire(info.scope, [info.table])
            return
        keys = self.keys
        text = pk_text(pk)
        # the row write counter retires the row's entity entries in every database and
        # schema (also those of other processes); those this process knows are unlinked.
        # Bumping the version refuses a fill that read the row before this call, and
        # retires the cached queries that may contain the row.
        known = sorted(self._core.entity_scopes.get(info.table, ()))
        entries = [keys.entity_key(info.table, info.schema_hash, s, text) for s in known]
        row = scripts.bump_all(
            [keys.version_key(info.table), keys.row_write_key(info.table, text)], unlink=entries
        )
        self._retire(info.scope, [info.table], row=row)

    def invalidate_model(self, model: type) -> None:
        """Invalidate every cached query that read ``model``'s table, and its entity entries.

        Costs one round trip whatever the number of entries: the table's version (which
        query entries are validated against) and its entity generation (which entity
        entries are validated against) are bumped; the old entries expire with their TTL.
        So are those of the tables that foreign keys with ``ON DELETE`` / ``ON UPDATE``
        actions on the table write: the unseen write may have cascaded.

        Example::

            cache.invalidate_model(Product)
        """
        info = self._model_info(model)
        self._retire(info.scope, [info.table])

    def invalidate_table(self, *tables: Table | str) -> list[str]:
        """Say that whole tables changed outside the cache's sight; the tables retired.

        For a table no model maps alone, such as the association table of a many-to-many
        ``relationship(secondary=...)`` that another program wrote: every cached query
        that read it becomes a miss. Each table is a ``Table`` or its ``fullname``
        (``"schema.name"`` in a schema), one of the mapped classes' ``MetaData``. As
        :meth:`invalidate_model` does for a model's table, each table's version and entity
        generation are bumped (one round trip in all), and so are those of the tables
        its foreign keys' ``ON DELETE`` / ``ON UPDATE`` actions write, which the returned
        list includes.

        Example::

            cache.invalidate_table(order_tags)          # the Table object
            cache.invalidate_table("shop.order_tags")   # or its fullname
        """
        if not tables:
            raise TypeError("invalidate_table() takes at least one Table or table name")
        names = [self._table_name(table) for table in tables]
        return self._retire(None, names)

    def _table_name(self, table: Table | str) -> str:
        if isinstance(table, Table):
            return table.fullname
        if not isinstance(table, str):
            raise TypeError(f"invalidate_table() takes Table objects or names, not {table!r}")
        known = self._core.models.known_tables()
        if table not in known:
            # a table of a mapped class's MetaData that no mapper names (one read by Core
            # joins, written by another program) is as much the application's as an
            # association table: the docs promise every table of the models' MetaData
            known = sorted({*known, *metadata_tables()})
        if table not in known:
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise ConfigurationError(
                f"no mapped MetaData has a table named {table!r}; give its fullname "
                f"('schema.name' in a schema), or the Table object itself (known: "
                f"{shown or 'none'})"
            )
        return table

    def _retire(
        self, scope: str | None, tables: list[str], row: ScriptCall | None = None
    ) -> list[str]:
        """Bump ``tables``' versions and generations (with ``row``: only that row's
        counters, and the version) and those of every table their foreign-key actions
        write; return once no local tier serves what changed. The tables retired.

        The application says these tables changed out of sight, maybe by a delete or a key
        update that Postgres carried on through ``ON DELETE`` / ``ON UPDATE`` actions: the
        referencing tables' rows cannot be named, so they are retired whole, as for a
        flush that deletes a referenced row (:mod:`~sa_redis_cache.referential`).
        """
        keys = self.keys
        acted = referential_actions().written_by(tables, deletes=True, updates=True)
        whole = sorted(acted if row is not None else acted | set(tables))
        calls = [] if row is None else [row]
        calls += [scripts.bump_all([keys.version_key(t), keys.generation_key(t)]) for t in whole]
        core = self._core
        with core.measure(scope, "invalidate"):
            core.run_fenced(calls, [*tables, *whole])
        if scope is None:
            core.counters.incr_total("invalidations")
        else:
            core.counters.incr(scope, "invalidations")
        return sorted({*tables, *whole})

    def invalidate_query(
        self, statement: Any, params: dict[str, Any] | None = None, *, bind: Any = None
    ) -> int:
        """Remove the entries that ``statement`` (with ``params``) reads; returns how many.

        ``bind`` is the engine (or connection) the statement runs on; by default every
        database the cache has served the statement's kind of reads from, and the database
        of every attached session factory's engine, is tried, as an entry's key includes
        its database. The ``FromCache`` option (and its ``ttl`` and
        ``region``) does not matter: the statement is matched with or without it.

        Example::

            stmt = select(Product).where(Product.id < 10).options(FromCache())
            cache.invalidate_query(stmt)
        """
        inspector = self.inspector
        plan = inspector.statement_plan(statement)
        if plan is None:
            return 0
        # an entry may be spread or not (FromCache(spread=...)): both keys are retired
        keys = {
            key
            for database, translate in self._databases(bind)
            for spread in (False, True)
            if (
                key := inspector.statement_key(
                    statement, params, database=database, translate=translate, spread=spread
                )
            )
        }
        # the entries' invalidation counters refuse a fill that read before this call, for
        # as long as such a read may take (the fill lease's life) or the entry lives
        ttl_ms = max(scripts.LEASE_MS, int(self._core.ttl_for_tables(plan.tables) * 1000))
        with self._core.measure(None, "invalidate"):
            removed = self._core.invalidate_entries(sorted(keys), ttl_ms, plan.tables)
        if bind is None and self._reads.queries.forgot_databases:
            # this process served more databases or schema_translate_maps than it
            # remembers: an entry of a forgotten one cannot be keyed, so the statement's
            # tables are retired (more misses, never an entry left behind)
            self._retire(None, sorted(plan.tables))
        self._core.counters.incr_total("invalidations")
        return removed

    def invalidate_region(self, region: str) -> list[str]:
        """Retire every entry of the ``FromCache`` region ``region``; the tables bumped.

        Each process records, per region, the table of the first entity of the statements
        it reads there; bumping those tables' versions retires the region's entries in
        every process and refuses any fill that read the database before this call. Other
        regions' entries on those tables are retired too (misses, never wrong values).
        Lazy-loaded collections are the regions ``"<Parent>.<relationship>"``. When the
        region's record in Redis is found of another Redis type (not the cache's: it is
        deleted), which tables it named is lost, and every table this process maps is
        bumped instead.

        Example::

            stmt = select(Product).options(FromCache(region="catalogue"))
            ...
            cache.invalidate_region("catalogue")
        """
        core = self._core
        tables = self._reads.regions.tables(region)
        if tables is None:
            # no fewer tables are known to hold every entry of the region
            tables = core.models.known_tables()
        with core.measure(None, "invalidate"):
            if tables:
                # fenced as every explicit invalidation is: no local tier serves the
                # region's entries once this returns
                core.run_fenced(
                    [scripts.bump_all([self.keys.version_key(t)]) for t in tables], tables
                )
        core.counters.incr_total("invalidations")
        return tables

    def clear(self) -> int:
        """Delete every cache entry of this namespace; returns how many keys went.

        Entity, query and function entries go, with the counters they were validated
        against (a counter comes back at a random value, so a fill that read the database
        before this call is refused). Kept: write-behind queues and pending states (writes
        not yet in the database), writer marks of transactions in flight, the published
        statistics and the regions' table sets. Returns once no process's local tier
        serves what was deleted, as every explicit invalidation does: the tables whose
        holder sets exist once the entries are gone are fenced.

        Example::

            cache.clear()   # e.g. after restoring a database backup
        """
        core = self._core
        keys = core.keys
        io = core.io()
        with core.measure(None, "invalidate"):
            removed = io.unlink_matching(keys.namespace_pattern, only=keys.clearable)
            # listed after the deletions: a process registers as a holder before it looks,
            # so one that registered later can only have read what was left
            held = {
                table
                for key in io.scan(keys.holders_pattern)
                if (table := keys.holders_table(key)) is not None
            }
            core.run_fenced([], held)
        core.counters.incr_total("invalidations")
        return removed

    # The awaitable versions run the synchronous method in a SQLAlchemy greenlet, as
    # AsyncSession runs its session: core.io() there awaits the asyncio client through the
    # greenlet bridge, so the checks, keys and commands stay written once, above.

    async def ainvalidate(self, model: type, *pk: Any) -> None:
        """:meth:`invalidate` for coroutines: awaits the asyncio client, never blocks the loop.

        Example::

            await cache.ainvalidate(Product, 7)
        """
        self._require_async_client("ainvalidate")
        await greenlet_spawn(self.invalidate, model, *pk)

    async def ainvalidate_model(self, model: type) -> None:
        """:meth:`invalidate_model` for coroutines, over the asyncio client.

        Example::

            await cache.ainvalidate_model(Product)
        """
        self._require_async_client("ainvalidate_model")
        await greenlet_spawn(self.invalidate_model, model)

    async def ainvalidate_table(self, *tables: Table | str) -> list[str]:
        """:meth:`invalidate_table` for coroutines, over the asyncio client.

        Example::

            await cache.ainvalidate_table(order_tags)
        """
        self._require_async_client("ainvalidate_table")
        return await greenlet_spawn(self.invalidate_table, *tables)

    async def ainvalidate_region(self, region: str) -> list[str]:
        """:meth:`invalidate_region` for coroutines, over the asyncio client; the tables bumped.

        Example::

            await cache.ainvalidate_region("catalogue")
        """
        self._require_async_client("ainvalidate_region")
        return await greenlet_spawn(self.invalidate_region, region)

    async def aclear(self) -> int:
        """:meth:`clear` for coroutines: its SCANs and UNLINKs await the asyncio client.

        Example::

            await cache.aclear()
        """
        self._require_async_client("aclear")
        return await greenlet_spawn(self.clear)

    async def ainvalidate_query(
        self, statement: Any, params: dict[str, Any] | None = None, *, bind: Any = None
    ) -> int:
        """:meth:`invalidate_query` for coroutines, over the asyncio client; how many went.

        ``bind`` may be an ``AsyncEngine``: the entries of a statement an ``AsyncSession``
        ran are keyed by its driver (``postgresql+psycopg_async``), not the sync engine's.

        Example::

            stmt = select(Product).where(Product.id < 10).options(FromCache())
            await cache.ainvalidate_query(stmt, bind=async_engine)
        """
        self._require_async_client("ainvalidate_query")
        return await greenlet_spawn(self.invalidate_query, statement, params, bind=bind)

    def _databases(self, bind: Any) -> list[tuple[Database, Any]]:
        """The (database, ``schema_translate_map``) pairs ``invalidate_query`` keys for."""
        if bind is not None:
            if isinstance(bind, AsyncEngine | AsyncConnection):
                bind = bind.sync_engine if isinstance(bind, AsyncEngine) else bind.sync_connection
            database = self._database_of(bind)
            if database is None and bind.dialect.is_async:
                raise ConfigurationError(
                    "invalidate_query(bind=<asyncio engine>) must ask the database which one it "
                    "is, from its event loop: await cache.ainvalidate_query(...) instead"
                )
            return [] if database is None else [(database, translate_map_of(bind))]
        targets = self._reads.queries.seen_databases()
        for engine in self._attached_binds:
            try:
                database = self._database_of(engine)
            except Exception as exc:  # noqa: BLE001 - a database that is away holds no entry
                log.debug("invalidate_query: skipping %s: %s", engine, exc)
                continue
            if database is not None:
                targets.append((database, translate_map_of(engine)))
        if not targets:
            raise ValueError(
                "invalidate_query() cannot tell which database the statement ran on: this "
                "cache has served no query and no attached session factory names a bind; "
                "pass bind=engine"
            )
        return targets

    def _database_of(self, bind: Engine | Connection) -> Database | None:
        """What ``bind`` reaches; None for an asyncio one never asked, outside its loop."""
        binds = self._core.binds
        found = binds.known(bind)
        if found is not None:
            return found
        if bind.dialect.is_async and not compat.in_greenlet():
            return None  # it connects from its event loop only
        if isinstance(bind, Connection):
            return binds.database_of(bind)
        return binds.database_of_engine(bind)

    def _require_async_client(self, method: str) -> None:
        if self._core.async_clients is None:
            raise ConfigurationError(
                f"cache.{method}() awaits an asyncio Redis client and this cache has none; "
                "make the cache from a URL or pass async_client=redis.asyncio.Redis(...), "
                f"or call cache.{method[1:]}() (it blocks for its round trip)"
            )

    def cached(
        self,
        prefix: str,
        ttl: float | None = None,
        *,
        key: Callable[..., Any] | None = None,
        ignore: Iterable[str] = (),
    ) -> CacheDecorator:
        """Cache a plain function's results under ``prefix`` (the recipe's decorator).

        The decorated function keeps its signature for type checkers and gains
        ``invalidate(*args, **kwargs)``, ``invalidate_all()`` and ``key_for(...)``.
        ``ttl`` (seconds, positive and finite) defaults to the cache's ``default_ttl``.
        An ``async def`` function gets an async wrapper that awaits the cache's asyncio
        client (the cache needs one: a URL or ``async_client``); ``await
        f.ainvalidate(...)`` is the non-blocking ``invalidate``.

        ``ignore`` names parameters left out of the key (``("db", "request")`` on a FastAPI
        endpoint); ``key`` is a function of the same arguments whose result is the key
        instead. Calls whose arguments make no key run uncached, with a WARNING naming the
        argument once per function.

        Example::

            @cache.cached("user_profile", ttl=600)
            def profile(user_id: int) -> dict: ...
            profile.invalidate(42)

            @cache.cached("user_page", ignore=("db",))
            async def user_page(user_id: int, db: AsyncSession) -> dict: ...

            @cache.cached("search", key=lambda q, db: q.strip().lower())
            def search(q: str, db: Session) -> list[int]: ...

            @cache.cached("exchange_rate", ttl=60)
            async def rate(currency: str) -> Decimal: ...
            await rate("EUR")
        """

        def decorate(func: Callable[P, Any]) -> CachedFunction[P, Any]:
            # an object with an async __call__ too: wrapped as a function, its coroutine
            # would be encoded as the result (refused) and looked up on the sync client
            if is_async_callable(func):
                if self._core.async_clients is None:
                    raise ConfigurationError(
                        f"cached({prefix!r}) on the async function {callable_name(func)} needs "
                        "an asyncio Redis client; make the cache from a URL or pass "
                        "async_client=redis.asyncio.Redis(...)"
                    )
                return AsyncCachedFunction(self._core, prefix, ttl, func, key=key, ignore=ignore)
            return CachedFunction(self._core, prefix, ttl, func, key=key, ignore=ignore)

        return cast("CacheDecorator", decorate)

    def _model_info(self, model: type) -> ModelInfo:
        mapper = mapper_of(model)
        if mapper is None:
            raise ConfigurationError(f"{model!r} is not a mapped class")
        return self._core.models.info_of(mapper)

    # -- observability -----------------------------------------------------------------

    def detach(self) -> None:
        """Remove every listener :meth:`attach` added, from sessions and engines.

        Sessions made afterwards by the factories this cache was attached to read and
        write the database only. Useful in tests and before re-configuring a process.
        Until then the cache is part of the process: dropping every reference to it (and
        to the factories) frees nothing, since its hooks, its counters' publisher thread
        and its local tier's threads hold it. A test that attaches a cache detaches it;
        once detached and dropped, it is freed, and leaves nothing on a Redis client that
        outlives it (its restart check and slot map watcher are held weakly there).
        The counters' publisher stops after a last publish (one round trip). The
        factories are freed: another ``Cache`` may attach them.

        Entries in Redis stay valid, but the writes made through those factories and
        engines from now on reach no cache: the next :meth:`attach` of one of them to this
        namespace (by this cache or another of the namespace, :meth:`lifespan` at the next
        startup) bumps the version and entity generation of every table the process maps,
        so what was cached before is read again once (kept undelivered while Redis is
        away). Results of :meth:`cached` functions are not retired.

        Example::

            cache.attach(Session)
            ...
            cache.detach()

        Refused (:class:`ConfigurationError`, nothing detached) while sessions joined to
        an application's transaction hold write-behind writes that wait for its commit:
        end that transaction first (docs/write-behind.md).
        """
        waiting = self._write_behind.pending_joined()
        if waiting:
            raise ConfigurationError(
                f"detach(): {waiting} write-behind write(s) of sessions joined to an "
                "application's transaction wait for its commit, which a detached cache "
                "would not see (they would be lost). Commit or roll back that transaction, "
                "then detach"
            )
        self._core.remove_listeners()
        self._core.settle_owed()  # the fills' replies, read before the connections close
        self._core.sync_io.drop_connections()
        self._hooks.uninstall_direct_reads()
        if self._core.local is not None:
            self._core.local.stop()
        self._reads.auto.clear()
        self._publisher.stop()  # after a last publish
        released = [*self._attached, *self._engine_writes.forget_engines()]
        self._write_behind.forget_engines()
        with _HOLDERS_LOCK:
            for target in released:
                if _HOLDERS.get(target) is self:
                    del _HOLDERS[target]
                _RELEASED.setdefault(target, set()).add(self.namespace)
        self._attached.clear()
        self._attached_binds.clear()

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate, errors, fills... in total, per model and per region.

        Example::

            cache.stats()["models"]["Product"]["hit_rate"]
            cache.stats()["local"]["entries"]   # with Cache(local=True)
        """
        snapshot = self._core.counters.snapshot()
        if self._core.local is not None:
            snapshot["local"] = self._core.local.gauges()
        return snapshot


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_limits(
    max_entry_bytes: int, breaker_threshold: int, breaker_reset: float, hit_rate_warning: object
) -> None:
    """Refuse limits that would fail every read (a string compared with a size) or make
    the cache silently useless (no entry small enough, a breaker that never closes)."""
    if not _whole(max_entry_bytes):
        raise ConfigurationError(
            f"max_entry_bytes={max_entry_bytes!r} must be a whole number of bytes >= 1 (the "
            "largest entry stored or read); the default is 1 << 20 (1 MiB)"
        )
    if not _whole(breaker_threshold):
        raise ConfigurationError(
            f"breaker_threshold={breaker_threshold!r} must be a whole number >= 1 (Redis "
            "failures in a row that open the breaker); the default is 3"
        )
    if not (breaker_reset == 0 or is_ttl(breaker_reset)):
        raise ConfigurationError(
            f"breaker_reset={breaker_reset!r} must be a finite number of seconds >= 0 (how "
            "long the open breaker keeps reads away from Redis); the default is 2.0"
        )
    if hit_rate_warning is not None and not (
        hit_rate_warning == 0 or (is_ttl(hit_rate_warning) and hit_rate_warning <= 1)  # type: ignore[operator]
    ):
        raise ConfigurationError(
            f"hit_rate_warning={hit_rate_warning!r} must be a fraction from 0 to 1, or None to "
            "turn the warning off"
        )


def _check_local(
    local: bool, max_entries: int, max_bytes: int, lease: float, consistency: str
) -> None:
    """Refuse local-tier settings that cannot work, naming the fix."""
    if not isinstance(local, bool):
        raise ConfigurationError(f"local={local!r} must be True or False")
    for name, value in (("local_max_entries", max_entries), ("local_max_bytes", max_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigurationError(f"{name}={value!r} must be a whole number >= 1")
    longest = scripts.LOCAL_LEASE_MAX_MS / 1000  # the scripts take a longer one for forged
    if not is_ttl(lease) or not 0.1 <= lease <= longest:
        raise ConfigurationError(
            f"local_lease={lease!r} must be from 0.1 to {longest:g} seconds: how long a process "
            "that stops answering can delay a commit; the default of 2 suits most deployments"
        )
    if consistency not in ("strict", "bounded"):
        raise ConfigurationError(
            f"local_consistency={consistency!r} must be 'strict' (commits wait for the local "
            "tiers, the default) or 'bounded' (they do not; see docs/guarantees.md)"
        )


def _query_option(cache_queries: FromCache | bool | None) -> FromCache | None:
    """``attach(cache_queries=)`` as an option: a ``FromCache``, True or False/None."""
    if cache_queries is None or cache_queries is False:
        return None
    if cache_queries is True:
        return FromCache()
    if isinstance(cache_queries, FromCache):
        return cache_queries
    raise ConfigurationError(
        f"attach(cache_queries={cache_queries!r}): give a FromCache(...) (its ttl and region "
        "apply to every select), True for FromCache(), or None"
    )
