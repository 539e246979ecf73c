"""An application that makes its sessions with ``Session(engine)`` (issue 16).

It has no factory to attach: ``cache.attach(Session)`` covers every session of the
process, and ``cache.attach(engine)`` its Core and ``text()`` writes.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, ConfigurationError, FromCache
from tests.support import SQLCounter


def test_session_of_engine(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter, product: int
) -> None:
    cache.attach(Session)
    cache.attach(shop_engine)
    try:
        stmt = select(Product).where(Product.id == product).options(FromCache())
        for expected in (2, 0):
            with Session(shop_engine) as s:
                sql.reset()
                assert s.get(Product, product) is not None
                assert s.scalars(stmt).one().price == Decimal("1.00")
                assert sql.count == expected
        with shop_engine.begin() as conn:
            conn.execute(text("UPDATE products SET price = 2.00 WHERE id = :id"), {"id": product})
        with Session(shop_engine) as s:
            got = s.get(Product, product)
            assert got is not None
            assert got.price == Decimal("2.00")
            assert s.scalars(stmt).one().price == Decimal("2.00")
        with pytest.raises(ConfigurationError, match="every hook would run twice"):
            cache.attach(sessionmaker(shop_engine))
    finally:
        cache.detach()
        with shop_engine.begin() as conn:
            conn.execute(text("UPDATE products SET price = 1.00 WHERE id = :id"), {"id": product})
