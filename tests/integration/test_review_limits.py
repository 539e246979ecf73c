"""A review of the cache at its limits: sizes, counts and memory bounds.

The database is the oracle for values (a session of an engine no cache saw); the process
(``len()`` of the cache's internal structures) and Redis are the oracles for resources.
Each probe pushes one bound far past its limit (the local tier's entries and the counters
it mirrors, ``max_entry_bytes``, the read path's memo dicts, many tenants) and checks the
structure stays within it while every value read is the database's.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from tests.integration.test_local_tier import WAIT, tier_of

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def many_products(shop_engine: sa.Engine) -> Iterator[list[int]]:
    """1500 products of the test's own (category 1, each its own price), deleted afterwards."""
    rows = [
        {
            "category_id": 1,
            "name": f"limits-{i}",
            "price": Decimal(i) / 100,
            "status": "ACTIVE",
            "attributes": {},
        }
        for i in range(1500)
    ]
    with shop_engine.begin() as connection:
        ids = list(connection.scalars(sa.insert(Product).returning(Product.id), rows))
    yield ids
    with shop_engine.begin() as connection:
        connection.execute(sa.delete(Product).where(Product.id.in_(ids)))


def _oracle_prices(shop_engine: sa.Engine, ids: list[int]) -> dict[int, Decimal]:
    with Session(shop_engine) as s:
        rows = s.execute(select(Product.id, Product.price).where(Product.id.in_(ids)))
        return {int(row[0]): row[1] for row in rows}


# -- the local tier's bound ----------------------------------------------------------------


def test_the_local_tier_forgets_the_counters_of_the_entries_it_evicts(
    database_url: str,
    redis_url: str,
    namespace: str,
    shop_engine: sa.Engine,
    many_products: list[int],
) -> None:
    """Each entity entry is valid under its row's write counter, which the store mirrors.
    Filling a 50-entry tier with 1500 rows' entries evicts 1450 of them: the mirror must
    not keep the 1450 counters no entry names any more (it grew by one per row ever held,
    without bound, in a long-lived process reading many rows)."""
    engine = sa.create_engine(database_url)
    cache = Cache(redis_url, namespace=namespace, local=True, local_max_entries=50)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = tier_of(cache)
        assert tier.wait_ready(WAIT)
        oracle = _oracle_prices(shop_engine, many_products)
        for _ in range(2):  # a fill, then a Redis hit the tier keeps
            for pid in many_products:
                with factory() as s:
                    found = s.get(Product, pid)
                    assert found is not None
                    assert found.price == oracle[pid]
        store = tier.store
        assert len(store) <= 50
        assert store.evictions >= 1400
        # the counters of the entries held (3 per entity entry at most), no more
        assert len(store._mirror) <= 3 * 50
        # and the entries it still holds are served, right
        for pid in many_products[-10:]:
            with factory() as s:
                found = s.get(Product, pid)
                assert found is not None
                assert found.price == oracle[pid]
    finally:
        cache.detach()
        engine.dispose()


def _unused(*_: Any) -> None:
    """Keeps FromCache imported for the probes below."""
    FromCache()
