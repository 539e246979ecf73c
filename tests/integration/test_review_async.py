"""Review probes of the asyncio side: many tasks on one loop, cancellation, two loops.

Each test builds its own ``AsyncEngine`` and a cache whose clients a :class:`RedisTap`
sees, and uses the database (a plain synchronous connection) as the oracle. Interleavings
are forced with asyncio events and the points of :mod:`tests.seams`, never with sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache, CachePolicy, FromCache, stampede
from sa_redis_cache.protocol import scripts
from tests.modes import async_url
from tests.seams import RedisTap, Seams
from tests.wb_support import drain, rows

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, models, make_worker

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_


@dataclass
class App:
    """An asyncio application: engine, attached factory, tapped cache, SQL log."""

    engine: AsyncEngine
    factory: async_sessionmaker[Any]
    cache: Cache
    tap: RedisTap
    seams: Seams
    aclient: redis.asyncio.Redis
    statements: list[str] = field(default_factory=list)

    def selects(self) -> int:
        return sum(s.lstrip().upper().startswith("SELECT") for s in self.statements)

    def cancel_before_post_commit(
        self, task: Callable[[], asyncio.Task[Any] | None]
    ) -> Callable[[], None]:
        """At the next commit's post-commit work, cancel ``task()``: the pool's connections
        are closed first, so that the next Redis call has to connect and the cancellation
        lands before it sends. The function that un-arms it."""

        def cancel() -> None:
            found = task()
            assert found is not None
            await_(self.aclient.connection_pool.disconnect())
            found.cancel()

        return self.seams.before_post_commit(cancel)


T = TypeVar("T")


@dataclass
class HeldFill:
    """A writer and a reader interleaved: the writer sets ``flushed`` after its flush and
    waits for ``reader_read``; the reader (:meth:`read`) starts once ``flushed`` is set,
    and after its database read sets ``reader_read`` and holds its fill until
    ``writer_over``."""

    app: App
    flushed: asyncio.Event = field(default_factory=asyncio.Event)
    reader_read: asyncio.Event = field(default_factory=asyncio.Event)
    writer_over: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, read: Callable[[Any], Awaitable[T]]) -> T:
        """``read`` in a session of its own, held as the class says."""
        await self.flushed.wait()
        remove = self.app.seams.after_database_read(self._hold_fill)
        try:
            async with self.app.factory() as s:
                return await read(s)
        finally:
            remove()

    def _hold_fill(self) -> None:
        self.reader_read.set()
        await_(self.writer_over.wait())


@asynccontextmanager
async def async_app(
    database_url: str, redis_url: str, namespace: str, **cache_options: Any
) -> AsyncIterator[App]:
    engine = create_async_engine(async_url(database_url), pool_size=60, max_overflow=0)
    tap = RedisTap()
    client = tap.client(redis_url)
    aclient = tap.async_client(redis_url)
    cache = Cache(client, async_client=aclient, namespace=namespace, **cache_options)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    cache.attach(factory)
    seams = Seams(
        engine=engine.sync_engine, session_class=factory.class_.sync_session_class, tap=tap
    )
    app = App(engine, factory, cache, tap, seams, aclient)
    sa.event.listen(
        engine.sync_engine, "before_cursor_execute", lambda *a: app.statements.append(a[2])
    )
    try:
        yield app
    finally:
        seams.close()
        cache.detach()
        client.close()
        await aclient.aclose()
        await engine.dispose()


def db_price(engine: sa.Engine, pid: int) -> Decimal:
    with engine.connect() as conn:
        return Decimal(conn.scalar(sa.text("SELECT price FROM products WHERE id = :i"), {"i": pid}))


async def price_by(how: str, s: Any, stmt: Any, product: int) -> Decimal:
    """The product's price by ``stmt`` (``how="query"``) or by ``session.get``."""
    if how == "query":
        return (await s.scalars(stmt)).one().price  # type: ignore[no-any-return]
    got = await s.get(Product, product)
    assert got is not None
    return got.price  # type: ignore[no-any-return]


