"""Set-based statements for a batch: one ``unnest`` upsert and one ``unnest`` delete.

``executemany`` of an ``INSERT ... ON CONFLICT`` sends one statement per row (pipelined
by psycopg, but parsed, bound and executed row by row). A batch instead binds one array
per column and runs one statement for all of its rows::

    INSERT INTO page_views (id, path, views)
    SELECT * FROM unnest(%s::UUID[], %s::VARCHAR[], %s::INTEGER[])
    ON CONFLICT (id) DO UPDATE SET path = excluded.path, views = excluded.views

    DELETE FROM page_views WHERE id = ANY(%s::UUID[])

Values go through each column type's own bind processor for the dialect (what
SQLAlchemy's ``executemany`` would apply: an Enum member becomes its name, JSON is
wrapped for the driver, ``None`` of a JSON column becomes JSON ``null``), so both forms
write the same rows. Only column types known to survive the round trip through an array
are handled here (:func:`set_based`); a table with any other column (an ``ARRAY`` column,
whose arrays ``unnest`` would flatten, or a user-defined type) keeps ``executemany``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import types as sqltypes
from sqlalchemy.dialects.postgresql import JSON, JSONB

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence, Set

    from sqlalchemy import Column, Table
    from sqlalchemy.engine import Connection, Dialect

_SAFE: tuple[type[Any], ...] = (
    sqltypes.Integer,
    sqltypes.String,
    sqltypes.Uuid,
    sqltypes.Numeric,
    sqltypes.Boolean,
    sqltypes.DateTime,
    sqltypes.Date,
    sqltypes.Time,
    sqltypes.Interval,
    sqltypes.LargeBinary,
    sqltypes.Enum,
    sqltypes.JSON,
    JSON,
    JSONB,
)


def _base_type(sqltype: Any, dialect: Dialect) -> Any:
    """The type the database sees: a TypeDecorator's implementation, recursively."""
    seen = 0
    while isinstance(sqltype, sqltypes.TypeDecorator) and seen < 10:
        sqltype = sqltype.impl_instance
        seen += 1
    return sqltype.dialect_impl(dialect)


def _array_type(column: Column[Any], dialect: Dialect) -> str:
    """The element type of ``column``'s array parameter.

    A string type with a length is cast to its unbounded form: an explicit cast to
    ``varchar(n)`` or ``char(n)`` silently truncates a longer value, where the INSERT's own
    assignment to the column refuses it (SQLSTATE 22001) as SQLAlchemy's INSERT would.
    """
    base = _base_type(column.type, dialect)
    if (
        isinstance(base, sqltypes.String)
        and not isinstance(base, sqltypes.Enum)
        and base.length is not None
    ):
        return "BPCHAR" if isinstance(base, sqltypes.CHAR | sqltypes.NCHAR) else "VARCHAR"
    return str(column.type.compile(dialect=dialect))


def set_based(columns: Sequence[Column[Any]], dialect: Dialect) -> bool:
    """True when every column's type can be bound as an array of its values.

    Example::

        set_based(list(PageView.__table__.columns), engine.dialect)  # True
    """
    if dialect.name != "postgresql":
        return False
    for column in columns:
        base = _base_type(column.type, dialect)
        if isinstance(base, sqltypes.ARRAY) or not isinstance(base, _SAFE):
            return False
    return True


