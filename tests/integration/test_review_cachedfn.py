"""Review of ``cache.cached`` functions and of stampede control (``FromCache(lease=...)``).

Probes the promises of docs/configuration.md (``@cache.cached``), docs/integrations.md
(``@cache.cached`` on endpoints) and docs/guarantees.md (cached functions; stampede
control) against real Postgres and Redis. The database, read on a connection of its own,
is the oracle. Interleavings are forced with the function's own body (a cached function
is the application's code), events and the seams of ``tests/seams.py``; never sleeps.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.cached_functions import is_async_callable
from sa_redis_cache.codec import dumps_tagged
from tests.seams import RedisTap, Seams, once

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis

    from tests.support import SQLCounter

TIMEOUT = 60
TAPS_CACHE = True  # the cache's client is tapped: the seams see its round trips (conftest)


def price_in_database(engine: sa.Engine, pid: int) -> Decimal:
    """The oracle: the product's price on a connection the cache never saw."""
    with engine.connect() as connection:
        price = connection.scalar(sa.text("SELECT price FROM products WHERE id = :p"), {"p": pid})
    assert isinstance(price, Decimal)
    return price


def write_price(engine: sa.Engine, pid: int, price: str) -> None:
    """A committed write the cache does not see (as another program's)."""
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE products SET price = :v WHERE id = :p"), {"v": Decimal(price), "p": pid}
        )


# -- cached functions: invalidate() racing a call that read before it ---------------------


def test_invalidate_after_a_write_refuses_the_result_of_a_call_that_read_before_it(
    cache: Cache, shop_engine: sa.Engine, product: int
) -> None:
    """The usual read-then-invalidate race: the call reads the old price, the writer
    commits and invalidates, then the call stores what it read. ``invalidate()`` came
    after the commit, so no later call may be served the old price."""
    writes = iter(["2.00"])

    @cache.cached("price_race", ttl=600)
    def price(pid: int) -> str:
        read = price_in_database(shop_engine, pid)
        new = next(writes, None)
        if new is not None:  # between this call's database read and its fill
            write_price(shop_engine, pid, new)
            price.invalidate(pid)
        return str(read)

    assert price(product) == "1.00"  # what it read, before the write: fine for this call
    assert price(product) == str(price_in_database(shop_engine, product)) == "2.00"


def test_invalidate_during_a_call_in_another_thread(
    cache: Cache, shop_engine: sa.Engine, product: int
) -> None:
    """The same race across threads: the call is held after its database read."""
    read_done, go_on = threading.Event(), threading.Event()
    results: list[str] = []

    @cache.cached("price_thread", ttl=600)
    def price(pid: int) -> str:
        read = price_in_database(shop_engine, pid)
        if not results:
            read_done.set()
            assert go_on.wait(TIMEOUT)
        return str(read)

    reader = threading.Thread(target=lambda: results.append(price(product)))
    reader.start()
    assert read_done.wait(TIMEOUT)
    write_price(shop_engine, product, "3.00")
    assert price.invalidate(product) is False  # nothing stored yet
    results.append("held")
    go_on.set()
    reader.join(TIMEOUT)
    assert not reader.is_alive()
    assert price(product) == "3.00" == str(price_in_database(shop_engine, product))


def test_async_invalidate_during_a_call_refuses_its_result(
    redis_url: str, namespace: str, shop_engine: sa.Engine, product: int
) -> None:
    """The async wrapper: a task invalidates while another is between read and fill."""
    cache = Cache(redis_url, namespace=namespace)

    async def main() -> tuple[str, str]:
        read_done, go_on = asyncio.Event(), asyncio.Event()
        first = True

        @cache.cached("price_async", ttl=600)
        async def price(pid: int) -> str:
            nonlocal first
            read = price_in_database(shop_engine, pid)
            if first:
                first = False
                read_done.set()
                await go_on.wait()
            return str(read)

        held = asyncio.create_task(price(product))
        await read_done.wait()
        write_price(shop_engine, product, "4.00")
        await price.ainvalidate(product)
        go_on.set()
        old = await held
        try:
            return old, await price(product)
        finally:
            await cache.aclose()

    try:
        old, new = asyncio.run(main())
    finally:
        cache.client.close()
    assert old == "1.00"
    assert new == "4.00" == str(price_in_database(shop_engine, product))