# -- stampede on one loop ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["query", "entity"])
def test_fifty_tasks_missing_one_key_read_the_database_once(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    how: str,
) -> None:
    """asyncio.gather of 50 misses of one entry: the lease holder reads, the others wait.

    The holder's database read is held (in its greenlet, awaiting an event) until all 49
    others have started waiting for the lease: the loop must stay free for them to get
    there, and they must then be served the holder's fill.
    """
    n = 50
    stmt = select(Product).where(Product.id == product).options(FromCache(lease_wait=5))

    async def main() -> tuple[list[Decimal], int, dict[str, Any]]:
        async with async_app(database_url, redis_url, namespace) as app:
            all_waiting = asyncio.Event()
            waiting = 0

            def one_waits() -> None:
                nonlocal waiting
                waiting += 1
                if waiting == n - 1:
                    all_waiting.set()

            app.seams.lease_wait(one_waits)
            app.seams.after_database_read(lambda: await_(all_waiting.wait()))

            async def read() -> Decimal:
                async with app.factory() as s:
                    return await price_by(how, s, stmt, product)

            app.statements.clear()
            prices = await asyncio.wait_for(asyncio.gather(*(read() for _ in range(n))), 30)
            return prices, app.selects(), app.cache.stats()["total"]

    prices, selects, total = asyncio.run(main())
    assert prices == [db_price(shop_engine, product)] * n
    assert total["lease_waits"] == n - 1, total
    assert selects == 1, (selects, total)


