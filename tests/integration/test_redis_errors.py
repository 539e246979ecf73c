"""A Redis that answers with an error: NOSCRIPT, OOM, READONLY (docs/design.md, "Failure and bad
input").

Each is a miss or a skipped fill, counted, never an exception in the application, and
never a stale read afterwards.
"""

from __future__ import annotations

from decimal import Decimal

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from examples.shop import Category, Product
from sa_redis_cache import Cache
from tests.support import SQLCounter, read_price


def write_two_tables(factory: sessionmaker[Session], pid: int, price: str) -> None:
    """One commit that touches two tables: its cache work is a batch of scripts."""
    with factory() as s:
        p = s.get(Product, pid, populate_existing=True)
        c = s.get(Category, 2, populate_existing=True)
        assert p is not None
        assert c is not None
        p.price = Decimal(price)
        c.name = c.name  # no net change: only the product row is written
        s.add(Category(name=f"errors-{price}"))
        s.commit()


def test_noscript_after_script_flush_reloads_and_loses_nothing(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    product: int,
    redis_client: redis.Redis,
    cache: Cache,
) -> None:
    assert read_price(session_factory, product) == (Decimal("1.00"), Decimal("1.00"))
    redis_client.script_flush()
    write_two_tables(session_factory, product, "2.00")  # the batched commit scripts
    redis_client.script_flush()
    assert read_price(session_factory, product) == (Decimal("2.00"), Decimal("2.00"))  # fills
    sql.reset()
    assert read_price(session_factory, product) == (Decimal("2.00"), Decimal("2.00"))
    assert sql.count == 0
    assert cache.stats()["total"]["errors"] == 0
    with Session(session_factory.kw["bind"]) as s:
        s.execute(sa.delete(Category).where(Category.name == "errors-2.00"))
        s.commit()


def test_out_of_memory_redis_is_a_miss_and_never_stale(
    shop_engine: sa.Engine, sql: SQLCounter, product: int, namespace: str
) -> None:
    with RedisServer(extra_args=("--maxmemory", "1", "--maxmemory-policy", "noeviction")) as server:
        cache = Cache(server.url, namespace=namespace, breaker_threshold=1000)
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        try:
            sql.reset()
            assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
            assert sql.count == 2  # nothing could be stored: OOM refuses every write
            with factory() as s:
                p = s.get(Product, product)
                assert p is not None
                p.price = Decimal("3.00")
                s.commit()  # the marks fail with OOM: the commit does not
            assert read_price(factory, product) == (Decimal("3.00"), Decimal("3.00"))
            assert cache.stats()["total"]["errors"] >= 2
            assert "products" in cache._core.undelivered
        finally:
            cache.detach()


def test_read_only_replica_is_a_miss_and_never_stale(
    shop_engine: sa.Engine, sql: SQLCounter, product: int, namespace: str
) -> None:
    with (
        RedisServer() as primary,
        RedisServer(extra_args=("--replicaof", primary.host, str(primary.port))) as replica,
    ):
        cache = Cache(replica.url, namespace=namespace, breaker_threshold=1000)
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        try:
            assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
            with factory() as s:
                p = s.get(Product, product)
                assert p is not None
                p.price = Decimal("4.00")
                s.commit()  # READONLY on every mark: the commit does not fail
            sql.reset()
            assert read_price(factory, product) == (Decimal("4.00"), Decimal("4.00"))
            assert sql.count == 2
            assert cache.stats()["total"]["errors"] >= 2
        finally:
            cache.detach()