def test_invalidate_still_reports_whether_there_was_a_result(cache: Cache) -> None:
    calls = 0

    @cache.cached("reports", ttl=60)
    def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    assert f.invalidate(1) is False
    assert f(1) == 1
    assert f(1) == 1
    assert calls == 1
    assert f.invalidate(1) is True
    assert f.invalidate(1) is False
    assert f(1) == 1
    assert f(1) == 1
    assert calls == 2


# -- methods, classmethods, partials ------------------------------------------------------


def test_a_cached_method_binds_like_a_method(
    cache: Cache, shop_engine: sa.Engine, product: int
) -> None:
    """``@cache.cached`` on a method: ``obj.m(x)`` must call ``m(obj, x)``, as without it."""

    class Shop:
        def __init__(self) -> None:
            self.calls = 0

        @cache.cached("shop_price", ttl=60, ignore=("self",))
        def price(self, pid: int) -> str:
            self.calls += 1
            return str(price_in_database(shop_engine, pid))

        @cache.cached("shop_price_keyed", ttl=60)
        def keyed(self, pid: int) -> str:  # self in the key: uncacheable, still correct
            self.calls += 1
            return str(price_in_database(shop_engine, pid))

    shop = Shop()
    assert shop.price(product) == "1.00"
    assert shop.price(pid=product) == "1.00"
    assert shop.calls == 1
    write_price(shop_engine, product, "5.00")
    assert shop.price.invalidate(product) is True
    assert shop.price(product) == "5.00"
    assert Shop.price(shop, product) == "5.00"  # through the class: self passed explicitly
    assert shop.calls == 2
    assert Shop.price.key_for(shop, product) == shop.price.key_for(product)
    assert list(inspect.signature(shop.price).parameters) == ["pid"]  # as a bound method
    assert shop.keyed(product) == "5.00"
    assert shop.keyed(product) == "5.00"
    assert shop.calls == 4


def test_a_cached_async_method_binds_like_a_method(redis_url: str, namespace: str) -> None:
    cache = Cache(redis_url, namespace=namespace)

    class Rates:
        calls = 0

        @cache.cached("rates_method", ttl=60, ignore=("self",))
        async def rate(self, currency: str) -> str:
            Rates.calls += 1
            return currency.lower()

    async def main() -> list[str]:
        rates = Rates()
        assert is_async_callable(rates.rate)  # FastAPI asks the same of an endpoint
        got = [await rates.rate("EUR"), await rates.rate("EUR")]
        assert await rates.rate.ainvalidate("EUR") is True
        got.append(await rates.rate("EUR"))
        await cache.aclose()
        return got

    try:
        assert asyncio.run(main()) == ["eur", "eur", "eur"]
    finally:
        cache.client.close()
    assert Rates.calls == 2


def test_cached_over_classmethod_is_refused_with_the_fix(cache: Cache) -> None:
    """``@cache.cached`` below ``@classmethod`` works; above it, a clear error says so."""

    class Shop:
        @classmethod
        @cache.cached("cls_ok", ttl=60, ignore=("cls",))
        def ok(cls, x: int) -> int:
            return x

    assert Shop.ok(3) == 3
    with pytest.raises(TypeError, match=r"classmethod.*above"):

        class Bad:
            @cache.cached("cls_bad", ttl=60)
            @classmethod
            def bad(cls, x: int) -> int:  # pragma: no cover - refused when decorating
                return x


# -- stampede control: lease holders that raise, die or are overtaken by a write ----------


@pytest.fixture
def seams(shop_engine: sa.Engine, redis_tap: RedisTap) -> Iterator[Seams]:
    points = Seams(engine=shop_engine, tap=redis_tap)
    yield points
    points.close()


def by_price(pid: int) -> Any:
    return select(Product.price).where(Product.id == pid)


