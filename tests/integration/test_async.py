"""The cache under ``AsyncSession``: what only asyncio has, and a free event loop.

The reads, consistency and write-behind scenarios run through one parametrised fixture
(``in_mode``, see :mod:`tests.modes`) with a ``Session`` and with an ``AsyncSession``, in
``test_reads.py``, ``test_interleavings.py``, ``test_write_behind.py`` and
``test_worker.py``; in the async mode every scenario also checks that the synchronous
Redis client made no round trip. The tests here are about asyncio itself: Redis
failures and script reloads in both modes, Core DML on an ``AsyncEngine``, write-behind's
round trips, the awaitable ``ainvalidate*`` methods, a free event loop, per-loop clients,
and ``cache.cached`` on ``async def``.

The event-loop tests talk to Redis through a proxy that delays every reply
(:mod:`tests.slow_proxy`): a Redis call made synchronously inside the loop would stop a
ticker task on the same loop for that long.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer, Services
from examples import async_shop
from examples.shop import Category, Product
from sa_redis_cache import Cache, ConfigurationError, FromCache, schema
from sa_redis_cache.strategies.write_behind.ids import ID_BLOCKS
from tests.modes import MODES, Db, Runner, SyncFacade, async_url, cached_price, set_price
from tests.seams import RedisTap, Seams
from tests.slow_proxy import SlowProxy
from tests.support import close_cache_and_engine
from tests.wb_support import private_models

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_


# -- failures ------------------------------------------------------------------------------


def test_noscript_after_script_flush_reloads(
    in_mode: Runner, product: int, redis_client: redis.Redis
) -> None:
    """EVALSHA with a reload on NOSCRIPT, for single scripts and batches, in both modes."""

    def scenario(db: Db) -> None:
        assert cached_price(db, product) == Decimal("1.00")
        redis_client.script_flush()
        with db.session() as s:  # a commit writing two tables: a batch of scripts
            s.get(Product, product, populate_existing=True).price = Decimal("6.00")
            s.add(Category(name=f"noscript-{db.mode}"))
            s.commit()
        redis_client.script_flush()
        assert cached_price(db, product) == Decimal("6.00")  # capture and fill scripts
        db.sql.reset()
        assert cached_price(db, product) == Decimal("6.00")
        assert db.sql.count == 0
        assert db.cache.stats()["total"]["errors"] == 0
        with db.session() as s:
            s.execute(sa.delete(Category).where(Category.name == f"noscript-{db.mode}"))
            s.commit()

    in_mode(scenario)


@pytest.mark.parametrize("mode", MODES)
def test_redis_down_reads_and_writes_use_the_database(
    mode: str, database_url: str, namespace: str, product: int, shop_engine: sa.Engine
) -> None:
    run = Runner(mode, database_url, "redis://127.0.0.1:1/0", namespace)

    def scenario(db: Db) -> None:
        for _ in range(4):
            db.sql.reset()
            assert cached_price(db, product) == Decimal("1.00")
            assert db.sql.count == 1
        set_price(db, product, "1.50")  # the marks fail: the commit does not
        assert cached_price(db, product) == Decimal("1.50")
        assert db.cache.stats()["total"]["errors"] >= 3
        assert db.cache._core.breaker.opened >= 1
        assert "products" in db.cache._core.undelivered

    run(scenario)


def test_core_dml_on_an_async_engine_invalidates_without_blocking(
    database_url: str, redis_url: str, namespace: str, product: int
) -> None:
    """``AsyncConnection`` DML: its marks and bumps await the asyncio client too."""
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def main() -> tuple[list[Decimal], int]:
        engine = create_async_engine(async_url(database_url))
        client = redis.Redis.from_url(redis_url)
        aclient = redis.asyncio.Redis.from_url(redis_url)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        factory = async_sessionmaker(engine)
        cache.attach(factory)  # instruments the factory's engine for Core DML
        sync_calls = 0
        original = client.connection_pool.get_connection

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal sync_calls
            sync_calls += 1
            return original(*args, **kwargs)

        client.connection_pool.get_connection = counting  # type: ignore[method-assign]
        prices = []
        try:
            for price in ("1.00", "7.00"):
                if price != "1.00":
                    async with engine.begin() as conn:
                        await conn.execute(
                            sa.update(Product).where(Product.id == product).values(price=price)
                        )
                async with factory() as s:
                    prices.append((await s.scalars(stmt)).one().price)
        finally:
            cache.detach()
            client.close()
            await aclient.aclose()
            await engine.dispose()
        return prices, sync_calls

    prices, sync_calls = asyncio.run(main())
    assert prices == [Decimal("1.00"), Decimal("7.00")]
    assert sync_calls == 0


# -- write-behind --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


def test_write_behind_awaits_the_asyncio_client(
    database_url: str, engine: sa.Engine, aof_redis: RedisServer, namespace: str
) -> None:
    """Write-behind's enqueue at commit and its queued-state lookup await the asyncio client.

    The async runner fails on any round trip of the synchronous client; each step here
    must also make its own on the asyncio one (``test_write_behind.py`` runs the other
    write-behind scenarios in both modes).
    """
    schema.upgrade(engine)
    with private_models() as (page_view, _):
        page_view.metadata.create_all(engine)
        run = Runner("async", database_url, aof_redis.url, namespace)

        def scenario(db: Db) -> None:
            def awaited(step: Callable[[], Any]) -> Any:
                before = db.round_trips["async"]
                result = step()
                assert db.round_trips["sync"] == 0
                assert db.round_trips["async"] > before
                return result

            with db.session() as s:
                view = page_view(path="/async", views=3)
                s.add(view)
                awaited(s.commit)  # the enqueue
                pk = view.id
            with db.session() as s:
                got = awaited(lambda: s.get(page_view, pk))  # the pending state
                assert (got.path, got.views) == ("/async", 3)
                got.views = 4
                awaited(s.commit)
            with db.session() as s:
                assert awaited(lambda: s.get(page_view, pk)).views == 4
            assert db.sql.statements == []

        run(scenario)


# -- the event loop ------------------------------------------------------------------------

DELAY = 0.1  # seconds the proxy holds every Redis reply
TICK = 0.005  # the ticker's period
MAX_LAG = 0.05  # a tick this late means the loop was blocked (half a Redis reply)


class Ticker:
    """A task that wakes every ``TICK`` seconds and records when it did."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await self.started.wait()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self.times.append(loop.time())
            self.started.set()
            await asyncio.sleep(TICK)

    def worst_gap(self, start: float, end: float) -> float:
        """The longest time between two ticks in [start, end] (or to its ends)."""
        inside = [t for t in self.times if start <= t <= end]
        points = [start, *inside, end]
        return max(b - a for a, b in itertools.pairwise(points))


