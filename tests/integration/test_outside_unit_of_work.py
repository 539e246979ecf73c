"""Writes that bypass the unit of work still invalidate (docs/design.md, "Consistency")."""

from __future__ import annotations

import gc
import weakref
from decimal import Decimal
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.engine_writes import text_dml_tables
from tests.support import read_price


def warm(factory: sessionmaker[Session], pid: int) -> Decimal:
    """Fill the query entry and the entity entry; return the cached price."""
    with factory() as s:
        price = s.scalars(select(Product).where(Product.id == pid).options(FromCache())).one().price
        s.get(Product, pid)
    return price


def change_price(factory: sessionmaker[Session], pid: int, price: str) -> None:
    """Change a product's price through a session's flush, and commit."""
    with factory() as s:
        changed = s.get(Product, pid)
        assert changed is not None
        changed.price = Decimal(price)
        s.commit()


def test_core_update_on_the_engine(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    assert warm(session_factory, product) == Decimal("1.00")
    with shop_engine.begin() as conn:
        conn.execute(update(Product).where(Product.id == product).values(price=Decimal("2.00")))
    assert read_price(session_factory, product) == (Decimal("2.00"), Decimal("2.00"))


def test_text_dml_on_the_engine(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    warm(session_factory, product)
    with shop_engine.begin() as conn:
        conn.execute(text("UPDATE products SET price = 3.00 WHERE id = :id"), {"id": product})
    assert read_price(session_factory, product) == (Decimal("3.00"), Decimal("3.00"))


def test_text_dml_through_the_session(session_factory: sessionmaker[Session], product: int) -> None:
    warm(session_factory, product)
    with session_factory() as s:
        s.execute(text("UPDATE products SET price = 4.00 WHERE id = :id"), {"id": product})
        s.commit()
    assert read_price(session_factory, product) == (Decimal("4.00"), Decimal("4.00"))


def test_core_dml_on_the_sessions_own_connection(
    session_factory: sessionmaker[Session], product: int
) -> None:
    """``session.connection().execute(update(table))`` runs on the connection the session's
    hooks watch, but no flush and no ``do_orm_execute`` sees it: it was once skipped as
    the session's own, and the old price was served in the transaction and after it."""
    warm(session_factory, product)
    table: Any = Product.__table__
    with session_factory() as s:
        s.connection().execute(
            update(table).where(table.c.id == product).values(price=Decimal("6.00"))
        )
        stmt = select(Product).where(Product.id == product).options(FromCache())
        assert s.scalars(stmt).one().price == Decimal("6.00")  # its own write, in its transaction
        s.commit()
    assert read_price(session_factory, product) == (Decimal("6.00"), Decimal("6.00"))


def test_an_orm_update_run_on_the_sessions_connection(
    session_factory: sessionmaker[Session], product: int
) -> None:
    """``update(Model)`` compiled by the ORM but run on the connection: no
    ``do_orm_execute`` marked it, so it is marked as Core DML."""
    warm(session_factory, product)
    with session_factory() as s:
        s.connection().execute(
            update(Product).where(Product.id == product).values(price=Decimal("15.00"))
        )
        s.commit()
    assert read_price(session_factory, product) == (Decimal("15.00"), Decimal("15.00"))


def test_dml_a_mapper_event_runs_during_a_flush(
    session_factory: sessionmaker[Session], product: int, shop_engine: sa.Engine
) -> None:
    """SQLAlchemy's mapper events may write other tables on the flush's connection: those
    rows are not the flush's, whose rows the session's hooks know."""
    category = 5
    with shop_engine.connect() as connection:
        before = connection.scalar(text("SELECT name FROM categories WHERE id = 5"))

    def rename_category(mapper: Any, connection: sa.Connection, target: Any) -> None:
        table: Any = Category.__table__
        connection.execute(
            update(table).where(table.c.id == category).values(name="renamed by an event")
        )

    statement = select(Category.name).where(Category.id == category).options(FromCache())
    with session_factory() as s:
        assert s.scalars(statement).one() == before
    sa.event.listen(Product, "after_update", rename_category)
    try:
        change_price(session_factory, product, "16.00")
        with session_factory() as s:
            assert s.scalars(statement).one() == "renamed by an event"
    finally:
        sa.event.remove(Product, "after_update", rename_category)
        with shop_engine.begin() as connection:
            connection.execute(text("UPDATE categories SET name = :n WHERE id = 5"), {"n": before})


@pytest.mark.parametrize("model", [Product, Category], ids=["write_through", "cache_aside"])
@pytest.mark.parametrize("rows", ["another", "both"])
def test_a_mapper_events_update_of_another_row_of_the_flushed_table(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, model: Any, rows: str
) -> None:
    """A mapper event that writes another row of the table being flushed: the flush's
    hooks name only the flushed rows, so the other row's entity entry must go too (a
    ``session.get`` of it served the old name). ``both``: one UPDATE of the flushed row
    and the other, which the write-through capture reads back as two rows."""
    table: Any = model.__table__
    with shop_engine.connect() as connection:
        (flushed, flushed_name), (other, other_name) = connection.execute(
            select(table.c.id, table.c.name).order_by(table.c.id).limit(2)
        ).all()
    touched = [other] if rows == "another" else [flushed, other]

    def rename_other(mapper: Any, connection: sa.Connection, target: Any) -> None:
        connection.execute(
            update(table).where(table.c.id.in_(touched)).values(name=table.c.name + " (event)")
        )

    def name_of(pid: int) -> str:
        with session_factory() as s:
            return str(s.get_one(model, pid).name)

    assert name_of(other) == other_name  # its entity entry is filled
    sa.event.listen(model, "after_update", rename_other)
    try:
        with session_factory() as s:
            s.get_one(model, flushed).name = flushed_name + " (flushed)"
            s.commit()
    finally:
        sa.event.remove(model, "after_update", rename_other)
    try:
        assert name_of(other) == other_name + " (event)"
        flushed_now = flushed_name + " (flushed)" + (" (event)" if rows == "both" else "")
        assert name_of(flushed) == flushed_now
    finally:
        with shop_engine.begin() as connection:
            for pid, name in ((flushed, flushed_name), (other, other_name)):
                connection.execute(update(table).where(table.c.id == pid).values(name=name))


def test_bulk_save_objects_after_a_flush_its_listeners_emptied(
    session_factory: sessionmaker[Session], product: int
) -> None:
    """A ``before_flush`` listener that takes every object out of the flush: the flush
    returns before ``after_flush``, and the bulk write after it is not the flush's."""
    warm(session_factory, product)
    with session_factory(expire_on_commit=False) as s:
        changed = s.get(Product, product)
    assert changed is not None
    changed.price = Decimal("17.00")

    def take_out_the_new(session: Session, *_: Any) -> None:
        for obj in list(session.new):
            session.expunge(obj)

    sa.event.listen(session_factory, "before_flush", take_out_the_new)
    try:
        with session_factory() as s:
            s.add(Product(category_id=1, name="never flushed", price=Decimal(1), status="ACTIVE"))
            s.flush()
            s.bulk_save_objects([changed])
            s.commit()
    finally:
        sa.event.remove(session_factory, "before_flush", take_out_the_new)
    assert read_price(session_factory, product) == (Decimal("17.00"), Decimal("17.00"))


def test_bulk_save_objects_invalidates(
    session_factory: sessionmaker[Session], product: int
) -> None:
    """``Session.bulk_save_objects`` writes through Core statements on the session's
    connection, outside a flush."""
    warm(session_factory, product)
    with session_factory(expire_on_commit=False) as s:
        changed = s.get(Product, product)
    assert changed is not None
    changed.price = Decimal("7.00")  # detached: no session flushes it
    with session_factory() as s:
        s.bulk_save_objects([changed])
        s.commit()
    assert read_price(session_factory, product) == (Decimal("7.00"), Decimal("7.00"))


def test_text_dml_in_a_session_whose_factory_names_no_engine(
    shop_engine: sa.Engine, cache: Cache, product: int
) -> None:
    """``sessionmaker(binds={...})`` (or ``configure(bind=...)`` after ``attach()``): the
    engine was not known at ``attach()``, and its listeners, which see textual, Core and
    bulk-mapping DML, were never added."""
    factory = sessionmaker(binds={Product: shop_engine, Category: shop_engine})
    cache.attach(factory)
    warm(factory, product)
    with factory() as s:
        s.execute(
            text("UPDATE Products SET price = 13.00 WHERE id = :id"),
            {"id": product},
            bind_arguments={"mapper": Product},
        )
        s.commit()
    assert read_price(factory, product) == (Decimal("13.00"), Decimal("13.00"))
    with factory() as s:
        s.bulk_update_mappings(Product, [{"id": product, "price": Decimal("14.00")}])
        s.commit()
    assert read_price(factory, product) == (Decimal("14.00"), Decimal("14.00"))


def test_an_engine_a_session_began_on_is_not_kept_alive(
    session_factory: sessionmaker[Session], database_url: str
) -> None:
    """The cache watches every engine its sessions begin on (one per tenant, say), and
    must not keep one alive after the application let it go."""
    engine = sa.create_engine(database_url)
    gone = weakref.ref(engine)
    with session_factory(bind=engine) as s:
        s.execute(text("SELECT 1"))
    engine.dispose()
    del engine, s
    gc.collect()
    assert gone() is None


def test_text_dml_whose_tables_cannot_be_told_invalidates_everything(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    warm(session_factory, product)
    with shop_engine.begin() as conn:
        conn.execute(
            text(
                "WITH t AS (SELECT :id AS id) "
                "UPDATE products SET price = 5.00 FROM t WHERE products.id = t.id"
            ),
            {"id": product},
        )
    assert read_price(session_factory, product) == (Decimal("5.00"), Decimal("5.00"))


def test_text_dml_table_parsing() -> None:
    known = ["products", "orders"]
    assert text_dml_tables("update products set x = 1", known) == {"products"}
    assert text_dml_tables('DELETE FROM "orders" WHERE id = 1', known) == {"orders"}
    assert text_dml_tables("INSERT INTO public.products VALUES (1)", known) == {"products"}
    # a table no model maps: that table alone, as Core DML on it (issue 16)
    assert text_dml_tables("UPDATE elsewhere SET x = 1", known) == {"elsewhere"}
    assert text_dml_tables("INSERT INTO audit VALUES (1); UPDATE orders SET x = 1", known) == set(
        known
    )
    assert text_dml_tables("SELECT 1", known) == set()
    assert text_dml_tables("WITH x AS (DELETE FROM orders RETURNING 1) SELECT 1", known) == set(
        known
    )
    # Postgres folds an unquoted name to lower case: these write "products"
    assert text_dml_tables("UPDATE PRODUCTS SET x = 1", known) == {"products"}
    assert text_dml_tables("DELETE FROM Public.Products WHERE id = 1", known) == {"products"}
    assert text_dml_tables('UPDATE "PRODUCTS" SET x = 1', known) == {"PRODUCTS"}  # another table
    assert text_dml_tables("UPDATE Elsewhere SET x = 1", known) == {"elsewhere"}
    # every table a TRUNCATE names; CASCADE empties the tables that refer to them too
    assert text_dml_tables("TRUNCATE products, ORDERS", known) == {"products", "orders"}
    assert text_dml_tables("TRUNCATE TABLE ONLY products * RESTART IDENTITY", known) == {"products"}
    assert text_dml_tables("TRUNCATE products CASCADE", known) == set(known)
    assert text_dml_tables("TRUNCATE products; UPDATE orders SET x = 1", known) == set(known)
    # a materialized view's rows change when it is refreshed: the view it names
    assert text_dml_tables("REFRESH MATERIALIZED VIEW totals", known) == {"totals"}
    assert text_dml_tables(
        "refresh materialized view concurrently Reports.Totals with no data;", known
    ) == {"reports.totals"}
    assert text_dml_tables('REFRESH MATERIALIZED VIEW "Products"', known) == {"Products"}
    assert text_dml_tables("REFRESH MATERIALIZED VIEW products", known) == {"products"}


def test_every_commit_is_announced_on_pub_sub(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    product: int,
    redis_client: Any,
    namespace: str,
) -> None:
    """Other processes' local caches learn of each commit from the invalidation channel."""
    pubsub = redis_client.pubsub()
    pubsub.subscribe(f"sarc:{namespace}:invalidations")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    try:
        change_price(session_factory, product, "6.00")
        with shop_engine.begin() as conn:
            conn.execute(text("UPDATE products SET price = 7.00 WHERE id = :id"), {"id": product})
        first = pubsub.get_message(timeout=5)
        second = pubsub.get_message(timeout=5)
    finally:
        pubsub.close()
    assert first is not None
    assert second is not None
    announced = orjson.loads(first["data"])
    assert announced.pop("s")  # the database and schema the rows live in
    assert announced == {"t": "products", "pk": [str(product)], "bulk": False}
    assert orjson.loads(second["data"]) == {"t": "products", "s": "", "pk": [], "bulk": True}


def test_two_caches_on_one_engine_both_see_core_dml(
    shop_engine: sa.Engine,
    redis_url: str,
    namespace: str,
    product: int,
    redis_client: Any,
) -> None:
    """Each cache watching an engine finishes its own marks (one pending slot per cache)."""
    other_namespace = namespace + "b"
    factories = []
    caches = []
    for ns in (namespace, other_namespace):
        factory = sessionmaker(shop_engine)
        caches.append(Cache(redis_url, namespace=ns))
        caches[-1].attach(factory)
        factories.append(factory)
    try:
        for factory in factories:
            assert warm(factory, product) == Decimal("1.00")
        with shop_engine.begin() as conn:
            conn.execute(text("UPDATE products SET price = 8.00 WHERE id = :id"), {"id": product})
        for factory in factories:
            assert read_price(factory, product) == (Decimal("8.00"), Decimal("8.00"))
        # both caches released their marks: a fill after the write is accepted again
        for ns in (namespace, other_namespace):
            marks = redis_client.zcard(f"sarc:{ns}:{{{ns}:products}}:w")
            assert marks == 0
    finally:
        for cache in caches:
            cache.detach()
        for key in redis_client.scan_iter(match=f"sarc:{other_namespace}:*"):
            redis_client.unlink(key)