def test_fifty_tasks_on_an_expired_entry_refresh_it_once_and_are_served_stale(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stale-while-refresh on one loop: past its logical TTL (within ``stale_ttl``), 50
    tasks read the entry; one takes the lease and refreshes (its database read held until
    the 49 others were served), the others are served the expired entry."""
    n = 50
    stmt = (
        select(Product)
        .where(Product.id == product)
        .options(FromCache(ttl=60, stale_ttl=600, xfetch_beta=0))
    )

    async def main() -> tuple[list[Decimal], int, dict[str, Any]]:
        async with async_app(database_url, redis_url, namespace) as app:
            async with app.factory() as s:
                (await s.scalars(stmt)).one()
            later = stampede.now_ms() + 3_600_000
            monkeypatch.setattr(stampede, "now_ms", lambda: later)
            served = 0
            all_served = asyncio.Event()

            async def read() -> Decimal:
                nonlocal served
                async with app.factory() as s:
                    price = (await s.scalars(stmt)).one().price
                served += 1
                if served == n - 1:
                    all_served.set()
                return price  # type: ignore[no-any-return]

            app.seams.after_database_read(lambda: await_(all_served.wait()))
            app.statements.clear()
            prices = await asyncio.wait_for(asyncio.gather(*(read() for _ in range(n))), 30)
            return prices, app.selects(), app.cache.stats()["regions"]["default"]

    prices, selects, region = asyncio.run(main())
    assert prices == [Decimal("1.00")] * n
    assert selects == 1
    assert region["stale_served"] == n - 1, region
    assert region["early_refreshes"] == 1, region


# -- cancellation --------------------------------------------------------------------------


def writers_left(client: redis.Redis, cache: Cache, table: str) -> int:
    return int(client.zcard(cache.keys.writers_key(table)))


def test_a_commit_cancelled_before_its_post_commit_work_leaves_no_mark_and_no_stale_read(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
) -> None:
    """The writer's task is cancelled after Postgres committed, while its post-commit
    Redis round trip waits for a connection (the pool's were closed: it must connect).

    Afterwards: the committed price is what every reader gets, the writer mark does not
    keep fills out for its 60 s, the session and the engine's pool still work.
    """
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with async_app(database_url, redis_url, namespace) as app:
            async with app.factory() as s:  # both entries filled with 1.00
                (await s.scalars(stmt)).one()
                await s.get(Product, product)
            writer: asyncio.Task[None] | None = None
            app.cancel_before_post_commit(lambda: writer)
            session = app.factory()

            async def write() -> None:
                p = await session.get(Product, product, populate_existing=True)
                assert p is not None
                p.price = Decimal("2.00")
                await session.commit()

            writer = asyncio.create_task(write())
            done = await asyncio.gather(writer, return_exceptions=True)
            out["writer"] = done[0]
            app.seams.close()
            out["marks_after_cancel"] = writers_left(redis_client, app.cache, "products")
            # until the session ends, this process reads products from the database
            out["undelivered"] = set(app.cache._core.undelivered)
            out["db"] = db_price(shop_engine, product)
            # the cancelled session is closed by the application and its connection returns
            await session.close()
            out["checked_out"] = app.engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            prices = []
            app.statements.clear()
            for _ in range(3):
                async with app.factory() as s:
                    prices.append((await s.scalars(stmt)).one().price)
                    got = await s.get(Product, product)
                    assert got is not None
                    prices.append(got.price)
            out["prices"] = prices
            out["selects"] = app.selects()
            out["marks_at_end"] = writers_left(redis_client, app.cache, "products")
        return out

    out = asyncio.run(main())
    assert isinstance(out["writer"], asyncio.CancelledError), out
    assert out["db"] == Decimal("2.00")
    assert out["undelivered"] == {"products"}, out
    assert out["checked_out"] == 0, out
    assert out["prices"] == [Decimal("2.00")] * 6, out
    # the first round fills both entries, the later rounds are hits
    assert out["selects"] == 2, out
    assert out["marks_at_end"] == 0, out


@pytest.mark.parametrize("how", ["query", "entity"])
def test_a_read_from_before_a_cancelled_commit_is_not_stored_as_current(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    how: str,
) -> None:
    """Guarantee 2 when the writer's task is cancelled between Postgres's COMMIT and the
    post-commit script (the cancellation lands while that script's connection connects).

    A reader captures the versions after the writer's flush and reads the row before its
    commit (1.00); its fill is held until the writer's task was cancelled and its session
    closed. The fill must be refused: every later reader gets the committed 2.00.
    """
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def main() -> tuple[Decimal, list[Decimal]]:
        async with async_app(database_url, redis_url, namespace) as app:
            held = HeldFill(app)
            flushed, reader_read, writer_over = held.flushed, held.reader_read, held.writer_over
            writer: asyncio.Task[None] | None = None
            unarm: list[Callable[[], None]] = []

            async def read(s: Any) -> Decimal:
                return await price_by(how, s, stmt, product)

            async def write() -> None:
                async with app.factory() as s:
                    p = await s.get(Product, product)
                    assert p is not None
                    p.price = Decimal("2.00")
                    await s.flush()
                    flushed.set()
                    await reader_read.wait()
                    unarm.append(app.cancel_before_post_commit(lambda: writer))
                    await s.commit()

            writer = asyncio.create_task(write())
            reading = asyncio.create_task(held.read(read))
            await asyncio.gather(writer, return_exceptions=True)  # cancelled, session closed
            unarm[0]()
            writer_over.set()
            before = await reading  # read before the commit: 1.00, its fill sent now
            later = []
            for _ in range(2):
                async with app.factory() as s:
                    later.append(await read(s))
            return before, later

    before, later = asyncio.run(main())
    assert before == Decimal("1.00")
    assert db_price(shop_engine, product) == Decimal("2.00")
    assert later == [Decimal("2.00")] * 2


# -- Redis dies in the middle of a call ----------------------------------------------------

COMMIT_SHA = scripts.script("commit").sha
LOOK_SHA = scripts.script("look").sha


@pytest.mark.parametrize("point", ["look", "post-commit"])
def test_redis_killed_in_the_middle_of_a_call_degrades_to_the_database(
    database_url: str, namespace: str, product: int, shop_engine: sa.Engine, point: str
) -> None:
    """Redis is SIGKILLed as one of the cache's asyncio round trips is about to be sent.

    Nothing raises; reads give the database's value while it is away; restarted from its
    AOF (with the entries of 1.00 back), it serves the committed 2.00.
    """
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def read(app: App) -> tuple[Decimal, Decimal]:
        async with app.factory() as s:
            by_query = (await s.scalars(stmt)).one().price
        async with app.factory() as s:
            got = await s.get(Product, product)
            assert got is not None
            return by_query, got.price

    async def main(server: RedisServer) -> list[tuple[Decimal, Decimal]]:
        seen = []
        async with async_app(database_url, server.url, namespace) as app:
            seen.append(await read(app))  # filled
            seen.append(await read(app))  # hits

            def kill_at(trip: list[tuple[str, ...]]) -> None:
                shas = {c[1] for c in trip if c[0].upper() == "EVALSHA"}
                looks = LOOK_SHA in shas or any(c[0].upper() == "MGET" for c in trip)
                if (COMMIT_SHA in shas) if point == "post-commit" else looks:
                    app.tap.remove(kill_at)
                    server.kill()

            app.tap.listen(kill_at)
            if point == "look":
                # the entry was invalidated elsewhere: this read's look meets a dead server
                with shop_engine.begin() as conn:
                    conn.execute(
                        sa.text("UPDATE products SET price = 2.00 WHERE id = :i"), {"i": product}
                    )
                seen.append(await read(app))  # cached 1.00 or the database's 2.00: no error
                server.restart()
                async with app.factory() as s:
                    p = await s.get(Product, product, populate_existing=True)
                    assert p is not None
                    p.price = Decimal("2.00")
                    p.name = "scratch again"
                    await s.commit()
            else:
                async with app.factory() as s:
                    p = await s.get(Product, product)
                    assert p is not None
                    p.price = Decimal("2.00")
                    await s.commit()  # the post-commit script meets a dead server
                seen.append(await read(app))
                server.restart()
            seen.append(await read(app))
            seen.append(await read(app))
        return seen

    with RedisServer(appendonly=True, appendfsync="always") as server:
        seen = asyncio.run(main(server))
    assert seen[:2] == [(Decimal("1.00"),) * 2] * 2
    assert seen[-2:] == [(Decimal("2.00"),) * 2] * 2, seen
    if point == "post-commit":
        assert seen[2] == (Decimal("2.00"),) * 2, seen


def test_a_redis_that_stops_answering_degrades_fifty_concurrent_reads_to_the_database(
    database_url: str, namespace: str, product: int, shop_engine: sa.Engine
) -> None:
    """Redis is SIGSTOPped (it accepts nothing, answers nothing) with the entries of 1.00
    cached and 2.00 committed meanwhile by a write the cache saw fail: 50 concurrent
    reads on one loop give 2.00, none raises, and the loop is not stuck meanwhile."""
    stmt = select(Product).where(Product.id == product).options(FromCache())

    async def main(server: RedisServer) -> tuple[list[Any], dict[str, Any]]:
        # the short timeouts Cache(url) sets
        url = f"{server.url}?socket_timeout=0.25&socket_connect_timeout=0.25"
        async with async_app(database_url, url, namespace) as app:
            async with app.factory() as s:
                (await s.scalars(stmt)).one()
            os.kill(server.pid or 0, signal.SIGSTOP)
            await app.aclient.connection_pool.disconnect()
            try:
                async with app.factory() as s:
                    p = await s.get(Product, product, populate_existing=True)
                    assert p is not None
                    p.price = Decimal("2.00")
                    await s.commit()  # its marks and post-commit time out: undelivered

                async def read() -> Any:
                    async with app.factory() as s:
                        return (await s.scalars(stmt)).one().price

                got = await asyncio.wait_for(
                    asyncio.gather(*(read() for _ in range(50)), return_exceptions=True), 30
                )
            finally:
                os.kill(server.pid or 0, signal.SIGCONT)
            return got, app.cache.stats()["total"]

    with RedisServer() as server:
        got, total = asyncio.run(main(server))
    assert got == [Decimal("2.00")] * 50, got
    assert total["errors"] >= 1


def test_a_commit_under_asyncio_waits_for_a_silent_local_holder_on_a_short_timeout_client(
    database_url: str, redis_url: str, namespace: str, product: int, redis_client: redis.Redis
) -> None:
    """Strict local tiers: a commit returns once every holder acknowledged or its lease
    ended. A holder that stopped answering (as a SIGSTOPped process) is planted in the
    table's holder set with 0.6 s of lease left. The application's asyncio client has a
    short socket timeout (0.05 s), its sync client none: the acknowledgement waits must
    be sliced for the client they run on, or the first times out and the commit returns
    at once, its holder unwaited for."""

    def redis_ms() -> int:
        seconds, micros = redis_client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def main() -> tuple[int, int, dict[str, Any]]:
        engine = create_async_engine(async_url(database_url))
        client = redis.Redis.from_url(redis_url)
        aclient = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.05)
        cache = Cache(client, async_client=aclient, namespace=namespace)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            lease_end = redis_ms() + 600
            redis_client.zadd(cache.keys.holders_key("products"), {"silent-holder": lease_end})
            async with factory() as s:
                p = await s.get(Product, product)
                assert p is not None
                p.price = Decimal("2.00")
                await s.commit()
                # by the server's clock, which the lease is measured on: a busy machine
                # may take any time between the plant and the commit
                returned = redis_ms()
            return lease_end, returned, cache.stats()["total"]
        finally:
            cache.detach()
            client.close()
            await aclient.aclose()
            await engine.dispose()

    lease_end, returned, total = asyncio.run(main())
    assert total["errors"] == 0, total
    assert returned >= lease_end, (returned, lease_end)


# -- two event loops, one cache ------------------------------------------------------------


@pytest.mark.parametrize("local", [False, True])
def test_two_event_loops_in_two_threads_share_one_cache(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    local: bool,
) -> None:
    """One ``Cache(url)``; each thread runs its own loop, engine and ``async_sessionmaker``.

    The threads take turns (a barrier between steps): one writes, the other, after the
    commit returned, reads the new price through both entries; then the other way round.
    Each loop gets its own asyncio client; closing one leaves the other's working.
    """
    cache = Cache(redis_url, namespace=namespace, local=local)
    turns = threading.Barrier(2, timeout=30)
    stmt = select(Product).where(Product.id == product).options(FromCache())
    seen: dict[int, list[Decimal]] = {0: [], 1: []}
    errors: list[BaseException] = []

    async def read(factory: async_sessionmaker[Any]) -> list[Decimal]:
        async with factory() as s:
            by_query = (await s.scalars(stmt)).one().price
        async with factory() as s:
            got = await s.get(Product, product)
            assert got is not None
            return [by_query, got.price]

    async def main(me: int) -> None:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            for step, price in enumerate(("2.00", "3.00", "4.00", "5.00")):
                writer = step % 2
                await read(factory)  # fills, or a Redis hit the local tier keeps
                seen[me] += await read(factory)  # a hit (in the local tier, with local=True)
                turns.wait()
                if me == writer:
                    async with factory() as s:
                        p = await s.get(Product, product)
                        assert p is not None
                        p.price = Decimal(price)
                        await s.commit()
                turns.wait()  # the commit returned
                seen[me] += await read(factory)
                turns.wait()
            client = cache._core.async_client()
            await cache.aclose()
            assert client is not cache._core.async_client()  # a new one for this loop
        finally:
            await cache.aclose()
            await engine.dispose()

    def run(me: int) -> None:
        try:
            asyncio.run(main(me))
        except BaseException as exc:
            errors.append(exc)
            turns.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        cache.detach()
        cache.client.close()
    assert not errors, errors
    expected = []
    for before, after in (("1.00", "2.00"), ("2.00", "3.00"), ("3.00", "4.00"), ("4.00", "5.00")):
        expected += [Decimal(before)] * 2 + [Decimal(after)] * 2
    assert seen[0] == seen[1] == expected
    assert db_price(shop_engine, product) == Decimal("5.00")
    assert (cache.stats()["total"]["local_hits"] > 0) == local


# -- a COMMIT whose outcome the application never learns ----------------------------------

HOLD_LOCK = 7_306_211  # the advisory lock a held COMMIT waits for


@pytest.fixture
def gauge(engine: sa.Engine) -> Iterator[Any]:
    """A private cache-aside model whose COMMIT of a row named 'hold' waits, in a deferred
    constraint trigger, for the advisory lock ``HOLD_LOCK``; the trigger swallows the
    cancel request psycopg sends when the committing task is cancelled, so that COMMIT
    then succeeds while the client raises ``CancelledError``: a commit whose outcome the
    application does not learn (as after a connection lost during COMMIT)."""

    class Base(DeclarativeBase):
        pass

    class Gauge(Base):
        __tablename__ = "review_async_gauges"
        __cache__ = CachePolicy(strategy="cache_aside", ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        value: Mapped[int]

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
                CREATE OR REPLACE FUNCTION review_async_hold() RETURNS trigger AS $$
                BEGIN
                    BEGIN
                        PERFORM pg_advisory_xact_lock({HOLD_LOCK});
                    EXCEPTION WHEN query_canceled THEN
                        NULL;
                    END;
                    RETURN NULL;
                END $$ LANGUAGE plpgsql
                """
            )
        )
        conn.execute(
            sa.text(
                "CREATE CONSTRAINT TRIGGER review_async_hold AFTER UPDATE ON review_async_gauges "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.name = 'hold') "
                "EXECUTE FUNCTION review_async_hold()"
            )
        )
        conn.execute(sa.insert(Gauge).values(id=1, name="plain", value=1))
    try:
        yield Gauge
    finally:
        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP FUNCTION IF EXISTS review_async_hold()"))
        Base.registry.dispose()
        del Gauge, Base
        gc.collect()


