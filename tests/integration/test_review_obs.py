"""Review of observability against what really happened (the oracle is the test itself).

``cache.stats()`` counters, the latency histograms, the published cross-process counters
(:mod:`sa_redis_cache.stats_publisher`) and the Prometheus collector are checked against
what the test did and observed: the SQL statements that reached Postgres (an engine event
listener) and the Redis round trips (:class:`tests.seams.RedisTap`), in the sync and the
``AsyncSession`` modes, through ``FromCache`` and ``session.get``, with two caches of one
namespace publishing into the same hashes, across ``detach()`` and ``attach()`` again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from tests.modes import Db, Runner
    from tests.support import SQLCounter


def published(client: redis.Redis, cache: Cache, scope: str) -> dict[str, int]:
    raw = client.hgetall(cache.keys.stats_key(scope))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def nonzero(values: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in values.items() if type(v) is int and v}


def test_read_counters_and_histograms_equal_what_reached_postgres(in_mode: Runner) -> None:
    """Two FromCache reads and two session.get of one row each: one miss then one hit."""

    def scenario(db: Db) -> dict[str, Any]:
        db.cache._core.counters.reset()
        db.sql.reset()
        seen = []
        for _ in range(2):
            with db.session() as s:
                stmt = select(Category).where(Category.id == 2).options(FromCache())
                s.scalars(stmt)
            seen.append(db.sql.count)
            with db.session() as s:
                s.get(Product, 7)
            seen.append(db.sql.count)
        stats = db.cache.stats()
        stats["sql"] = seen
        return stats

    stats, _ = in_mode(scenario)
    # the oracle: the first read of each went to Postgres, the second did not
    assert stats["sql"] == [1, 2, 2, 2]
    assert nonzero(stats["total"]) == {"hits": 2, "misses": 2, "fills": 2}
    assert nonzero(stats["regions"]["default"]) == {"hits": 1, "misses": 1, "fills": 1}
    assert nonzero(stats["models"]["Category"]) == {"hits": 1, "misses": 1, "fills": 1}
    assert nonzero(stats["models"]["Product"]) == {"hits": 1, "misses": 1, "fills": 1}
    latency = stats["latency"]["total"]
    assert {op: h["count"] for op, h in latency.items()} == {"hit": 2, "miss": 2, "fill": 2}


def test_an_entity_read_of_a_table_the_transaction_wrote_counts_as_bypassed(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter, product: int
) -> None:
    """configuration.md: ``bypassed`` counts "lookups that did not ask Redis: ... a table
    the transaction wrote". A FromCache read counts it; session.get must too."""
    with session_factory() as s:
        s.execute(update(Product).where(Product.id == product).values(name="renamed"))
        before = cache.stats()
        sql.reset()
        s.scalars(select(Product).where(Product.id == 7).options(FromCache())).all()
        s.get(Product, 8)
        assert sql.count == 2  # both went to Postgres
        s.rollback()
    after = cache.stats()
    gained = after["total"]["bypassed"] - before["total"]["bypassed"]
    looked = (after["total"]["hits"] + after["total"]["misses"]) - (
        before["total"]["hits"] + before["total"]["misses"]
    )
    assert looked == 0
    assert gained == 2
    assert after["models"].get("Product", {}).get("bypassed", 0) == 1


def test_a_database_error_during_a_miss_is_timed_as_a_miss_not_a_redis_error(
    session_factory: sessionmaker[Session], cache: Cache
) -> None:
    """The ``error`` histogram is "a lookup whose Redis call failed" (configuration.md):
    Redis answered here, Postgres refused the statement."""
    with session_factory() as s:
        stmt = (
            select(Category)
            .where(Category.id == sa.cast(sa.literal("not a number"), sa.Integer))
            .options(FromCache())
        )
        with pytest.raises(sa.exc.DataError):
            s.scalars(stmt).all()
    stats = cache.stats()
    assert stats["total"]["errors"] == 0
    assert stats["total"]["misses"] == 1
    assert set(stats["latency"]["total"]) == {"miss"}


def test_two_caches_publishing_into_one_namespace_add_up_across_detach_and_attach(
    shop_engine: sa.Engine, redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    caches = [
        Cache(redis.Redis.from_url(redis_url), namespace=namespace, stats_publish_interval=3600)
        for _ in range(2)
    ]
    factories = [sessionmaker(shop_engine) for _ in caches]
    try:
        for cache, factory in zip(caches, factories, strict=True):
            cache.attach(factory)
        for _ in range(3):
            for cache, factory in zip(caches, factories, strict=True):
                with factory() as s:
                    s.get(Product, 11)
                    s.scalars(select(Category).where(Category.id == 1).options(FromCache()))
                assert cache._publisher.publish_now()
            # detach then attach again the first one; the second stays attached
            caches[0].detach()
            caches[0].attach(factories[0])
    finally:
        for cache in caches:
            cache.detach()
    for scope_, pick in (("total", "total"), ("model:Product", ("models", "Product"))):
        expected: dict[str, int] = {}
        for cache in caches:
            stats = cache.stats()
            values = stats["total"] if pick == "total" else stats[pick[0]][pick[1]]
            for k, v in nonzero(values).items():
                expected[k] = expected.get(k, 0) + v
        assert published(redis_client, caches[0], scope_) == expected, scope_
    for cache in caches:
        cache.client.close()
