"""Review of the issue-15 commit path and ``session.get`` fast path: writes whose rows'
keys change during the flush, and what the fast path must check like the pipeline."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session

from examples.shop import Product

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

    from sa_redis_cache import Cache


def test_a_primary_key_update_drops_the_entry_of_the_old_key(
    session_factory: sessionmaker[Session], cache: Cache, shop_engine: sa.Engine
) -> None:
    """The row leaves its old key: a get of the old key must not be served the cached
    row after the commit returned."""
    with Session(shop_engine) as s:
        p = Product(category_id=1, name="pk-move", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        old = p.id
        new = s.scalar(sa.select(sa.func.max(Product.id))) + 1000
    try:
        with session_factory() as s:
            assert s.get(Product, old) is not None  # fills the entry of the old key
        with session_factory() as s:
            assert s.get(Product, old) is not None  # a hit
        assert cache.stats()["models"]["Product"]["hits"] >= 1
        with session_factory() as s:
            s.get_one(Product, old).id = new
            s.commit()
        with session_factory() as s:
            assert s.get(Product, old) is None
        with session_factory() as s:
            assert s.scalars(sa.select(Product).where(Product.id == old)).first() is None
    finally:
        with Session(shop_engine) as s:
            s.execute(sa.delete(Product).where(Product.id.in_([old, new])))
            s.commit()
