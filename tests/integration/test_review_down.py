"""Review probes of failure handling: Redis cut off from one process while it commits, then
back with the same data (no restart for the run id check to notice), through every commit
path, with the database (a plain session) as the oracle (docs/guarantees.md, "Redis
outages").

The writer reaches Redis through :class:`CutProxy`; the reader, another "process" (a cache
of its own on an engine of its own), reaches it directly and never sees the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from tests.support import close_cache_and_engine

if TYPE_CHECKING:
    from sa_redis_cache.redis_io import RedisIO


class CutProxy:
    """Forwards 127.0.0.1:<port> to a Redis server; :meth:`cut` drops every connection and
    refuses new ones (a network partition of this one client), :meth:`mend` ends it."""

    def __init__(self, port: int) -> None:
        self.upstream = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def mend(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut or self._closed
            if refused:
                downstream.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [downstream, upstream]
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False) as started:
        yield started


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[CutProxy]:
    cut = CutProxy(server.port)
    yield cut
    cut.close()


class Pair:
    """The writer's cache (through the proxy) and the reader's (direct), one namespace."""

    def __init__(self, engine: sa.Engine, server: RedisServer, proxy: CutProxy) -> None:
        self.writer_engine = sa.create_engine(engine.url)
        self.reader_engine = sa.create_engine(engine.url)
        self.writer = Cache(proxy.url, namespace="review", breaker_threshold=1, breaker_reset=0)
        self.reader = Cache(server.url, namespace="review")
        self.write = sessionmaker(self.writer_engine)
        self.read = sessionmaker(self.reader_engine)
        self.writer.attach(self.write)
        self.reader.attach(self.read)

    def close(self) -> None:
        self.writer.detach()
        self.reader.detach()
        self.writer_engine.dispose()
        self.reader_engine.dispose()


@pytest.fixture
def pair(shop_engine: sa.Engine, server: RedisServer, proxy: CutProxy) -> Iterator[Pair]:
    made = Pair(shop_engine, server, proxy)
    yield made
    made.close()


def oracle(engine: sa.Engine, pid: int) -> Decimal:
    with Session(engine) as s:
        got = s.scalar(sa.select(Product.price).where(Product.id == pid))
        assert got is not None
        return got


def cached_prices(factory: sessionmaker[Session], pid: int) -> tuple[Decimal, Decimal]:
    with factory() as s:
        by_query = s.scalars(sa.select(Product).where(Product.id == pid).options(FromCache())).one()
        price = by_query.price
    with factory() as s:
        got = s.get(Product, pid)
        assert got is not None
        return price, got.price


PRODUCTS = cast("sa.Table", Product.__table__)
UPDATE_TEXT = sa.text("UPDATE products SET price = :p WHERE id = :i")


def _orm(factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal) -> None:
    with factory() as s:
        p = s.get(Product, pid, populate_existing=True)
        assert p is not None
        p.price = price
        s.commit()


def _bulk(factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal) -> None:
    with factory() as s:
        s.execute(sa.update(Product).where(Product.id == pid).values(price=price))
        s.commit()


def _core(factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(PRODUCTS).where(Product.id == pid).values(price=price))


def _text(factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE products SET price = :p WHERE id = :i"), {"p": price, "i": pid}
        )


def _commit_as_you_go(
    factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal
) -> None:
    with engine.connect() as conn:
        conn.execute(sa.update(PRODUCTS).where(Product.id == pid).values(price=price))
        conn.commit()


def _session_text(
    factory: sessionmaker[Session], engine: sa.Engine, pid: int, price: Decimal
) -> None:
    with factory() as s:
        s.execute(UPDATE_TEXT, {"p": price, "i": pid})
        s.commit()


WRITES: dict[str, Callable[[sessionmaker[Session], sa.Engine, int, Decimal], None]] = {
    "orm": _orm,
    "bulk": _bulk,
    "core": _core,
    "text": _text,
    "commit_as_you_go": _commit_as_you_go,
    "session_text": _session_text,
}


@pytest.mark.parametrize("path", sorted(WRITES))
def test_a_commit_while_cut_off_is_never_served_stale_after(
    pair: Pair, proxy: CutProxy, shop_engine: sa.Engine, product: int, path: str
) -> None:
    assert cached_prices(pair.read, product) == (Decimal("1.00"), Decimal("1.00"))
    assert cached_prices(pair.write, product) == (Decimal("1.00"), Decimal("1.00"))
    proxy.cut()
    WRITES[path](pair.write, pair.writer_engine, product, Decimal("2.00"))
    assert oracle(shop_engine, product) == Decimal("2.00")
    assert cached_prices(pair.write, product) == (Decimal("2.00"), Decimal("2.00"))
    proxy.mend()
    # the writer trusts the cache again only once its write is delivered
    assert cached_prices(pair.write, product) == (Decimal("2.00"), Decimal("2.00"))
    assert pair.writer._core.undelivered == set()
    # and then the reader, who never saw the outage, must see it too
    assert cached_prices(pair.read, product) == (Decimal("2.00"), Decimal("2.00"))


@contextlib.contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """The server stopped (SIGSTOP): connections stay open, nothing answers."""
    import os
    import signal

    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_hung_redis_costs_a_commit_and_a_read_timeouts_only(
    shop_engine: sa.Engine, server: RedisServer, product: int
) -> None:
    import time

    cache = Cache(server.url, namespace="review", breaker_threshold=100)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        assert cached_prices(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        with hung(server):
            started = time.monotonic()
            _orm(factory, shop_engine, product, Decimal("2.00"))
            commit_took = time.monotonic() - started
            started = time.monotonic()
            assert cached_prices(factory, product) == (Decimal("2.00"), Decimal("2.00"))
            read_took = time.monotonic() - started
            started = time.monotonic()
            _core(factory, shop_engine, product, Decimal("3.00"))
            core_took = time.monotonic() - started
        assert cached_prices(factory, product) == (Decimal("3.00"), Decimal("3.00"))
        # a few calls of 0.25 s each (docs/guarantees.md, "Writes still try Redis")
        assert max(commit_took, read_took, core_took) < 2.0
    finally:
        cache.detach()


ASYNC_WRITES = ("orm", "core", "text", "bulk")


@pytest.mark.parametrize("path", ASYNC_WRITES)
def test_an_async_commit_while_cut_off_is_never_served_stale_after(
    pair: Pair, proxy: CutProxy, shop_engine: sa.Engine, database_url: str, product: int, path: str
) -> None:
    from tests.modes import async_url

    stmt = sa.select(Product).where(Product.id == product).options(FromCache())

    async def main() -> list[tuple[Decimal, Decimal]]:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(proxy.url, namespace="review", breaker_threshold=1, breaker_reset=0)
        factory = async_sessionmaker(engine)
        cache.attach(factory)

        async def prices() -> tuple[Decimal, Decimal]:
            async with factory() as s:
                by_query = (await s.scalars(stmt)).one().price
            async with factory() as s:
                got = await s.get(Product, product)
                assert got is not None
                return by_query, got.price

        async def write(price: Decimal) -> None:
            if path == "orm":
                async with factory() as s:
                    p = await s.get(Product, product, populate_existing=True)
                    assert p is not None
                    p.price = price
                    await s.commit()
            elif path == "bulk":
                async with factory() as s:
                    await s.execute(
                        sa.update(Product).where(Product.id == product).values(price=price)
                    )
                    await s.commit()
            elif path == "core":
                async with engine.begin() as conn:
                    await conn.execute(
                        sa.update(PRODUCTS).where(Product.id == product).values(price=price)
                    )
            else:
                async with engine.begin() as conn:
                    await conn.execute(
                        sa.text("UPDATE products SET price = :p WHERE id = :i"),
                        {"p": price, "i": product},
                    )

        seen = []
        try:
            seen.append(await prices())
            proxy.cut()
            await write(Decimal("2.00"))
            seen.append(await prices())
            proxy.mend()
            seen.append(await prices())
            assert cache._core.undelivered == set()
        finally:
            await close_cache_and_engine(cache, engine)
        return seen

    assert cached_prices(pair.read, product) == (Decimal("1.00"), Decimal("1.00"))
    seen = asyncio.run(main())
    assert oracle(shop_engine, product) == Decimal("2.00")
    assert seen == [(Decimal("1.00"),) * 2, (Decimal("2.00"),) * 2, (Decimal("2.00"),) * 2]
    assert cached_prices(pair.read, product) == (Decimal("2.00"), Decimal("2.00"))


@pytest.mark.parametrize("path", ["orm", "core", "text"])
def test_the_local_tier_of_a_cut_off_writer_serves_nothing_it_wrote(
    shop_engine: sa.Engine, proxy: CutProxy, product: int, path: str
) -> None:
    cache = Cache(proxy.url, namespace="review", local=True, breaker_threshold=100)
    engine = sa.create_engine(shop_engine.url)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10)
        for _ in range(2):
            assert cached_prices(factory, product) == (Decimal("1.00"), Decimal("1.00"))
        proxy.cut()
        WRITES[path](factory, engine, product, Decimal("2.00"))
        assert cached_prices(factory, product) == (Decimal("2.00"), Decimal("2.00"))
        proxy.mend()
        assert cached_prices(factory, product) == (Decimal("2.00"), Decimal("2.00"))
    finally:
        cache.detach()
        engine.dispose()


def test_a_write_that_fails_while_a_delivery_is_in_flight_stays_undelivered(
    shop_engine: sa.Engine, server: RedisServer, product: int
) -> None:
    """Thread A delivers the undelivered tables; while its bump is on the wire, thread B
    commits and its invalidation fails (B's connection lost, A's not). B's table must stay
    undelivered: A's bump landed before B's commit, so it retired nothing B wrote.

    The seam runs B's whole story (another process's fill, B's database commit, B's failed
    invalidation, as ``cache_aside`` reports it) right after A's bump returned from Redis
    and before A records the delivery.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError

    cache = Cache(server.url, namespace="review", breaker_threshold=100)
    other = Cache(server.url, namespace="review")
    plain, mine, others = (sa.create_engine(shop_engine.url) for _ in range(3))
    factory, other_factory = sessionmaker(mine), sessionmaker(others)
    cache.attach(factory)
    other.attach(other_factory)
    core = cache._core
    real_io = core.io
    try:
        core.keep_undelivered({"products"})  # an earlier failed write of A's process

        class Io:
            def __init__(self, io: Any) -> None:
                self._io = io

            def __getattr__(self, name: str) -> Any:
                return getattr(self._io, name)

            def run_batch(self, calls: Any) -> Any:
                got = self._io.run_batch(calls)
                core.io = real_io  # type: ignore[method-assign]  # once
                # B: a reader elsewhere fills 1.00 under the bumped versions, then B
                # commits 2.00 and its invalidation does not reach Redis
                assert cached_prices(other_factory, product) == (Decimal("1.00"),) * 2
                with plain.begin() as conn:  # B's engine: its Core hook is B's, failing
                    conn.execute(sa.update(PRODUCTS).where(Product.id == product).values(price=2))
                core.invalidation_failed(RedisConnectionError("B's connection lost"), ["products"])
                return got

        core.io = lambda: cast("RedisIO", Io(real_io()))  # type: ignore[method-assign]
        core.deliver_undelivered()
        core.io = real_io  # type: ignore[method-assign]
        assert oracle(shop_engine, product) == Decimal("2.00")
        assert cached_prices(factory, product) == (Decimal("2.00"), Decimal("2.00"))
        assert cached_prices(other_factory, product) == (Decimal("2.00"), Decimal("2.00"))
        assert core.undelivered == set()
    finally:
        core.io = real_io  # type: ignore[method-assign]
        cache.detach()
        other.detach()
        for engine in (plain, mine, others):
            engine.dispose()


