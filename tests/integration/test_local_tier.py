"""The local tier (``Cache(local=True)``): hits that ask nobody, and the guarantee kept.

Two caches on one namespace stand for two processes (each has its own engine, Redis
client, invalidation connection and holder id). The hard cases of docs/guarantees.md, "The
local tier", each have a test: an invalidation sitting unread on the connection, a writer
waiting for a holder's acknowledgement, a killed invalidation or control connection, a
restarted server, the breaker, a transaction that wrote the table, REPEATABLE READ. The
multi-process history (a paused process included) is tests/chaos/test_local_history.py.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select as sa_select
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, selectinload, sessionmaker

from devservices import RedisServer
from examples.shop import Category, Order, OrderLine, Product
from sa_redis_cache import Cache, ConfigurationError, FromCache, compat
from sa_redis_cache.protocol import KeyScheme, scripts
from sa_redis_cache.redis_io import RedisIO, client_from_url, split_cluster_url
from tests.modes import async_url
from tests.seams import RedisTap
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from sa_redis_cache.local import LocalTier
    from sa_redis_cache.protocol.scripts import Script

# in every run on the cluster too (as the CI subset of tests/integration/conftest.py)
pytestmark = pytest.mark.cluster

# short leases keep the tests in which a holder stops answering short; everywhere else a
# lease that a listener starved on a busy machine still renews in time (a lapse empties
# the tier, and the test would count the local hits and evictions of an emptied tier)
LEASE = 0.5
STEADY_LEASE = 5.0
WAIT = 10.0


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll the system under test for a state it reaches by itself (a reconnection)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def is_cluster_url(url: str) -> bool:
    return split_cluster_url(url)[1]


def tier_of(cache: Cache) -> LocalTier:
    tier = cache.inspector.local_tier
    assert tier is not None
    return tier


class Process:
    """One cache with a local tier, its own engine and session factory: a process."""

    def __init__(
        self, database_url: str, client: redis.Redis | str, namespace: str, **kwargs: Any
    ) -> None:
        self.engine = sa.create_engine(database_url)
        self.sql = SQLCounter()
        sa.event.listen(self.engine, "before_cursor_execute", self.sql)
        kwargs.setdefault("local_lease", STEADY_LEASE)
        self.cache = Cache(client, namespace=namespace, local=True, **kwargs)
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.factory)
        assert tier_of(self.cache).wait_ready(WAIT)

    @property
    def tier(self) -> LocalTier:
        return tier_of(self.cache)

    def total(self, counter: str) -> int:
        return int(self.cache.stats()["total"][counter])

    def price(self, pid: int, *, get: bool = False) -> Decimal:
        with self.factory() as s:
            if get:
                found = s.get(Product, pid)
                assert found is not None
                return found.price
            stmt = sa_select(Product).where(Product.id == pid).options(FromCache())
            return s.scalars(stmt).one().price

    def hold(self, pid: int, *, get: bool = False) -> None:
        """Read until the row is a local hit (a fill, a Redis hit kept, a local hit)."""
        for _ in range(3):
            self.price(pid, get=get)
        before = self.total("local_hits")
        self.price(pid, get=get)
        assert self.total("local_hits") == before + 1

    def set_price(self, pid: int, price: str) -> None:
        with self.factory() as s:
            s.execute(update(Product).where(Product.id == pid).values(price=Decimal(price)))
            s.commit()

    def close(self) -> None:
        self.cache.detach()
        self.engine.dispose()


@pytest.fixture(params=["single", "cluster"])
def tier_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The Redis of the processes ``spawn`` makes: the run's server, and the run's Redis
    Cluster (tracking, fences and acknowledgements per primary); ``--redis-mode=cluster``
    leaves the server out."""
    chosen = request.config.getoption("--redis-mode")
    marked = request.node.get_closest_marker("cluster") is not None
    if request.param == "cluster":
        if chosen == "single" and not marked:
            pytest.skip("--redis-mode=single")
        url: str = request.getfixturevalue("redis_cluster").url
        return url
    if chosen == "cluster":
        pytest.skip("--redis-mode=cluster")
    return redis_url


