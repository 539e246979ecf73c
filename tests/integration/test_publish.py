"""The counters' publisher: deltas into Redis hashes, kept through outages, once per fork.

``sa-redis-cache stats`` reads what is published here (tests/integration/test_cli.py);
these tests look at the hashes themselves. Each cache is made with
``stats_publish_interval=0`` (no thread) unless the thread is what is tested, and
publishes through ``publish_now()``: no test waits for a tick.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.stats_publisher import STATS_TTL_MS


def published(client: redis.Redis, cache: Cache, scope: str) -> dict[str, int]:
    raw = client.hgetall(cache.keys.stats_key(scope))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def running(cache: Cache) -> bool:
    return cache._publisher.running


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own, to stop and start (AOF: its data survives)."""
    with RedisServer(appendfsync="always") as server:
        yield server


def test_a_publish_during_an_outage_keeps_the_deltas_and_delivers_them_after(
    own_redis: RedisServer,
) -> None:
    cache = Cache(own_redis.url, namespace="pub", stats_publish_interval=0)
    counters, publisher = cache._core.counters, cache._publisher
    counters.incr("model:Product", "hits", 5, also=("region:pages",))
    counters.incr("model:Product", "misses", 2)
    assert publisher.publish_now()
    probe = redis.Redis.from_url(own_redis.url)
    try:
        assert published(probe, cache, "model:Product") == {"hits": 5, "misses": 2}
        own_redis.stop()
        counters.incr("model:Product", "hits", 3)
        assert not publisher.publish_now()  # no exception: the deltas stay here
        counters.incr("model:Product", "errors")
        assert not publisher.publish_now()
        assert publisher.failed == 2
        own_redis.start()
        assert publisher.publish_now()
        assert published(probe, cache, "model:Product") == {"hits": 8, "misses": 2, "errors": 1}
        assert published(probe, cache, "region:pages") == {"hits": 5}
        assert published(probe, cache, "total") == {"hits": 8, "misses": 2, "errors": 1}
        # nothing new: nothing sent, nothing counted twice
        assert publisher.publish_now()
        assert published(probe, cache, "model:Product")["hits"] == 8
        assert 0 < probe.pttl(cache.keys.stats_key("model:Product")) <= STATS_TTL_MS
    finally:
        probe.close()
        cache.client.close()


def test_attach_starts_the_thread_and_detach_publishes_what_is_left(
    shop_engine: sa.Engine, redis_client: redis.Redis, namespace: str
) -> None:
    # an hour between ticks: what reaches Redis here is detach()'s last publish
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=3600)
    factory = sessionmaker(shop_engine)
    assert not running(cache)
    cache.attach(factory)
    assert running(cache)
    for _ in range(2):
        with factory() as s:
            s.get(Product, 6)
    assert published(redis_client, cache, "model:Product") == {}
    cache.detach()
    assert not running(cache)
    assert published(redis_client, cache, "model:Product") == {
        "hits": 1,
        "misses": 1,
        "fills": 1,
    }


def test_interval_zero_publishes_nothing_and_a_bad_interval_is_refused(
    shop_engine: sa.Engine, redis_client: redis.Redis, namespace: str
) -> None:
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=0)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    assert not cache._publisher.running
    with factory() as s:
        s.get(Product, 6)
    cache.detach()
    assert published(redis_client, cache, "model:Product") == {}
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError, match="stats_publish_interval"):
            Cache(redis_client, namespace=namespace, stats_publish_interval=bad)


def test_a_forked_child_publishes_only_what_it_counts_itself(
    redis_client: redis.Redis, namespace: str
) -> None:
    """What ``os.register_at_fork`` runs in a child, called here without forking.

    A real fork of the test process (it has threads) would be unsafe, and deprecated
    from Python 3.12: the child side is what is tested.
    """
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=3600)
    cache.attach(sessionmaker())
    counters, publisher = cache._core.counters, cache._publisher
    parent_thread_stop = publisher._stop  # in a real child, the parent's thread is not there
    try:
        counters.incr("model:Product", "hits", 4)  # counted by the parent before the fork
        publisher.after_fork_in_child()
        assert publisher.running  # a thread of its own
        counters.incr("model:Product", "hits")
        assert publisher.publish_now()
        assert published(redis_client, cache, "model:Product") == {"hits": 1}
    finally:
        parent_thread_stop.set()
        cache.detach()


def test_a_reset_of_the_counters_is_not_published_as_a_negative_delta(
    redis_client: redis.Redis, namespace: str
) -> None:
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=0)
    counters, publisher = cache._core.counters, cache._publisher
    counters.incr("region:pages", "misses", 10)
    assert publisher.publish_now()
    counters.reset()
    counters.incr("region:pages", "misses", 3)
    assert publisher.publish_now()
    assert published(redis_client, cache, "region:pages") == {"misses": 13}


def test_the_publisher_uses_a_pool_of_its_own(
    shop_engine: sa.Engine, redis_client: redis.Redis, namespace: str
) -> None:
    """Its connections are not taken from the application's pool (nor counted there)."""
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=0)
    factory: sessionmaker[Session] = sessionmaker(shop_engine)
    cache.attach(factory)
    with factory() as s:
        s.get(Product, 6)
    pool = redis_client.connection_pool
    taken: list[Any] = []
    original = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        taken.append(args)
        return original(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        assert cache._publisher.publish_now()
    finally:
        del pool.get_connection
        cache.detach()
    assert taken == []
    assert published(redis_client, cache, "model:Product")["misses"] == 1