def test_a_cached_query_never_blocks_the_event_loop(
    database_url: str, redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """A ticker on the loop keeps its beat while cached queries wait on a slow Redis.

    The control: the same hit through a synchronous ``Session`` called on the loop stalls
    the ticker for a whole Redis reply, so the ticker would see a blocking call.
    """
    server = urlsplit(redis_url)
    host, port = server.hostname or "127.0.0.1", server.port or 6379
    stmt = select(Product).where(Product.id == 7).options(FromCache())
    warm = select(Product).where(Product.id == 8).options(FromCache())

    async def main(proxy: SlowProxy) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        client = redis.Redis.from_url(proxy.url(), socket_timeout=5)
        aclient = redis.asyncio.Redis.from_url(proxy.url(), socket_timeout=5)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine)
        sync_factory = sessionmaker(shop_engine)
        cache.attach(factory)
        cache.attach(sync_factory)
        out: dict[str, float] = {}
        try:
            async with factory() as s:  # connections, statement compilation, plans
                (await s.scalars(warm)).one()
            with sync_factory() as s:
                s.scalars(warm).one()
            async with Ticker() as ticker:
                start = loop.time()
                async with factory() as s:
                    miss = (await s.scalars(stmt)).one().price  # look + lease, read, fill
                async with factory() as s:
                    hit = (await s.scalars(stmt)).one().price  # MGET
                end = loop.time()
                with sync_factory() as s:  # the control: blocks the loop
                    blocked = s.scalars(stmt).one().price
                control_end = loop.time()
            assert miss == hit == blocked
            out["elapsed"] = end - start
            out["worst_gap"] = ticker.worst_gap(start, end)
            out["ticks"] = len([t for t in ticker.times if start <= t <= end])
            out["control_gap"] = ticker.worst_gap(end, control_end)
            out["control_elapsed"] = control_end - end
        finally:
            cache.detach()
            client.close()
            await aclient.aclose()
            await engine.dispose()
        return out

    with SlowProxy(host, port, delay=DELAY) as proxy:
        got = asyncio.run(main(proxy))
    print(
        f"\nasync miss+hit through a {DELAY * 1000:.0f} ms Redis: {got['elapsed'] * 1000:.0f} ms, "
        f"{got['ticks']:.0f} ticks of {TICK * 1000:.0f} ms, worst gap "
        f"{got['worst_gap'] * 1000:.1f} ms; sync control: {got['control_elapsed'] * 1000:.0f} "
        f"ms, worst gap {got['control_gap'] * 1000:.1f} ms"
    )
    # the queries really waited on the slow Redis: three round trips
    assert got["elapsed"] >= 3 * DELAY
    assert got["worst_gap"] < MAX_LAG, got
    assert got["ticks"] >= got["elapsed"] / TICK / 3, got
    assert got["control_gap"] >= DELAY * 0.9, got  # the ticker does notice a blocked loop