class SetStatements:
    """The ``unnest`` upsert and delete of one table; see the module docstring.

    Example::

        sets = SetStatements(table, columns, pk_columns, engine.dialect)
        sets.upsert(conn, [(uuid4(), "/a", 1), (uuid4(), "/b", 2)])
        sets.delete(conn, [(some_id,)])
    """

    def __init__(
        self,
        table: Table,
        columns: Sequence[Column[Any]],
        pk_columns: Sequence[Column[Any]],
        dialect: Dialect,
        schema_translate_map: Mapping[str | None, str | None] | None = None,
        kept: Set[str] = frozenset(),
    ) -> None:
        preparer = dialect.identifier_preparer
        name = qualified_name(table, dialect, schema_translate_map)
        quoted = [preparer.quote(c.name) for c in columns]

        def cast(column: Column[Any]) -> str:
            return f"%b::{_array_type(column, dialect)}[]"

        self._processors: list[Callable[[Any], Any] | None] = [
            c.type.dialect_impl(dialect).bind_processor(dialect) for c in columns
        ]
        pk_names = [preparer.quote(c.name) for c in pk_columns]
        # ``kept``: columns an existing row keeps (an UPDATE that leaves them out)
        others = [
            q
            for q, c in zip(quoted, columns, strict=True)
            if not c.primary_key and c.name not in kept
        ]
        conflict = (
            "DO UPDATE SET " + ", ".join(f"{q} = excluded.{q}" for q in others)
            if others
            else "DO NOTHING"
        )
        # identifiers come quoted from the dialect, types from their own compile(): no input
        self.upsert_sql = (
            f"INSERT INTO {name} ({', '.join(quoted)}) "  # noqa: S608
            f"SELECT * FROM unnest({', '.join(cast(c) for c in columns)}) "
            f"ON CONFLICT ({', '.join(pk_names)}) {conflict}"
        )
        self._pk_processors: list[Callable[[Any], Any] | None] = [
            c.type.dialect_impl(dialect).bind_processor(dialect) for c in pk_columns
        ]
        if len(pk_columns) == 1:
            key, key_array = pk_names[0], cast(pk_columns[0])
            self.delete_sql = f"DELETE FROM {name} WHERE {key} = ANY({key_array})"  # noqa: S608
        else:
            self.delete_sql = (
                f"DELETE FROM {name} WHERE ({', '.join(pk_names)}) IN "  # noqa: S608
                f"(SELECT * FROM unnest({', '.join(cast(c) for c in pk_columns)}))"
            )

    @staticmethod
    def _arrays(
        rows: Sequence[Sequence[Any]], processors: list[Callable[[Any], Any] | None]
    ) -> tuple[list[Any], ...]:
        arrays = [list(column) for column in zip(*rows, strict=True)]
        for array, process in zip(arrays, processors, strict=True):
            if process is not None:
                array[:] = [process(v) for v in array]
        return tuple(arrays)

    def upsert_arrays(self, rows: Sequence[Sequence[Any]]) -> tuple[list[Any], ...]:
        """The parameters of :attr:`upsert_sql` for ``rows``: one array per column."""
        return self._arrays(rows, self._processors)

    def delete_arrays(self, keys: Sequence[Sequence[Any]]) -> tuple[list[Any], ...]:
        """The parameters of :attr:`delete_sql` for ``keys``: one array per key column."""
        return self._arrays(keys, self._pk_processors)

    def upsert(self, conn: Connection, rows: Sequence[Sequence[Any]]) -> None:
        """Insert or overwrite ``rows`` (full rows, in column order; unique keys)."""
        conn.exec_driver_sql(self.upsert_sql, self.upsert_arrays(rows))

    def delete(self, conn: Connection, keys: Sequence[Sequence[Any]]) -> None:
        """Delete the rows with the primary keys ``keys``."""
        conn.exec_driver_sql(self.delete_sql, self.delete_arrays(keys))


def qualified_name(
    table: Table, dialect: Dialect, schema_translate_map: Mapping[str | None, str | None] | None
) -> str:
    """``table``'s name for raw SQL, quoted, in the schema the engine's map sends it to.

    Raw SQL skips the engine's ``schema_translate_map``: applied here, so that each
    tenant's schema receives its own rows.

    Example::

        qualified_name(wb_offsets, engine.dialect, {None: "tenant_a"})
        # '"tenant_a".sarc_wb_offsets'
    """
    preparer = dialect.identifier_preparer
    schema = table.schema
    if schema_translate_map:
        schema = schema_translate_map.get(schema, schema)
    name = preparer.quote(table.name)
    if schema is not None:
        name = f"{preparer.quote_schema(schema)}.{name}"
    return name
