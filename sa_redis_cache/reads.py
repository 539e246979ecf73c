"""The read path: ``do_orm_execute`` serving FromCache statements and primary-key loads.

Protocol (DESIGN.md §4): one MGET reads the entry together with the current version
counters of every table the statement depends on. The entry is a hit only if the
versions stored in it equal the current ones. On a miss those counters are the versions
captured *before* the database read, and the fill is a Lua compare-and-set that stores
only if they have not moved and no writer is in flight. Any Redis error degrades to the
database; nothing here raises a Redis error into the application.

Every Redis call goes through ``core.io()``: the asyncio client when the session is run
by ``AsyncSession`` (the event loop keeps running meanwhile), the synchronous one otherwise.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import RedisError
from sqlalchemy import Table
from sqlalchemy.orm.interfaces import UserDefinedOption
from sqlalchemy.sql.type_api import TypeEngine

from . import hydrate, stampede
from .binds import translate_map_of
from .codec import CodecError, RowCodec, UncacheableType, pack, unpack
from .core import INVALIDATIONS_SUFFIX, LEASE_SUFFIX, ROW_COUNTER_TTL_MS
from .counters import parse_counter
from .keys import Unfingerprintable, fingerprint, pk_text, values_digest
from .options import FromCache
from .policy import CachePolicy
from .txstate import peek_tx_state, tx_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

    from .binds import Database
    from .core import CacheCore
    from .events import WritePath
    from .models import ModelInfo
    from .tracing import Measurement
    from .txstate import TxState

log = logging.getLogger("sa_redis_cache")

_PLAN_CACHE_SIZE = 4096
# how many (database, schema_translate_map) pairs invalidate_query() remembers: it bounds
# memory for applications that make engines or connections per request
_SEEN_BINDS = 256
LEASE_MS = 30_000  # a filler that dies holding the lease blocks fills this long at most
_DEFAULT_POLICY = CachePolicy()
_BYPASS_OPTIONS = ("yield_per", "stream_results", "populate_existing", "identity_token")


@dataclass(slots=True)
class Look:
    """What one look at an entry found: a valid entry, or the versions a fill needs.

    ``found`` is ``(timing, body)``; timing is None for an entity entry a writer stored
    (write-through, write-behind): no read time is known, so it is never refreshed early.
    """

    found: tuple[stampede.Timing | None, Any] | None
    captured: list[bytes] | None
    leased: bool = False
    # the entry's invalidate_query() counter as read (None: absent); the fill compares it
    invalidations: bytes | None = None


@dataclass(slots=True)
class Target:
    """One entry on the read path: how to look at it, serve it and fill it.

    ``look(token)`` reads the entry and its counters, asking for the fill lease in the
    same round trip when given a token; ``serve(body)`` turns a body into the result
    (None when unreadable: it deleted the entry); ``fill(data, preexisting, look,
    delta_ms, token)`` stores what the database returned: True stored, False refused or
    failed, None not tried (the caller still holds its lease).
    """

    key: str
    scope: str
    also: tuple[str, ...]
    look: Callable[[str], Look | None]
    serve: Callable[[Any], Result[Any] | None]
    fill: Callable[[Any, Any, Look, int, str], bool | None]
    lease: bool
    lease_wait: float
    xfetch_beta: float
    stale_ttl: float


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """What the read path needs about one statement shape, computed once per shape."""

    digest: str
    tables: frozenset[str]
    table_names: tuple[str, ...]
    version_keys: tuple[str, ...]
    writers_keys: tuple[str, ...]
    entry_prefix: str
    shape: hydrate.RowShape
    scopes: tuple[str, ...]


class Uncacheable(Exception):
    """The statement cannot be cached; the reason is logged once."""


class ReadPath:
    """Serves cached reads for one :class:`~sa_redis_cache.Cache`."""

    def __init__(self, core: CacheCore, writes: WritePath) -> None:
        self.core = core
        self.writes = writes
        self.binds = core.binds
        self._plans: dict[Any, StatementPlan | None] = {}
        # (database, translate map) of the statements this cache keyed, for
        # invalidate_query(); bounded, and holding no engine or connection alive
        self._seen: dict[tuple[str, str], tuple[Database, Any]] = {}

    def seen_databases(self) -> list[tuple[Database, Any]]:
        """The (database, ``schema_translate_map``) pairs this read path keyed statements for."""
        return list(self._seen.values())

    # -- entry point ---------------------------------------------------------------------

    def on_execute(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """The ``do_orm_execute`` listener; returns a result to short-circuit the database."""
        if not orm_context.is_select:
            if orm_context.is_update or orm_context.is_delete or orm_context.is_insert:
                # ORM bulk DML through the session; textual DML is seen at the engine
                self.writes.on_bulk(orm_context)
            return None
        option = None
        for opt in orm_context.user_defined_options:
            if type(opt) is FromCache:
                option = opt
        if option is None:
            if orm_context.is_relationship_load and not orm_context.lazy_loaded_from:
                return None
            return self._entity_load(orm_context)
        if orm_context.is_relationship_load:
            return None
        return self._query(orm_context, option)

    # -- FromCache -----------------------------------------------------------------------

    def _query(self, orm_context: ORMExecuteState, option: FromCache) -> Result[Any] | None:
        core = self.core
        stats = core.counters
        exec_opts = orm_context.execution_options
        region = "region:" + option.region
        if any(exec_opts.get(name) for name in _BYPASS_OPTIONS):
            stats.incr(region, "bypassed")
            return None
        statement: Any = orm_context.statement
        if statement._for_update_arg is not None:
            stats.incr(region, "bypassed")  # a cached row takes no lock
            return None
        cache_key = statement._generate_cache_key()
        if cache_key is None:
            stats.incr(region, "uncacheable")
            return None
        plan = self.plan(cache_key.key, statement)
        if plan is None:
            stats.incr(region, "uncacheable")
            return None
        session = orm_context.session
        if orm_context.load_options._autoflush:
            hydrate.autoflush_pending(session)
        tx = peek_tx_state(session)
        if tx is not None and not tx.written_tables.isdisjoint(plan.tables):
            stats.incr(region, "bypassed")
            return None
        bind = session.get_bind(**orm_context.bind_arguments)
        database = self.binds.database_for(session, bind, orm_context.bind_arguments)
        if database is None:
            stats.incr(region, "bypassed")
            return None
        translate = translate_map_of(bind, exec_opts)
        entry_key = self.entry_key(
            plan, cache_key.bindparams, orm_context.parameters, database, translate
        )
        if entry_key is None:
            stats.incr(region, "uncacheable")
            return None
        if not self._trusted(plan.tables):
            stats.incr(region, "bypassed")
            return None
        return self._cached_read(orm_context, option, plan, entry_key, tx, region)

    def _cached_read(
        self,
        orm_context: ORMExecuteState,
        option: FromCache,
        plan: StatementPlan,
        entry_key: str,
        tx: TxState | None,
        region: str,
    ) -> Result[Any] | None:
        session = orm_context.session
        core = self.core

        def fill(data: Any, preexisting: Any, look: Look, delta: int, token: str) -> bool | None:
            body = hydrate.extract(data, plan.shape, core.models.info_of, preexisting)
            ttl = option.ttl or core.ttl_for_tables(plan.tables)
            return self._fill(entry_key, plan, look, body, ttl, option, delta, token, region)

        target = Target(
            key=entry_key,
            scope=region,
            also=plan.scopes,
            look=lambda lease: self._look(entry_key, plan, region, tx, lease=lease),
            serve=lambda body: self._serve(session, body, plan, entry_key, region),
            fill=fill,
            lease=option.lease,
            lease_wait=option.lease_wait,
            xfetch_beta=option.xfetch_beta,
            stale_ttl=option.stale_ttl,
        )
        return self._read_through(orm_context, target)

    def _read_through(self, orm_context: ORMExecuteState, target: Target) -> Result[Any] | None:
        """Serve the entry, refresh it early, wait for its filler, or read and fill.

        One flow for query entries and entity entries (DESIGN.md §4 and §6).
        """
        # a latency histogram under the read's outcome, and a span when traced; leaving by
        # an exception records an error and ends the span
        with self.core.measure(target.scope, also=target.also) as measured:
            return self._serve_or_fill(orm_context, target, measured)

    def _serve_or_fill(
        self, orm_context: ORMExecuteState, target: Target, measured: Measurement
    ) -> Result[Any] | None:
        core = self.core
        stats = core.counters
        look = target.look("")
        if look is None:
            measured.done("error")
            return None
        token = ""
        if look.found is not None:
            timing, body = look.found
            refresh = False
            now = stampede.now_ms()
            if timing is not None and stampede.due(timing, target.xfetch_beta, now):
                # due for a refresh: one caller refreshes, the others serve this value
                token = self._take_lease(target.key) if target.lease else ""
                refresh = bool(token) or not target.lease
                if refresh:
                    stats.incr(target.scope, "early_refreshes")
                elif timing.expires_ms <= now and target.stale_ttl:
                    stats.incr(target.scope, "stale_served")
            if not refresh:
                served = target.serve(body)
                if served is not None:
                    measured.done("hit")
                    return served
                # unreadable: deleted by serve, so look again for what a fill needs
                look = target.look("")
                if look is None:
                    measured.done("error")
                    return None
        if look.found is None and look.captured is not None and target.lease:
            token, waited, look = self._lease_or_wait(target, look)
            if waited is not None:
                measured.done("hit")
                return waited
        stats.incr(target.scope, "misses", also=target.also)
        preexisting = hydrate.identity_snapshot(orm_context.session)
        started = stampede.now_ms()
        tried: bool | None = None
        try:
            frozen = orm_context.invoke_statement().freeze()
            if look.captured is not None:
                try:
                    delta = stampede.now_ms() - started
                    tried = target.fill(frozen.data, preexisting, look, delta, token)
                except (hydrate.NotCacheable, CodecError, ValueError) as exc:
                    log.debug("not caching %s: %s", target.key, exc)
                    stats.incr(target.scope, "uncacheable")
        finally:
            if tried is None:
                # fill.lua releases the lease whenever it runs (stored, refused or failed
                # mid-call); when it did not run, the lease is released here
                self._release(target.key, token)
        measured.done("miss")
        return frozen()

    def _fetch(self, keys: list[str], scope: str, lease: str) -> tuple[list[Any], bool] | None:
        """MGET ``keys`` (an entry first), asking for its fill lease in the same round trip.

        Returns the values and whether the lease was granted; None when Redis failed (the
        caller reads the database and does not fill).
        """
        core = self.core
        leased = False
        try:
            if lease:
                got, raw = core.io().pipeline(
                    [
                        ("SET", keys[0] + LEASE_SUFFIX, lease, "NX", "PX", LEASE_MS),
                        ("MGET", *keys),
                    ]
                )
                leased = bool(got)
            else:
                raw = core.io().mget(keys)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr(scope, "errors")
            return None
        core.breaker.success()  # resets the failure count too
        return list(raw), leased

    def _look(
        self,
        entry_key: str,
        plan: StatementPlan,
        region: str,
        tx: TxState | None,
        *,
        lease: str = "",
    ) -> Look | None:
        """One MGET of the entry and its counters: a valid entry, or what a fill needs.

        With ``lease`` (a token), the fill lease is asked for in the same round trip.
        None when Redis failed (the caller reads the database and does not fill).
        """
        keys = [entry_key, entry_key + INVALIDATIONS_SUFFIX, *plan.version_keys]
        fetched = self._fetch(keys, region, lease)
        if fetched is None:
            return None
        raw, leased = fetched
        entry, invalidations, current = raw[0], raw[1], raw[2:]
        numbers = None if None in current else self._counters(plan.version_keys, current, region)
        pinned = None if tx is None or tx.snapshot is None else tx.snapshot
        expected = None if pinned is None else [pinned.get(t) for t in plan.table_names]
        # a transaction pinned to an older snapshot cannot tell whether invalidate_query()
        # came after its snapshot: it never fills an entry that was ever invalidated
        may_fill = expected is None or invalidations is None
        if entry is not None and numbers is not None and expected in (None, current):
            found = self._parse(entry, numbers, plan, entry_key, region)
            if found is not None:
                # the counters were read before any refresh's database read: a capture
                timing = stampede.Timing(found[1], found[2])
                captured_now = current if may_fill else None
                return Look((timing, found[0]), captured_now, leased, invalidations)
        captured: list[bytes] | None = None
        if expected is not None:
            if may_fill and None not in expected:
                captured = cast("list[bytes]", expected)
        elif numbers is not None or None in current:
            captured = self._captured(current, plan.version_keys)
        return Look(None, captured, leased=leased, invalidations=invalidations)

    def _parse(
        self, raw: bytes, current: list[int], plan: StatementPlan, entry_key: str, region: str
    ) -> tuple[Any, int, int] | None:
        """The body, read time and expiry of a valid entry; None when a write retired it."""
        try:
            document = self.core.opened(entry_key, raw)
            stamp, body = _query_entry(document, entry_key[len(plan.entry_prefix) :])
        except (CodecError, ValueError, TypeError, IndexError) as exc:
            self._corrupt(entry_key, region, exc)
            return None
        if stamp[3:] != current:
            return None  # written since: a plain miss, the fill replaces it
        return body, stamp[1], stamp[2]

    def _serve(
        self,
        session: Session,
        body: Any,
        plan: StatementPlan,
        entry_key: str,
        region: str,
    ) -> Result[Any] | None:
        core = self.core
        try:
            result = hydrate.rehydrate(session, body, core.models.info_of, plan.shape)
        except (CodecError, ValueError, TypeError, KeyError, IndexError) as exc:
            self._corrupt(entry_key, region, exc)
            return None
        core.counters.incr(region, "hits", also=plan.scopes)
        return result

    def _take_lease(self, entry_key: str, lease_ms: int = LEASE_MS) -> str:
        """The fill lease's token when this caller got it, else ''."""
        core = self.core
        token = stampede.new_token()
        try:
            got = core.io().set(entry_key + LEASE_SUFFIX, token, nx=True, px=lease_ms)
        except RedisError as exc:
            core.redis_failed(exc)
            return ""
        return token if got else ""

    def _lease_or_wait(self, target: Target, look: Look) -> tuple[str, Result[Any] | None, Look]:
        """Take the fill lease, or wait for whoever holds it to fill.

        The lease is asked for in the same round trip as a second look at the entry: a
        caller whose first look missed just before another caller's fill landed must not
        take the lease that fill released and read the database again.
        Returns (token, None, look) to go to the database (token '' when the wait timed
        out), or ('', result, look) when the entry appeared.
        """
        core = self.core
        token = stampede.new_token()
        again = target.look(token)
        if again is None:
            return "", None, look
        if again.found is not None:
            if again.leased:
                self._release(target.key, token)
            served = target.serve(again.found[1])
            return "", served, again
        if again.leased:
            return token, None, again
        core.counters.incr(target.scope, "lease_waits", also=target.also)
        poller = stampede.Poller(target.lease_wait, sleep=core.io().sleep)
        while poller.wait():
            seen = target.look("")
            if seen is None:
                break
            if seen.found is not None:
                result = target.serve(seen.found[1])
                if result is not None:
                    return "", result, seen
        return "", None, again

    def _release(self, entry_key: str, token: str) -> None:
        if not token:
            return
        core = self.core
        try:
            core.io().run_script(core.scripts.release_lease, [entry_key + LEASE_SUFFIX], [token])
        except RedisError as exc:
            core.redis_failed(exc)

    def _counters(self, keys: Sequence[str], values: Sequence[Any], scope: str) -> list[int] | None:
        """Parse version counters as Redis does; one it could not INCR is deleted (a miss,
        no fill).

        A value ``int()`` would take but ``INCR`` refuses (``b" 7 "``) must not be trusted:
        every writer's script would reseed it, and a reader that trusted it would keep
        serving entries stored under it. A deleted counter comes back at a random value,
        so no entry stored under the garbage can ever match it.
        """
        numbers = [parse_counter(v) for v in values]
        if None not in numbers:
            return cast("list[int]", numbers)
        bad = [(k, v) for k, v, n in zip(keys, values, numbers, strict=True) if n is None]
        exc = ValueError(f"not a counter: {bad[0][1]!r:.60}")
        self._corrupt_keys([k for k, _ in bad], scope, exc)
        return None

    def _corrupt(self, key: str, scope: str, exc: Exception) -> None:
        self._corrupt_keys([key], scope, exc)

    def _corrupt_keys(self, keys: Sequence[str], scope: str, exc: Exception) -> None:
        core = self.core
        log.warning("unreadable cache keys %s deleted: %s", ", ".join(keys), exc)
        core.counters.incr(scope, "decode_errors")
        try:
            core.io().unlink(*keys)
        except RedisError as err:
            core.redis_failed(err)

    def _trusted(self, tables: Iterable[str]) -> bool:
        """May the cache be used for ``tables`` now? (breaker closed, writes delivered)"""
        core = self.core
        if not core.breaker.allow():
            return False
        undelivered = core.undelivered
        if undelivered and not undelivered.isdisjoint(tables):
            return core.deliver_undelivered()
        return True

    def _captured(
        self,
        current: Sequence[bytes | None],
        keys: Sequence[str],
        ttls_ms: Sequence[int] | None = None,
    ) -> list[bytes] | None:
        """Counters as they were before the database read; creates missing ones.

        ``ttls_ms`` gives each counter's TTL (the counters' TTL by default).
        """
        if None not in current:
            return list(current)  # type: ignore[arg-type]
        core = self.core
        ttls = ttls_ms or [core.counter_ttl_ms] * len(keys)
        args = [a for ttl in ttls for a in (ttl, str(random.getrandbits(62)))]
        try:
            got = core.io().run_script(core.scripts.capture_versions, list(keys), args)
        except RedisError as exc:
            core.redis_failed(exc)
            return None
        return list(got)

    def _fill(
        self,
        entry_key: str,
        plan: StatementPlan,
        look: Look,
        body: Any,
        ttl: float,
        option: FromCache,
        delta_ms: int,
        token: str,
        scope: str,
    ) -> bool | None:
        core = self.core
        captured = cast("list[bytes]", look.captured)
        live_ms = core.jittered_ms(ttl)
        # the stamp names the statement (an entry copied under another key is foreign),
        # says how long the read took and when the entry expires logically (XFetch,
        # stale_ttl), then lists the versions it was read under
        stamp = [
            entry_key[len(plan.entry_prefix) :],
            delta_ms,
            stampede.now_ms() + live_ms,
            *(int(v) for v in captured),
        ]
        return core.store(
            entry_key,
            pack([stamp, body]),
            list(plan.version_keys),
            list(plan.writers_keys),
            captured,
            ttl,
            scope,
            also=plan.scopes,
            lease_token=token,
            physical_ttl_ms=live_ms + int(option.stale_ttl * 1000),
            seen_invalidations=look.invalidations,
        )

    def entry_key(
        self,
        plan: StatementPlan,
        bindparams: Sequence[Any],
        params: Any,
        database: Database,
        translate: Any,
    ) -> str | None:
        """The entry key of a planned statement with its execute-time values and database.

        The bound values are those the database would see: execute-time parameters
        override the values embedded in the statement. The database (its identity, default
        schema, dialect and driver: :class:`~sa_redis_cache.binds.Database`) and the
        ``schema_translate_map`` are part of the key, so tenants and shards never read each
        other's entries. None when a value cannot be encoded exactly.
        """
        params = params or {}
        try:
            values: list[Any] = [params.get(bp.key, bp.effective_value) for bp in bindparams]
            parts: list[Any] = [plan.digest, values, database.name]
            translated = sorted((str(k), str(v)) for k, v in translate.items()) if translate else []
            if translated:
                parts.append(translated)
            self._remember(database, translate, translated)
            return plan.entry_prefix + values_digest(parts)
        except (CodecError, TypeError):
            return None

    def _remember(self, database: Database, translate: Any, translated: list[Any]) -> None:
        seen = self._seen
        memo = (database.name, repr(translated))
        if memo not in seen:
            if len(seen) >= _SEEN_BINDS:
                seen.pop(next(iter(seen)))
            seen[memo] = (database, translate)

    def on_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """Under REPEATABLE READ or SERIALIZABLE, pin the versions before the snapshot.

        Such a transaction reads one snapshot, taken at its first statement; a fill must
        be validated against the versions as they were before it, or a value older than
        a write committed since could be stored as current.
        """
        isolation = (
            connection.get_execution_options().get("isolation_level")
            or connection.default_isolation_level
        )
        if isolation not in ("REPEATABLE READ", "SERIALIZABLE"):
            return
        core = self.core
        tables = core.models.known_tables()
        tx = tx_state(session)
        try:
            values = core.io().mget([core.keys.version_key(t) for t in tables])
        except RedisError as exc:
            core.redis_failed(exc)
            values = [None] * len(tables)
        # a pin that is not a counter pins nothing: such a table is not filled this time
        tx.snapshot = {
            t: v if parse_counter(v) is not None else None
            for t, v in zip(tables, values, strict=True)
        }

    def plan(self, structural_key: Any, statement: Any) -> StatementPlan | None:
        """The memoised plan of a statement shape; None when it cannot be cached."""
        plans = self._plans
        try:
            return plans[structural_key]
        except KeyError:
            pass
        except TypeError:
            return None
        try:
            plan: StatementPlan | None = self._build_plan(statement)
        except (Unfingerprintable, Uncacheable) as exc:
            log.info("statement runs uncached: %s", exc)
            plan = None
        if len(plans) >= _PLAN_CACHE_SIZE:
            plans.clear()
        plans[structural_key] = plan
        return plan

    def _build_plan(self, statement: Any) -> StatementPlan:
        core = self.core
        canonical = hydrate.canonical_statement(statement)
        fp = fingerprint(canonical._generate_cache_key().key)
        if not fp.tables:
            raise Uncacheable("the statement reads no table the cache can version")
        tables = [t.fullname for t in fp.tables]
        schema = [core.models.table_schema(t) for t in fp.tables]
        keys = core.keys
        shape = _row_shape(statement)
        scopes = tuple(
            "model:" + info.mapper.class_.__name__
            for t in fp.tables
            if (info := core.models.by_table.get(t.fullname)) is not None
        )
        return StatementPlan(
            digest=values_digest([fp.digest, schema]),
            tables=frozenset(tables),
            table_names=tuple(tables),
            version_keys=tuple(keys.version_key(t) for t in tables),
            writers_keys=tuple(keys.writers_key(t) for t in tables),
            entry_prefix=keys.query_key(tables[0], ""),
            shape=shape,
            scopes=scopes,
        )

    # -- entity cache: session.get and many-to-one lazy loads ----------------------------

    def _entity_target(
        self, orm_context: ORMExecuteState
    ) -> tuple[ModelInfo, tuple[Any, ...]] | None:
        """The model and primary key of a plain load by primary key, else None.

        Locking loads, attribute refreshes, loads with loader options and the bypass
        execution options go to the database.
        """
        statement: Any = orm_context.statement
        mapper = statement._propagate_attrs.get("plugin_subject")
        info = None if mapper is None else self.core.models.entity_infos.get(mapper)
        if info is None:
            return None
        pk = hydrate.get_clause_pk(statement, mapper, orm_context.parameters)
        if (
            pk is None
            or None in pk
            or statement._for_update_arg is not None
            or orm_context.load_options._refresh_state is not None
            or any(not isinstance(o, UserDefinedOption) for o in statement._with_options)
            or any(orm_context.execution_options.get(n) for n in _BYPASS_OPTIONS)
        ):
            return None
        return info, pk

    def _entity_load(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        target = self._entity_target(orm_context)
        if target is None:
            return None
        info, pk = target
        core = self.core
        session = orm_context.session
        tx = peek_tx_state(session)
        if tx is not None and info.table in tx.written_tables:
            return None
        scope = "model:" + info.mapper.class_.__name__
        try:
            pk_str = pk_text(pk)
        except TypeError:
            return None
        if not self._trusted((info.table,)):
            core.counters.incr(scope, "bypassed")
            return None
        bind = session.get_bind(**orm_context.bind_arguments)
        database = self.binds.database_for(session, bind, orm_context.bind_arguments)
        if database is None:
            core.counters.incr(scope, "bypassed")
            return None
        row_scope = core.entity_scope(
            info, database, translate_map_of(bind, orm_context.execution_options)
        )
        keys = core.keys
        key = keys.entity_key(info.table, info.schema_hash, row_scope, pk_str)
        # the entry is valid under the table's generation and the row's write counter;
        # the fill compares the version (any write of the table) like a query's fill
        counters = [
            keys.version_key(info.table),
            keys.generation_key(info.table),
            keys.row_write_key(info.table, pk_str),
        ]
        # under a pinned snapshot a missing counter reads as b"", which matches nothing
        pinned = None if tx is None or tx.snapshot is None else tx.snapshot.get(info.table) or b""
        policy = info.policy or _DEFAULT_POLICY
        ttl = core.ttl_for_info(info)
        # a row write counter lives as long as the entries it validates, an hour at least
        ttls = [core.counter_ttl_ms] * 2 + [max(ROW_COUNTER_TTL_MS, int(ttl * 1000))]

        def fill(data: Any, preexisting: Any, look: Look, delta: int, token: str) -> bool | None:
            captured = cast("list[bytes]", look.captured)
            body = hydrate.extract_entity(data[0] if data else None, info, preexisting)
            live_ms = core.jittered_ms(ttl)
            stamp = [int(captured[1]), int(captured[2]), delta, stampede.now_ms() + live_ms]
            return core.store(
                key,
                pack([stamp, body]),
                counters[:1],
                [core.keys.writers_key(info.table)],
                captured[:1],
                live_ms / 1000,
                scope,
                lease_token=token,
                physical_ttl_ms=live_ms,
            )

        return self._read_through(
            orm_context,
            Target(
                key=key,
                scope=scope,
                also=(),
                look=lambda lease: self._entity_look(key, counters, ttls, pinned, scope, lease),
                serve=lambda body: self._serve_entity(session, info, pk, body, key, scope),
                fill=fill,
                lease=True,
                lease_wait=policy.lease_wait,
                xfetch_beta=policy.xfetch_beta,
                stale_ttl=0,
            ),
        )

    def _entity_look(
        self,
        key: str,
        counters: list[str],
        ttls: list[int],
        pinned: bytes | None,
        scope: str,
        lease: str,
    ) -> Look | None:
        """One MGET of an entity entry, its table's version and generation, its row's
        write counter."""
        fetched = self._fetch([key, *counters], scope, lease)
        if fetched is None:
            return None
        (entry, *current), leased = fetched
        version = current[0]
        missing = None in current
        numbers = None if missing else self._counters(counters, current, scope)
        if entry is not None and numbers is not None and (pinned is None or pinned == version):
            try:
                document = self.core.opened(key, entry, scripted=True)
                stored_generation, stored_writes, timing, body = entity_entry(document)
            except (CodecError, ValueError, TypeError) as exc:
                self._corrupt(key, scope, exc)
            else:
                if stored_generation == numbers[1] and stored_writes == numbers[2]:
                    return Look((timing, body), current, leased)
        captured: list[bytes] | None = None
        if numbers is not None or missing:
            captured = self._captured(current, counters, ttls)
        if pinned is not None and captured is not None:
            # the fill is validated against the version pinned before the snapshot
            captured = [pinned, *captured[1:]] if pinned else None
        return Look(None, captured, leased=leased)

    def _serve_entity(
        self,
        session: Session,
        info: ModelInfo,
        pk: tuple[Any, ...],
        body: Any,
        key: str,
        scope: str,
    ) -> Result[Any] | None:
        try:
            result = hydrate.rehydrate_entity(session, info, body, pk)
        except (CodecError, ValueError, TypeError, KeyError, IndexError) as exc:
            self._corrupt(key, scope, exc)
            return None
        self.core.counters.incr(scope, "hits")
        return result


def entity_entry(raw: bytes) -> tuple[int, int, stampede.Timing | None, Any]:
    """The generation, row write counter, timing and body of an entity entry.

    CodecError when foreign. A read's fill stamps ``[generation, row_writes, delta_ms,
    expires_ms]`` (for XFetch); a writer (write-through, write-behind's scripts) stamps
    ``[generation, row_writes]``: it read nothing, so the entry is never refreshed early
    and simply expires with its TTL.

    Example::

        >>> entity_entry(pack([[7, 5, 3, 1000], None]))
        (7, 5, Timing(delta_ms=3, expires_ms=1000), None)
    """
    payload = unpack(raw)
    if type(payload) is not list or len(payload) != 2:
        raise CodecError("not an entity entry of this cache")
    stamp, body = payload
    if type(stamp) is not list or not all(type(n) is int for n in stamp):
        raise CodecError("not an entity entry stamp")
    if len(stamp) == 2:
        return stamp[0], stamp[1], None, body
    if len(stamp) == 4:
        return stamp[0], stamp[1], stampede.Timing(stamp[2], stamp[3]), body
    raise CodecError("not an entity entry stamp")


def _query_entry(raw: bytes, owner: str) -> tuple[list[Any], Any]:
    """Unpack a query entry's ``[stamp, body]``; anything else is foreign (CodecError).

    The stamp starts with its statement's digest (``owner``): an entry copied under
    another statement's key is foreign too.
    """
    payload = unpack(raw)
    if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not list:
        raise CodecError("not an entry of this cache")
    stamp: list[Any] = payload[0]
    if len(stamp) < 3 or type(stamp[1]) is not int or type(stamp[2]) is not int:
        raise CodecError("not a query entry stamp")
    if stamp[0] != owner:
        raise CodecError("the entry of another statement")
    return stamp, payload[1]


def _row_shape(statement: Any) -> hydrate.RowShape:
    descriptions = statement.column_descriptions
    keys: list[str] = []
    entity_positions: list[int] = []
    entity_mappers: list[Mapper[Any]] = []
    scalar_positions: list[int] = []
    scalar_types: list[TypeEngine[Any]] = []
    for i, desc in enumerate(descriptions):
        keys.append(desc["name"])
        kind = desc["type"]
        if isinstance(kind, TypeEngine):
            scalar_positions.append(i)
            scalar_types.append(kind)
        elif isinstance(kind, type) and hasattr(kind, "__mapper__"):
            entity_positions.append(i)
            entity_mappers.append(kind.__mapper__)
        else:
            raise Uncacheable(f"result column {desc['name']!r} is neither an entity nor a column")
    try:
        codec = RowCodec(scalar_types)
    except UncacheableType as exc:
        raise Uncacheable(str(exc)) from exc
    single = len(descriptions) == 1 and bool(entity_positions)
    return hydrate.RowShape(
        keys=tuple(keys),
        single_entity=single,
        entity_positions=tuple(entity_positions),
        scalar_positions=tuple(scalar_positions),
        scalar_codec=codec,
        entity_mappers=tuple(entity_mappers),
    )


def mapper_tables(mapper: Mapper[Any]) -> list[Table]:
    """The tables a mapper's rows live in."""
    return [t for t in mapper.tables if isinstance(t, Table)]