def test_a_half_open_probe_records_its_region_before_it_fills(
    shop_engine: sa.Engine, proxy: CutProxy, product: int
) -> None:
    """The region of a FromCache read is recorded in Redis before the read (so that
    ``invalidate_region`` knows its table). While the breaker is not closed the record is
    skipped; the read that then takes the half-open probe must not fill an entry that
    ``invalidate_region`` cannot find."""
    # reset 0: the read after a failure is the half-open probe, no clock needed
    cache = Cache(proxy.url, namespace="review", breaker_threshold=1, breaker_reset=0)
    engine = sa.create_engine(shop_engine.url)
    factory = sessionmaker(engine)
    cache.attach(factory)
    stmt = sa.select(Product).where(Product.id == product).options(FromCache(region="prices"))

    def price() -> Decimal:
        with factory() as s:
            return s.scalars(stmt).one().price

    try:
        proxy.cut()
        assert price() == Decimal("1.00")  # Redis fails: the breaker opens
        assert cache.inspector.breaker_openings() == 1
        assert cache.inspector.breaker_state() == "half-open"  # reset 0: its probe is due
        proxy.mend()
        assert price() == Decimal("1.00")  # the probe: a miss, filled
        assert cache.inspector.breaker_state() == "closed"
        with Session(shop_engine) as s:  # a write the cache does not see...
            s.execute(sa.update(PRODUCTS).where(PRODUCTS.c.id == product).values(price=5))
            s.commit()
        cache.invalidate_region("prices")  # ...and the invalidation the docs prescribe
        assert oracle(shop_engine, product) == Decimal("5.00")
        assert price() == Decimal("5.00")
    finally:
        cache.detach()
        engine.dispose()