@pytest.fixture
def table_node(tier_url: str, namespace: str) -> Iterator[redis.Redis]:
    """A client of the server that keeps the ``products`` table's keys (on a cluster, the
    primary of its slot)."""
    node_url = tier_url
    if is_cluster_url(tier_url):
        scout: Any = client_from_url(tier_url)  # a RedisCluster: the URL says so
        node = scout.get_node_from_key(KeyScheme(namespace).version_key("products"))
        node_url = f"redis://{node.host}:{node.port}/0"
        scout.close()
    client = redis.Redis.from_url(node_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def spawn(
    database_url: str, tier_url: str, namespace: str, shop_engine: sa.Engine
) -> Iterator[Callable[..., Process]]:
    made: list[Process] = []

    def make(**kwargs: Any) -> Process:
        made.append(Process(database_url, tier_url, namespace, **kwargs))
        return made[-1]

    yield make
    for process in made:
        process.close()


# -- what a local hit costs ---------------------------------------------------------------


def _thread_trips(tap: RedisTap) -> list[Any]:
    """The round trips the calling thread sends (the tier's own threads are not counted)."""
    me = threading.get_ident()
    trips: list[Any] = []
    tap.listen(lambda trip: trips.append(trip) if threading.get_ident() == me else None)
    return trips


def test_a_local_hit_runs_no_sql_and_no_redis_command(
    database_url: str, redis_url: str, namespace: str, product: int, sql: SQLCounter
) -> None:
    tap = RedisTap()
    trips = _thread_trips(tap)
    engine = sa.create_engine(database_url)
    cache = Cache(tap.client(redis_url), namespace=namespace, local=True)
    factory = sessionmaker(engine)
    sa.event.listen(engine, "before_cursor_execute", sql)
    cache.attach(factory)
    try:
        assert tier_of(cache).wait_ready(WAIT)
        stmt = sa_select(Product).where(Product.id == product).options(FromCache())
        for _ in range(2):  # a fill, then a Redis hit the tier keeps
            with factory() as s:
                s.scalars(stmt).one()
                s.get(Product, product)
        sql.reset()
        trips.clear()
        with factory() as s:
            assert s.scalars(stmt).one().price == Decimal("1.00")
            got = s.get(Product, product)
            assert got is not None
            assert got.price == Decimal("1.00")
        assert sql.count == 0
        assert trips == []
        assert cache.stats()["total"]["local_hits"] == 2
    finally:
        cache.detach()
        engine.dispose()


def test_a_local_hit_under_asyncio_runs_no_sql_and_no_redis_command(
    database_url: str, redis_url: str, namespace: str, product: int
) -> None:
    tap = RedisTap()
    trips = _thread_trips(tap)
    statements: list[str] = []

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        aclient = tap.async_client(redis_url)
        cache = Cache(tap.client(redis_url), async_client=aclient, namespace=namespace, local=True)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            assert tier_of(cache).wait_ready(WAIT)
            stmt = sa_select(Product).where(Product.id == product).options(FromCache())
            for _ in range(2):
                async with factory() as s:
                    (await s.scalars(stmt)).one()
                    await s.get(Product, product)
            statements.clear()
            trips.clear()
            async with factory() as s:
                assert (await s.scalars(stmt)).one().price == Decimal("1.00")
                got = await s.get(Product, product)
                assert got is not None
            assert statements == []
            assert trips == []
            assert cache.stats()["total"]["local_hits"] == 2
        finally:
            cache.detach()
            await aclient.aclose()
            await engine.dispose()

    asyncio.run(scenario())


def test_asyncio_sessions_hit_the_local_tier_and_see_a_commit_at_once(
    database_url: str, tier_url: str, namespace: str, product: int
) -> None:
    """AsyncSession readers and writers, on one server and on the cluster (each cache
    with its asyncio client): local hits, and a commit the holder drops before it returns."""

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        statements: list[str] = []
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        reader = Cache(tier_url, namespace=namespace, local=True, local_lease=LEASE)
        writer = Cache(tier_url, namespace=namespace, local=True, local_lease=LEASE)
        reads, writes = async_sessionmaker(engine), async_sessionmaker(engine)
        reader.attach(reads)
        writer.attach(writes)
        try:
            assert tier_of(reader).wait_ready(WAIT)
            stmt = sa_select(Product).where(Product.id == product).options(FromCache())
            for _ in range(3):  # a fill, a Redis hit kept, a local hit
                async with reads() as s:
                    (await s.scalars(stmt)).one()
            statements.clear()
            async with reads() as s:
                assert (await s.scalars(stmt)).one().price == Decimal("1.00")
            assert statements == []
            assert reader.stats()["total"]["local_hits"] >= 2
            async with writes() as s:
                await s.execute(update(Product).where(Product.id == product).values(price=8))
                await s.commit()
            async with reads() as s:
                assert (await s.scalars(stmt)).one().price == Decimal("8.00")
            assert writer.stats()["total"]["fence_waits"] == 1  # it waited for the reader
        finally:
            for cache in (reader, writer):
                cache.detach()
                await cache.aclose()
            await engine.dispose()

    asyncio.run(scenario())


def test_session_get_from_the_local_tier_keeps_the_identity_map(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn()
    reader.hold(product, get=True)
    with reader.factory() as s:
        first = s.get(Product, product)
        assert first is not None
        assert s.get(Product, product) is first
        assert first in s
        # any keyword argument goes the ordinary way, and still sees the same object
        assert s.get(Product, product, populate_existing=True) is first
    with reader.factory() as s:
        assert s.get(Product, 10**9) is None
        assert s.get(Product, 10**9) is None


def test_load_listeners_run_for_every_object_a_hit_builds(
    spawn: Callable[..., Process], product: int
) -> None:
    """A hit runs the classes' ``load`` listeners (and reconstructors) once per object it
    builds, as the database load does: from Redis and from the local tier, for a graph of
    two classes (one listened to) and for ``session.get``."""
    process = spawn()
    loaded: list[str] = []

    def on_load(target: Any, _context: Any) -> None:
        loaded.append(type(target).__name__)

    graph = (
        sa_select(Order)
        .options(selectinload(Order.lines), FromCache())
        .where(Order.id <= 4)
        .order_by(Order.id)
    )
    sa.event.listen(OrderLine, "load", on_load)
    sa.event.listen(Product, "load", on_load)
    try:
        counts = []
        for _ in range(4):  # a fill, a Redis hit the tier keeps, two local hits
            loaded.clear()
            with process.factory() as s:
                lines = sum(len(o.lines) for o in s.scalars(graph).all())
                assert s.get(Product, product) is not None
            counts.append((loaded.count("OrderLine"), loaded.count("Product"), lines))
        assert lines > 0
        assert counts == [(lines, 1, lines)] * 4
        assert process.total("local_hits") >= 4
    finally:
        sa.event.remove(OrderLine, "load", on_load)
        sa.event.remove(Product, "load", on_load)


def test_mutable_values_are_never_shared_between_sessions(
    spawn: Callable[..., Process], product: int, shop_engine: sa.Engine
) -> None:
    with Session(shop_engine) as s:
        s.execute(update(Product).where(Product.id == product).values(attributes={"tags": ["a"]}))
        s.commit()
    reader = spawn()
    reader.hold(product)
    stmt = sa_select(Product).where(Product.id == product).options(FromCache())
    with reader.factory() as s:
        s.scalars(stmt).one().attributes["tags"].append("changed in one session")
        got = s.get(Product, product)
        assert got is not None
        got.attributes["new"] = 1
    with reader.factory() as s:
        assert s.scalars(stmt).one().attributes == {"tags": ["a"]}
    assert reader.total("local_hits") >= 2


# -- the guarantee ------------------------------------------------------------------------


class HeldAck:
    """Holds back the holder's acknowledgement of a fence that came with the table's
    changed version (``together``; else with or after it: ``clear()`` deletes, then
    fences, in two round trips), until :attr:`release` is set: the writer cannot return
    meanwhile.

    Another fence is let through: one that ran after a call that met NOSCRIPT (the server
    lost its scripts) is followed by the batch again, under new fences, which the writer
    waits for (``Fences.run``).
    """

    def __init__(self, holder: Process, *, together: bool = True) -> None:
        self.seen, self.release = threading.Event(), threading.Event()
        # an acknowledgement of a fence that came alone was sent
        self.early_sent = threading.Event()
        version = holder.cache.keys.version_key("products").encode()
        tier = holder.tier
        invalidate, take_acks = tier.store.invalidate, tier.take_acks
        listener = tier._listener
        send_acks = listener._send_acks
        real: set[str] = set()
        early: list[tuple[str, str]] = []
        changed = threading.Event()

        def noting(keys: Iterable[bytes | str]) -> None:
            names = [key.encode() if isinstance(key, str) else key for key in keys]
            if version in names and not together:
                changed.set()
            if version in names or changed.is_set():
                real.update(name.decode() for name in names if b":fence:" in name)
            invalidate(names)

        def held_back() -> list[tuple[str, str]]:
            acks = take_acks()
            if any(fence in real for _, fence in acks):
                self.seen.set()
                assert self.release.wait(WAIT)
            early.extend(ack for ack in acks if ack[1] not in real)
            return acks

        def sending() -> None:
            send_acks()
            if early:
                self.early_sent.set()

        tier.store.invalidate = noting  # type: ignore[method-assign]
        tier.take_acks = held_back  # type: ignore[method-assign]
        listener._send_acks = sending  # type: ignore[method-assign]


def held_until_dropped(
    reader: Process, product: int, write: Callable[[], object], held: HeldAck | None = None
) -> Decimal:
    """Run ``write`` in a thread with the reader's acknowledgement held back: it must not
    return before the reader dropped what it changed, which the reader's next read, made
    then, shows. That read's price."""
    held = held or HeldAck(reader)
    returned = threading.Event()

    def run() -> None:
        write()
        returned.set()

    caller = threading.Thread(target=run)
    caller.start()
    try:
        assert held.seen.wait(WAIT), "the holder never saw the write's fence"
        # the holder has dropped the entry and not yet said so: the write has not returned
        assert not returned.is_set(), "the write returned before the holder acknowledged"
        before = reader.sql.count
        price = reader.price(product)
        assert reader.sql.count > before, "the holder served a retired entry"
    finally:
        held.release.set()
        caller.join(WAIT)
    assert returned.is_set()
    return price


def test_a_commit_waits_for_every_holder_to_drop_what_it_changed(
    spawn: Callable[..., Process], product: int
) -> None:
    """The writer's commit returns only after the holder acknowledged its fence."""
    reader = spawn(local_lease=30.0)  # a lease that cannot end during the test
    writer = spawn()
    reader.hold(product)
    assert held_until_dropped(
        reader, product, lambda: writer.set_price(product, "2.00")
    ) == Decimal("2.00")
    assert writer.total("fence_waits") == 1


def test_commit_as_you_go_waits_for_every_holder_before_commit_returns(
    spawn: Callable[..., Process], product: int
) -> None:
    """``Connection.commit()`` on a connection kept open: the fences are waited for as
    the commit returns, not when the pool gets the connection back."""
    reader = spawn(local_lease=30.0)  # a lease that cannot end during the test
    writer = spawn()
    reader.hold(product)
    table = cast("sa.Table", Product.__table__)
    committed = threading.Event()
    go_on = threading.Event()

    def commit_as_you_go() -> None:
        with writer.engine.connect() as conn:
            conn.execute(update(table).where(table.c.id == product).values(price=Decimal("3.00")))
            conn.commit()
            committed.set()
            # the connection stays checked out until the reader has read
            assert go_on.wait(WAIT)

    keeper = threading.Thread(target=commit_as_you_go)
    keeper.start()
    try:
        assert held_until_dropped(reader, product, committed.wait) == Decimal("3.00")
    finally:
        go_on.set()
        keeper.join(WAIT)
    assert writer.total("fence_waits") == 1


@pytest.mark.parametrize(
    "call", ["invalidate", "invalidate_model", "invalidate_table", "invalidate_region", "clear"]
)
def test_an_explicit_invalidation_waits_for_every_holder_to_drop_what_it_retired(
    spawn: Callable[..., Process], product: int, call: str
) -> None:
    """As a commit does: the call returns once the holder acknowledged its fence."""
    reader = spawn(local_lease=30.0)  # a lease that cannot end during the test
    writer = spawn()
    reader.hold(product)
    invalidations: dict[str, Callable[[], object]] = {
        "invalidate": lambda: writer.cache.invalidate(Product, product),
        "invalidate_model": lambda: writer.cache.invalidate_model(Product),
        "invalidate_table": lambda: writer.cache.invalidate_table("products"),
        # the reader recorded the region's table when it filled
        "invalidate_region": lambda: writer.cache.invalidate_region("default"),
        # deletes the entry and its counters: the holder must have dropped it too
        "clear": writer.cache.clear,
    }
    held = HeldAck(reader, together=call != "clear")
    held_until_dropped(reader, product, invalidations[call], held)
    assert writer.total("fence_waits") == 1


def test_on_a_cluster_a_commit_over_two_nodes_waits_for_each_tables_fence(
    database_url: str, tier_url: str, namespace: str, product: int, shop_engine: sa.Engine
) -> None:
    """Each table's fence is reported by its own node, after that node's reports of the
    commit only: the holder's acknowledgement of one table's fence must not release the
    writer while it has not seen another's."""
    if not is_cluster_url(tier_url):
        pytest.skip("one server: one connection carries every fence, in order")
    scout: Any = client_from_url(tier_url)  # a RedisCluster: the URL says so

    def node(ns: str, table: str) -> str:
        return str(scout.get_node_from_key(KeyScheme(ns).version_key(table)).name)

    # a namespace of the test's own whose two tables live on two primaries
    ns = next(
        f"{namespace}n{i}"
        for i in range(200)
        if node(f"{namespace}n{i}", "products") != node(f"{namespace}n{i}", "categories")
    )
    with Session(shop_engine) as s:
        category = Category(name=f"c-{ns}")
        s.add(category)
        s.commit()
        cid = category.id
    reader = Process(database_url, tier_url, ns, local_lease=30.0)
    writer = Process(database_url, tier_url, ns, local_lease=5.0)  # waits up to 5 leases
    try:
        reader.hold(product)
        by_id = sa_select(Category).where(Category.id == cid).options(FromCache())
        for _ in range(3):
            with reader.factory() as s:
                s.scalars(by_id).one()
        hits = reader.total("local_hits")
        with reader.factory() as s:
            s.scalars(by_id).one()
        assert reader.total("local_hits") == hits + 1
        tier, listener = reader.tier, reader.tier._listener
        categories = f"{{{ns}:categories}}"
        held: list[tuple[str, str]] = []
        release = threading.Event()
        products_taken, products_sent = threading.Event(), threading.Event()
        take_acks, send_acks = tier.take_acks, listener._send_acks

        def only_products() -> list[tuple[str, str]]:
            acks = take_acks()
            held.extend(a for a in acks if categories in a[1])
            passed = [a for a in acks if categories not in a[1]]
            if passed:
                products_taken.set()
            if release.is_set():
                passed += held
                held.clear()
            return passed

        def sending() -> None:
            send_acks()
            if products_taken.is_set():
                products_sent.set()

        tier.take_acks = only_products  # type: ignore[method-assign]
        listener._send_acks = sending  # type: ignore[method-assign]
        returned = threading.Event()

        def commit() -> None:
            with writer.factory() as s:
                s.execute(update(Product).where(Product.id == product).values(price=2))
                s.execute(update(Category).where(Category.id == cid).values(name=f"d-{ns}"))
                s.commit()
            returned.set()

        committer = threading.Thread(target=commit)
        committer.start()
        try:
            assert products_sent.wait(WAIT), "the holder never acknowledged the products fence"
            until(lambda: bool(held), "the holder saw the categories fence")
            token = held[0][0]
            # the writer took the products acknowledgement ...
            ack_key = KeyScheme(ns).ack_key(token)
            until(lambda: returned.is_set() or not scout.exists(ack_key), "the ack taken")
            # ... and still waits for the categories one
            assert not returned.wait(0.5), "the commit returned before the categories fence"
        finally:
            release.set()
            listener.wake()
            committer.join(WAIT)
        assert returned.is_set()
        assert reader.price(product) == Decimal("2.00")
    finally:
        reader.close()
        writer.close()
        scout.close()
        with Session(shop_engine) as s:
            s.execute(sa.delete(Category).where(Category.id == cid))
            s.commit()


def test_no_local_hit_while_an_invalidation_sits_unread_on_the_connection(
    spawn: Callable[..., Process], product: int
) -> None:
    """The reading thread applies what the connection holds before it serves: the
    listener thread not having run yet is no excuse."""
    reader = spawn(local_lease=30.0)
    writer = spawn(local_consistency="bounded")  # returns without waiting for anyone
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)
    try:
        writer.set_price(product, "3.00")
        socks = [sock for sock, _ in tier._socks]
        assert socks
        readable, _, _ = select.select(socks, [], [], WAIT)
        assert readable, "redis never sent the invalidation"
        hits = reader.total("local_hits")
        assert reader.price(product) == Decimal("3.00")
        assert reader.total("local_hits") == hits
    finally:
        release.set()


def _stall_listener(tier: LocalTier) -> threading.Event:
    """Stall the tier's listener thread (its reads wait for the event returned)."""
    release = threading.Event()
    read_invalidations = tier.read_invalidations

    def stalled() -> None:
        assert release.wait(WAIT)
        read_invalidations()

    tier.read_invalidations = stalled  # type: ignore[method-assign]  # the listener, stalled
    return release


def _reported_on(tier: LocalTier) -> int:
    """Which of the tier's invalidation sockets got the report of a write (one node's,
    on a cluster), once it is there."""
    socks = [sock for sock, _ in tier._socks]
    readable, _, _ = select.select(socks, [], [], WAIT)
    assert readable, "redis never sent the invalidation"
    return socks.index(readable[0])


class _Interrupted(Exception):
    """What a signal handler raises in the middle of a read (a request timeout)."""


def test_reports_a_cut_short_read_fed_to_the_parser_are_applied_before_serving(
    spawn: Callable[..., Process], product: int
) -> None:
    """A read interrupted right after it fed the socket's bytes to the parser leaves the
    reports there, where no readiness poll announces them again: the next hit applies
    them first."""
    reader = spawn(local_lease=30.0)
    writer = spawn(local_consistency="bounded")
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)
    try:
        writer.set_price(product, "6.00")
        at = _reported_on(tier)
        sock, parser = tier._socks[at]

        class FeedThenInterrupt:
            interrupted = False

            def feed(self, data: bytes) -> None:
                parser.feed(data)
                if not FeedThenInterrupt.interrupted:
                    FeedThenInterrupt.interrupted = True
                    raise _Interrupted

            def gets(self) -> Any:
                return parser.gets()

        tier._socks[at] = (sock, FeedThenInterrupt())
        with pytest.raises(_Interrupted):
            tier.serving()
        hits = reader.total("local_hits")
        assert reader.price(product) == Decimal("6.00")
        assert reader.total("local_hits") == hits
    finally:
        release.set()


