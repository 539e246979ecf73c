"""``cache.inspector``: the public view tools use instead of the cache's internals."""

from __future__ import annotations

from decimal import Decimal

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache


def test_the_keys_it_names_are_the_keys_reads_store(
    cache: Cache,
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
) -> None:
    stmt = select(Product).where(Product.category_id == 3).order_by(Product.id)
    with session_factory() as s:
        s.scalars(stmt.options(FromCache())).all()
        s.get(Product, 7)
    inspector = cache.inspector
    database = inspector.database_of(shop_engine)
    assert database is not None
    query_key = inspector.statement_key(stmt, database=database)  # with or without the option
    assert query_key is not None
    assert redis_client.exists(query_key)
    assert inspector.statement_key(stmt.options(FromCache()), database=database) == query_key
    assert redis_client.exists(inspector.row_key(Product, (7,), database=database))
    plan = inspector.statement_plan(stmt)
    assert plan is not None
    assert "products" in plan.tables


def test_models_and_health(cache: Cache, session_factory: sessionmaker[Session]) -> None:
    inspector = cache.inspector
    assert inspector.model(Product).table == "products"
    assert inspector.model_named("examples.shop.Product") is inspector.model(Product)
    assert inspector.breaker_state() == "closed"
    assert inspector.breaker_openings() == 0
    assert inspector.undelivered_tables() == frozenset()
    assert inspector.restarts_seen() == 0
    with session_factory() as s:
        s.get(Product, 8)
    assert inspector.latency()["models"]["Product"]


def test_values_equal_in_python_but_encoded_apart_key_apart(
    cache: Cache, shop_engine: sa.Engine
) -> None:
    """Entry keys are remembered by the values they were made of (``KeysMade``): values
    that compare equal but encode apart (``1``, ``True``, ``1.0``; ``0.0``, ``-0.0``) keep
    keys of their own, whichever was keyed first, and a remembered key is the one made."""
    inspector = cache.inspector
    database = inspector.database_of(shop_engine)
    assert database is not None
    values: list[object] = [1, True, 1.0, Decimal("1.0"), "1", 0, False, 0.0, -0.0, None]
    # one statement, the values given at execute time (a literal True or None would be
    # rendered into the SQL, another statement)
    stmt = select(Product).where(Product.id == sa.bindparam("v"))

    def keys(order: list[object]) -> dict[str, str | None]:
        return {repr(v): inspector.statement_key(stmt, {"v": v}, database=database) for v in order}

    first = keys(values)
    assert len(set(first.values())) == len(values)
    assert None not in first.values()
    assert keys(values[::-1]) == first  # remembered now: the same keys
    other = Cache(cache.client, namespace=cache.namespace)  # remembers nothing yet
    try:
        other_database = other.inspector.database_of(shop_engine)
        assert other_database is not None
        assert {
            repr(v): other.inspector.statement_key(stmt, {"v": v}, database=other_database)
            for v in values[::-1]
        } == first
    finally:
        other.detach()
