"""Redis down from the start, going down mid-run, and coming back (docs/design.md, "Failure and bad
input").

Reads keep returning the database's answer and never raise; the breaker stops asking a
dead Redis; writes committed while Redis was away are delivered as invalidations before
this process trusts the cache again, even when the server comes back with its old data.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer, free_port
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from tests.support import SQLCounter, read_price


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as started:
        yield started


def set_price(factory: sessionmaker[Session], pid: int, price: str) -> None:
    with factory() as s:
        p = s.get(Product, pid, populate_existing=True)
        assert p is not None
        p.price = Decimal(price)
        s.commit()


def cache_on_no_redis(
    engine: sa.Engine, namespace: str, *, breaker_threshold: int
) -> tuple[Cache, sessionmaker[Session]]:
    """A cache whose Redis URL nothing listens on (its breaker, once open, stays open for
    the test) and a sessionmaker attached to it. Detach the cache."""
    cache = Cache(
        f"redis://127.0.0.1:{free_port()}/0",
        namespace=namespace,
        breaker_threshold=breaker_threshold,
        breaker_reset=3600,
    )
    factory = sessionmaker(engine)
    cache.attach(factory)
    return cache, factory


def test_redis_down_from_the_start(
    shop_engine: sa.Engine, product: int, sql: SQLCounter, namespace: str
) -> None:
    cache, factory = cache_on_no_redis(shop_engine, namespace, breaker_threshold=2)
    try:
        for _ in range(5):
            assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        set_price(factory, product, "2.00")  # a write never fails because of Redis
        sql.reset()
        assert read_price(factory, product) == (Decimal("2.00"), Decimal("2.00"))
        assert sql.count == 2  # both reads went to the database
        stats = cache.stats()["total"]
        # two read failures opened the breaker; reads did not ask Redis again. The write
        # still tried (flush, the delivery of the table its flush left undelivered, and
        # commit: each failure the breaker counts is an error), because another process may
        # see Redis again before this one: its invalidation must not wait for the breaker.
        assert stats["errors"] == 5
        assert stats["bypassed"] >= 10
        assert cache._core.undelivered == {"products"}
    finally:
        cache.detach()


def test_redis_goes_down_and_comes_back_with_its_old_data(
    shop_engine: sa.Engine, product: int, sql: SQLCounter, server: RedisServer, namespace: str
) -> None:
    # reset 0: each call after a failure is a half-open probe, so the test needs no clock
    cache = Cache(server.url, namespace=namespace, breaker_threshold=1, breaker_reset=0)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        sql.reset()
        assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        assert sql.count == 0  # both cached

        server.stop()  # the AOF keeps the entries of price 1.00
        assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        set_price(factory, product, "3.00")  # committed while Redis is away
        assert read_price(factory, product) == (Decimal("3.00"), Decimal("3.00"))
        assert cache._core.undelivered == {"products"}

        server.start()  # back, with the entries of price 1.00 still in it
        assert read_price(factory, product) == (Decimal("3.00"), Decimal("3.00"))
        assert cache._core.undelivered == set()
        sql.reset()
        assert read_price(factory, product) == (Decimal("3.00"), Decimal("3.00"))
        assert sql.count == 0  # trusted and cached again
    finally:
        cache.detach()


def counted_square(cache: Cache) -> tuple[Any, list[int]]:
    """A cached ``square`` of ``cache``, and the arguments it was computed for."""
    calls: list[int] = []

    @cache.cached("square")
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    return square, calls


def test_cached_functions_survive_an_outage(server: RedisServer, namespace: str) -> None:
    cache = Cache(server.url, namespace=namespace, breaker_threshold=1, breaker_reset=0)
    square, calls = counted_square(cache)

    assert square(3) == 9
    assert square(3) == 9
    assert calls == [3]
    server.stop()
    assert square(3) == 9
    assert calls == [3, 3]
    server.start()
    assert square(3) == 9
    # a restart may have lost an invalidate()'s tombstone: what the first look found is
    # not served, the function's results are deleted, and that call fills again
    assert calls == [3, 3, 3]
    assert square(3) == 9
    assert calls == [3, 3, 3]


def test_a_restart_that_lost_a_functions_tombstone_does_not_bring_its_result_back(
    namespace: str,
) -> None:
    """``invalidate()`` was acknowledged, then the server came back from a snapshot taken
    before it (an RDB file; an AOF that lost its last second is the same): the result it
    retired is in Redis again, valid by its generation. It must not be served."""
    source = {"n": 1}
    calls: list[str] = []
    with RedisServer(appendonly=False) as server:
        cache = Cache(server.url, namespace=namespace)

        @cache.cached("value")
        def value(name: str) -> int:
            calls.append(name)
            return source[name]

        assert value("n") == 1
        with redis.Redis.from_url(server.url) as admin:
            assert admin.save()  # the snapshot holds the result 1
        source["n"] = 2
        assert value.invalidate("n")  # acknowledged: the tombstone is in memory only
        assert value("n") == 2
        server.kill()
        server.start()  # from the snapshot: the result 1 under its old generation
        assert value("n") == 2
        assert calls == ["n"] * 3  # not served: computed, and filled again
        assert value("n") == 2
        assert calls == ["n"] * 3
        assert cache._core.restarts_seen == 1


@pytest.mark.parametrize("reader_client", ["made by the cache", "connected before the cache"])
def test_another_process_never_reads_stale_after_a_restart(
    shop_engine: sa.Engine,
    product: int,
    sql: SQLCounter,
    server: RedisServer,
    namespace: str,
    reader_client: str,
) -> None:
    """Process A writes while Redis is down; process B, which saw nothing, reads first after.

    Redis comes back from its AOF with the old entries. B notices the new run id on its
    reconnect and invalidates every table before serving anything: also when B's client
    was connected (by the application) before B's cache was made.
    """
    writer = Cache(server.url, namespace=namespace, breaker_threshold=1, breaker_reset=0)
    client: str | redis.Redis = server.url
    if reader_client == "connected before the cache":
        client = redis.Redis.from_url(server.url)
        assert client.ping()
    reader = Cache(client, namespace=namespace, breaker_threshold=1, breaker_reset=0)
    writer_factory, reader_factory = sessionmaker(shop_engine), sessionmaker(shop_engine)
    writer.attach(writer_factory)
    reader.attach(reader_factory)
    try:
        assert read_price(reader_factory, product) == (Decimal("1.00"), Decimal("1.00"))
        server.stop()
        set_price(writer_factory, product, "4.00")
        server.start()
        sql.reset()
        assert read_price(reader_factory, product) == (Decimal("4.00"), Decimal("4.00"))
        assert sql.count == 2  # both entries were retired: read from the database
        assert reader._core.restarts_seen == 1
    finally:
        writer.detach()
        reader.detach()
        if isinstance(client, redis.Redis):
            client.close()


def test_breaker_counts_only_consecutive_failures(
    session_factory: sessionmaker[Session], cache: Cache, product: int
) -> None:
    """Occasional failures among successes never open the breaker."""
    breaker = cache._core.breaker
    for _ in range(5):
        for _ in range(breaker.threshold - 1):
            breaker.failure()
        read_price(session_factory, product)  # a successful round trip resets the count
    assert breaker.state == "closed"
    assert breaker.opened == 0


def test_with_the_breaker_open_a_read_computes_no_entry_key(
    shop_engine: sa.Engine,
    product: int,
    sql: SQLCounter,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read the breaker will refuse goes to the database before the cache keys it: the
    statement's bound values are not digested for an entry nobody will look at."""
    cache, factory = cache_on_no_redis(shop_engine, namespace, breaker_threshold=1)
    statement = sa.select(Product).where(Product.id == product).options(FromCache())
    try:
        with factory() as s:
            s.scalars(statement).one()  # the refused connection opens the breaker
        assert cache._core.breaker.refusing()
        keyed: list[str] = []
        queries = cache._reads.queries
        original = queries.entry_key

        def entry_key(*args: Any, **kwargs: Any) -> str | None:
            keyed.append("key")
            return original(*args, **kwargs)

        monkeypatch.setattr(queries, "entry_key", entry_key)
        bypassed = cache.stats()["total"]["bypassed"]
        sql.reset()
        for _ in range(3):
            with factory() as s:
                assert s.scalars(statement).one().id == product
        assert sql.count == 3
        assert keyed == []
        assert cache.stats()["total"]["bypassed"] == bypassed + 3
    finally:
        cache.detach()