def test_a_socket_closed_under_the_tier_is_not_polled_by_its_number(
    spawn: Callable[..., Process], product: int
) -> None:
    """redis-py closes a connection whose send failed before the listener tells the tier;
    the socket's number may then be another connection's, which a poll would ask instead:
    a closed socket breaks the tier at the next hit."""
    reader = spawn(local_lease=30.0)
    writer = spawn(local_consistency="bounded")
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)
    ours, theirs = socket.socketpair()
    number = -1
    try:
        writer.set_price(product, "7.00")
        sock = tier._socks[_reported_on(tier)][0]
        number = sock.fileno()
        sock.close()  # as redis-py's disconnect() does
        os.dup2(ours.fileno(), number)  # the number is another connection's now, idle
        hits = reader.total("local_hits")
        assert not tier.serving()
        assert reader.price(product) == Decimal("7.00")
        assert reader.total("local_hits") == hits
    finally:
        release.set()
        if number >= 0:
            os.close(number)
        ours.close()
        theirs.close()


def test_a_holder_that_stops_answering_delays_a_commit_by_its_lease_at_most(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn(local_lease=LEASE)
    writer = spawn()
    reader.hold(product)
    tier = reader.tier
    release = threading.Event()
    read_invalidations = tier.read_invalidations

    def stuck() -> None:
        assert release.wait(WAIT)
        read_invalidations()

    tier.read_invalidations = stuck  # type: ignore[method-assign]  # its listener, stuck
    try:
        # the commit returns once the holder's lease has ended (nothing waits forever) ...
        writer.set_price(product, "4.00")
        # ... and the holder, whose lease ended, serves nothing it held
        assert reader.price(product) == Decimal("4.00")
        assert reader.price(product, get=True) == Decimal("4.00")
        assert tier.lapses >= 1
    finally:
        release.set()


FAR_MS = 4_102_444_800_000  # 2100-01-01 in milliseconds: beyond any lease


def test_a_holder_scored_beyond_any_lease_is_never_waited_for(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis, namespace: str
) -> None:
    """``ZADD <holders> <year 2100> ghost``: every commit on the table waited five leases
    for a holder that never acknowledges, in every process, and each holder's renewal kept
    the set alive. A holder that renews is still waited for (the other tests)."""
    key = KeyScheme(namespace).holders_key("products")
    reader = spawn()
    writer = spawn()
    reader.hold(product)
    table_node.zadd(key, {"ghost": FAR_MS})
    writer.set_price(product, "5.00")
    assert writer.total("fence_timeouts") == 0  # the reader acknowledged; nobody else
    assert table_node.zscore(key, "ghost") is None
    assert reader.price(product) == Decimal("5.00")

    # a holder's registration removes it too, and the question a waiting writer asks
    # about a holder whose lease should have ended (holders.lua) answers "gone"
    table_node.zadd(key, {"ghost": FAR_MS})
    spawn().hold(product)
    assert table_node.zscore(key, "ghost") is None
    table_node.zadd(key, {"ghost": FAR_MS})
    io = writer.cache._core.io()
    reply = io.run_script(*scripts.holders(KeyScheme(namespace), "products", ["ghost"]))
    assert int(reply[1]) == -1
    assert table_node.zscore(key, "ghost") is None


def test_a_gauge_key_of_another_type_does_not_stop_the_tier(
    spawn: Callable[..., Process], product: int, namespace: str
) -> None:
    """A string at ``sarc:<ns>:local:<holder>`` (the name is found by ``SCAN``): the HSET of
    every renewal failed, which broke the tier and reconnected it, again and again, for as
    long as the process lived (its own PEXPIRE kept the string)."""
    reader = spawn(local_lease=LEASE)
    tier = reader.tier
    reader.hold(product)
    key = KeyScheme(namespace).local_stats_key(tier.holder)
    reader.cache.client.set(key, b"planted")
    breaks, renewals = tier.breaks, tier.renewals
    until(lambda: tier.renewals >= renewals + 2, "renewals went on")
    assert tier.breaks == breaks
    assert reader.cache.client.type(key) == b"hash"
    reader.hold(product)  # still served from the tier


def kill_invalidation_connection(tier: Any, node: redis.Redis) -> int:
    """Kill ``tier``'s invalidation connection on ``node``, found by its local address: not
    every subscriber of the server, which other tiers (other tests' runs) may share."""
    killed = 0
    for link in tier._listener._links:
        if getattr(link.sub, "_sock", None) is None:
            continue  # closed already: the tier is making its connections again
        host, port = compat.connection_socket(link.sub).getsockname()[:2]
        killed += int(node.client_kill_filter(_id=None, addr=f"{host}:{port}"))
    return killed


def test_a_killed_invalidation_connection_empties_the_tier(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis
) -> None:
    reader = spawn(local_lease=LEASE)
    writer = spawn()
    reader.hold(product)
    tier = reader.tier
    breaks = tier.breaks
    # on a cluster, the table's primary's only: one broken pair of several empties the tier
    # (none killed when a break on a busy machine beat it to it: the tier is reconnecting)
    kill_invalidation_connection(tier, table_node)
    until(lambda: tier.breaks > breaks, "the tier noticed its connection was killed")
    writer.set_price(product, "5.00")
    assert reader.price(product) == Decimal("5.00")
    assert tier.wait_ready(WAIT)
    reader.hold(product)  # it serves again once tracking is back
    assert reader.price(product) == Decimal("5.00")


def test_a_reading_thread_notices_a_killed_invalidation_connection_itself(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis
) -> None:
    """With the listener thread stalled, the connection's close (which a readiness poll
    reports, as it reports data) is found by the thread about to serve: no local hit."""
    reader = spawn(local_lease=30.0)
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)
    try:
        breaks, hits = tier.breaks, reader.total("local_hits")
        assert kill_invalidation_connection(tier, table_node) == 1
        socks = [sock for sock, _ in tier._socks]
        assert socks
        readable, _, _ = select.select(socks, [], [], WAIT)
        assert readable, "redis never closed the connection"
        assert not tier.serving()
        assert tier.breaks == breaks + 1
        reader.price(product)
        assert reader.total("local_hits") == hits
    finally:
        release.set()