def test_a_read_from_before_a_commit_of_unknown_outcome_is_not_stored_as_current(
    database_url: str, redis_url: str, namespace: str, engine: sa.Engine, gauge: Any
) -> None:
    """The writer's task is cancelled while Postgres runs its COMMIT, which succeeds.

    SQLAlchemy raises ``CancelledError`` from ``commit()`` and the session ends as if it
    had rolled back. A reader that captured the versions after the writer's flush and read
    the row before the COMMIT (value 1) fills after that: the fill must be refused, as it
    would be after a commit the session saw, since the database holds value 2.
    """
    stmt = select(gauge).where(gauge.id == 1).options(FromCache())

    async def main() -> tuple[int, list[int]]:
        async with async_app(database_url, redis_url, namespace) as app:
            held = HeldFill(app)
            flushed, reader_read, writer_over = held.flushed, held.reader_read, held.writer_over

            async def write() -> None:
                async with app.factory() as s:
                    g = await s.get(gauge, 1)
                    g.value, g.name = 2, "hold"
                    await s.flush()
                    flushed.set()
                    await reader_read.wait()
                    await s.commit()  # waits in the trigger, then is cancelled

            async def value(s: Any) -> int:
                return (await s.scalars(stmt)).one().value  # type: ignore[no-any-return]

            async with app.factory() as s:  # filled with 1
                assert (await s.scalars(stmt)).one().value == 1
            with engine.connect() as holder:
                holder.execute(sa.text(f"SELECT pg_advisory_lock({HOLD_LOCK})"))
                writer = asyncio.create_task(write())
                reading = asyncio.create_task(held.read(value))
                await reader_read.wait()
                # the writer's COMMIT is inside Postgres, waiting for the lock
                while not holder.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND objid = :k AND NOT granted"
                    ),
                    {"k": HOLD_LOCK},
                ):
                    await asyncio.sleep(0.01)  # polls a condition (no event reaches here)
                writer.cancel()
                outcome = await asyncio.gather(writer, return_exceptions=True)
                holder.execute(sa.text(f"SELECT pg_advisory_unlock({HOLD_LOCK})"))
                holder.commit()
            assert isinstance(outcome[0], asyncio.CancelledError), outcome
            writer_over.set()
            before = await reading
            later = []
            for _ in range(2):
                async with app.factory() as s:
                    later.append((await s.scalars(stmt)).one().value)
            return before, later

    # The scenario needs the COMMIT to succeed. On a loaded machine the driver's cancel
    # request has been seen to reach it after the trigger (which swallows it there), and
    # the COMMIT then rolls back: nothing changed, so the scenario is played again.
    for _ in range(3):
        before, later = asyncio.run(main())
        with engine.connect() as conn:
            committed = conn.scalar(sa.text("SELECT value FROM review_async_gauges WHERE id = 1"))
        if committed == 2:
            break
        assert committed == 1, committed
        assert later == [1, 1], later
    assert committed == 2, "the COMMIT was meant to succeed (3 tries)"
    assert before == 1
    assert later == [2, 2]


