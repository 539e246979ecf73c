"""``strategy="write_through"``: a commit writes the rows' new state to their entity entries.

It runs inside the invalidation protocol of :mod:`.cache_aside` (marks at flush, bump at
commit): where cache-aside deletes a written row's entity entry after the commit, a
write-through model's entry is set to the row as the database holds it after the flush,
read back in the writing transaction, unless another writer flushed
the row meanwhile (then it is deleted: the cache is never left older than the database).
This module reads and encodes those states. The row comes, where it can, from the flush's
own ``UPDATE``, given a ``RETURNING`` clause of every column (:class:`Returning`: no
statement and no round trip of its own); otherwise from one ``SELECT`` per table and flush
(:func:`read_back`).

A value the codec cannot store exactly deletes the entry instead, as cache-aside would:
counted in ``write_through_fallbacks`` and logged at WARNING once per model and column
(docs/strategies.md).

Example::

    rows = read_back(session.connection(), info, [product])  # {id(product): [...]}
    state = flushed_state(info, rows[id(product)], generation=7, ticket=3)  # bytes or None
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Table, select, tuple_
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.dml import Delete, Insert, Update
from sqlalchemy.sql.elements import TextClause

from sa_redis_cache import compat
from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.policy import Strategy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.engine import Connection, Dialect

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.stats import Stats

log = logging.getLogger(__name__)

# (model, reason) pairs already logged at WARNING: the next ones go to DEBUG
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def is_written_through(info: ModelInfo) -> bool:
    """True for a model whose commits write their rows' state into the cache."""
    return info.policy is not None and info.policy.strategy == Strategy.WRITE_THROUGH


def flushed_pk(info: ModelInfo, obj: object) -> tuple[Any, ...]:
    """The primary key ``obj`` was flushed under, as its attributes hold it.

    Example::

        flushed_pk(info, product)   # (7,)
    """
    attributes = instance_state(obj).dict
    keys = info.column_keys
    return tuple(attributes.get(keys[p]) for p in info.pk_positions)


def read_back(
    connection: Connection, info: ModelInfo, objs: Sequence[object]
) -> dict[int, list[Any]]:
    """The rows ``objs`` were flushed to, as the database holds them now, by ``id(obj)``.

    Read inside the writing transaction, after its flush: the transaction holds the rows'
    locks, so no other commit can change them before this one ends. An UPDATE sets only
    the columns this session changed; the object's other attributes may be older than a
    commit made since it was loaded, so the state written through is the row, not the
    object.
    """
    mapper = info.mapper
    positions = info.pk_positions
    wanted: dict[tuple[Any, ...], list[int]] = {}
    for obj in objs:
        wanted.setdefault(flushed_pk(info, obj), []).append(id(obj))
    if not wanted:
        return {}
    columns = [mapper.columns[key] for key in info.column_keys]
    pk_columns = [columns[p] for p in positions]
    statement = select(*columns).select_from(mapper.persist_selectable)
    if len(pk_columns) == 1:
        statement = statement.where(pk_columns[0].in_([key[0] for key in wanted]))
    else:
        statement = statement.where(tuple_(*pk_columns).in_(list(wanted)))
    found: dict[int, list[Any]] = {}
    for row in connection.execute(statement):
        values = list(row)
        for ident in wanted.get(tuple(values[p] for p in positions), ()):
            found[ident] = values
    return found


_ALL = "*"  # Capture.spoiled: every table
# a RETURNING clause in the statement's text: SQLAlchemy's own, or one another listener
# appended (a second RETURNING is a syntax error)
_RETURNING = re.compile(r"\bRETURNING\b", re.IGNORECASE)


@dataclass(slots=True)
class Capture:
    """The rows one flush's ``UPDATE`` statements returned on one connection.

    ``rows``: per written-through table, each row's values (``ModelInfo.column_keys``
    order, as a ``SELECT`` would give them) by primary key; ``spoiled``: tables that a
    statement the capture could not read wrote during the flush (an ``executemany``, an
    ``INSERT``, a ``DELETE``, textual SQL: ``*``), whose captured rows may be older than
    the database's and are not used.

    Example::

        capture = returning.arm(connection, [info])   # Returning.arm, before the flush
        capture.row(info, (7,))   # after it: row 7 as its UPDATE returned it, or None
    """

    tables: dict[str, ModelInfo]  # by the table's full name
    # the connection's ``info`` (its pool record's, which outlives a closed Connection)
    home: dict[Any, Any]
    rows: dict[str, dict[tuple[Any, ...], list[Any]]] = field(default_factory=dict)
    spoiled: set[str] = field(default_factory=set)
    # the statement sent with our RETURNING clause and not read yet: (context, info)
    expect: tuple[Any, ModelInfo] | None = None

    def row(self, info: ModelInfo, pk: tuple[Any, ...]) -> list[Any] | None:
        """The row ``pk`` of ``info``'s table as the flush left it, or None if unknown."""
        if _ALL in self.spoiled or info.table in self.spoiled:
            return None
        return self.rows.get(info.table, {}).get(pk)