def test_a_write_behind_commit_never_blocks_the_event_loop(
    database_url: str, engine: sa.Engine, aof_redis: RedisServer, namespace: str
) -> None:
    """A ticker on the loop keeps its beat while write-behind commits (and the read of a
    queued row) wait on a slow Redis; the same commit through a synchronous ``Session``
    on the loop stalls it for a whole reply."""
    schema.upgrade(engine)
    server = urlsplit(aof_redis.url)
    host, port = server.hostname or "127.0.0.1", server.port or 6379

    async def main(proxy: SlowProxy, page_view: Any) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        client = redis.Redis.from_url(proxy.url(), socket_timeout=5)
        aclient = redis.asyncio.Redis.from_url(proxy.url(), socket_timeout=5)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        async_engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(async_engine)
        sync_factory = sessionmaker(engine)
        cache.attach(factory)
        cache.attach(sync_factory)
        out: dict[str, float] = {}
        try:
            with sync_factory() as s:  # the control's connections (the loop is not timed)
                s.add(page_view(path="/warm-sync", views=0))
                s.commit()
            async with Ticker() as ticker:  # from the first commit: nothing is warm
                start = loop.time()
                for i in range(3):
                    async with factory() as s:
                        view = page_view(path=f"/a/{i}", views=i)
                        s.add(view)
                        await s.commit()  # one enqueue
                async with factory() as s:
                    got = await s.get(page_view, view.id)  # its pending state
                    assert got is not None
                    assert got.views == 2
                end = loop.time()
                with sync_factory() as s:  # the control: blocks the loop
                    s.add(page_view(path="/blocked", views=9))
                    s.commit()
                control_end = loop.time()
            out["elapsed"] = end - start
            out["worst_gap"] = ticker.worst_gap(start, end)
            out["ticks"] = len([t for t in ticker.times if start <= t <= end])
            out["control_gap"] = ticker.worst_gap(end, control_end)
        finally:
            cache.detach()
            client.close()
            await aclient.aclose()
            await async_engine.dispose()
        return out

    with private_models() as (page_view, _), SlowProxy(host, port, delay=DELAY) as proxy:
        page_view.metadata.create_all(engine)
        got = asyncio.run(main(proxy, page_view))
    print(
        f"\nasync write-behind commits and read through a {DELAY * 1000:.0f} ms Redis: "
        f"{got['elapsed'] * 1000:.0f} ms, {got['ticks']:.0f} ticks, worst gap "
        f"{got['worst_gap'] * 1000:.1f} ms; sync control: worst gap "
        f"{got['control_gap'] * 1000:.1f} ms"
    )
    assert got["elapsed"] >= 4 * DELAY  # the commits really waited on the slow Redis
    assert got["worst_gap"] < MAX_LAG, got
    assert got["ticks"] >= got["elapsed"] / TICK / 3, got
    assert got["control_gap"] >= DELAY * 0.9, got  # the ticker does notice a blocked loop


