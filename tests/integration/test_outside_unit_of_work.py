"""Writes that bypass the unit of work still invalidate (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import FromCache
from sa_redis_cache.dml import text_dml_tables


@pytest.fixture
def product(session_factory: sessionmaker[Session]) -> Iterator[int]:
    with session_factory() as s:
        p = Product(category_id=1, name="core", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        pid = p.id
    yield pid
    with session_factory() as s:
        s.execute(sa.delete(Product).where(Product.id == pid))
        s.commit()


def warm(factory: sessionmaker[Session], pid: int) -> Decimal:
    """Fill the query entry and the entity entry; return the cached price."""
    with factory() as s:
        price = s.scalars(select(Product).where(Product.id == pid).options(FromCache())).one().price
        s.get(Product, pid)
    return price


def read_both(factory: sessionmaker[Session], pid: int) -> tuple[Decimal, Decimal]:
    with factory() as s:
        by_query = s.scalars(select(Product).where(Product.id == pid).options(FromCache())).one()
        query_price = by_query.price
    with factory() as s:
        by_get = s.get(Product, pid)
        assert by_get is not None
        return query_price, by_get.price


def test_core_update_on_the_engine(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    assert warm(session_factory, product) == Decimal("1.00")
    with shop_engine.begin() as conn:
        conn.execute(update(Product).where(Product.id == product).values(price=Decimal("2.00")))
    assert read_both(session_factory, product) == (Decimal("2.00"), Decimal("2.00"))


def test_text_dml_on_the_engine(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    warm(session_factory, product)
    with shop_engine.begin() as conn:
        conn.execute(text("UPDATE products SET price = 3.00 WHERE id = :id"), {"id": product})
    assert read_both(session_factory, product) == (Decimal("3.00"), Decimal("3.00"))


def test_text_dml_through_the_session(session_factory: sessionmaker[Session], product: int) -> None:
    warm(session_factory, product)
    with session_factory() as s:
        s.execute(text("UPDATE products SET price = 4.00 WHERE id = :id"), {"id": product})
        s.commit()
    assert read_both(session_factory, product) == (Decimal("4.00"), Decimal("4.00"))


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
    assert read_both(session_factory, product) == (Decimal("5.00"), Decimal("5.00"))


def test_text_dml_table_parsing() -> None:
    known = ["products", "orders"]
    assert text_dml_tables("update products set x = 1", known) == {"products"}
    assert text_dml_tables('DELETE FROM "orders" WHERE id = 1', known) == {"orders"}
    assert text_dml_tables("INSERT INTO public.products VALUES (1)", known) == {"products"}
    assert text_dml_tables("UPDATE elsewhere SET x = 1", known) == set(known)
    assert text_dml_tables("SELECT 1", known) == set()
    assert text_dml_tables("WITH x AS (DELETE FROM orders RETURNING 1) SELECT 1", known) == set(
        known
    )
