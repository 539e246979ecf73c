"""``FromCache``: cache-aside reads of any ORM statement, keyed by its structure and values.

A statement's *plan* (its fingerprint, the tables it reads, the shape of its rows) is
computed once per statement shape; the *entry key* adds the execute-time values, the
database and the ``schema_translate_map``. The entry stores the versions of every table
the statement reads, captured before the database read (:mod:`.flow`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.sql.type_api import TypeEngine

from sa_redis_cache import compat, hydrate, stampede
from sa_redis_cache.binds import (
    session_translate_map,
    statement_translate_map,
    view_table_names,
)
from sa_redis_cache.breaker import CLOSED
from sa_redis_cache.codec import CodecError, RowCodec, UncacheableType, pack, unpack
from sa_redis_cache.fingerprint import Unfingerprintable, fingerprint, values_digest
from sa_redis_cache.local.store import estimated_size
from sa_redis_cache.protocol.keys import query_digest
from sa_redis_cache.stats import scope
from sa_redis_cache.tracing import active_tracer
from sa_redis_cache.transaction import peek_transaction_state

from .flow import Look, Target, start_snapshot

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

    from sa_redis_cache.binds import Database
    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.local import LocalTier, Mark
    from sa_redis_cache.options import FromCache
    from sa_redis_cache.stats import Counter
    from sa_redis_cache.transaction import TransactionState

    from .flow import ReadThrough

log = logging.getLogger(__name__)

_PLAN_CACHE_SIZE = 4096
# how many (database, schema_translate_map) pairs invalidate_query() remembers: it bounds
# memory for applications that make engines or connections per request
_SEEN_BINDS = 256
# entry keys remembered as hit at their last look (a few hundred KiB at most)
HITS_REMEMBERED = 10_000
# entry keys remembered by the values they were made of (KeysMade), the most values and
# characters of str values one of them may hold (ints: those of 64 bits), so that all of
# them hold at most ~15 MiB (14 MiB measured with 10,000 keys of 8 ints and 256 characters)
KEYS_REMEMBERED = 10_000
KEY_VALUES_REMEMBERED = 16
KEY_TEXT_REMEMBERED = 256
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
# values whose equality (with their type) means the same tagged encoding: str, int, bool,
# None; not float (0.0 == -0.0), Decimal (Decimal("1.0") == 1) or anything mutable
_EXACT_TYPES = frozenset((str, int, bool, type(None)))
# the decoded entries kept for hits on the same bytes (DecodedEntries): memory as the local
# tier estimates it, for all of them and for one (a larger entry is decoded on every hit)
DECODED_MAX_BYTES = 8 << 20
DECODED_MAX_ONE = DECODED_MAX_BYTES // 16


def bypasses(orm_context: ORMExecuteState) -> bool:
    """True when the statement asks for fresh or streamed rows: it bypasses the cache.

    ``populate_existing`` (in the execution or the load options, see
    :func:`~sa_redis_cache.compat.populates_existing`), ``yield_per``,
    ``stream_results`` and ``identity_token``; and any read of a horizontal-sharding
    session (:func:`~sa_redis_cache.compat.is_sharded`), whose shard is chosen after the
    cache would have keyed it. Checked once per read.

    Example::

        if bypasses(orm_context):
            return None  # the database reads it
    """
    if compat.populates_existing(orm_context) or compat.is_sharded(orm_context.session):
        return True
    opts = orm_context.execution_options
    return bool(opts.get("yield_per") or opts.get("stream_results") or opts.get("identity_token"))


def _translated(translate: Any) -> list[tuple[str, str]]:
    """A ``schema_translate_map`` as a key part. SQLAlchemy's compiler adds ``"_none"``
    (a copy of the ``None`` entry) to the application's own dict the first time it
    compiles under it: left in, a tenant's first statement would be keyed apart from every
    later one, and its first entries never read again."""
    none = translate.get(None)
    return sorted(
        (str(k), str(v))
        for k, v in translate.items()
        if not (k == "_none" and none is not None and v == none)
    )


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
    # may the local tier keep its entries (no table of a write-behind or local=False model)
    local: bool = True
    # are its entries spread by digest unless FromCache(spread=...) says (the first
    # table's CachePolicy(spread_queries=True))
    spread: bool = False
    # does it call a SQL function whose value changes with no write (now(), random())
    volatile: bool = False


class Uncacheable(Exception):
    """The statement cannot be cached; the reason is logged once."""


class DecodedEntries:
    """The last decoded and checked form of the entries this process served, by entry
    key (query entries and entity entries alike): a hit whose bytes are exactly those
    decoded before reuses their decoding (the document, its stamp, the body checked
    against the statement or the row's primary key) instead of doing it again, ~15 µs of
    a 1-row hit (benchmarks/results/speed.md).

    Nothing is served from here without Redis: the hit's MGET still reads the entry and
    its counters, the stamp is still compared with the counters just read, and only
    bytes equal to the ones decoded before reuse that decoding, so what a hit returns is
    what decoding the bytes Redis returned would give. The values are shared between
    sessions (:func:`hydrate.build` and :func:`hydrate.build_entity` with
    ``shared=True`` copy the mutable ones). Bounded by the local tier's memory estimate
    (:data:`DECODED_MAX_BYTES` in all, none above :data:`DECODED_MAX_ONE`); emptied
    when full.

    Example::

        decoded = DecodedEntries()
        decoded.put(key, raw, (stamp, prepared), objects=1)
        decoded.get(key, raw)   # (stamp, prepared): raw is what was decoded before
    """

    __slots__ = ("_bytes", "_entries", "_lock")

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, Any, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, raw: bytes) -> Any:
        """What ``raw`` under ``key`` decoded to before, if any (else None)."""
        found = self._entries.get(key)
        if found is None or found[0] != raw:
            return None
        return found[1]

    def gauges(self) -> dict[str, int]:
        """How many entries are kept, and their estimated memory in bytes."""
        return {"entries": len(self._entries), "bytes": self._bytes}

    def clear(self) -> None:
        """Forget every decoding: the next hit of each entry decodes and checks it."""
        with self._lock:
            self._entries = {}
            self._bytes = 0

    def put(self, key: str, raw: bytes, decoded: Any, *, objects: int) -> None:
        """Keep what ``raw`` decoded to, holding the values of ``objects`` objects
        (unless it is too large to keep)."""
        size = estimated_size(len(raw), max(1, objects))
        if size > DECODED_MAX_ONE:
            return
        with self._lock:
            entries = self._entries
            if self._bytes + size > DECODED_MAX_BYTES:
                entries.clear()
                self._bytes = 0
            old = entries.get(key)
            if old is not None:
                self._bytes -= old[2]
            entries[key] = (raw, decoded, size)
            self._bytes += size


class KeysMade:
    """Entry keys by the values they were made of, so that a read of values keyed before
    costs a dict look-up instead of encoding and hashing them again (~3 µs of a ~26 µs
    local-tier hit, benchmarks/results/speed.md).

    Only for bound values of types whose equality means the same encoding (str, int,
    bool, None: see :data:`_EXACT_TYPES`; ``1 == True`` is told apart by the types kept
    beside the values), no ``schema_translate_map``, at most
    :data:`KEY_VALUES_REMEMBERED` values, :data:`KEY_TEXT_REMEMBERED` characters of str
    values and ints of 64 bits; anything else is keyed as before. Bounded by
    :data:`KEYS_REMEMBERED`; emptied when full.

    Example::

        made = KeysMade()
        memo = made.memo_of(plan, database, [7], spread=False)  # None: not rememberable
        made.get(memo)                               # None: not made yet
        made.put(memo, "sarc:ns:q:products:...")     # what was made of them
    """

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[Any, ...], str] = {}

    @staticmethod
    def memo_of(
        plan: StatementPlan, database: Database, values: list[Any], *, spread: bool
    ) -> tuple[Any, ...] | None:
        """What the key of these values is remembered under; None when they cannot be."""
        if len(values) > KEY_VALUES_REMEMBERED:
            return None
        types = tuple(map(type, values))
        if not _EXACT_TYPES.issuperset(types):
            return None
        text = 0
        for value in values:
            kind = type(value)
            if kind is str:
                text += len(value)
            elif kind is int and not _INT64_MIN <= value <= _UINT64_MAX:
                return None
        if text > KEY_TEXT_REMEMBERED:
            return None
        return (plan.entry_prefix, plan.digest, database.name, spread, types, *values)

    def get(self, memo: tuple[Any, ...]) -> str | None:
        """The key made before under ``memo``, if any."""
        return self._keys.get(memo)

    def put(self, memo: tuple[Any, ...], key: str) -> None:
        """Remember ``key`` under ``memo`` (from :meth:`memo_of`)."""
        keys = self._keys
        if len(keys) >= KEYS_REMEMBERED:
            keys.clear()
        keys[memo] = key


class QueryReads:
    """The ``FromCache`` reads of one cache.

    Example::

        queries = QueryReads(core, flow, DecodedEntries())
        queries.read(orm_context, option)   # a result, or None to read the database
    """

    def __init__(self, core: CacheContext, flow: ReadThrough, decoded: DecodedEntries) -> None:
        self.core = core
        self.flow = flow
        self.binds = core.binds
        self._plans: dict[Any, StatementPlan | None] = {}
        # (database, translate map) of the statements this cache keyed, for
        # invalidate_query(); bounded, and holding no engine or connection alive
        self._seen: dict[tuple[str, str], tuple[Database, Any]] = {}
        # True once a pair left _seen (more than _SEEN_BINDS tenants or databases): their
        # entries can no longer be keyed by invalidate_query(), which then retires the
        # statement's tables instead
        self.forgot_databases = False
        # entry keys whose last look in this process found the entry: their next look is
        # a plain MGET, since a hit through look.lua's EVALSHA costs ~35 µs more (measured
        # in benchmarks/results/speed.md); any other key's look takes the fill lease in
        # the same script, saving its miss a round trip
        self._hits_last: dict[str, None] = {}
        self.decoded = decoded
        self._keys_made = KeysMade()
        # (plan, database name) -> (plan, the known tables it was made with, the plan
        # over the tables its views read): see over_views
        self._over_views: dict[tuple[int, str], tuple[StatementPlan, Any, StatementPlan]] = {}

    def read(
        self, orm_context: ORMExecuteState, option: FromCache, *, volatile_ok: bool = True
    ) -> Result[Any] | None:
        """Serve ``orm_context``'s select from its entry, or read it and fill; None lets
        the database answer. ``volatile_ok=False`` (a read the cache chose to cache:
        ``cache_queries``, a lazy-loaded collection) leaves a statement calling a
        volatile SQL function (``now()``, ``random()``) to the database."""
        core = self.core
        stats = core.counters
        region = scope("region", option.region)
        if bypasses(orm_context):
            stats.incr(region, "bypassed")
            return None
        if core.breaker.refusing():
            # Redis is out: SQLAlchemy's cache key, the plan, the binds and the entry key
            # would be computed for nothing (an uncacheable statement counts as bypassed)
            self.flow.bypassed(orm_context.session, region)
            return None
        statement: Any = orm_context.statement
        planned = self._planned(statement)
        if isinstance(planned, str):
            stats.incr(region, planned)
            return None
        cache_key, plan = planned
        if plan.volatile and not volatile_ok:
            stats.incr(region, "bypassed")
            return None
        session = orm_context.session
        tx = peek_transaction_state(session)
        if tx is not None and not tx.written_tables.isdisjoint(plan.tables):
            stats.incr(region, "bypassed")
            return None
        bind = session.get_bind(**orm_context.bind_arguments)
        database = self.binds.database_for(session, bind, orm_context.bind_arguments)
        if database is None:
            stats.incr(region, "bypassed")
            return None
        if database.views:
            plan = self.over_views(plan, database)
            if tx is not None and not tx.written_tables.isdisjoint(plan.tables):
                stats.incr(region, "bypassed")  # it wrote a table a view here reads
                return None
        if start_snapshot(session, bind, orm_context.bind_arguments):
            tx = peek_transaction_state(session)
        entry_key = self._entry_key_of(
            plan,
            cache_key,
            orm_context.parameters,
            database,
            statement_translate_map(orm_context, bind),
            option,
        )
        if entry_key is None:
            stats.incr(region, "uncacheable")
            return None
        if not self.flow.trusted(plan.tables):
            self.flow.bypassed(session, region)
            return None
        mark: Mark | None = None
        local = core.local
        if (
            local is not None
            and option.local
            and plan.local
            and (tx is None or tx.snapshot is None)
        ):
            if local.serving():
                result = self._local_hit(local, session, statement, plan, entry_key, region)
                if result is not None:
                    return result
            stats.incr(region, "local_misses", also=plan.scopes)
            mark = local.hold(plan.tables)
        return self._cached_read(orm_context, option, plan, entry_key, tx, region, mark)

    def direct_read(
        self, session: Session, statement: Any, option: FromCache, mapper: Mapper[Any]
    ) -> Result[Any] | None:
        """``session.execute(statement)`` of a ``FromCache`` statement served without
        SQLAlchemy's execute pipeline, as :meth:`EntityReads.direct_get
        <sa_redis_cache.reads.entities.EntityReads.direct_get>` serves ``session.get``:
        the result on a hit, else None. ``mapper``: the statement's subject, whose
        binds the pipeline would ask for.

        A hit in the local tier; or a hit in Redis of an entry whose last look in this
        process found it, with the one MGET the pipeline's read would send. A Redis look
        that is no hit is handed to the pipeline's read (:meth:`ReadThrough.hand
        <sa_redis_cache.reads.flow.ReadThrough.hand>`). An entry not known to be there,
        a local-tier miss, anything the pipeline's read would count or bypass, any
        execution option, a pinned snapshot (REPEATABLE READ) or, for Redis, an active
        tracer (the read's span is the pipeline's): the pipeline reads, having seen no
        look. The session is one :func:`~sa_redis_cache.reads.flow.reads_directly` allows.
        """
        # during an outage the pipeline's read bypasses the cache: nothing to compute here
        if statement._execution_options or self.core.breaker.state is not CLOSED:
            return None
        planned = self._planned(statement)
        if isinstance(planned, str):
            return None
        cache_key, plan = planned
        bind = session.get_bind(mapper=mapper, clause=statement)  # as the pipeline asks
        database = self.binds.known(bind)
        if database is None:
            return None
        if database.views:
            plan = self.over_views(plan, database)
        tx = peek_transaction_state(session)
        if tx is not None and (
            tx.snapshot is not None or not tx.written_tables.isdisjoint(plan.tables)
        ):
            return None
        if (
            not self.flow.trusted_quietly(plan.tables)
            # pinned now: the pipeline's read checks the entry against the pins
            or start_snapshot(session, bind, mapper=mapper, clause=statement)
        ):
            return None
        entry_key = self._entry_key_of(
            plan, cache_key, None, database, session_translate_map(session, bind), option
        )
        if entry_key is None:
            return None
        core = self.core
        region = scope("region", option.region)
        local = core.local
        if local is not None and option.local and plan.local:
            # a local miss is the pipeline's: it holds the tables before its Redis look
            if local.serving():
                return self._local_hit(local, session, statement, plan, entry_key, region)
            return None
        started = time.perf_counter()
        if entry_key not in self._hits_last or active_tracer(started) is not None:
            return None
        look = self._look(entry_key, plan, region, None)
        if look is not None and look.found is not None and not look.due_now(option.xfetch_beta):
            result = self._serve(session, statement, look, plan, entry_key, None)
            core.counters.hit(region, time.perf_counter() - started, also=plan.scopes)
            return result
        self.flow.hand(session, entry_key, look, started)
        return None

    def _planned(self, statement: Any) -> tuple[Any, StatementPlan] | Counter:
        """SQLAlchemy's cache key of ``statement`` and its plan; or the counter a read that
        cannot use the cache counts (``bypassed``: a locking read; ``uncacheable``)."""
        if compat.is_locking(statement):
            return "bypassed"  # a cached row takes no lock
        cache_key = compat.statement_cache_key(statement)
        if cache_key is None:
            return "uncacheable"
        plan = self.plan(cache_key.key, statement)
        if plan is None:
            return "uncacheable"
        return cache_key, plan

    def over_views(self, plan: StatementPlan, database: Database) -> StatementPlan:
        """``plan`` in ``database``, where a table it reads may be a view: validated also
        against the version counters of the tables the view reads (``database.views``),
        which every write to them bumps, and refused a fill while one is being written.
        The database reads them on the view's behalf; the statement names only the view.

        A table a view reads is versioned under every name a write to it may bump
        (:func:`~sa_redis_cache.binds.view_table_names`). The entry key is unchanged: an
        entry filled by a process that knew fewer tables carries fewer versions, which no
        look here accepts (a miss).
        """
        views = database.views
        memo = (id(plan), database.name)
        known = self.core.models.known()
        found = self._over_views.get(memo)
        if found is not None and found[0] is plan and found[1] is known:
            return found[2]
        extended = plan
        added = sorted(view_table_names(views, plan.table_names, known) - plan.tables)
        if added:
            keys = self.core.keys
            infos = [self.core.models.by_table.get(t) for t in added]
            extended = dataclasses.replace(
                plan,
                tables=plan.tables | frozenset(added),
                table_names=plan.table_names + tuple(added),
                version_keys=plan.version_keys + tuple(keys.version_key(t) for t in added),
                writers_keys=plan.writers_keys + tuple(keys.writers_key(t) for t in added),
                local=plan.local and all(info is None or info.local for info in infos),
            )
        if len(self._over_views) >= _PLAN_CACHE_SIZE:
            self._over_views.clear()
        self._over_views[memo] = (plan, known, extended)
        return extended

    def _entry_key_of(
        self,
        plan: StatementPlan,
        cache_key: Any,
        params: Any,
        database: Database,
        translate: Any,
        option: FromCache,
    ) -> str | None:
        spread = plan.spread if option.spread is None else option.spread
        return self.entry_key(plan, cache_key.bindparams, params, database, translate, spread)

    def _local_hit(
        self,
        local: LocalTier,
        session: Session,
        statement: Any,
        plan: StatementPlan,
        entry_key: str,
        region: str,
    ) -> Result[Any] | None:
        entry = local.store.get(entry_key)
        if entry is None:
            return None
        result = hydrate.build(session, entry.value, plan.shape, shared=True, statement=statement)
        self.core.counters.incr_each(region, ("hits", "local_hits"), also=plan.scopes)
        return result

    def _cached_read(
        self,
        orm_context: ORMExecuteState,
        option: FromCache,
        plan: StatementPlan,
        entry_key: str,
        tx: TransactionState | None,
        region: str,
        mark: Mark | None,
    ) -> Result[Any] | None:
        session = orm_context.session
        core = self.core
        # a direct read's look (direct_read); not under a local-tier hold, which must
        # come before the look whose entry the local tier may keep
        handed, first = self.flow.take_handed(session, entry_key)
        handed = handed and mark is None

        def fill(data: Any, preexisting: Any, look: Look, delta: int, token: str) -> bool | None:
            if plan.shape.single_entity and compat.returns_tuples(orm_context):
                data = [row[0] for row in data]  # one-object rows: stored as the objects
            body = hydrate.extract(data, plan.shape, core.models.info_of, preexisting)
            ttl = option.ttl or core.ttl_for_tables(plan.tables)
            return self._fill(entry_key, plan, look, body, ttl, option, delta, token, region)

        def look_at(lease: str, *, if_absent: bool = False) -> Look | None:
            nonlocal handed
            if handed and not lease:
                handed = False
                return first
            return self._look(entry_key, plan, region, tx, lease=lease, if_absent=if_absent)

        target = Target(
            key=entry_key,
            scope=region,
            also=plan.scopes,
            look=look_at,
            serve=lambda look: self._serve(
                session, orm_context.statement, look, plan, entry_key, mark
            ),
            fill=fill,
            lease=option.lease,
            lease_wait=option.lease_wait,
            xfetch_beta=option.xfetch_beta,
            stale_ttl=option.stale_ttl,
            # a transaction pinned to a snapshot may not fill: its misses take no lease;
            # a handed look took none either
            lease_in_look=option.lease
            and not handed
            and (tx is None or tx.snapshot is None)
            and entry_key not in self._hits_last,
        )
        return self.flow.read_through(orm_context, target)

    def _look(
        self,
        entry_key: str,
        plan: StatementPlan,
        region: str,
        tx: TransactionState | None,
        *,
        lease: str = "",
        if_absent: bool = False,
    ) -> Look | None:
        """One MGET of the entry and its counters: a valid entry, or what a fill needs.

        With ``lease`` (a token), the fill lease is asked for in the same round trip; with
        ``if_absent``, only when the entry is absent. None when Redis failed (the caller
        reads the database and does not fill).
        """
        keys = [entry_key, self.core.keys.invalidations_key(entry_key), *plan.version_keys]
        fetched = self.flow.fetch(keys, plan.table_names, region, lease, if_absent=if_absent)
        if fetched is None:
            return None
        raw, leased = fetched
        entry, invalidations, current = raw[0], raw[1], raw[2:]
        numbers = (
            None if None in current else self.flow.counters(plan.version_keys, current, region)
        )
        pinned = None if tx is None or tx.snapshot is None else tx.snapshot
        expected = None if pinned is None else [pinned.get(t) for t in plan.table_names]
        # a transaction pinned to an older snapshot cannot tell whether invalidate_query()
        # came after its snapshot: it never fills an entry that was ever invalidated
        may_fill = expected is None or invalidations is None
        if entry is not None and numbers is not None and expected in (None, current):
            found = self._parse(entry, numbers, plan, entry_key, region)
            if found is not None:
                self._hit_last(entry_key)
                # the counters were read before any refresh's database read: a capture
                timing = stampede.Timing(*found[1])
                captured_now = current if may_fill else None
                # only the local tier keeps an entry under the counters it was valid under
                valid_under = (
                    None
                    if self.core.local is None
                    else list(zip(plan.version_keys, current, strict=True))
                )
                return Look(
                    (timing, found[0]),
                    captured_now,
                    leased,
                    invalidations,
                    valid_under,
                    len(entry),
                    entry,
                )
        self._hits_last.pop(entry_key, None)
        captured: list[bytes] | None = None
        if expected is not None:
            if may_fill and None not in expected:
                captured = cast("list[bytes]", expected)
        elif numbers is not None or None in current:
            captured = self.flow.captured(current, plan.version_keys)
        return Look(None, captured, leased=leased, invalidations=invalidations)

    def _hit_last(self, entry_key: str) -> None:
        hits_last = self._hits_last
        if len(hits_last) >= HITS_REMEMBERED:
            hits_last.clear()  # forgetting costs the next looks ~35 µs each, nothing else
        hits_last[entry_key] = None

    def _parse(
        self, raw: bytes, current: list[int], plan: StatementPlan, entry_key: str, region: str
    ) -> tuple[hydrate.Prepared, tuple[int, int, int]] | None:
        """The checked body and (read time, expiry, fill time) of a valid entry; None
        when a write retired it, or when it is unreadable (deleted and counted)."""
        decoded: tuple[list[Any], hydrate.Prepared] | None = self.decoded.get(entry_key, raw)
        if decoded is not None:
            stamp, prepared = decoded
            if stamp[4:] != current:
                return None  # written since: a plain miss, as below
            return prepared, (stamp[1], stamp[2], stamp[3])
        try:
            document = self.core.opened(entry_key, raw)
            stamp, body = _query_entry(document, query_digest(entry_key))
            if stamp[4:] != current:
                # written since (or stamped in the format before the fill time): a plain
                # miss, the fill replaces it
                return None
            prepared = hydrate.prepare(body, plan.shape, self.core.models.info_of)
        except (CodecError, ValueError, TypeError, KeyError, IndexError) as exc:
            self.flow.corrupt(entry_key, region, exc)
            return None
        self.decoded.put(entry_key, raw, (stamp, prepared), objects=len(prepared.objects))
        return prepared, (stamp[1], stamp[2], stamp[3])

    def _serve(
        self,
        session: Session,
        statement: Any,
        look: Look,
        plan: StatementPlan,
        entry_key: str,
        mark: Mark | None,
    ) -> Result[Any]:
        """Build the result of the valid entry ``look`` found (checked when it was read:
        :meth:`_parse`), and let the local tier keep it when it holds the tables."""
        assert look.found is not None
        timing, prepared = look.found
        if mark is not None and timing is not None:
            ttl = (timing.expires_ms - stampede.now_ms()) / 1000
            self.flow.keep_local(
                entry_key, prepared, look, ttl, mark, objects=max(1, len(prepared.objects))
            )
        # shared with later hits on the same bytes (DecodedEntries), and the local tier's
        return hydrate.build(session, prepared, plan.shape, shared=True, statement=statement)

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
        # says how long the read took, when the entry expires logically and when it was
        # filled (XFetch, stale_ttl), then lists the versions it was read under
        now = stampede.now_ms()
        stamp = [
            query_digest(entry_key),
            delta_ms,
            now + live_ms,
            now,
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
        spread: bool = False,
    ) -> str | None:
        """The entry key of a planned statement with its execute-time values and database.

        The bound values are those the database would see: execute-time parameters
        override the values embedded in the statement. The database (its identity, default
        schema, dialect and driver: :class:`~sa_redis_cache.binds.Database`) and the
        ``schema_translate_map`` are part of the key, so tenants and shards never read each
        other's entries. None when a value cannot be encoded exactly. ``spread``: the key
        tagged by its digest (``FromCache(spread=True)``).
        """
        params = params or {}
        if not isinstance(params, Mapping):
            # several parameter sets (session.execute(stmt, [{...}])): which row set the
            # result is cannot be keyed; it runs uncached
            return None
        try:
            values: list[Any] = [params.get(bp.key, bp.effective_value) for bp in bindparams]
        except TypeError:
            return None
        keys_made = self._keys_made
        memo = None if translate else keys_made.memo_of(plan, database, values, spread=spread)
        if memo is not None:
            known = keys_made.get(memo)
            if known is not None:
                self._remember(database, translate, [])
                return known
        made = self._make_entry_key(plan, values, database, translate, spread)
        if made is not None and memo is not None:
            keys_made.put(memo, made)
        return made

    def _make_entry_key(
        self,
        plan: StatementPlan,
        values: list[Any],
        database: Database,
        translate: Any,
        spread: bool,
    ) -> str | None:
        try:
            parts: list[Any] = [plan.digest, values, database.name]
            translated = _translated(translate) if translate else []
            if translated:
                parts.append(translated)
            self._remember(database, translate, translated)
            found = values_digest(parts)
        except (CodecError, TypeError):
            return None
        if spread:
            return self.core.keys.query_key(plan.table_names[0], found, spread=True)
        return plan.entry_prefix + found

    def _remember(self, database: Database, translate: Any, translated: list[Any]) -> None:
        seen = self._seen
        memo = (database.name, repr(translated))
        if memo not in seen:
            if len(seen) >= _SEEN_BINDS:
                seen.pop(next(iter(seen)))
                self.forgot_databases = True
            seen[memo] = (database, translate)

    def seen_databases(self) -> list[tuple[Database, Any]]:
        """The (database, ``schema_translate_map``) pairs this read path keyed statements
        for: the last :data:`_SEEN_BINDS` (see :attr:`forgot_databases`)."""
        return list(self._seen.values())

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
        canonical = compat.canonical_statement(statement)
        fp = fingerprint(compat.statement_cache_key(canonical).key)
        if not fp.tables:
            raise Uncacheable("the statement reads no table the cache can version")
        tables = [t.fullname for t in fp.tables]
        schema = [core.models.table_schema(t) for t in fp.tables]
        keys = core.keys
        shape = _row_shape(statement)
        for mapper in shape.entity_mappers:
            core.models.info_of(mapper)  # a class refused after attach() is refused here too
        scopes = tuple(
            info.scope
            for t in fp.tables
            if (info := core.models.by_table.get(t.fullname)) is not None
        )
        infos = [core.models.by_table.get(t) for t in tables]
        first = infos[0]
        return StatementPlan(
            spread=first is not None
            and first.policy is not None
            and first.policy.spread_queries is True,
            local=all(info is None or info.local for info in infos),
            volatile=fp.volatile,
            digest=values_digest([fp.digest, schema]),
            tables=frozenset(tables),
            table_names=tuple(tables),
            version_keys=tuple(keys.version_key(t) for t in tables),
            writers_keys=tuple(keys.writers_key(t) for t in tables),
            entry_prefix=keys.query_key(tables[0], ""),
            shape=shape,
            scopes=scopes,
        )


def _query_entry(raw: bytes, owner: str) -> tuple[list[Any], Any]:
    """Unpack a query entry's ``[stamp, body]``; anything else is foreign (CodecError).

    The stamp starts with its statement's digest (``owner``): an entry copied under
    another statement's key is foreign too.
    """
    payload = unpack(raw)
    if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not list:
        raise CodecError("not an entry of this cache")
    stamp: list[Any] = payload[0]
    if (
        len(stamp) < 4
        or type(stamp[1]) is not int
        or type(stamp[2]) is not int
        or type(stamp[3]) is not int
    ):
        raise CodecError("not a query entry stamp")
    if stamp[0] != owner:
        raise CodecError("the entry of another statement")
    return stamp, payload[1]


def _row_shape(statement: Any) -> hydrate.RowShape:
    descriptions = getattr(statement, "column_descriptions", None)
    if descriptions is None:
        # a UNION/INTERSECT/EXCEPT of selects names no columns of its own to rebuild
        raise Uncacheable(f"{type(statement).__name__} statements are not cached")
    keys: list[str] = []
    entity_positions: list[int] = []
    entity_mappers: list[Mapper[Any]] = []
    scalar_positions: list[int] = []
    scalar_types: list[TypeEngine[Any]] = []
    for i, desc in enumerate(descriptions):
        # a plain str: a Table column's name is a quoted_name, which no codec packs
        keys.append(str(desc["name"]))
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
    try:
        loading = hydrate.loading_of(statement)
    except hydrate.UnservableLoading as exc:
        raise Uncacheable(str(exc)) from exc
    return hydrate.RowShape(
        keys=tuple(keys),
        single_entity=single,
        entity_positions=tuple(entity_positions),
        scalar_positions=tuple(scalar_positions),
        scalar_codec=codec,
        entity_mappers=tuple(entity_mappers),
        loading=loading,
        root_paths=(hydrate.root_paths(statement) if compat.propagated_options(statement) else ()),
        metadata=compat.statement_result_metadata(statement, keys),
    )
