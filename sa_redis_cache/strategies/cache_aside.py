"""``strategy="cache_aside"`` (the default): a committed write invalidates; the next read fills.

This is the invalidation protocol every write the cache sees goes through, whatever the
model's strategy (write-through models only add their new states, :mod:`.write_through`;
write-behind rows never reach the flush, :mod:`.write_behind`). Tables without a policy are
invalidated too: a cached query may read them. The steps, called by
:mod:`sa_redis_cache.sessions` and :mod:`sa_redis_cache.engine_writes`:

* at flush, before the database commit (:meth:`Invalidation.mark_flush`): mark the written
  tables and rows (``lua/flush_mark.lua``): versions bumped, a writer mark that refuses
  fills, the rows' entity entries deleted and their write counters moved;
* on ORM bulk ``update()``/``delete()``/``insert()`` and Core or textual DML, the same for
  the whole table (:meth:`Invalidation.mark_bulk`);
* after the outermost commit, before ``commit()`` returns (:meth:`Invalidation.apply`):
  bump the versions, write through or delete the entity entries, announce on Pub/Sub,
  release the marks (``lua/commit.lua``); then, in the same round trip, fence the tables
  and wait for the local tiers that hold them (:mod:`sa_redis_cache.local.fences`);
* after a rollback (:meth:`Invalidation.release`): release the marks.

A Redis failure on these paths never fails the application's transaction: the flush marks
and version bumps make the cache refuse old fills, the failure is counted, and the tables
are kept as undelivered until Redis takes their bump. Every Redis call goes through
``core.io()``, so under ``AsyncSession`` it awaits the asyncio client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import Table
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.sql.elements import TextClause

from sa_redis_cache import compat
from sa_redis_cache.binds import written_through_views
from sa_redis_cache.compat import has_net_change
from sa_redis_cache.counters import parse_counter
from sa_redis_cache.models import mappers_changed
from sa_redis_cache.protocol import pk_text, scripts
from sa_redis_cache.protocol.scripts import WRITER_MARK_MS
from sa_redis_cache.referential import referential_actions
from sa_redis_cache.transaction import RowWrite, TableWrites, TransactionState

from .write_through import (
    Capture,
    Returning,
    flushed_pk,
    flushed_state,
    is_written_through,
    read_back,
    sealed_state,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session
    from sqlalchemy.orm.state import InstanceState
    from sqlalchemy.util import IdentitySet

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.protocol.scripts import ScriptCall
    from sa_redis_cache.redis_io import Pending
    from sa_redis_cache.tracing import Measurement

log = logging.getLogger(__name__)

_Rows = dict[str, dict[str, tuple["ModelInfo", object | None]]]


@dataclass(slots=True)
class _Seen:
    """What a :class:`_FlushPlan` was made from, so that ``after_flush`` can tell that it
    still holds (:meth:`Invalidation._still_holds`) instead of making it again.

    The plan depends on nothing else: which objects are new, dirty (with or without a net
    change) and deleted, each keyed row's primary key attributes and identity key, the
    association tables' histories (a plan with those is never reused), and the connection
    (with its execution options) each named table was written through
    (:attr:`_FlushPlan.connections`).
    """

    new: list[object]
    dirty: list[object]
    deleted: list[object]
    unmodified: list[object]  # dirty with no net change: left out of the plan
    # each keyed row's state, the model, its primary key attributes as read, its identity key
    keys: list[tuple[InstanceState[Any], ModelInfo, list[Any], Any]]


@dataclass(slots=True)
class _FlushPlan:
    """What one flush writes: its tables, the rows it can name (and their scopes), the
    tables whose rows it cannot name; ``complete`` is False when a row's key is not known
    yet (a new row whose primary key the database will make). ``connections``: per named
    table, the mapper of its first row, the connection the session writes it through and
    that connection's execution options; ``seen``: what it was made from, None when it
    must be made again after the flush."""

    tables: set[str]
    rows: _Rows
    scopes: dict[str, str]
    unnamed: set[str]
    complete: bool = True
    connections: dict[str, tuple[Any, Connection, Any]] = field(default_factory=dict)
    seen: _Seen | None = None


@dataclass(frozen=True, slots=True)
class _MapperTables:
    """The tables a flushed object of one mapper writes: its own, and the association
    tables of its many-to-many relationships (written when their history changed)."""

    tables: tuple[str, ...]
    secondaries: tuple[tuple[str, str], ...]  # (relationship key, association table)
    # what the database writes through foreign-key actions (referential.py) when the
    # flush deletes such an object, or changes one of ``key_attributes``
    on_delete: frozenset[str] = frozenset()
    on_update: frozenset[str] = frozenset()
    key_attributes: tuple[str, ...] = ()


def _key_of(mapper: Mapper[Any], column: Any) -> str | None:
    """The attribute ``mapper`` maps ``column`` to; None when it maps none."""
    try:
        return mapper.get_property_by_column(column).key
    except UnmappedColumnError:
        return None


@dataclass(slots=True)
class _Premark:
    """Marks sent before a flush ran (:meth:`Invalidation.premark_flush`), replies unread."""

    pending: Pending | None  # None: sending failed (``error``)
    plan: _FlushPlan
    pks: dict[str, list[str]]
    bulk_calls: int
    named: list[str]
    error: RedisError | None = None


@dataclass(slots=True)
class _Posted:
    """Post-commit work sent after the database commit (:meth:`Invalidation.apply`)."""

    pending: Pending
    token: str
    tables: set[str]
    measured: Measurement
    calls: list[ScriptCall]  # commit.lua calls; the fence calls' replies follow theirs


def _same(now: IdentitySet, before: list[object]) -> bool:
    """Whether the session collection ``now`` holds exactly the objects ``before``."""
    return len(now) == len(before) and all(obj in now for obj in before)


class Invalidation:
    """The invalidation protocol of one :class:`~sa_redis_cache.Cache`.

    Example::

        invalidation = Invalidation(core)
        invalidation.mark_bulk(token, {"products"})     # Core DML, before its commit
        invalidation.finish_bulk(token, {"products"})   # after it
    """

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        self.writer_mark_ms = WRITER_MARK_MS
        self._tables_by_mapper: dict[Mapper[Any], _MapperTables] = {}
        self._tables_generation = -1
        # the engine listeners that read write-through rows from the flush's own UPDATEs
        self.returning = Returning()

    # -- before the database commit ------------------------------------------------------

    def _plan(self, session: Session) -> _FlushPlan | None:
        """What the flush about to run (or just run) writes; None when nothing."""
        rows: _Rows = {}
        tables: set[str] = set()
        complete = True
        keys: list[tuple[InstanceState[Any], ModelInfo, list[Any], Any]] = []
        # reusable after the flush unless an association table's history counts
        reusable = True
        new, dirty, deleted = list(session.new), list(session.dirty), list(session.deleted)
        unmodified: list[object] = []
        acted: set[str] = set()
        collect = self._collect
        for obj in new:
            done, plain = collect(obj, rows, tables, keys, acted, deleted=False)
            complete = done and complete
            reusable = reusable and plain
        for obj in dirty:
            if has_net_change(instance_state(obj)):
                reusable = collect(obj, rows, tables, keys, acted, deleted=False)[1] and reusable
            else:
                unmodified.append(obj)
        for obj in deleted:
            reusable = collect(obj, rows, tables, keys, acted, deleted=True)[1] and reusable
        if not tables:
            return None
        scopes: dict[str, str] = {}
        # nor can the rows of a model of the same table under another name (a schema that a
        # schema_translate_map makes the same): they are keyed under that name
        acted |= self.core.models.aliases_of(tables)
        # nor the rows of the tables a view the flush writes through (an ORM model mapped
        # onto an updatable view) reads: the database writes them on its behalf
        acted |= written_through_views(tables, self.core.models.known)
        # rows the database writes on its own (foreign-key actions) cannot be named
        unnamed: set[str] = set(acted)
        tables |= acted
        for table in acted:
            rows.pop(table, None)
        connections: dict[str, tuple[Any, Connection, Any]] = {}
        for table, table_rows in list(rows.items()):
            mapper = next(iter(table_rows.values()))[0].mapper
            connection = session.connection(bind_arguments={"mapper": mapper})
            options = connection.get_execution_options()
            scope = self._scope_on(connection, options, next(iter(table_rows.values()))[0])
            if scope is None:
                # the rows cannot be named: every entity entry of the table goes
                del rows[table]
                unnamed.add(table)
            else:
                scopes[table] = scope
                connections[table] = (mapper, connection, options)
        seen = None
        if reusable:
            seen = _Seen(new, dirty, deleted, unmodified, keys)
        return _FlushPlan(tables, rows, scopes, unnamed, complete, connections, seen)

    def _still_holds(self, session: Session, plan: _FlushPlan) -> bool:
        """Whether ``plan``, made before the flush, is what :meth:`_plan` would make now.

        Between ``before_flush`` and ``after_flush`` the session's collections still show
        the state before the flush, but other ``before_flush`` listeners, mapper events
        and the flush's own synchronisation of foreign keys may add, delete or change
        objects; any of that shows as another member of ``new``, ``dirty`` or ``deleted``,
        a dirty object that now has a net change, a primary key attribute or identity key
        that is not the same object any more, or another connection (or execution options)
        for a table. Then the plan is made again.
        """
        seen = plan.seen
        if seen is None:
            return False
        if not (
            _same(session.new, seen.new)
            and _same(session.dirty, seen.dirty)
            and _same(session.deleted, seen.deleted)
        ):
            return False
        for obj in seen.unmodified:
            if has_net_change(instance_state(obj)):
                return False
        for state, info, pk, identity in seen.keys:
            if state.key is not identity:
                return False
            attributes = state.dict
            names = info.column_keys
            for position, value in zip(info.pk_positions, pk, strict=True):
                if attributes.get(names[position]) is not value:
                    return False
        for mapper, connection, options in plan.connections.values():
            now = session.connection(bind_arguments={"mapper": mapper})
            if now is not connection or now.get_execution_options() is not options:
                return False
        return True

    def premark_flush(self, session: Session, state: TransactionState) -> None:
        """Send the marks of the flush about to run (``before_flush``), without waiting:
        the round trip overlaps the flush's statements, and :meth:`mark_flush` reads the
        replies. Marking before the statements run refuses fills a little earlier,
        never later. Not offered by every client (:meth:`RedisIO.send_batch
        <sa_redis_cache.redis_io.RedisIO.send_batch>`); then ``mark_flush`` marks alone.
        """
        self.settle_premark(state)
        plan = self._plan(session)
        if plan is None:
            return
        self._arm_returning(session, plan, state)
        if not plan.complete:
            state.plan = plan  # mark_flush sees whether it still holds (it will not)
            return  # a new row's key is known after the flush only: mark_flush marks
        core = self.core
        if core.undelivered:
            core.deliver_undelivered()
        named = plan.tables - plan.unnamed
        pks = {t: list(r) for t, r in plan.rows.items()}
        bulk_tables: list[str] = []
        bulk_calls: list[scripts.ScriptCall] = []
        if plan.unnamed:
            bulk_tables, bulk_calls = self._mark_calls(state.token, plan.unnamed, {}, {}, bulk=True)
        named_tables, named_calls = self._mark_calls(
            state.token, named, pks, plan.scopes, bulk=False
        )
        error: RedisError | None = None
        try:
            pending = core.io().send_batch([*bulk_calls, *named_calls])
        except RedisError as exc:
            # counted by mark_flush as its own failure would be: one attempt per flush,
            # so a flush waits for one timeout while Redis is unreachable, not two
            pending, error = None, exc
        if pending is None and error is None:
            state.plan = plan  # not offered: mark_flush marks alone, from this plan if it holds
            return
        # reads of these tables go to the database from now on, and their marks are
        # released when the transaction ends, even if the flush fails
        state.marked.update(plan.tables)
        state.premark = _Premark(pending, plan, pks, len(bulk_tables), named_tables, error)

    @staticmethod
    def _running_plan(state: TransactionState) -> _FlushPlan | None:
        """The plan of the flush running now, made before its statements (None when it
        writes nothing the cache keeps)."""
        premark: _Premark | None = state.premark
        return premark.plan if premark is not None else state.plan

    def flush_writes_rows(
        self, state: TransactionState, table: str, pks: list[tuple[Any, ...]]
    ) -> bool:
        """Whether the rows ``pks`` of ``table`` are all rows the flush running now writes
        (its plan names them): a later write of such a row reaches the cache with the
        flush's own (write-through reads it from what the write returned); any other row
        is not known to the flush's hooks."""
        plan = self._running_plan(state)
        table_rows = None if plan is None else plan.rows.get(table)
        if table_rows is None:
            return not pks
        flushed = {flushed_pk(info, obj) for info, obj in table_rows.values() if obj is not None}
        return all(pk in flushed for pk in pks)

    def _arm_returning(self, session: Session, plan: _FlushPlan, state: TransactionState) -> None:
        """Capture the written-through rows of the flush about to run from its own
        UPDATEs (:class:`.write_through.Returning`), on each connection it writes them on."""
        by_connection: dict[Connection, list[ModelInfo]] = {}
        for table, table_rows in plan.rows.items():
            info, _ = next(iter(table_rows.values()))
            if is_written_through(info) and any(o is not None for _, o in table_rows.values()):
                connection = self._connection_for(session, plan, table, info)
                by_connection.setdefault(connection, []).append(info)
        captures: dict[Connection, Capture] = {}
        for connection, written in by_connection.items():
            infos = written
            database = self.core.binds.known(connection)
            if database is not None and database.after_update_triggers:
                # RETURNING gives the row before AFTER row triggers run, which may change
                # it: such tables are read back after the flush instead
                triggered = database.after_update_triggers
                infos = [i for i in written if i.table.rpartition(".")[2] not in triggered]
            capture = self.returning.arm(connection, infos)
            if capture is not None:
                captures[connection] = capture
        state.captures = captures or None

    @staticmethod
    def _connection_for(
        session: Session, plan: _FlushPlan, table: str, info: ModelInfo
    ) -> Connection:
        """The connection the session writes ``info``'s rows of ``table`` through: the one
        ``plan`` was made with when it asked for the same mapper."""
        found = plan.connections.get(table)
        if found is not None and found[0] is info.mapper:
            connection: Connection = found[1]
            return connection
        return session.connection(bind_arguments={"mapper": info.mapper})

    def _take_captures(self, state: TransactionState) -> dict[Connection, Capture]:
        """Disarm the flush's captures and return them (empty when none were armed)."""
        captures: dict[Connection, Capture] | None = state.captures
        state.captures = None
        if not captures:
            return {}
        for capture in captures.values():
            self.returning.disarm(capture)
        return captures

    def settle_premark(self, state: TransactionState) -> None:
        """Drop the replies of marks a flush that failed never read (the transaction's
        end releases the marks), and stop its captures."""
        self._take_captures(state)
        state.plan = None
        premark: _Premark | None = state.premark
        if premark is not None:
            state.premark = None
            if premark.pending is not None:
                premark.pending.discard()

    def mark_flush(self, session: Session, state: TransactionState) -> None:
        """Mark every table and row this flush wrote (``after_flush``); the marks
        :meth:`premark_flush` sent count, and only what they missed is marked now."""
        tickets: dict[str, tuple[int, dict[str, int]]] = {}
        covered: set[str] = set()
        covered_bulk: set[str] = set()
        premark: _Premark | None = state.premark
        state.premark = None
        captures = self._take_captures(state)
        early: _FlushPlan | None = premark.plan if premark is not None else state.plan
        state.plan = None
        if early is not None and self._still_holds(session, early):
            plan: _FlushPlan | None = early
        else:
            plan = self._plan(session)
        if premark is not None:
            tickets = self._premark_replies(premark)
            covered_bulk = premark.plan.unnamed
            if plan is premark.plan:
                covered = set(premark.named)
            elif plan is not None:
                covered = {
                    t
                    for t in premark.named
                    if t in plan.tables
                    and t not in plan.unnamed
                    and plan.scopes.get(t) == premark.plan.scopes.get(t)
                    and set(plan.rows.get(t, ())) <= set(premark.pks.get(t, ()))
                }
        if plan is None:
            return
        core = self.core
        rows, scopes, unnamed, tables = plan.rows, plan.scopes, plan.unnamed, plan.tables
        frame = state.frame()
        for table in unnamed:
            frame.table(table).bulk = True
        if unnamed - covered_bulk:
            self._mark(state.token, unnamed - covered_bulk, {}, {}, bulk=True)
        pks = {t: list(r) for t, r in rows.items()}
        rest = tables - unnamed - covered
        if rest:
            tickets.update(self._mark(state.token, rest, pks, scopes, bulk=False))
        state.marked.update(tables)
        for table, table_rows in rows.items():
            writes = frame.table(table)
            writes.scope = scopes[table]
            generation, row_tickets = tickets.get(table, (None, {}))
            current = (
                self._read_back(session, plan, table, table_rows, captures)
                if generation is not None
                else {}
            )
            for pk, (info, obj) in table_rows.items():
                ticket = row_tickets.get(pk, -1)
                entry = None
                row = None if obj is None else current.get(id(obj))
                if row is not None:  # gone since the flush (a trigger): deleted instead
                    entry = flushed_state(info, row, generation, ticket, core.counters)
                writes.rows[pk] = RowWrite(ticket=ticket, state=entry, ttl=core.ttl_for_info(info))
        for table in tables - set(rows):
            frame.table(table)

    def _read_back(
        self,
        session: Session,
        plan: _FlushPlan,
        table: str,
        table_rows: dict[str, tuple[ModelInfo, object | None]],
        captures: dict[Connection, Capture],
    ) -> dict[int, list[Any]]:
        """The written-through rows among ``table_rows`` as the database holds them after
        this flush, by ``id`` of their object: as the flush's UPDATEs returned them
        (``captures``), the others read back (:func:`.write_through.read_back`)."""
        groups: dict[int, tuple[ModelInfo, list[object]]] = {}
        for info, obj in table_rows.values():
            if obj is not None and is_written_through(info):
                groups.setdefault(id(info), (info, []))[1].append(obj)
        found: dict[int, list[Any]] = {}
        for info, objs in groups.values():
            connection = self._connection_for(session, plan, table, info)
            capture = captures.get(connection)
            rest = objs
            if capture is not None:
                rest = []
                for obj in objs:
                    row = capture.row(info, flushed_pk(info, obj))
                    if row is None:
                        rest.append(obj)
                    else:
                        found[id(obj)] = row
            if rest:
                found.update(read_back(connection, info, rest))
        return found

    def mark_bulk_statement(self, orm_context: ORMExecuteState, state: TransactionState) -> bool:
        """ORM ``update()``/``delete()``/``insert()`` statements: the rows are not known.
        True when it marked the statement's tables."""
        if isinstance(orm_context.statement, TextClause):
            return False  # textual DML is seen at the engine (sa_redis_cache.engine_writes)
        mapper = compat.bind_mapper(orm_context)
        tables: set[str] = set()
        if mapper is not None:
            tables.update(t.fullname for t in mapper.tables if isinstance(t, Table))
        target = compat.dml_table(orm_context.statement)
        if target is not None:
            tables |= self.core.models.written_as(target)
        if not tables:
            return False
        tables |= referential_actions().written_by(
            tables, deletes=orm_context.is_delete, updates=orm_context.is_update
        )
        tables |= self.core.models.aliases_of(tables)
        self._mark(state.token, tables, {}, {}, bulk=True)
        state.marked.update(tables)
        frame = state.frame()
        for table in tables:
            frame.table(table).bulk = True
        return True

    def mark_bulk(self, token: str, tables: set[str]) -> None:
        """Core/textual DML: mark ``tables`` with unknown rows (every entity entry goes)."""
        self._mark(token, tables, {}, {}, bulk=True)

    def _scope_on(self, connection: Connection, options: Any, info: ModelInfo) -> str | None:
        """The scope of ``info``'s rows written through ``connection``, whose execution
        options are ``options``; None when its database cannot be told."""
        database = self.core.binds.database_of(connection)
        if database is None:
            return None
        return self.core.entity_scope(info, database, options.get("schema_translate_map"))

    def _tables_of(self, mapper: Mapper[Any]) -> _MapperTables:
        """The tables ``mapper``'s flushed objects may write, worked out once per mapper
        (again after any mapper was made or configured)."""
        generation = mappers_changed()
        if generation != self._tables_generation:
            self._tables_by_mapper.clear()
            self._tables_generation = generation
        found = self._tables_by_mapper.get(mapper)
        if found is None:
            own = [t for t in mapper.tables if isinstance(t, Table)]
            names = [t.fullname for t in own]
            actions = referential_actions()
            updated_columns = [
                column
                for table in own
                for column in table.columns
                if column.name in actions.update_columns(table.fullname)
            ]
            found = self._tables_by_mapper[mapper] = _MapperTables(
                tuple(names),
                tuple(
                    (rel.key, rel.secondary.fullname)
                    for rel in mapper.relationships
                    if isinstance(rel.secondary, Table)
                ),
                frozenset(
                    actions.written_by((t.fullname for t in own), deletes=True, updates=False)
                ),
                frozenset(
                    actions.written_by((t.fullname for t in own), deletes=False, updates=True)
                ),
                tuple(key for column in updated_columns if (key := _key_of(mapper, column))),
            )
        return found

    def _collect(
        self,
        obj: object,
        rows: _Rows,
        tables: set[str],
        keys: list[tuple[InstanceState[Any], ModelInfo, list[Any], Any]],
        acted: set[str],
        *,
        deleted: bool,
    ) -> tuple[bool, bool]:
        """Add ``obj``'s tables and row, and what its row's key was made from to ``keys``;
        add to ``acted`` the tables the database writes through foreign-key actions when
        the flush deletes its row or changes a key others reference (referential.py).

        Returns whether its row could be keyed (False: not yet), and whether no
        association table's history counted (a plan that read one is not reused).
        """
        state = instance_state(obj)
        mapper = state.mapper
        written = self._tables_of(mapper)
        tables.update(written.tables)
        if deleted:
            acted |= written.on_delete
        elif state.key is not None and written.key_attributes:
            attrs = state.attrs
            if any(attrs[key].history.has_changes() for key in written.key_attributes):
                acted |= written.on_update
        for key, secondary in written.secondaries:
            if state.attrs[key].history.has_changes():
                tables.add(secondary)
        plain = not written.secondaries
        info = self.core.models.info_of(mapper)
        if info is None or not info.entity_cached:
            return True, plain
        attributes = state.dict
        names = info.column_keys
        raw = [attributes.get(names[p]) for p in info.pk_positions]
        identity = state.key
        keys.append((state, info, raw, identity))
        pk = raw
        if identity is not None and (deleted or None in pk):
            pk = list(identity[1])
        if None in pk:
            return False, plain
        try:
            # keyed as loads give it: an object given id="7" is the row reads key as 7
            text = pk_text(info.coerce_pk(pk))
        except (TypeError, ValueError):
            return True, plain
        table_rows = rows.setdefault(info.table, {})
        table_rows[text] = (info, None if deleted else obj)
        if identity is not None and not deleted:
            # a primary key update moves the row: its old key's entry goes as a delete
            # would (state.key still names the old key until the flush is finalised)
            try:
                before = pk_text(info.coerce_pk(list(identity[1])))
            except (TypeError, ValueError):
                return True, plain
            if before != text:
                table_rows.setdefault(before, (info, None))
        return True, plain

    def _mark(
        self,
        token: str,
        tables: Iterable[str],
        rows: dict[str, list[str]],
        scopes: dict[str, str],
        *,
        bulk: bool,
    ) -> dict[str, tuple[int, dict[str, int]]]:
        """Run flush_mark.lua for each table in one round trip; tickets per table and row.

        ``rows`` are the primary keys written per table, ``scopes`` the scope their entity
        entries live in (:meth:`~sa_redis_cache.binds.Binds.scope`).
        """
        core = self.core
        # writes ask Redis even while the breaker keeps reads away: another process that
        # reaches Redis again would otherwise serve what this write changed
        if core.undelivered:
            core.deliver_undelivered()
        ordered, calls = self._mark_calls(token, tables, rows, scopes, bulk=bulk)
        try:
            replies = core.io().run_batch(calls)
            core.breaker.success()  # resets the failure count too
        except RedisError as exc:
            self.core.invalidation_failed(exc, ordered)
            return {}
        return self._tickets(ordered, replies, rows)

    def _premark_replies(self, premark: _Premark) -> dict[str, tuple[int, dict[str, int]]]:
        """The tickets of the marks :meth:`premark_flush` sent; a failure is handled as
        :meth:`_mark` handles one."""
        core = self.core
        try:
            if premark.pending is None:
                assert premark.error is not None
                raise premark.error
            replies = premark.pending.replies()
            core.breaker.success()  # resets the failure count too
        except RedisError as exc:
            self.core.invalidation_failed(exc, premark.plan.tables)
            return {}
        return self._tickets(premark.named, replies[premark.bulk_calls :], premark.pks)

    def _mark_calls(
        self,
        token: str,
        tables: Iterable[str],
        rows: dict[str, list[str]],
        scopes: dict[str, str],
        *,
        bulk: bool,
    ) -> tuple[list[str], list[scripts.ScriptCall]]:
        """The tables in order, and a flush_mark.lua call for each."""
        core = self.core
        keys = core.keys
        ordered = sorted(tables)
        calls = []
        for table in ordered:
            info = core.models.by_table.get(table)
            entity_rows = []
            for pk in rows.get(table, []):
                assert info is not None
                entity = keys.entity_key(table, info.schema_hash, scopes[table], pk)
                entity_rows.append((entity, pk))
            call = scripts.flush_mark(
                keys, table, token, entity_rows, bulk=bulk, writer_mark_ms=self.writer_mark_ms
            )
            calls.append(call)
        return ordered, calls

    def _tickets(
        self, ordered: list[str], replies: list[Any], rows: dict[str, list[str]]
    ) -> dict[str, tuple[int, dict[str, int]]]:
        """flush_mark.lua's replies as each table's generation and its rows' tickets."""
        out: dict[str, tuple[int, dict[str, int]]] = {}
        for table, reply in zip(ordered, replies, strict=True):
            generation, *tickets = reply
            number = parse_counter(generation)
            if number is None:
                # flush_mark.lua reseeds what is not a counter, so this does not happen; the
                # rows would be deleted at commit instead of written through
                continue
            out[table] = (number, dict(zip(rows.get(table, []), map(int, tickets), strict=True)))
        return out

    # -- after the transaction -----------------------------------------------------------

    def apply(self, state: TransactionState) -> None:
        """The outermost commit: bump, write through or delete, announce, release marks.

        Sent at once; its replies are read by :meth:`settle_posted` when SQLAlchemy has
        finished the commit (``after_transaction_end``, before ``commit()`` returns), so
        the round trip overlaps SQLAlchemy's own post-commit work; the wait for the local
        tiers the fences name starts then too.
        """
        self._apply(state.token, state.frames[0].tables, state.marked, state)

    def settle_posted(self, state: TransactionState) -> None:
        """Read the replies of the post-commit work :meth:`apply` sent."""
        posted: _Posted | None = state.posted
        if posted is None:
            return
        state.posted = None
        core = self.core
        try:
            core.fences.run(posted.calls, posted.tables, sent=(posted.pending, posted.token))
        except RedisError as exc:
            self._undelivered(exc, posted.tables, posted.measured)
            return
        except BaseException:
            self._interrupted(posted.tables, posted.measured)
            raise
        posted.measured.done("delivered")
        core.breaker.success()  # resets the failure count too

    def finish_bulk(self, token: str, tables: set[str]) -> None:
        """Core/textual DML: the post-commit bump and mark release."""
        self._apply(token, {table: TableWrites(bulk=True) for table in tables}, tables)

    def finish_uncertain(self, token: str, tables: set[str]) -> None:
        """A transaction whose commit may or may not have reached the database ended:
        the post-commit bump and the marks' release, no states written (its rows' entries
        were deleted at flush)."""
        self._apply(token, {}, tables)

    def release(self, token: str, tables: Iterable[str]) -> None:
        """A transaction that marked ``tables`` ended without a commit: drop its marks."""
        core = self.core
        try:
            core.io().pipeline(scripts.release_writer_mark(core.keys, t, token) for t in tables)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")

    def _apply(
        self,
        token: str,
        frame: dict[str, TableWrites],
        tables: set[str],
        state: TransactionState | None = None,
    ) -> None:
        core = self.core
        keys = core.keys
        measured = core.measure_tables(tables, "invalidate")
        if core.undelivered:
            core.deliver_undelivered()
        calls = []
        for table in sorted(tables):
            writes = frame.get(table) or TableWrites()
            info = core.models.by_table.get(table)
            rows = []
            for pk, row in writes.rows.items():
                assert info is not None
                key = keys.entity_key(table, info.schema_hash, writes.scope, pk)
                value = sealed_state(core, key, row.state, info)
                ttl_ms = core.jittered_ms(row.ttl)
                rows.append(scripts.RowCommit(key, pk, row.ticket, ttl_ms, value))
            calls.append(
                scripts.commit(keys, table, token, rows, bulk=writes.bulk, scope=writes.scope)
            )
        # the local tiers that hold the tables see the commit before it returns
        try:
            if state is not None:
                pending = core.io().send_batch([*calls, *core.fences.calls(token, tables)])
                if pending is not None:
                    state.posted = _Posted(pending, token, set(tables), measured, calls)
                    return
            core.fences.run(calls, tables, token)
            measured.done("delivered")
            core.breaker.success()  # resets the failure count too
        except RedisError as exc:
            self._undelivered(exc, tables, measured)
        except BaseException:
            self._interrupted(tables, measured)
            raise

    def _interrupted(self, tables: set[str], measured: Measurement) -> None:
        """The post-commit work was interrupted (under asyncio, a cancellation or timeout
        lands at any of its awaits), after the database committed: whether Redis ran it
        is unknown, so it is undelivered, as after a Redis error, and delivered before
        this process trusts the cache for those tables again. The session's end then
        bumps and releases the marks (:meth:`finish_uncertain`)."""
        measured.done("error")
        self.core.keep_undelivered(tables)

    def _undelivered(self, exc: RedisError, tables: set[str], measured: Measurement) -> None:
        """The post-commit work failed: counted, and kept until Redis takes it."""
        measured.done("error")
        self.core.invalidation_failed(exc, tables)