def test_concurrent_commits_reserving_sequence_ids_do_not_block_the_loop(
    database_url: str, engine: sa.Engine, aof_redis: RedisServer, namespace: str
) -> None:
    """Tasks that each need a new block of ids from a client-side sequence at once.

    A block is reserved with ``nextval``, awaited on the task's connection: a lock held
    across that await would stop the thread, and with it the loop and the task holding it.
    """
    schema.upgrade(engine)

    async def main(stock_level: Any) -> list[int]:
        cache = Cache(aof_redis.url, namespace=namespace)
        async_engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(async_engine)
        cache.attach(factory)

        async def commit(i: int) -> int:
            async with factory() as s:
                level = stock_level(warehouse=f"w{i}", quantity=i)
                s.add(level)
                await s.commit()
                return int(level.id)

        try:
            return list(await asyncio.gather(*(commit(i) for i in range(6))))
        finally:
            cache.detach()
            await cache.aclose()
            await async_engine.dispose()

    with private_models() as (_, stock_level):
        stock_level.metadata.create_all(engine)
        ID_BLOCKS.clear()  # every task needs a block first
        found: list[list[int]] = []
        runner = threading.Thread(
            target=lambda: found.append(asyncio.run(main(stock_level))), daemon=True
        )
        runner.start()
        runner.join(timeout=30)
        assert not runner.is_alive(), "the event loop is stuck: a task blocked the thread"
        ID_BLOCKS.clear()  # the other tests count their nextvals from no block
    ids = found[0]
    assert len(set(ids)) == len(ids) == 6