def _rename(path: str, factory: sessionmaker[Session], engine: sa.Engine, name: str) -> None:
    """A write of another table (categories) through ``path``."""
    categories = cast("sa.Table", Category.__table__)
    if path == "orm":
        with factory() as s:
            c = s.get(Category, 3, populate_existing=True)
            assert c is not None
            c.name = name
            s.commit()
    elif path == "bulk":
        with factory() as s:
            s.execute(sa.update(Category).where(Category.id == 3).values(name=name))
            s.commit()
    elif path == "core":
        with engine.begin() as conn:
            conn.execute(sa.update(categories).where(categories.c.id == 3).values(name=name))
    else:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE categories SET name = :n WHERE id = 3"), {"n": name})


@pytest.mark.parametrize("path", ["orm", "bulk", "core", "text"])
def test_the_next_write_of_another_table_delivers_the_undelivered_ones(
    pair: Pair, proxy: CutProxy, shop_engine: sa.Engine, product: int, category: int, path: str
) -> None:
    """docs/guarantees.md: delivery is tried before every later write of the process."""
    assert cached_prices(pair.read, product) == (Decimal("1.00"), Decimal("1.00"))
    proxy.cut()
    _orm(pair.write, pair.writer_engine, product, Decimal("2.00"))
    proxy.mend()
    _rename(path, pair.write, pair.writer_engine, f"renamed-{path}")
    assert pair.writer._core.undelivered == set()
    assert oracle(shop_engine, product) == Decimal("2.00")
    assert cached_prices(pair.read, product) == (Decimal("2.00"), Decimal("2.00"))