def test_a_killed_control_connection_ends_tracking_and_empties_the_tier(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis
) -> None:
    """Tracking belongs to the connection that asked for it: killed, Redis stops sending
    invalidations without a word. The holder stops serving before its lease ends."""
    reader = spawn(local_lease=LEASE)
    writer = spawn()
    reader.hold(product)
    tier = reader.tier
    redirects = {str(link.sub_id) for link in tier._listener._links}
    (control,) = [c for c in table_node.client_list() if c.get("redir") in redirects]
    breaks = tier.breaks
    table_node.client_kill_filter(_id=control["id"])
    writer.set_price(product, "6.00")
    assert reader.price(product) == Decimal("6.00")
    assert reader.price(product, get=True) == Decimal("6.00")
    until(lambda: tier.breaks > breaks, "the tier noticed tracking had stopped")


def test_a_restarted_server_empties_every_tier(
    database_url: str, namespace: str, product: int
) -> None:
    with RedisServer() as server:
        reader = Process(database_url, server.url, namespace, local_lease=LEASE)
        writer = Process(database_url, server.url, namespace)
        try:
            reader.hold(product)
            reader.hold(product, get=True)
            tier = reader.tier
            breaks = tier.breaks
            server.restart()
            until(lambda: tier.breaks > breaks, "the tier noticed the restart")
            writer.set_price(product, "7.00")
            assert reader.price(product) == Decimal("7.00")
            assert reader.price(product, get=True) == Decimal("7.00")
            assert tier.wait_ready(WAIT)
            reader.hold(product)
        finally:
            reader.close()
            writer.close()