def test_a_reader_cancelled_between_its_database_read_and_its_fill_leaves_no_lease(
    database_url: str, redis_url: str, namespace: str, product: int, redis_client: redis.Redis
) -> None:
    """The lease holder's task is cancelled (from another task, as a timeout does) after
    its database read, before its fill: the lease goes with it, so the next reader neither
    waits ``lease_wait`` nor finds anything but the row; the pool gets its connection back."""
    stmt = select(Product).where(Product.id == product).options(FromCache(lease_wait=5))

    async def main() -> tuple[Any, list[bytes], Decimal, dict[str, Any], int]:
        async with async_app(database_url, redis_url, namespace) as app:
            read_done = asyncio.Event()
            never = asyncio.Event()

            def park() -> None:
                read_done.set()
                await_(never.wait())  # the cancellation lands here

            remove = app.seams.after_database_read(park)

            async def read() -> Decimal:
                async with app.factory() as s:
                    return (await s.scalars(stmt)).one().price  # type: ignore[no-any-return]

            reader = asyncio.create_task(read())
            await read_done.wait()
            reader.cancel()
            outcome = (await asyncio.gather(reader, return_exceptions=True))[0]
            remove()
            leases = list(redis_client.scan_iter(f"sarc:{namespace}:*:lease"))
            again = await asyncio.wait_for(read(), 2)  # a lease left would hold it 5 s
            checked_out = app.engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            return outcome, leases, again, app.cache.stats()["total"], checked_out

    outcome, leases, again, total, checked_out = asyncio.run(main())
    assert isinstance(outcome, asyncio.CancelledError), outcome
    assert leases == []
    assert again == Decimal("1.00")
    assert total["lease_waits"] == 0
    assert checked_out == 0