def test_waiters_of_a_holder_that_raises_read_the_database(
    session_factory: sessionmaker[Session],
    seams: Seams,
    shop_engine: sa.Engine,
    product: int,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """The holder's database read raises after every waiter is waiting: the waiters must
    neither hang nor serve anything but the database's value, and the lease is released."""
    waiters = 4
    waiting = threading.Semaphore(0)
    failures: list[BaseException] = []

    def holder_fails() -> None:
        for _ in range(waiters):
            assert waiting.acquire(timeout=TIMEOUT)
        raise RuntimeError("the holder's read failed")

    seams.lease_wait(waiting.release)
    seams.after_database_read(once(holder_fails))
    stmt = by_price(product).options(FromCache(lease_wait=0.2))
    start = threading.Barrier(waiters + 1)
    results: list[Any] = []

    def call() -> None:
        start.wait(TIMEOUT)
        try:
            with session_factory() as s:
                results.append(s.scalar(stmt))
        except RuntimeError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(waiters + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert len(failures) == 1
    assert results == [price_in_database(shop_engine, product)] * waiters
    assert not list(redis_client.scan_iter(match=f"sarc:{namespace}:*:lease"))


def test_a_dead_holders_lease_delays_but_never_blocks(
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
    shop_engine: sa.Engine,
    product: int,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """A lease whose holder died (set by hand, 30 s left): a reader waits lease_wait, then
    reads and fills; the next reader is served that entry."""
    stmt = by_price(product).options(FromCache(lease_wait=0.1))
    with session_factory() as s:
        s.scalar(stmt)
    entries = [
        k
        for k in redis_client.scan_iter(match=f"sarc:{namespace}:*:q:*")
        if not k.endswith((b":lease", b":inv"))
    ]
    assert len(entries) == 1
    redis_client.unlink(entries[0])
    redis_client.set(entries[0] + b":lease", "dead-holder", px=30_000)
    write_price(shop_engine, product, "6.00")
    cache.invalidate_model(Product)
    sql.reset()
    with session_factory() as s:
        assert s.scalar(stmt) == Decimal("6.00")
    with session_factory() as s:
        assert s.scalar(stmt) == Decimal("6.00")
    assert sql.count == 1, sql.statements  # the second read was served the first's fill
    assert price_in_database(shop_engine, product) == Decimal("6.00")


def test_a_read_after_a_commit_never_waits_for_a_holder_that_read_before_it(
    session_factory: sessionmaker[Session],
    seams: Seams,
    shop_engine: sa.Engine,
    product: int,
) -> None:
    """The holder is held after its database read (old price); a session commits a new
    price; a read that starts after the commit must get the new price, never the holder's
    fill, and so must every read after the holder finished."""
    held, go_on = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        assert go_on.wait(TIMEOUT)

    seams.after_database_read(once(hold))
    stmt = by_price(product).options(FromCache(lease_wait=0.2))
    got: list[Any] = []

    def holder() -> None:
        with session_factory() as s:
            got.append(s.scalar(stmt))

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(TIMEOUT)
    with session_factory() as s:
        s.get_one(Product, product).price = Decimal("7.00")
        s.commit()
    with session_factory() as s:
        assert s.scalar(stmt) == Decimal("7.00")
    go_on.set()
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert got == [Decimal("1.00")]
    with session_factory() as s:
        assert s.scalar(stmt) == Decimal("7.00") == price_in_database(shop_engine, product)


# -- cached functions: Redis lost mid-call, ORM results, many tasks on one loop ------------


def test_redis_lost_between_the_look_and_the_fill_returns_the_result(
    shop_engine: sa.Engine, product: int
) -> None:
    """The function's look reaches Redis; Redis dies while the function runs: the caller
    gets the function's result (and the next call degrades to the function), never a
    Redis error."""
    with RedisServer(appendonly=False) as server:
        cache = Cache(server.url, namespace="lost")
        calls = 0

        @cache.cached("lost_sync", ttl=60)
        def price(pid: int) -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                server.kill()
            return str(price_in_database(shop_engine, pid))

        @cache.cached("lost_async", ttl=60)
        async def aprice(pid: int) -> str:
            return str(price_in_database(shop_engine, pid))

        try:
            assert price(product) == "1.00"
            assert price(product) == "1.00"
            assert price.invalidate(product) is False
            assert calls == 2

            async def main() -> list[str]:
                try:
                    return [await aprice(product), await aprice(product)]
                finally:
                    await cache.aclose()

            assert asyncio.run(main()) == ["1.00", "1.00"]
            assert cache.stats()["functions"]["lost_sync"]["errors"] >= 2
        finally:
            cache.client.close()


def test_orm_objects_and_rows_are_returned_uncached(
    cache: Cache, shop_engine: sa.Engine, product: int, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/integrations.md: a result the codec cannot store (an ORM object, a ``Row``) is
    returned as the function made it, not cached, with one WARNING per function."""
    calls = 0

    @cache.cached("orm_result", ttl=60)
    def load(pid: int) -> Any:
        nonlocal calls
        calls += 1
        with Session(shop_engine, expire_on_commit=False) as s:
            return s.get_one(Product, pid), s.execute(by_price(pid)).one()

    with caplog.at_level("WARNING", logger="sa_redis_cache"):
        first, row = load(product)
        second, _ = load(product)
    assert isinstance(first, Product)
    assert first is not second
    assert row.price == Decimal("1.00")
    assert calls == 2
    assert cache.stats()["functions"]["orm_result"]["uncacheable"] == 2
    assert len([r for r in caplog.records if "results not cached" in r.getMessage()]) == 1


def test_many_tasks_on_one_loop_with_an_invalidation_among_them(
    redis_url: str, namespace: str, shop_engine: sa.Engine, product: int
) -> None:
    """64 tasks call one cached ``async def`` at once (no lease: each miss runs it); a
    write and ``ainvalidate`` land while they are all between their read and their fill.
    Every call after the invalidation returns the new price."""
    cache = Cache(redis_url, namespace=namespace)
    tasks = 64

    async def main() -> tuple[list[str], list[str]]:
        arrived, go_on = asyncio.Event(), asyncio.Event()
        waiting = 0

        @cache.cached("many", ttl=600)
        async def price(pid: int) -> str:
            nonlocal waiting
            read = str(price_in_database(shop_engine, pid))
            waiting += 1
            if waiting == tasks:
                arrived.set()
            await go_on.wait()
            return read

        running = [asyncio.create_task(price(product)) for _ in range(tasks)]
        await arrived.wait()
        write_price(shop_engine, product, "8.00")
        await price.ainvalidate(product)
        go_on.set()
        before = await asyncio.gather(*running)
        after = await asyncio.gather(*(price(product) for _ in range(tasks)))
        await cache.aclose()
        return list(before), list(after)

    try:
        before, after = asyncio.run(main())
    finally:
        cache.client.close()
    assert before == ["1.00"] * tasks
    assert after == ["8.00"] * tasks
    assert cache.stats()["functions"]["many"]["fill_refused"] == tasks


def test_entries_of_the_previous_format_are_still_served(
    cache: Cache, redis_client: redis.Redis
) -> None:
    """0.1.0 stored ``\\x01F`` + the tagged result; after an upgrade those entries hit,
    and an invalidation replaces them with a tombstone like any entry."""
    calls = 0

    @cache.cached("legacy", ttl=60)
    def f(x: int) -> list[int]:
        nonlocal calls
        calls += 1
        return [x]

    key = f.key_for(1)
    redis_client.set(key, b"\x01F" + dumps_tagged([41]), px=60_000)
    assert f(1) == [41]
    assert calls == 0
    assert f.invalidate(1) is True
    assert f(1) == [1]
    assert f(1) == [1]
    assert calls == 1


def test_redis_lost_while_a_waiter_polls_and_the_holder_fills(
    shop_engine: sa.Engine, product: int
) -> None:
    """The holder is held after its database read; the waiter starts polling and Redis
    dies then: the waiter reads the database, the holder's fill fails quietly, both
    return the database's price, neither hangs."""
    tap = RedisTap()
    with RedisServer(appendonly=False) as server:
        client = tap.client(server.url)
        cache = Cache(client, namespace="lostpoll")
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        seams = Seams(engine=shop_engine, tap=tap)
        held, go_on = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            assert go_on.wait(TIMEOUT)

        seams.after_database_read(once(hold))
        seams.lease_wait(once(server.kill))
        stmt = by_price(product).options(FromCache(lease_wait=TIMEOUT))
        got: list[Any] = []

        def read() -> None:
            with factory() as s:
                got.append(s.scalar(stmt))

        try:
            holder = threading.Thread(target=read)
            holder.start()
            assert held.wait(TIMEOUT)
            read()  # the waiter: refused the lease, polls, Redis dies, reads the database
            go_on.set()
            holder.join(TIMEOUT)
            assert not holder.is_alive()
        finally:
            go_on.set()
            seams.close()
            cache.detach()
            client.close()
    assert got == [price_in_database(shop_engine, product)] * 2