def test_concurrent_readers_through_an_outage_and_the_half_open_probe(
    shop_engine: sa.Engine, proxy: CutProxy, product: int
) -> None:
    """Eight threads read through a cut and its end, with a write committed during the
    cut: each read gives the database's answer, and the breaker closes again."""
    from concurrent.futures import ThreadPoolExecutor

    cache = Cache(proxy.url, namespace="review", breaker_threshold=2, breaker_reset=0)
    engine = sa.create_engine(shop_engine.url, pool_size=10)
    factory = sessionmaker(engine)
    cache.attach(factory)
    barrier = threading.Barrier(8)

    def reader(phase: str) -> tuple[Decimal, Decimal]:
        barrier.wait(10)
        return cached_prices(factory, product)

    try:
        assert cached_prices(factory, product) == (Decimal("1.00"),) * 2
        with ThreadPoolExecutor(8) as pool:
            proxy.cut()
            got = list(pool.map(reader, ["cut"] * 8))
            assert set(got) == {(Decimal("1.00"),) * 2}
            _orm(factory, engine, product, Decimal("2.00"))
            got = list(pool.map(reader, ["cut"] * 8))
            assert set(got) == {(Decimal("2.00"),) * 2}
            proxy.mend()
            for _ in range(3):
                got = list(pool.map(reader, ["back"] * 8))
                assert set(got) == {(Decimal("2.00"),) * 2}
        assert cache.inspector.breaker_state() == "closed"
        assert cache._core.undelivered == set()
        assert cache.stats()["total"]["hits"] > 0
    finally:
        cache.detach()
        engine.dispose()


@pytest.mark.parametrize("call", ["invalidate", "invalidate_model", "invalidate_region", "clear"])
def test_an_explicit_invalidation_against_a_hung_redis_raises_within_its_timeout(
    shop_engine: sa.Engine, server: RedisServer, product: int, call: str
) -> None:
    """configuration.md: the invalidate* methods raise the Redis error when Redis fails."""
    import time

    from redis.exceptions import RedisError

    cache = Cache(server.url, namespace="review", local=True)
    engine = sa.create_engine(shop_engine.url)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10)
        assert cached_prices(factory, product) == (Decimal("1.00"),) * 2
        calls: dict[str, Callable[[], object]] = {
            "invalidate": lambda: cache.invalidate(Product, product),
            "invalidate_model": lambda: cache.invalidate_model(Product),
            "invalidate_region": lambda: cache.invalidate_region("default"),
            "clear": cache.clear,
        }
        with hung(server):
            started = time.monotonic()
            with pytest.raises(RedisError):
                calls[call]()
            took = time.monotonic() - started
        assert took < 3.0
        calls[call]()  # retried once Redis answers, as the docs say
        with Session(shop_engine) as s:
            s.execute(sa.update(PRODUCTS).where(PRODUCTS.c.id == product).values(price=9))
            s.commit()
        calls[call]()
        by_query, by_get = cached_prices(factory, product)
        assert by_query == Decimal("9.00")
        if call != "invalidate_region":  # entity entries are in no region
            assert by_get == Decimal("9.00")
    finally:
        cache.detach()
        engine.dispose()


