"""Review: stale reads after write and read shapes the history tests do not make.

Each test writes through one shape, with entries of the written rows cached in a reader's
cache (another engine, another ``Cache`` on the namespace: another process), and checks
that the reader's next read is at least as new as the committed state.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import FromCache
from tests.support import Two, read_price


def warm(factory: sessionmaker[Session], pid: int) -> Decimal:
    """Fill (and hit once) the query entry and the entity entry of product ``pid``."""
    for _ in range(2):
        with factory() as s:
            stmt = select(Product).where(Product.id == pid).options(FromCache())
            price = s.scalars(stmt).one().price
            s.get(Product, pid)
    return price


def _price_cte(pid: int, price: str) -> Any:
    table: Any = Product.__table__
    return (
        table.update()
        .where(table.c.id == pid)
        .values(price=Decimal(price))
        .returning(table.c.id)
        .cte("changed")
    )


def _select_over_the_cte(pid: int, price: str) -> Any:
    return select(_price_cte(pid, price).c.id)


def _insert_from_the_cte(pid: int, price: str) -> Any:
    changed = _price_cte(pid, price)
    categories: Any = Category.__table__
    return categories.insert().from_select(
        ["name"], select(sa.func.concat("fresh-cte-", changed.c.id))
    )


def _update_of_another_table_with_the_cte(pid: int, price: str) -> Any:
    return (
        sa.update(Category)
        .where(Category.id == -1)
        .values(name="never")
        .add_cte(_price_cte(pid, price))
    )


def _textual_cte(pid: int, price: str) -> Any:
    changed = (
        sa.text("UPDATE products SET price = :price WHERE id = :pid RETURNING id")
        .bindparams(price=Decimal(price), pid=pid)
        .columns(id=sa.Integer)
        .cte("changed")
    )
    return select(changed.c.id)


CTE_SHAPES = {
    "select": _select_over_the_cte,
    "insert_from_select": _insert_from_the_cte,
    "update_with_cte": _update_of_another_table_with_the_cte,
    "textual_cte": _textual_cte,
}


@pytest.fixture
def no_cte_categories(shop_engine: sa.Engine) -> Any:
    """Deletes the categories the CTE shapes insert."""
    yield
    with shop_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM categories WHERE name LIKE 'fresh-cte-%'"))


@pytest.mark.parametrize("via", ["engine", "session"])
@pytest.mark.parametrize("shape", sorted(CTE_SHAPES))
def test_dml_in_a_with_clause_retires_the_rows_it_writes(
    two: Two, product: int, shape: str, via: str, no_cte_categories: None
) -> None:
    """``WITH changed AS (UPDATE products ... RETURNING id) SELECT ...`` writes products,
    but the statement is a SELECT (or DML on another table): the engine listener looked at
    the outer statement only, marked nothing, and the old price stayed cached."""
    assert warm(two.read, product) == Decimal("1.00")
    statement = CTE_SHAPES[shape](product, "7.00")
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(statement)
    else:
        with two.write() as s:
            s.execute(statement)
            s.commit()
    assert read_price(two.read, product) == (Decimal("7.00"), Decimal("7.00"))