# -- write-behind under asyncio ------------------------------------------------------------


def test_write_behind_from_asyncio_queues_reads_its_writes_and_drains(
    database_url: str,
    engine: sa.Engine,
    wb_redis_url: str,
    namespace: str,
    models: Any,
    make_worker: Callable[..., Any],
) -> None:
    """``AsyncSession`` commits of a write-behind model: queued (not in Postgres), read
    back by ``await session.get``, flushed by the worker. A commit whose task is cancelled
    before its enqueue reached Redis queues nothing, says so by raising, and leaves the
    session's engine usable for the next commit of the same row."""
    page_view = models[0]

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with async_app(database_url, wb_redis_url, namespace) as app:
            async with app.factory() as s:
                first = page_view(path="/one", views=1)
                s.add(first)
                await s.commit()
                one = first.id
            out["db_before_drain"] = rows(engine, page_view)
            async with app.factory() as s:
                got = await s.get(page_view, one)
                out["queued"] = (got.path, got.views)
                got.views = 2
                await s.commit()

            writer: asyncio.Task[None] | None = None
            unarm = app.cancel_before_post_commit(lambda: writer)
            lost = page_view(path="/lost", views=9)

            async def write() -> None:
                async with app.factory() as s:
                    s.add(lost)
                    await s.commit()

            writer = asyncio.create_task(write())
            out["cancelled"] = (await asyncio.gather(writer, return_exceptions=True))[0]
            unarm()
            async with app.factory() as s:
                out["lost_read"] = await s.get(page_view, lost.id)
                again = page_view(id=lost.id, path="/lost", views=10)
                s.add(again)
                await s.commit()
            async with app.factory() as s:
                got = await s.get(page_view, lost.id)
                out["again_read"] = (got.path, got.views)
        return out

    out = asyncio.run(main())
    assert out["db_before_drain"] == {}
    assert out["queued"] == ("/one", 1)
    assert isinstance(out["cancelled"], asyncio.CancelledError), out
    assert out["lost_read"] is None
    assert out["again_read"] == ("/lost", 10)
    worker = make_worker()
    drain(worker)
    found = rows(engine, page_view)
    assert sorted(found.values()) == [("/lost", 10), ("/one", 2)]