def test_a_lease_waiter_lets_the_loop_run(
    database_url: str, redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """Two tasks miss one entry; the one without the lease polls with ``asyncio.sleep``.

    The filler, after its database read, waits until a ticker task has ticked 30 times
    since the other task started waiting (~150 ms on a free loop), then fills. The waiter
    (``lease_wait`` 0.5 s) is then served the entry. A waiter that slept with
    ``time.sleep`` would let the loop run only during its polls (about 14 in 0.5 s), so
    the filler would still be waiting when it gave up, and both would read the database.
    """
    stmt = select(Product).where(Product.id == 9).options(FromCache(lease_wait=0.5))

    async def main() -> tuple[tuple[Any, Any], int, dict[str, Any]]:
        engine = create_async_engine(async_url(database_url))
        statements: list[str] = []
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        tap = RedisTap()  # the cache's clients are tapped: the test sees the lease wait
        client = tap.client(redis_url)
        aclient = tap.async_client(redis_url)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        seams = Seams(engine=engine.sync_engine, tap=tap)
        waiting = asyncio.Event()  # set by the task that did not get the lease
        ticked = asyncio.Event()  # 30 ticks since then
        done = asyncio.Event()

        async def ticker() -> None:
            count = 0
            while not done.is_set():
                await asyncio.sleep(TICK)
                count += waiting.is_set()
                if count >= 30:
                    ticked.set()

        # engine events run in the session's greenlet: the filler awaits the ticks there
        def wait_for_ticks() -> None:
            await_(ticked.wait())

        seams.after_database_read(wait_for_ticks)
        seams.lease_wait(waiting.set)

        async def read() -> Any:
            async with factory() as s:
                return (await s.scalars(stmt)).one().price

        tick_task = asyncio.create_task(ticker())
        try:
            prices = await asyncio.gather(read(), read())
        finally:
            done.set()
            await tick_task
            seams.close()
            cache.detach()
            await aclient.aclose()
            client.close()
            await engine.dispose()
        return prices, len(statements), cache.stats()["total"]

    prices, statements, total = asyncio.run(main())
    assert prices[0] == prices[1]
    assert total["lease_waits"] == 1
    assert statements == 1, "the waiter gave up and read the database"
    assert total["hits"] == 1


def test_a_cache_from_a_url_makes_a_client_per_event_loop(
    database_url: str, redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """``asyncio.run`` twice with one cache: each loop gets its own asyncio client."""
    cache = Cache(redis_url, namespace=namespace)
    stmt = select(Product).where(Product.id == 10).options(FromCache())

    async def main() -> tuple[Any, int]:
        engine = create_async_engine(async_url(database_url))
        statements: list[str] = []
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            async with factory() as s:
                price = (await s.scalars(stmt)).one().price
            return price, len(statements)
        finally:
            await close_cache_and_engine(cache, engine)

    try:
        first = asyncio.run(main())
        second = asyncio.run(main())
    finally:
        cache.client.close()
    assert first[0] == second[0]
    assert (first[1], second[1]) == (1, 0)


def test_asyncio_connections_check_the_server_run_id(
    redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """A new asyncio connection that finds another run id bumps every known table first."""
    client = redis.Redis.from_url(redis_url)

    async def main() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        cache.attach(sessionmaker(shop_engine))  # registers the shop's tables
        core = cache._core
        version = cache.keys.version_key("products")
        before = client.get(version)  # the sync pool's connection checks the run id now
        assert core.restarts_seen == 0
        core.run_id = "a-run-before-a-restart"
        try:
            await aclient.ping()  # the first connection of the asyncio pool
        finally:
            cache.detach()
            await aclient.aclose()
        assert core.restarts_seen == 1
        assert core.run_id not in (None, "a-run-before-a-restart")
        assert client.get(version) not in (None, before)

    try:
        asyncio.run(main())
    finally:
        client.close()


# -- configuration -------------------------------------------------------------------------


def test_an_async_factory_needs_an_asyncio_client(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        cache = Cache(client, namespace=namespace)
        engine = create_async_engine("postgresql+psycopg_async://u@127.0.0.1/db")
        with pytest.raises(ConfigurationError, match=re.escape("async_client=redis.asyncio.Redis")):
            cache.attach(async_sessionmaker(engine))
        with pytest.raises(ConfigurationError, match="asyncio Redis client"):

            @cache.cached("rates")
            async def rate(currency: str) -> int:
                return 1

        with pytest.raises(ConfigurationError, match=r"or call cache\.invalidate\(\)"):
            asyncio.run(cache.ainvalidate(Product, 1))
        with pytest.raises(ConfigurationError, match="async_client="):
            Cache(redis.asyncio.Redis.from_url(redis_url), namespace=namespace)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="decode_responses"):
            Cache(client, async_client=redis.asyncio.Redis(decode_responses=True))
    finally:
        client.close()


# -- awaitable invalidation ----------------------------------------------------------------


def test_invalidation_removes_the_same_entries_in_both_modes(in_mode: Runner, product: int) -> None:
    """``cache.invalidate*`` in the sync mode, ``await cache.ainvalidate*`` in the async one."""
    by_id = select(Product).where(Product.id == product).options(FromCache())
    categories = select(Category).order_by(Category.id).options(FromCache())
    in_region = select(Category).where(Category.id == 1).options(FromCache(region="menu"))
    reads: dict[str, Callable[[SyncFacade], Any]] = {
        "entity": lambda s: s.get(Product, product),
        "other entity": lambda s: s.get(Product, 1),
        "query": lambda s: s.scalars(by_id),
        "categories": lambda s: s.scalars(categories),
        "category": lambda s: s.get(Category, 1),
        "region": lambda s: s.scalars(in_region),
    }

    def misses(db: Db) -> set[str]:
        """The reads that sent SQL, each in a fresh session."""
        missed = set()
        for name, read in reads.items():
            db.sql.reset()
            with db.session() as s:
                read(s)
            if db.sql.count:
                missed.add(name)
        return missed

    def scenario(db: Db) -> None:
        misses(db)
        assert misses(db) == set()
        assert db.invalidate("invalidate", Product, product) is None
        # the row may be in any cached query on its table: those are retired too
        assert misses(db) == {"entity", "query"}
        assert db.invalidate("invalidate_model", Category) is None
        assert misses(db) == {"categories", "category", "region"}
        assert db.invalidate("invalidate_table", "categories") == ["categories"]
        assert misses(db) == {"categories", "category", "region"}
        # a region's tables are bumped: its entries go, and the others on those tables
        assert db.invalidate("invalidate_region", "menu") == ["categories"]
        assert misses(db) == {"categories", "region"}
        # every entry and the counters they were checked against: 5 entries, 4 counters
        # (the queries' invalidation counters, the entities' row counters, and the
        # versions and generations of both tables)
        assert db.invalidate("clear") >= 5
        assert misses(db) == set(reads)
        assert db.invalidate("invalidate_query", by_id) == 1
        assert misses(db) == {"query"}
        assert db.invalidate("invalidate_query", by_id.where(Product.id > 0)) == 0
        with pytest.raises(ValueError, match="primary key of 1 column"):
            db.invalidate("invalidate", Product, product, 2)
        stats = db.cache.stats()["models"]
        assert (stats["Product"]["invalidations"], stats["Category"]["invalidations"]) == (1, 1)

    in_mode(scenario)


def test_ainvalidate_query_takes_the_async_engine_and_raises_redis_errors(
    database_url: str, redis_url: str, namespace: str, product: int
) -> None:
    """Entries an ``AsyncSession`` stored are keyed by its engine; a failed call raises."""
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def main() -> list[int]:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(redis_url, namespace=namespace)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            async with factory() as s:
                (await s.scalars(stmt)).one()
            return [
                await cache.ainvalidate_query(stmt, bind=engine),
                await cache.ainvalidate_query(stmt, bind=engine),
            ]
        finally:
            cache.detach()
            await cache.aclose()
            cache.client.close()
            await engine.dispose()

    assert asyncio.run(main()) == [1, 0]

    async def down() -> None:
        cache = Cache("redis://127.0.0.1:1/0", namespace=namespace)
        try:
            await cache.ainvalidate_model(Product)
        finally:
            await cache.aclose()
            cache.client.close()

    with pytest.raises(redis.ConnectionError):  # that invalidation did not happen: retry it
        asyncio.run(down())


# -- cache.cached on async functions -------------------------------------------------------


def test_cached_decorates_async_functions(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(redis_url, namespace=namespace)
    calls: list[str] = []
    blocking: list[tuple[Any, ...]] = []

    @cache.cached("rates", ttl=60)
    async def rate(currency: str, *, scale: int = 2) -> dict[str, Any]:
        calls.append(currency)
        return {"currency": currency, "rate": Decimal("1.08"), "scale": scale}

    async def main() -> list[dict[str, Any] | bool | int]:
        try:
            got: list[dict[str, Any] | bool | int] = [
                await rate("EUR"),
                await rate(currency="EUR"),
                await rate("USD"),
            ]
            got.append(await rate.ainvalidate("EUR"))
            got.append(await rate("EUR"))
            got.append(rate.invalidate("EUR"))  # the synchronous one works too
            await rate("EUR")
            # every cached result goes, without a round trip on the synchronous client
            sync_command: Any = cache.client.execute_command

            def record(*args: Any, **options: Any) -> Any:
                blocking.append(args)
                return sync_command(*args, **options)

            monkeypatch.setattr(cache.client, "execute_command", record)
            got.append(await rate.ainvalidate_all())
            monkeypatch.undo()
            got.append(await rate("USD"))
            return got
        finally:
            await cache.aclose()

    try:
        got = asyncio.run(main())
    finally:
        cache.client.close()
    eur = {"currency": "EUR", "rate": Decimal("1.08"), "scale": 2}
    usd = {**eur, "currency": "USD"}
    assert got == [eur, eur, usd, True, eur, True, 2, usd]
    assert blocking == []
    assert calls == ["EUR", "USD", "EUR", "EUR", "USD"]
    assert cache.stats()["functions"]["rates"]["hits"] == 1
    assert cache.stats()["functions"]["rates"]["fills"] == 5
    # frameworks (Starlette, FastAPI) see a coroutine function and await it
    assert asyncio.iscoroutinefunction(rate.__call__)
    assert inspect.iscoroutinefunction(rate.__call__)
    assert rate.__name__ == "rate"


def test_an_async_cached_function_survives_redis_down(namespace: str) -> None:
    cache = Cache("redis://127.0.0.1:1/0", namespace=namespace)

    @cache.cached("down")
    async def double(x: int) -> int:
        return 2 * x

    async def main() -> list[int]:
        try:
            return [await double(i) for i in range(5)]
        finally:
            await cache.aclose()

    try:
        assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    finally:
        cache.client.close()
    stats = cache.stats()["functions"]["down"]
    assert stats["errors"] >= 1
    assert stats["bypassed"] >= 1  # the breaker opened after repeated failures


def test_a_given_async_client_serves_one_loop_at_a_time(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    aclient = redis.asyncio.Redis.from_url(redis_url)
    cache = Cache(client, async_client=aclient, namespace=namespace)

    @cache.cached("one_loop")
    async def answer() -> int:
        return 42

    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(answer()) == 42
        with pytest.raises(ConfigurationError, match="second event loop"):
            asyncio.run(answer())
    finally:
        first.run_until_complete(aclient.aclose())
        first.close()
        client.close()


# -- the example ---------------------------------------------------------------------------


def test_the_async_example_runs(
    services: Services, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"sarc_async_{secrets.token_hex(4)}"
    assert async_shop.main(services.database_url, redis_url, database, namespace) == 0
    out = capsys.readouterr().out
    assert "second read: 15 products, 0 SQL statement(s)" in out
    assert "a fresh session reads 12.34 with 0 SQL statement(s)" in out
    assert "every claim held" in out
