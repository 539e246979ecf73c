"""The entity cache: ``session.get`` and many-to-one lazy loads, read through by identity.

An entity entry holds one row of one database and schema (its key's scope). It is valid
under its table's generation and its row's write counter; its fill is validated against
the table's version captured before the database read (:mod:`.flow`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.orm.interfaces import UserDefinedOption

from sa_redis_cache import compat, hydrate, stampede
from sa_redis_cache.binds import reads_a_view, session_translate_map, statement_translate_map
from sa_redis_cache.codec import CodecError, pack, unpack
from sa_redis_cache.policy import CachePolicy, Strategy
from sa_redis_cache.protocol import pk_text
from sa_redis_cache.protocol.scripts import COUNTER_TTL_MS, ROW_COUNTER_TTL_MS
from sa_redis_cache.tracing import active_tracer
from sa_redis_cache.transaction import peek_transaction_state

from .flow import Look, Target, reads_directly, start_snapshot
from .queries import DecodedEntries, bypasses

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState, Session

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.local import LocalTier, Mark
    from sa_redis_cache.models import ModelInfo

    from .flow import ReadThrough

log = logging.getLogger(__name__)

_DEFAULT_POLICY = CachePolicy()


class EntityReads:
    """The entity-cache reads of one cache.

    Example::

        entities = EntityReads(core, flow, DecodedEntries())
        entities.read(orm_context)   # a result, or None to read the database
    """

    def __init__(self, core: CacheContext, flow: ReadThrough, decoded: DecodedEntries) -> None:
        self.core = core
        self.flow = flow
        self.binds = core.binds
        # entity hits on bytes decoded before reuse that decoding, as query hits do
        self.decoded = decoded

    def target(self, orm_context: ORMExecuteState) -> tuple[ModelInfo, tuple[Any, ...]] | None:
        """The model and primary key of a plain load by primary key, else None.

        Locking loads, attribute refreshes, loads with loader options and the bypass
        execution options go to the database.
        """
        statement: Any = orm_context.statement
        mapper = compat.statement_mapper(statement)
        info = None if mapper is None else self.core.models.entity_infos.get(mapper)
        if info is None:
            return None
        pk = compat.get_clause_pk(statement, info.mapper, orm_context.parameters)
        if (
            pk is None
            or None in pk
            or compat.is_locking(statement)
            or compat.is_refresh(orm_context)
            or any(
                not isinstance(o, UserDefinedOption) for o in compat.statement_options(statement)
            )
            or bypasses(orm_context)
        ):
            return None
        try:
            return info, info.coerce_pk(pk)  # keyed as loads give it: "7" reads as 7
        except ValueError:
            return None  # the database reads it (or refuses it) as it would uncached

    def direct_get(self, session: Session, entity: Any, ident: Any) -> tuple[bool, Any]:
        """``session.get(entity, ident)`` served without SQLAlchemy's execute pipeline:
        ``(True, object or None)`` on a hit, ``(False, None)`` otherwise.

        From the local tier for a local-tier model; otherwise from Redis, with the one MGET
        the pipeline's read would send. When that look is no hit (a miss, an entry due for
        an early refresh, a Redis error), it is handed to the pipeline's read of the same
        key in this session, which uses it as its first look: a miss costs no second
        round trip.

        Only for a plain get the pipeline would bring to the entity cache and nowhere else:
        a model with an entity cache (not write-behind: its queued states come first), a
        scalar or tuple primary key, an object not in the identity map, a session with
        nothing to autoflush, no other ``do_orm_execute`` listener (which could change what
        the load returns), no ``get_bind`` override, no pinned snapshot (REPEATABLE READ)
        and, for Redis, no active tracer (the read's span is the pipeline's). Anything else
        takes the ordinary path.
        """
        core = self.core
        mapper = getattr(entity, "__mapper__", None)
        info = None if mapper is None else core.models.entity_infos.get(mapper)
        if info is None or (
            info.policy is not None and info.policy.strategy == Strategy.WRITE_BEHIND
        ):
            # a write-behind row's queued state comes first: the pipeline serves it
            return False, None
        local = core.local if info.local else None
        if local is not None and not local.serving():
            return False, None
        mapper = info.mapper
        pk = ident if type(ident) is tuple else (ident,)
        if len(pk) != len(info.pk_positions) or None in pk:
            return False, None
        try:
            pk = info.coerce_pk(pk)
        except ValueError:
            return False, None
        if compat.identity_key(mapper, pk) in session.identity_map or not reads_directly(session):
            return False, None
        tx = peek_transaction_state(session)
        if tx is not None and (tx.snapshot is not None or info.table in tx.written_tables):
            return False, None
        try:
            pk_str = pk_text(pk)
        except TypeError:
            return False, None
        if not self.flow.trusted_quietly((info.table,)):
            return False, None
        bind = session.get_bind(mapper=mapper)
        database = self.binds.known(bind)
        # pinned now: the pipeline's read checks the entry against the pin
        if (
            database is None
            or (database.views and reads_a_view(database, info.table))
            or start_snapshot(session, bind, mapper=mapper)
        ):
            return False, None
        row_scope = core.entity_scope(info, database, session_translate_map(session, bind))
        key = core.keys.entity_key(info.table, info.schema_hash, row_scope, pk_str)
        if local is not None:
            return self._local_hit(local, session, info, key)
        return self._redis_get(session, info, pk, pk_str, key)

    def _local_hit(
        self, local: LocalTier, session: Session, info: ModelInfo, key: str
    ) -> tuple[bool, Any]:
        """The local tier's entry of ``key`` built into ``session``: ``(True, object or
        None)`` on a hit (None: no such row), ``(False, None)`` when the tier holds no
        entry of ``info``'s model under it."""
        entry = local.store.get(key)
        if entry is None or not hydrate.entity_prepared_for(entry.value, info):
            return False, None
        obj = hydrate.build_entity(session, info, entry.value, shared=True)
        self.core.counters.incr_each(info.scope, ("hits", "local_hits"))
        return True, obj

    def _redis_get(
        self, session: Session, info: ModelInfo, pk: tuple[Any, ...], pk_str: str, key: str
    ) -> tuple[bool, Any]:
        """The Redis tier's part of :meth:`direct_get`."""
        started = time.perf_counter()
        if active_tracer(started) is not None:
            return False, None
        core = self.core
        scope = info.scope
        counters = self._counters(info.table, pk_str)
        look = self._look(key, counters, info, pk, None, scope, "")
        if look is not None and look.found is not None:
            policy = info.policy or _DEFAULT_POLICY
            if not look.due_now(policy.xfetch_beta):
                # shared: the values are kept decoded for later hits (DecodedEntries)
                obj = hydrate.build_entity(session, info, look.found[1], shared=True)
                core.counters.hit(scope, time.perf_counter() - started)
                return True, obj
        self.flow.hand(session, key, look, started)
        return False, None

    def _counters(self, table: str, pk_str: str) -> list[str]:
        keys = self.core.keys  # formats each table's prefix once (KeyScheme.table_prefix)
        # the entry is valid under the table's generation and the row's write counter;
        # the fill compares the version (any write of the table) like a query's fill
        return [
            keys.version_key(table),
            keys.generation_key(table),
            keys.row_write_key(table, pk_str),
        ]

    def _ttls(self, info: ModelInfo) -> list[int]:
        ttl = self.core.ttl_for_info(info)
        # a row write counter lives as long as the entries it validates, an hour at least
        return [COUNTER_TTL_MS] * 2 + [max(ROW_COUNTER_TTL_MS, int(ttl * 1000))]

    def read(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        target = self.target(orm_context)
        if target is None:
            return None
        info, pk = target
        core = self.core
        session = orm_context.session
        tx = peek_transaction_state(session)
        scope = info.scope
        if tx is not None and info.table in tx.written_tables:
            # counted as a FromCache read of a written table is: a lookup that did not
            # ask Redis (its transaction's own writes must be seen)
            core.counters.incr(scope, "bypassed")
            return None
        try:
            pk_str = pk_text(pk)
        except TypeError:
            return None
        if not self.flow.trusted((info.table,)):
            self.flow.bypassed(session, scope)
            return None
        bind = session.get_bind(**orm_context.bind_arguments)
        database = self.binds.database_for(session, bind, orm_context.bind_arguments)
        if database is None:
            core.counters.incr(scope, "bypassed")
            return None
        if database.views and reads_a_view(database, info.table):
            core.counters.incr(scope, "uncacheable")
            return None
        if start_snapshot(session, bind, orm_context.bind_arguments):
            tx = peek_transaction_state(session)
        row_scope = core.entity_scope(info, database, statement_translate_map(orm_context, bind))
        key = core.keys.entity_key(info.table, info.schema_hash, row_scope, pk_str)
        counters = self._counters(info.table, pk_str)
        handed, first = self.flow.take_handed(session, key)
        # under a pinned snapshot a missing counter reads as b"", which matches nothing
        pinned = None if tx is None or tx.snapshot is None else tx.snapshot.get(info.table) or b""
        mark: Mark | None = None
        local = core.local
        if local is not None and pinned is None and info.local:
            if local.serving():
                hit, obj = self._local_hit(local, session, info, key)
                if hit:
                    return hydrate.entity_result(info, obj)
            core.counters.incr(scope, "local_misses")
            mark = local.hold((info.table,))
        policy = info.policy or _DEFAULT_POLICY
        ttl = core.ttl_for_info(info)

        def fill(data: Any, preexisting: Any, look: Look, delta: int, token: str) -> bool | None:
            captured = cast("list[bytes]", look.captured)
            body = hydrate.extract_entity(data[0] if data else None, info, preexisting, pk=pk)
            live_ms = core.jittered_ms(ttl)
            now = stampede.now_ms()
            stamp = [int(captured[1]), int(captured[2]), delta, now + live_ms, now]
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

        def look_at(lease: str, *, if_absent: bool = False) -> Look | None:
            nonlocal handed
            if handed and not lease and pinned is None and mark is None:
                handed = False
                return first
            return self._look(key, counters, info, pk, pinned, scope, lease, if_absent=if_absent)

        return self.flow.read_through(
            orm_context,
            Target(
                key=key,
                scope=scope,
                also=(),
                look=look_at,
                serve=lambda look: self._serve(session, info, look, key, mark, ttl),
                fill=fill,
                lease=True,
                lease_wait=policy.lease_wait,
                xfetch_beta=policy.xfetch_beta,
                stale_ttl=0,
            ),
        )

    def _look(
        self,
        key: str,
        counters: list[str],
        info: ModelInfo,
        pk: tuple[Any, ...],
        pinned: bytes | None,
        scope: str,
        lease: str,
        *,
        if_absent: bool = False,
    ) -> Look | None:
        """One MGET of an entity entry, its table's version and generation, its row's
        write counter, asking for the lease (``if_absent``: only when the entry is absent,
        :meth:`ReadThrough.fetch <.flow.ReadThrough.fetch>`). A valid entry is found
        decoded and checked against ``info`` and ``pk`` (:meth:`_valid`); an unreadable
        one is deleted, counted, and looked at as missing."""
        fetched = self.flow.fetch(
            [key, *counters], (info.table,), scope, lease, if_absent=if_absent
        )
        if fetched is None:
            return None
        (entry, *current), leased = fetched
        version = current[0]
        missing = None in current
        numbers = None if missing else self.flow.counters(counters, current, scope)
        if entry is not None and numbers is not None and (pinned is None or pinned == version):
            found = self._valid(key, entry, (numbers[1], numbers[2]), info, pk, scope)
            if found is not None:
                # only the local tier keeps an entry under the counters it was valid under
                valid_under = (
                    None
                    if self.core.local is None
                    else [(counters[1], current[1]), (counters[2], current[2])]
                )
                return Look(found, current, leased, None, valid_under, len(entry), entry)
        captured: list[bytes] | None = None
        if numbers is not None or missing:
            captured = self.flow.captured(current, counters, self._ttls(info))
        if pinned is not None and captured is not None:
            # the fill is validated against the version pinned before the snapshot
            captured = [pinned, *captured[1:]] if pinned else None
        return Look(None, captured, leased=leased)

    def _serve(
        self,
        session: Session,
        info: ModelInfo,
        look: Look,
        key: str,
        mark: Mark | None,
        ttl: float,
    ) -> Result[Any]:
        assert look.found is not None
        timing, prepared = look.found  # checked when it was read (_look)
        if mark is not None:
            # an entry a writer stored has no logical expiry: it lives its model's TTL, and
            # its expiry in Redis reaches the local tier as an invalidation anyway
            left = ttl if timing is None else (timing.expires_ms - stampede.now_ms()) / 1000
            self.flow.keep_local(key, prepared, look, min(left, ttl), mark)
        # shared with later hits on the same bytes (DecodedEntries), and the local tier's
        obj = hydrate.build_entity(session, info, prepared, shared=True)
        return hydrate.entity_result(info, obj)

    def _valid(
        self,
        key: str,
        raw: bytes,
        counters: tuple[int, int],
        info: ModelInfo,
        pk: tuple[Any, ...],
        scope: str,
    ) -> tuple[stampede.Timing | None, hydrate.PreparedEntity] | None:
        """The timing and checked body of the entity entry ``raw`` when its stamp is the
        table's generation and the row's write counter just read (``counters``); None
        when a write retired it (a plain miss) or when it is unreadable (deleted and
        counted). A valid entry is decoded once per bytes and model
        (:class:`~sa_redis_cache.reads.queries.DecodedEntries`)."""
        kept: tuple[int, int, stampede.Timing | None, hydrate.PreparedEntity] | None = (
            self.decoded.get(key, raw)
        )
        if kept is not None and hydrate.entity_prepared_for(kept[3], info):
            generation, writes, timing, prepared = kept
            return (timing, prepared) if (generation, writes) == counters else None
        try:
            document = self.core.opened(key, raw, scripted=True)
            generation, writes, timing, body = entity_entry(document)
            if (generation, writes) != counters:
                return None  # written since: the body is not read, as a query's is not
            prepared = hydrate.prepare_entity(info, body, pk)
        except (CodecError, ValueError, TypeError, KeyError, IndexError) as exc:
            self.flow.corrupt(key, scope, exc)
            return None
        self.decoded.put(key, raw, (generation, writes, timing, prepared), objects=1)
        return timing, prepared


def entity_entry(raw: bytes) -> tuple[int, int, stampede.Timing | None, Any]:
    """The generation, row write counter, timing and body of an entity entry.

    CodecError when foreign. A read's fill stamps ``[generation, row_writes, delta_ms,
    expires_ms, filled_ms]`` (for XFetch; entries filled before the fill time was
    recorded have no ``filled_ms``); a writer (write-through, write-behind's scripts) stamps
    ``[generation, row_writes]``: it read nothing, so the entry is never refreshed early
    and simply expires with its TTL.

    Example::

        >>> entity_entry(pack([[7, 5, 3, 1000, 900], None]))
        (7, 5, Timing(delta_ms=3, expires_ms=1000, filled_ms=900), None)
    """
    payload = unpack(raw)
    if type(payload) is not list or len(payload) != 2:
        raise CodecError("not an entity entry of this cache")
    stamp, body = payload
    if type(stamp) is not list:
        raise CodecError("not an entity entry stamp")
    for n in stamp:
        if type(n) is not int:
            raise CodecError("not an entity entry stamp")
    if len(stamp) == 2:
        return stamp[0], stamp[1], None, body
    if len(stamp) in (4, 5):
        return stamp[0], stamp[1], stampede.Timing(*stamp[2:]), body
    raise CodecError("not an entity entry stamp")
