"""Session hooks: record what each transaction writes and apply the model's strategy.

* ``after_flush``: mark the written tables and rows in Redis before the database
  commit (``lua/flush_mark.lua``) and keep the write-through states for later.
* ``do_orm_execute`` on ORM bulk ``update()``/``delete()``: the same, for the whole table.
* ``after_commit`` of the outermost transaction, inside ``commit()``: bump the versions,
  write through or delete the entity entries, announce on Pub/Sub, release the marks
  (``lua/commit.lua``).
* savepoints: frames in :mod:`sa_redis_cache.txstate`; rollbacks release the marks.

A Redis failure on these paths never fails the application's transaction: the flush
marks and version bumps make the cache refuse old fills, and the failure is counted.
Their Redis calls go through ``core.io()``, so under ``AsyncSession`` they await the
asyncio client and the event loop keeps running (so do write-behind's, in
:mod:`sa_redis_cache.writebehind`).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError
from sqlalchemy import Table
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.elements import TextClause

from . import hydrate
from .codec import CodecError, pack
from .core import ROW_COUNTER_TTL_MS
from .counters import parse_counter
from .dml import CoreDML
from .keys import pk_text
from .models import Inexact
from .txstate import RowWrite, TableWrites, peek_tx_state, tx_state
from .writebehind import WriteBehind

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

    from .core import CacheCore
    from .models import ModelInfo

log = logging.getLogger("sa_redis_cache")


class WritePath:
    """Applies the write strategies of one :class:`~sa_redis_cache.Cache`."""

    def __init__(self, core: CacheCore) -> None:
        self.core = core
        self.writer_mark_ms = 60_000
        self.core_dml = CoreDML(self)
        self.write_behind = WriteBehind(core)

    def register(self, session_class: Any) -> None:
        """Listen on ``session_class`` (a sessionmaker or Session subclass)."""
        self.core.listen(session_class, "after_begin", self.after_begin)
        self.core.listen(session_class, "after_flush", self.after_flush)
        self.core.listen(session_class, "after_transaction_create", self.after_transaction_create)
        self.core.listen(session_class, "after_commit", self.after_commit)
        self.core.listen(session_class, "after_rollback", self.after_rollback)
        self.core.listen(session_class, "after_transaction_end", self.after_transaction_end)
        # after ours: at the outermost commit, ordinary rows' cache work runs first
        self.write_behind.register(session_class)

    # -- recording -----------------------------------------------------------------------

    def after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        """Mark every table and row this flush wrote, before the database commit."""
        core = self.core
        rows: dict[str, dict[str, tuple[ModelInfo, object | None]]] = {}
        tables: set[str] = set()
        for obj in session.new:
            self._collect(obj, rows, tables, deleted=False)
        for obj in session.dirty:
            if session.is_modified(obj):
                self._collect(obj, rows, tables, deleted=False)
        for obj in session.deleted:
            self._collect(obj, rows, tables, deleted=True)
        if not tables:
            return
        tx = tx_state(session)
        frame = tx.frame()
        tz = hydrate.connection_timezone(session)
        scopes: dict[str, str] = {}
        unnamed: set[str] = set()
        for table, table_rows in list(rows.items()):
            scope = self._scope_of(session, next(iter(table_rows.values()))[0])
            if scope is None:
                # the rows cannot be named: every entity entry of the table goes
                del rows[table]
                unnamed.add(table)
                frame.setdefault(table, TableWrites()).bulk = True
            else:
                scopes[table] = scope
        if unnamed:
            self._mark(tx.token, unnamed, {}, {}, bulk=True)
        pks = {t: list(r) for t, r in rows.items()}
        tickets = self._mark(tx.token, tables - unnamed, pks, scopes, bulk=False)
        tx.marked.update(tables)
        for table, table_rows in rows.items():
            writes = frame.setdefault(table, TableWrites())
            writes.scope = scopes[table]
            generation, row_tickets = tickets.get(table, (None, {}))
            for pk, (info, obj) in table_rows.items():
                ticket = row_tickets.get(pk, -1)
                writes.rows[pk] = RowWrite(
                    ticket=ticket,
                    state=self._write_through_state(info, obj, generation, ticket, tz),
                    ttl=core.ttl_for_info(info),
                )
        for table in tables - set(rows):
            frame.setdefault(table, TableWrites())

    def _scope_of(self, session: Session, info: ModelInfo) -> str | None:
        """The scope of ``info``'s rows on the connection this flush wrote them through."""
        connection = session.connection(bind_arguments={"mapper": info.mapper})
        database = self.core.binds.database_of(connection)
        if database is None:
            return None
        translate = connection.get_execution_options().get("schema_translate_map")
        return self.core.entity_scope(info, database, translate)

    def _collect(
        self,
        obj: object,
        rows: dict[str, dict[str, tuple[ModelInfo, object | None]]],
        tables: set[str],
        *,
        deleted: bool,
    ) -> None:
        state = instance_state(obj)
        mapper = state.mapper
        for table in mapper.tables:
            if isinstance(table, Table):
                tables.add(table.fullname)
        for rel in mapper.relationships:
            if isinstance(rel.secondary, Table) and state.attrs[rel.key].history.has_changes():
                tables.add(rel.secondary.fullname)
        info = self.core.models.info_of(mapper)
        if info is None or not info.entity_cached:
            return
        pk = [state.dict.get(info.column_keys[p]) for p in info.pk_positions]
        if state.key is not None and (deleted or None in pk):
            pk = list(state.key[1])
        if None in pk:
            return
        try:
            text = pk_text(pk)
        except TypeError:
            return
        rows.setdefault(info.table, {})[text] = (info, None if deleted else obj)

    def _write_through_state(
        self, info: ModelInfo, obj: object | None, generation: int | None, ticket: int, tz: Any
    ) -> bytes | None:
        if (
            obj is None
            or generation is None
            or info.policy is None
            or info.policy.strategy != "write_through"
        ):
            return None
        try:
            body = hydrate.extract_entity(obj, info, frozenset(), allow_modified=True, as_stored=tz)
        except (hydrate.NotCacheable, CodecError, Inexact):
            # Postgres would return something we cannot predict: delete, never guess
            return None
        if body is None or body[1]:
            # columns the database filled in (server defaults) are not known here; a
            # partial state would cost SQL on the next hit, so the entry is deleted instead
            return None
        # valid while neither the generation nor the row's write counter moves
        return pack([[generation, ticket], body])

    def _sealed_state(self, key: str, state: bytes | None, info: ModelInfo) -> bytes:
        """The write-through value for ``key`` (signed if the cache signs), or b"" to delete.

        A state above ``max_entry_bytes`` is deleted instead: reads refuse such values.
        """
        if not state:
            return b""
        core = self.core
        sealed = core.sealed(key, state)
        if len(sealed) > core.max_entry_bytes:
            core.counters.incr("model:" + info.mapper.class_.__name__, "oversize")
            return b""
        return sealed

    def on_bulk(self, orm_context: ORMExecuteState) -> None:
        """ORM ``update()``/``delete()``/``insert()`` statements: the rows are not known."""
        mapper = orm_context.bind_mapper
        tables: set[str] = set()
        if mapper is not None:
            tables.update(t.fullname for t in mapper.tables if isinstance(t, Table))
        target = getattr(orm_context.statement, "table", None)
        if isinstance(target, Table):
            tables.add(target.fullname)
        if not tables:
            return
        if isinstance(orm_context.statement, TextClause):
            return  # textual DML is seen at the engine (sa_redis_cache.dml)
        session = orm_context.session
        tx = tx_state(session)
        self._mark(tx.token, tables, {}, {}, bulk=True)
        tx.marked.update(tables)
        frame = tx.frame()
        for table in tables:
            frame.setdefault(table, TableWrites()).bulk = True

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
        keys = core.keys
        scripts = core.scripts
        ordered = sorted(tables)
        # writes ask Redis even while the breaker keeps reads away: another process that
        # reaches Redis again would otherwise serve what this write changed
        if core.undelivered:
            core.deliver_undelivered()
        calls = []
        try:
            for table in ordered:
                pks = rows.get(table, [])
                info = core.models.by_table.get(table)
                row_keys: list[str] = []
                for pk in pks:
                    assert info is not None
                    row_keys.append(keys.entity_key(table, info.schema_hash, scopes[table], pk))
                    row_keys.append(keys.row_write_key(table, pk))
                calls.append(
                    (
                        scripts.flush_mark,
                        [
                            keys.version_key(table),
                            keys.writers_key(table),
                            keys.generation_key(table),
                            *row_keys,
                        ],
                        [
                            token,
                            self.writer_mark_ms,
                            ROW_COUNTER_TTL_MS,
                            random.getrandbits(62),
                            1 if bulk else 0,
                            core.counter_ttl_ms,
                        ],
                    )
                )
            replies = core.io().run_batch(calls)
            core.breaker.success()  # resets the failure count too
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            core.keep_undelivered(ordered)
            return {}
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

    def mark_bulk(self, token: str, tables: set[str]) -> None:
        """Core/textual DML: mark ``tables`` with unknown rows (every entity entry goes)."""
        self._mark(token, tables, {}, {}, bulk=True)

    def finish_bulk(self, token: str, tables: set[str]) -> None:
        """Core/textual DML: the post-commit bump and mark release."""
        self._apply(token, {table: TableWrites(bulk=True) for table in tables}, tables)

    # -- transaction boundaries ----------------------------------------------------------

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """Core DML on a session's connection is the session's business, not the engine's."""
        self.core_dml.session_connections.add(connection)

    def after_transaction_create(self, session: Session, transaction: Any) -> None:
        """A savepoint gets a frame of its own."""
        if transaction.nested:
            tx_state(session).push()

    def after_commit(self, session: Session) -> None:
        """Savepoint release merges; the outermost commit applies everything."""
        tx = peek_tx_state(session)
        if tx is None:
            return
        if session.in_nested_transaction():
            tx.release()
            return
        if tx.marked:
            self._apply(tx.token, tx.frames[0], tx.marked)
        tx.reset()

    def after_rollback(self, session: Session) -> None:
        """A savepoint rollback drops its write-through states."""
        tx = peek_tx_state(session)
        if tx is not None and session.in_nested_transaction():
            tx.discard()

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        """The outermost transaction ended without a commit: release its marks."""
        if transaction.nested or transaction.parent is not None:
            return
        tx = peek_tx_state(session)
        if tx is None:
            return
        if not tx.marked:
            tx.snapshot = None
            return
        core = self.core
        try:
            core.io().pipeline(("ZREM", core.keys.writers_key(t), tx.token) for t in tx.marked)
        except RedisError as exc:
            core.redis_failed(exc)
        tx.reset()

    def _apply(self, token: str, frame: dict[str, TableWrites], tables: set[str]) -> None:
        core = self.core
        keys = core.keys
        channel = keys.prefix + "invalidations"
        measured = core.measure_tables(tables, "invalidate")
        if core.undelivered:
            core.deliver_undelivered()
        calls = []
        try:
            for table in sorted(tables):
                writes = frame.get(table) or TableWrites()
                info = core.models.by_table.get(table)
                row_keys: list[str] = []
                args: list[Any] = [
                    token,
                    channel,
                    orjson.dumps(
                        {
                            "t": table,
                            "s": writes.scope,
                            "pk": list(writes.rows),
                            "bulk": writes.bulk,
                        }
                    ),
                    1 if writes.bulk else 0,
                    core.counter_ttl_ms,
                    random.getrandbits(62),
                ]
                for pk, row in writes.rows.items():
                    assert info is not None
                    key = keys.entity_key(table, info.schema_hash, writes.scope, pk)
                    row_keys.append(key)
                    row_keys.append(keys.row_write_key(table, pk))
                    state = self._sealed_state(key, row.state, info)
                    args.extend([row.ticket, core.jittered_ms(row.ttl), state])
                calls.append(
                    (
                        core.scripts.commit,
                        [
                            keys.version_key(table),
                            keys.writers_key(table),
                            keys.generation_key(table),
                            *row_keys,
                        ],
                        args,
                    )
                )
            core.io().run_batch(calls)
            measured.done("delivered")
            core.breaker.success()  # resets the failure count too
        except RedisError as exc:
            measured.done("error")
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            core.keep_undelivered(tables)
