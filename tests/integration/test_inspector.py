"""``cache.inspector``: the public view tools use instead of the cache's internals."""

from __future__ import annotations

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