def test_an_open_breaker_serves_nothing_from_the_local_tier(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn()
    sql = reader.sql
    reader.hold(product)
    reader.hold(product, get=True)
    breaker = reader.cache._core.breaker
    for _ in range(breaker.threshold):
        breaker.failure()
    hits = reader.total("local_hits")
    sql.reset()
    reader.price(product)
    reader.price(product, get=True)
    assert reader.total("local_hits") == hits
    assert sql.count == 2


def test_a_transaction_that_wrote_the_table_reads_the_database(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn()
    sql = reader.sql
    reader.hold(product)
    stmt = sa_select(Product).where(Product.id == product).options(FromCache())
    with reader.factory() as s:
        s.execute(update(Product).where(Product.id == product).values(price=Decimal("8.00")))
        sql.reset()
        assert s.scalars(stmt).one().price == Decimal("8.00")
        assert sql.count == 1
        s.rollback()
    assert reader.price(product) == Decimal("1.00")


def test_a_repeatable_read_transaction_reads_its_snapshot_not_the_local_tier(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn()
    writer = spawn()
    reader.hold(product)
    stmt = sa_select(Product).where(Product.id == product).options(FromCache())
    with reader.factory() as s:
        s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        s.execute(sa.text("SELECT 1"))  # the snapshot starts
        hits = reader.total("local_hits")
        assert s.scalars(stmt).one().price == Decimal("1.00")
        writer.set_price(product, "9.00")
        s.expire_all()
        assert s.scalars(stmt).one().price == Decimal("1.00")
        assert reader.total("local_hits") == hits
    assert reader.price(product) == Decimal("9.00")


def test_bounded_commits_do_not_wait_and_holders_catch_up(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn(local_consistency="bounded")
    writer = spawn(local_consistency="bounded")
    reader.hold(product)
    invalidations = reader.tier.store.invalidations
    writer.set_price(product, "2.50")
    assert writer.total("fence_waits") == 0
    until(lambda: reader.tier.store.invalidations > invalidations, "the holder got the news")
    assert reader.price(product) == Decimal("2.50")


# -- opting out, limits ---------------------------------------------------------------------


def test_from_cache_local_false_always_asks_redis(
    spawn: Callable[..., Process], product: int
) -> None:
    reader = spawn()
    stmt = sa_select(Product).where(Product.id == product).options(FromCache(local=False))
    for _ in range(4):
        with reader.factory() as s:
            s.scalars(stmt).one()
    assert reader.total("local_hits") == 0
    assert reader.total("hits") == 3


def test_the_entry_limit_evicts_the_least_recently_used(
    spawn: Callable[..., Process], shop_engine: sa.Engine
) -> None:
    reader = spawn(local_max_entries=2)
    for pid in (1, 2, 3):
        for _ in range(2):
            reader.price(pid, get=True)
    local = reader.cache.stats()["local"]
    assert local["entries"] == 2
    assert local["evictions"] == 1
    hits = reader.total("local_hits")
    reader.price(1, get=True)  # evicted: from Redis again
    assert reader.total("local_hits") == hits


def test_the_local_settings_are_checked(redis_url: str) -> None:
    for kwargs, named in (
        ({"local_lease": 0}, "local_lease"),
        ({"local_max_entries": 0}, "local_max_entries"),
        ({"local_max_bytes": -1}, "local_max_bytes"),
        ({"local_consistency": "eventual"}, "local_consistency"),
    ):
        with pytest.raises(ConfigurationError, match=named):
            Cache(redis_url, local=True, **kwargs)


def test_stats_show_the_tier(spawn: Callable[..., Process], product: int) -> None:
    reader = spawn()
    reader.hold(product)
    local = reader.cache.stats()["local"]
    assert local["ready"] is True
    assert local["entries"] == 1
    assert local["bytes"] > 0
    assert local["tables_held"] == 1
    assert local["seconds_since_invalidation"] is not None
    total = reader.cache.stats()["total"]
    assert total["local_hits"] == 2  # hold() read it locally twice
    assert total["local_misses"] >= 1


def test_prometheus_and_the_command_line_show_each_process_tier(
    spawn: Callable[..., Process], product: int, tier_url: str, namespace: str
) -> None:
    from click.testing import CliRunner
    from prometheus_client import CollectorRegistry, generate_latest

    from sa_redis_cache.cli import cli
    from sa_redis_cache.metrics import CacheCollector

    first, second = spawn(local_lease=LEASE), spawn(local_lease=LEASE)
    first.hold(product)
    second.hold(product, get=True)
    registry = CollectorRegistry()
    registry.register(CacheCollector(first.cache))
    text = generate_latest(registry).decode()
    assert f'sarc_local_entries{{namespace="{namespace}"}} 1.0' in text
    assert f'sarc_local_ready{{namespace="{namespace}"}} 1.0' in text
    assert "sarc_local_hits_total" in text
    holders = {first.tier.holder, second.tier.holder}
    base = ["--redis-url", tier_url, "--namespace", namespace, "--models", "examples.shop"]

    def published() -> list[dict[str, Any]]:
        result = CliRunner().invoke(cli, [*base, "stats", "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        document = __import__("json").loads(result.output)
        tiers: list[dict[str, Any]] = document["local_tiers"]
        return tiers

    # each process publishes its gauges with its lease renewals
    until(
        lambda: (
            {t["holder"] for t in published()} == holders
            and all(t["hits"] >= 2 for t in published())
        ),
        "both processes published their local tiers",
    )
    shown = CliRunner().invoke(cli, [*base, "stats"], catch_exceptions=False).output
    for holder in holders:
        assert holder in shown
    assert "local holders" in shown


def test_detach_stops_the_tier_and_attach_starts_it_again(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis, namespace: str
) -> None:
    reader = spawn()
    reader.hold(product)
    tier = reader.tier
    holders = KeyScheme(namespace).holders_key("products")
    assert table_node.zscore(holders, tier.holder) is not None
    reader.cache.detach()
    assert not tier.ready
    assert table_node.zscore(holders, tier.holder) is None  # writers no longer wait for it
    reader.cache.attach(reader.factory)
    assert tier.wait_ready(WAIT)
    reader.hold(product)


def test_a_forked_child_starts_a_tier_of_its_own(
    spawn: Callable[..., Process], product: int
) -> None:
    """The child shares its parent's sockets: it must not read them, nor serve what the
    parent holds; it connects afresh, under a holder id of its own."""
    import multiprocessing

    reader = spawn()
    reader.hold(product)
    parent_holder = reader.tier.holder
    breaks, lapses = reader.tier.breaks, reader.tier.lapses
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child() -> None:
        tier = reader.tier
        out: dict[str, Any] = {"holder": tier.holder, "entries": len(tier.store)}
        out["ready"] = tier.wait_ready(WAIT)
        reader.engine.dispose(close=False)  # the parent's database connections stay its own
        out["price"] = str(reader.price(product))
        reader.hold(product)
        out["local_hits"] = reader.total("local_hits")
        results.put(out)

    process = context.Process(target=child)
    process.start()
    got = results.get(timeout=WAIT * 3)
    process.join(WAIT)
    assert got["holder"] != parent_holder
    assert got["entries"] == 0
    assert got["ready"] is True
    assert got["price"] == "1.00"
    # the parent's tier is untouched: none of its connections broken, still serving
    assert reader.tier.breaks == breaks
    assert reader.tier.ready
    if reader.tier.lapses != lapses:
        # its listener thread, starved on a busy machine, renewed its lease late (which
        # empties the tier, as it must): it serves again once it holds one
        reader.hold(product)
        return
    hits = reader.total("local_hits")
    reader.price(product)
    assert reader.total("local_hits") == hits + 1


def test_a_script_flush_costs_the_tier_nothing(
    spawn: Callable[..., Process], product: int, table_node: redis.Redis
) -> None:
    """Any client may send SCRIPT FLUSH: the next lease renewal loads its script again
    instead of taking the refusal for a broken connection and emptying the tier."""
    reader = spawn(local_lease=LEASE)
    reader.hold(product)
    tier = reader.tier
    breaks, renewals = tier.breaks, tier.renewals
    table_node.script_flush()
    until(lambda: tier.renewals >= renewals + 2, "two renewals after the flush")
    assert tier.breaks == breaks
    hits = reader.total("local_hits")
    reader.price(product)
    assert reader.total("local_hits") == hits + 1


@pytest.mark.parametrize("write", ["commit", "invalidate"])
def test_a_write_whose_scripts_the_server_lost_waits_for_its_new_fence(
    spawn: Callable[..., Process],
    product: int,
    table_node: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    write: str,
) -> None:
    """The server lost its scripts (SCRIPT FLUSH), and has loaded the fence's again (another
    writer's fence): the write's first call meets NOSCRIPT, but the fence sent after it
    runs, and the holder acknowledges it before the write's changes exist. The writer
    must wait for the fence of the batch it sends again."""
    reader = spawn(local_lease=30.0)
    writer = spawn()
    reader.hold(product)
    held = HeldAck(reader)
    reload_scripts = RedisIO.reload_scripts
    writing = threading.Event()

    def reloading(io: RedisIO, lost: Iterable[Script]) -> None:
        # the writer sends a batch that held a fence again only once the holder
        # acknowledged the fence that ran alone, as a slower writer would
        lost = list(lost)
        if writing.is_set() and any(script.name == "fence" for script in lost):
            assert held.early_sent.wait(WAIT), "the fence that ran alone was not acknowledged"
        reload_scripts(io, lost)

    monkeypatch.setattr(RedisIO, "reload_scripts", reloading)
    table_node.script_flush()
    table_node.script_load(scripts.script("fence").source)

    def write_once() -> None:
        writing.set()
        if write == "commit":
            writer.set_price(product, "4.00")
        else:
            writer.cache.invalidate_model(Product)

    assert held_until_dropped(reader, product, write_once, held) == Decimal(
        "4.00" if write == "commit" else "1.00"
    )
