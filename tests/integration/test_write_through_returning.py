"""Write-through takes a flushed row from the flush's own UPDATE (``RETURNING``), not from a
``SELECT`` after it (strategies/write_through.Returning); the entry written must still
equal the database row, and rows the capture cannot vouch for are read back.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, CachePolicy
from tests.support import SQLCounter

PRODUCTS = sa.table("products", sa.column("id"), sa.column("name"))

if TYPE_CHECKING:
    from collections.abc import Iterator


def row(p: Product) -> tuple[Any, ...]:
    return (p.id, p.name, p.price, p.status, p.attributes, p.created_at)


def database_row(engine: sa.Engine, pid: int) -> tuple[Any, ...]:
    with Session(engine) as s:
        return row(s.get_one(Product, pid))


def cached_row(
    factory: sessionmaker[Session], sql: SQLCounter, pid: int, *, written_through: bool = True
) -> tuple[Any, ...]:
    """The row as the entity cache serves it; fails if it was not written through (unless
    ``written_through`` is False: then it may be read from the database)."""
    sql.reset()
    with factory() as s:
        got = row(s.get_one(Product, pid))
    if written_through:
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
    # the mapped Table's UPDATE is captured (RETURNING) and written through; the rows an
    # UPDATE through another table object (a lightweight table(), as Alembic's) or an
    # executemany wrote cannot be named, so the table's entries are retired instead: never
    # the row as the flush left it
    assert cached_row(session_factory, sql, pid, written_through=how == "mapped-table") == expected


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


def test_a_table_with_an_after_row_trigger_is_read_back_after_the_flush(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """``UPDATE ... RETURNING`` gives the row before the statement's AFTER row triggers
    run; one that changes the row (an audit stamp) is not in it. Such a table, seen when
    the pool first meets the database, is read back after the flush, and the entry
    written through is the row the trigger left (it was the row before the trigger)."""

    class Base(DeclarativeBase):
        pass

    class Audited(Base):
        __tablename__ = "wt_audited"
        __cache__ = CachePolicy(strategy="write_through", ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[str] = mapped_column(String(20))
        audit: Mapped[str | None] = mapped_column(String(40))

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "CREATE OR REPLACE FUNCTION wt_audited_stamp() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.audit IS DISTINCT FROM 'changed:' || NEW.status THEN "
                "UPDATE wt_audited SET audit = 'changed:' || NEW.status WHERE id = NEW.id; "
                "END IF; RETURN NULL; END $$"
            )
        )
        connection.execute(
            sa.text(
                "CREATE TRIGGER wt_audited_after AFTER UPDATE ON wt_audited "
                "FOR EACH ROW EXECUTE FUNCTION wt_audited_stamp()"
            )
        )
        connection.execute(sa.insert(Audited).values(id=1, status="new"))
    own = sa.create_engine(engine.url)  # a pool that meets the database with the trigger
    sql = SQLCounter()
    sa.event.listen(own, "before_cursor_execute", sql)
    factory = sessionmaker(own)
    cache = Cache(redis_url, namespace=namespace)
    cache.attach(factory)
    try:
        with factory() as s:
            s.get_one(Audited, 1).status = "active"
            s.commit()
        sql.reset()
        with factory() as s:
            got = s.get_one(Audited, 1)
            assert (got.status, got.audit) == ("active", "changed:active")
        assert sql.statements == [], "the row was not written through"
    finally:
        cache.clear()
        cache.detach()
        own.dispose()
        Base.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.execute(sa.text("DROP FUNCTION IF EXISTS wt_audited_stamp()"))
        Base.registry.dispose()


def test_a_returning_another_listener_appended_is_not_appended_again(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter, products: list[int]
) -> None:
    """An engine listener that runs first (registered before attach()) and gives an
    UPDATE a RETURNING of its own (an audit hook, or another cache's capture): a second
    clause would be a syntax error; the row is read back after the flush instead."""
    pid = products[0]

    def audit(
        conn: sa.Connection, cursor: Any, statement: str, parameters: Any, *rest: Any
    ) -> tuple[str, Any]:
        if statement.startswith("UPDATE products "):
            statement += " RETURNING products.id"
        return statement, parameters

    sa.event.listen(shop_engine, "before_cursor_execute", audit, retval=True)
    session_factory = sessionmaker(shop_engine)
    cache.attach(session_factory)  # its listeners run after audit's
    try:
        with session_factory() as s:
            s.get_one(Product, pid).name = "audited"
            s.commit()
    finally:
        sa.event.remove(shop_engine, "before_cursor_execute", audit)
    assert cached_row(session_factory, sql, pid) == database_row(shop_engine, pid)
    assert database_row(shop_engine, pid)[1] == "audited"


def test_two_caches_on_one_engine_write_through_each_its_own_factory(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_url: str,
    sql: SQLCounter,
    products: list[int],
) -> None:
    """Two caches (namespaces) attached to two factories of one engine: each arms the
    capture of its own sessions only, and sees the other's flush as Core DML."""
    other = Cache(redis_url, namespace=f"{cache.namespace}-other")
    other_factory = sessionmaker(shop_engine)
    other.attach(other_factory)
    try:
        pid = products[1]
        for factory in (session_factory, other_factory):
            with factory() as s:
                s.get_one(Product, pid)  # both entity entries filled
        for name, writer in (("first", session_factory), ("second", other_factory)):
            with writer() as s:
                s.get_one(Product, pid).name = name
                s.commit()
            for factory in (session_factory, other_factory):
                with factory() as s:
                    assert s.get_one(Product, pid).name == name
        assert cached_row(other_factory, sql, pid) == database_row(shop_engine, pid)
    finally:
        other.detach()
        other.client.close()
