"""Write-through takes a flushed row from the flush's own UPDATE (``RETURNING``), not from a
``SELECT`` after it (strategies/write_through.Returning); the entry written must still
equal the database row, and rows the capture cannot vouch for are read back.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from examples.shop import Product

PRODUCTS = sa.table("products", sa.column("id"), sa.column("name"))

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import sessionmaker

    from tests.support import SQLCounter


def row(p: Product) -> tuple[Any, ...]:
    return (p.id, p.name, p.price, p.status, p.attributes, p.created_at)


def database_row(engine: sa.Engine, pid: int) -> tuple[Any, ...]:
    with Session(engine) as s:
        return row(s.get_one(Product, pid))


def cached_row(factory: sessionmaker[Session], sql: SQLCounter, pid: int) -> tuple[Any, ...]:
    """The row as the entity cache serves it; fails if it was not written through."""
    sql.reset()
    with factory() as s:
        got = row(s.get_one(Product, pid))
    assert sql.statements == [], "the row was not written through"
    return got


@pytest.fixture
def products(shop_engine: sa.Engine) -> Iterator[list[int]]:
    """Three products of the test's own, deleted afterwards."""
    with Session(shop_engine) as s:
        made = [
            Product(category_id=1, name=f"returning-{i}", price=Decimal("1.00"), status="ACTIVE")
            for i in range(3)
        ]
        s.add_all(made)
        s.commit()
        ids = [p.id for p in made]
    yield ids
    with Session(shop_engine) as s:
        s.execute(sa.delete(Product).where(Product.id.in_(ids)))
        s.commit()


def test_an_update_writes_through_the_row_it_returned_with_no_select(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    products: list[int],
) -> None:
    pid = products[0]
    with session_factory() as s:
        s.get_one(Product, pid).price = Decimal("2.345")  # Numeric(10, 2) stores 2.35
        sql.reset()
        s.commit()
        sent = [statement.split(maxsplit=1)[0] for statement in sql.statements]
    assert sent == ["UPDATE"]  # no SELECT after it
    assert cached_row(session_factory, sql, pid) == database_row(shop_engine, pid)
    assert database_row(shop_engine, pid)[2] == Decimal("2.35")


def test_rows_one_executemany_updates_are_read_back(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    products: list[int],
) -> None:
    # the same column of several rows: SQLAlchemy sends one executemany, whose rows a
    # RETURNING clause cannot give back; they are read back instead
    with session_factory() as s:
        for pid in products:
            s.get_one(Product, pid).price = Decimal("3.333")
        s.commit()
    for pid in products:
        assert cached_row(session_factory, sql, pid) == database_row(shop_engine, pid)


@pytest.mark.parametrize("how", ["mapped-table", "other-table-object", "executemany"])
def test_a_later_write_of_the_row_in_the_flush_is_what_is_written_through(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    products: list[int],
    how: str,
) -> None:
    pid = products[0]
    table = cast("sa.Table", Product.__table__) if how == "mapped-table" else PRODUCTS
    rename_stmt = (
        sa.update(table).where(table.c.id == sa.bindparam("pid")).values(name=sa.bindparam("n"))
    )

    def rename(_mapper: Any, connection: sa.Connection, target: Product) -> None:
        # runs right after the flush's UPDATE returned the row: the row changes again. One
        # UPDATE of the mapped Table is captured in turn (its row replaces the first); one
        # through another Table object of the same table, or an executemany, cannot be:
        # the table's captured rows are then read back
        params = [{"pid": target.id, "n": "renamed by a listener"}]
        if how == "executemany":
            params.append({"pid": -1, "n": "no such row"})
        connection.execute(rename_stmt, params)

    sa.event.listen(Product, "after_update", rename)
    try:
        with session_factory() as s:
            s.get_one(Product, pid).price = Decimal("4.00")
            s.commit()
    finally:
        sa.event.remove(Product, "after_update", rename)
    expected = database_row(shop_engine, pid)
    assert expected[1] == "renamed by a listener"
    assert cached_row(session_factory, sql, pid) == expected


def test_no_statement_outside_a_flush_gets_returning_even_after_a_failed_flush(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    products: list[int],
) -> None:
    pid = products[0]
    sent: list[str] = []

    def on_sql(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    sa.event.listen(shop_engine, "before_cursor_execute", on_sql)
    try:
        with session_factory() as s:
            s.get_one(Product, pid).category_id = 987_654  # no such category: the flush fails
            with pytest.raises(IntegrityError):
                s.commit()
            s.rollback()
            assert any("RETURNING" in statement for statement in sent)  # the flush's
            sent.clear()
            # the same session and connection, outside a flush
            result = s.connection().execute(
                sa.update(PRODUCTS).where(PRODUCTS.c.id == pid).values(name="core")
            )
            assert not result.returns_rows
            s.commit()
        with shop_engine.connect() as conn:  # a pooled connection, maybe the same one
            result = conn.execute(sa.update(PRODUCTS).where(PRODUCTS.c.id == pid).values(name="x"))
            assert not result.returns_rows
            conn.commit()
    finally:
        sa.event.remove(shop_engine, "before_cursor_execute", on_sql)
    assert [s for s in sent if "RETURNING" in s] == []