class Returning:
    """Reads the rows a flush writes to write-through tables from the flush's own
    ``UPDATE`` statements, instead of a ``SELECT`` after the flush.

    ``before_flush`` arms a :class:`Capture` on the connection of each written-through
    table (:meth:`arm`); while it is armed, an engine listener appends ``RETURNING`` and
    every column of the model to each single-row ``UPDATE`` of such a table
    (:meth:`before_cursor_execute`), reads the returned row right after the statement ran
    (:meth:`read_returned`, through the column types' own result processors, as a
    ``SELECT`` would) and tells SQLAlchemy the statement returned nothing.
    ``after_flush`` disarms it and takes the rows (:meth:`disarm`); the rows it lacks are
    read back by :func:`read_back`. Only on dialects with ``UPDATE … RETURNING``
    (PostgreSQL), for models whose columns are all columns of one table, and for
    statements SQLAlchemy did not give a ``RETURNING`` of its own (``eager_defaults`` with
    server ``onupdate``, a server-side version counter), nor another listener appended one
    to (the row is read back instead).

    Example::

        returning = Returning()
        event.listen(engine, "before_cursor_execute", returning.before_cursor_execute,
                     retval=True)
        # and from an after_cursor_execute listener: returning.read_returned(conn, cursor, ctx)
        capture = returning.arm(connection, [info])   # before the flush
        ...                                            # the flush's UPDATEs
        returning.disarm(capture)                      # after it
        capture.row(info, (7,))                        # [7, "name", Decimal("1.50"), ...]
    """

    def __init__(self) -> None:
        # one slot per cache: several caches may watch the same engine
        self._key = ("sa_redis_cache.returning", id(self))
        # per dialect, then mapper: the RETURNING clause, or None when the model has none.
        # Held by the dialect weakly: an application that makes an engine per tenant or
        # request (each with a dialect of its own) would otherwise keep every one alive,
        # and these dicts would grow by an entry per engine for the life of the process
        self._clauses: weakref.WeakKeyDictionary[Dialect, dict[Any, str | None]] = (
            weakref.WeakKeyDictionary()
        )
        # per dialect, then (mapper, the cursor's type codes): the columns' result
        # processors (the same weak hold)
        self._processors: weakref.WeakKeyDictionary[
            Dialect, dict[tuple[Any, ...], list[Callable[[Any], Any] | None]]
        ] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def arm(self, connection: Connection, infos: Iterable[ModelInfo]) -> Capture | None:
        """Start capturing the rows the next statements on ``connection`` write to the
        tables of ``infos`` (write-through models); None when none of them can be."""
        dialect = connection.dialect
        tables = {info.table: info for info in infos if self._clause(info, dialect) is not None}
        if not tables:
            return None
        home = connection.info
        capture = Capture(tables, home)
        home[self._key] = capture
        return capture

    def disarm(self, capture: Capture) -> None:
        """Stop ``capture`` (the flush is over, or failed); works on a closed Connection."""
        if capture.home.get(self._key) is capture:
            del capture.home[self._key]

    def _clause(self, info: ModelInfo, dialect: Dialect) -> str | None:
        clauses = self._clauses.get(dialect)
        if clauses is None:
            with self._lock:  # a WeakKeyDictionary's setdefault is not atomic
                clauses = self._clauses.setdefault(dialect, {})
        try:
            return clauses[info.mapper]
        except KeyError:
            pass
        mapper = info.mapper
        table = mapper.local_table
        columns = [mapper.columns[k] for k in info.column_keys]
        clause = None
        if (
            dialect.update_returning
            and isinstance(table, Table)
            and mapper.persist_selectable is table
            and all(isinstance(c, Column) and c.table is table for c in columns)
        ):
            preparer = dialect.identifier_preparer
            clause = " RETURNING " + ", ".join(preparer.format_column(c) for c in columns)
        clauses[mapper] = clause
        return clause

    def before_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        """Append RETURNING to a single-row ``UPDATE`` of an armed table (listened with
        ``retval=True``; positional, so that every other statement of the engine pays
        no dictionary of arguments for it)."""
        capture: Capture | None = conn.info.get(self._key)
        if capture is None:
            return statement, parameters
        capture.expect = None
        compiled = getattr(context, "compiled", None)
        element = getattr(compiled, "statement", None)
        if isinstance(element, (Update, Insert, Delete)):
            table = element.table
            # by name: another Table object of the same table (a Core ``table()``) writes
            # the same rows
            info = capture.tables.get(getattr(table, "fullname", ""))
            if info is None:
                return statement, parameters  # not a written-through table
            if (
                table is info.mapper.local_table
                and isinstance(element, Update)
                and not executemany
                and not compiled.effective_returning  # type: ignore[union-attr]
                and _RETURNING.search(statement) is None
            ):
                clause = self._clause(info, conn.dialect)
                if clause is not None:
                    capture.expect = (context, info)
                    return statement + clause, parameters
            capture.spoiled.add(info.table)
        elif compiled is None or isinstance(element, TextClause):
            capture.spoiled.add(_ALL)  # textual SQL may write any table
        return statement, parameters

    def read_returned(
        self, conn: Connection, cursor: Any, context: Any
    ) -> list[tuple[Any, ...]] | None:
        """Read the rows of a statement :meth:`before_cursor_execute` gave RETURNING, and
        return their primary keys (None for any other statement).

        Called by :meth:`EngineWrites.after_cursor_execute
        <sa_redis_cache.engine_writes.EngineWrites.after_cursor_execute>`, first."""
        if not getattr(context, "isupdate", False):
            return None
        capture: Capture | None = conn.info.get(self._key)
        if capture is None or capture.expect is None:
            return None
        expected, info = capture.expect
        capture.expect = None
        if expected is not context:
            return None
        raw = cursor.fetchall()
        compat.rows_already_read(context)
        processors = self._row_processors(info, conn.dialect, _type_codes(cursor))
        rows = capture.rows.setdefault(info.table, {})
        positions = info.pk_positions
        pks = []
        for values in raw:
            row = [v if p is None else p(v) for p, v in zip(processors, values, strict=True)]
            pk = tuple(row[p] for p in positions)
            rows[pk] = row
            pks.append(pk)
        return pks

    def _row_processors(
        self, info: ModelInfo, dialect: Dialect, codes: tuple[Any, ...]
    ) -> list[Callable[[Any], Any] | None]:
        processors = self._processors.get(dialect)
        if processors is None:
            with self._lock:
                processors = self._processors.setdefault(dialect, {})
        key = (info.mapper, codes)
        found = processors.get(key)
        if found is None:
            mapper = info.mapper
            found = processors[key] = [
                mapper.columns[k].type.dialect_impl(dialect).result_processor(dialect, code)
                for k, code in zip(info.column_keys, codes, strict=True)
            ]
        return found


