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


# -- many tenants --------------------------------------------------------------------------


def test_invalidate_query_retires_a_tenant_this_process_no_longer_remembers(
    shop_engine: sa.Engine, database_url: str, cache: Cache, product: int
) -> None:
    """``invalidate_query(stmt)`` without ``bind`` keys the statement for every (database,
    ``schema_translate_map``) this process served, as an entry's key holds both. Those
    pairs are remembered up to a bound (256): past it, the first tenant's entry was left
    in place, and its next read served the value the unseen write had replaced."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        stmt = select(Product.price).where(Product.id == product).options(FromCache())

        def read(tenant: int) -> Decimal:
            # a map naming a schema the shop does not use: the same rows, keyed apart
            options = {"schema_translate_map": {f"tenant_{tenant}": f"tenant_{tenant}"}}
            with factory() as s:
                price: Decimal = s.execute(stmt, execution_options=options).scalar_one()
                return price

        assert read(0) == Decimal("1.00")
        assert read(0) == Decimal("1.00")  # a hit
        for tenant in range(1, 300):
            read(tenant)
        unseen = sa.create_engine(database_url)  # a write the cache does not see
        with unseen.begin() as connection:
            connection.execute(
                sa.update(Product).where(Product.id == product).values(price=Decimal("2.00"))
            )
        unseen.dispose()
        cache.invalidate_query(stmt)
        assert _oracle_prices(shop_engine, [product]) == {product: Decimal("2.00")}
        assert read(0) == Decimal("2.00")
        assert read(299) == Decimal("2.00")
    finally:
        cache.detach()