def test_an_async_reader_never_reads_stale_after_a_restart_from_old_data(
    shop_engine: sa.Engine, database_url: str, product: int
) -> None:
    """An asyncio process that knew the old server, and a writer that committed while
    Redis was down: Redis comes back from its AOF with the entries of 1.00."""
    from tests.modes import async_url

    stmt = sa.select(Product).where(Product.id == product).options(FromCache())
    with RedisServer(appendonly=True, appendfsync="always") as server:
        writer = Cache(server.url, namespace="review", breaker_threshold=1, breaker_reset=0)
        writer_engine = sa.create_engine(shop_engine.url)
        write = sessionmaker(writer_engine)
        writer.attach(write)

        async def main() -> list[tuple[Decimal, Decimal]]:
            engine = create_async_engine(async_url(database_url))
            cache = Cache(server.url, namespace="review", breaker_threshold=1, breaker_reset=0)
            factory = async_sessionmaker(engine)
            cache.attach(factory)

            async def prices() -> tuple[Decimal, Decimal]:
                async with factory() as s:
                    by_query = (await s.scalars(stmt)).one().price
                async with factory() as s:
                    got = await s.get(Product, product)
                    assert got is not None
                    return by_query, got.price

            seen = []
            try:
                seen.append(await prices())
                seen.append(await prices())
                server.stop()
                await asyncio.to_thread(_orm, write, writer_engine, product, Decimal("2.00"))
                server.start()
                seen.append(await prices())
                seen.append(await prices())
            finally:
                await close_cache_and_engine(cache, engine)
            return seen

        try:
            seen = asyncio.run(main())
        finally:
            writer.detach()
            writer_engine.dispose()
    assert oracle(shop_engine, product) == Decimal("2.00")
    assert seen == [(Decimal("1.00"),) * 2] * 2 + [(Decimal("2.00"),) * 2] * 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_cached_functions_invalidate_while_cut_off_is_delivered_before_its_next_hit(
    shop_engine: sa.Engine, server: RedisServer, proxy: CutProxy, category: int, kind: str
) -> None:
    """The application commits a change, then calls ``f.invalidate(...)``, which cannot
    reach Redis (False). Once Redis answers again, the old result was served until its
    TTL. The process now remembers the failed invalidation: while it cannot deliver it,
    that call runs uncached; once it can, it delivers it first, then reads afresh."""
    cache = Cache(proxy.url, namespace="review", breaker_threshold=1, breaker_reset=0)
    calls: list[int] = []

    def name_of(cid: int) -> str:
        calls.append(cid)
        with Session(shop_engine) as s:
            return s.get_one(Category, cid).name

    @cache.cached("category-name", ttl=600)
    def cached_name(cid: int) -> str:
        return name_of(cid)

    @cache.cached("category-name-async", ttl=600)
    async def acached_name(cid: int) -> str:
        return name_of(cid)

    def on_a_loop(awaitable: Any) -> Any:
        async def run() -> Any:
            try:
                return await awaitable
            finally:
                await cache.aclose()  # the asyncio client it made for this loop

        return asyncio.run(run())

    def call() -> str:
        if kind == "sync":
            return cached_name(category)
        return str(on_a_loop(acached_name(category)))

    def invalidate() -> bool:
        if kind == "sync":
            return cached_name.invalidate(category)
        return bool(on_a_loop(acached_name.ainvalidate(category)))

    try:
        old = call()
        assert call() == old
        assert len(calls) == 1  # the second call was a hit
        with Session(shop_engine) as s:
            s.get_one(Category, category).name = f"{old}-renamed"
            s.commit()
        proxy.cut()
        assert invalidate() is False  # not delivered
        assert call() == f"{old}-renamed"  # while cut off: uncached, nothing stored
        proxy.mend()
        assert call() == f"{old}-renamed"  # the invalidation lands first
        assert call() == f"{old}-renamed"
        prefix = "category-name" if kind == "sync" else "category-name-async"
        assert cache.stats()["functions"][prefix]["bypassed"] >= 1
    finally:
        with Session(shop_engine) as s:
            s.get_one(Category, category).name = old
            s.commit()
        cache.detach()
        cache.client.close()