def _type_codes(cursor: Any) -> tuple[Any, ...]:
    """The DBAPI type code of each column of the statement ``cursor`` ran, as
    ``cursor.description`` gives them.

    psycopg 3 builds a ``Column`` per column on each ``description`` (tens of
    microseconds for a model's columns); its result says the same codes (the columns'
    type OIDs) directly (``Cursor.pgresult``, ``PGresult.ftype``).
    """
    result = getattr(cursor, "pgresult", None)
    if result is not None:
        try:
            return tuple(map(result.ftype, range(result.nfields)))
        except AttributeError:
            pass  # another driver's attribute of that name
    return tuple(d[1] for d in cursor.description)


def flushed_state(
    info: ModelInfo,
    row: list[Any],
    generation: int | None,
    ticket: int,
    counters: Stats | None = None,
) -> bytes | None:
    """The entity entry of a row a flush just wrote, as the database holds it after the
    flush (:func:`read_back`); None when the entry is deleted instead (another strategy, no
    mark, a value the codec cannot store exactly).

    ``generation`` and ``ticket`` are the table's generation and the row's write ticket
    from the flush's mark: the entry is valid while neither moves. A fallback to deleting
    is counted in ``counters`` (``write_through_fallbacks``) and logged.
    """
    if generation is None or not is_written_through(info):
        return None
    assert info.codec is not None
    try:
        body = info.codec.dump_row(row)
    except CodecError as exc:
        _fell_back(info, exc, counters)
        return None
    return pack([[generation, ticket], [body, 0]])


def _fell_back(info: ModelInfo, exc: Exception, counters: Stats | None) -> None:
    """Count a write-through state deleted instead of written; WARNING once per reason."""
    if counters is not None:
        counters.incr(info.scope, "write_through_fallbacks")
    name = info.mapper.class_.__name__
    # the column (Inexact names it first) or the kind of problem, not the value
    reason = str(exc).partition(":")[0]
    with _WARNED_LOCK:
        first = (name, reason) not in _WARNED and len(_WARNED) < 4096
        if first:
            _WARNED.add((name, reason))
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "write_through: %s rows are deleted from the cache at commit instead of written "
        "(as cache_aside does): %s. Later occurrences are logged at DEBUG and counted in "
        "write_through_fallbacks",
        name,
        exc,
        extra={"sarc_scope": info.scope},
    )


def sealed_state(core: CacheContext, key: str, state: bytes | None, info: ModelInfo) -> bytes:
    """The value to store under ``key`` (signed if the cache signs), or b"" to delete.

    A state above ``max_entry_bytes`` is deleted instead: reads refuse such values.
    """
    if not state:
        return b""
    sealed = core.sealed(key, state)
    if len(sealed) > core.max_entry_bytes:
        core.counters.incr(info.scope, "oversize")
        return b""
    return sealed