def test_attaching_again_with_redis_down_starts_and_serves_what_was_written_meanwhile(
    shop_engine: sa.Engine, product: int, sql: SQLCounter, server: RedisServer, namespace: str
) -> None:
    """A factory attached again after detach() retires every table (writes made while
    detached went unseen); with Redis away that bump cannot be sent: attach() must not
    fail the application's startup, and the tables wait, undelivered, until Redis is back."""
    cache = Cache(server.url, namespace=namespace, breaker_threshold=1, breaker_reset=0)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        assert read_price(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        cache.detach()
        set_price(factory, product, "5.00")  # unseen: nothing is attached
        server.stop()
        cache.attach(factory)
        assert "products" in cache._core.undelivered
        assert read_price(factory, product) == (Decimal("5.00"), Decimal("5.00"))
        server.start()
        assert read_price(factory, product) == (Decimal("5.00"), Decimal("5.00"))
        assert not cache._core.undelivered
        sql.reset()
        assert read_price(factory, product) == (Decimal("5.00"), Decimal("5.00"))
        assert sql.count == 0  # trusted and cached again
    finally:
        cache.detach()
        set_price(factory, product, "1.00")


def test_after_a_restart_one_thread_per_function_deletes_its_results(
    server: RedisServer, namespace: str
) -> None:
    """Every thread's first call after a restart finds the function's results distrusted:
    one deletes them (a SCAN), the others run the function uncached meanwhile instead of
    scanning too, and the function is cached again once the deletion landed."""
    cache = Cache(server.url, namespace=namespace)
    square, calls = counted_square(cache)
    assert square(3) == 9
    cache._core.distrust_cached_functions()  # what noticing a restart does
    with square._delivering_all:  # another thread is deleting the results
        assert square(3) == 9
        assert calls == [3, 3]
        assert cache.stats()["functions"]["square"]["bypassed"] == 1
    assert square(3) == 9  # this call deletes them before it looks, then fills
    assert square(3) == 9
    assert calls == [3, 3, 3]