# -- cache.cached on what is not a plain function ------------------------------------------


def test_cached_partials_and_callable_objects_degrade_and_are_awaited(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``functools.partial`` (sync or async) whose result the codec refuses is returned
    uncached with the usual warning, instead of an ``AttributeError`` from the warning
    (a partial has no ``__qualname__``); an object with an ``async def __call__`` gets the
    async wrapper, so its results are cached over the asyncio client."""
    cache = Cache(redis_url, namespace=namespace)
    calls: list[str] = []

    def lookup(table: str, key: int) -> object:
        calls.append(table)
        return object()  # no codec takes it

    async def alookup(table: str, key: int) -> object:
        return lookup(table, key)

    class Rate:
        async def __call__(self, currency: str) -> int:
            calls.append(currency)
            return 3

    sync_partial = cache.cached("lookup")(functools.partial(lookup, "t"))
    async_partial = cache.cached("alookup")(functools.partial(alookup, "a"))
    rate = cache.cached("rate")(Rate())

    async def main() -> list[Any]:
        try:
            return [await async_partial(1), await rate("EUR"), await rate("EUR")]
        finally:
            await cache.aclose()

    try:
        with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
            first = sync_partial(1)
            out = asyncio.run(main())
    finally:
        cache.client.close()
    assert type(first) is object
    assert type(out[0]) is object
    assert out[1:] == [3, 3]
    assert calls == ["t", "a", "EUR"]  # the second rate("EUR") was a hit
    named = [r.getMessage() for r in caplog.records if "results not cached" in r.getMessage()]
    assert any("partial(" in message for message in named), named
