"""A review of the local tier within one process: threads and tasks sharing one cache.

The oracle is a plain read of the database at the same moment (a statement without
``FromCache`` in the same session, or a session of no cache). Each probe forces its
interleaving with events and the tier's own points (what it applies from its
invalidation connection, its listener's reads), never with sleeps. The processes are
:class:`tests.integration.test_local_tier.Process` (one cache, engine and session factory
each), on a single server.
"""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from select import select as wait_readable
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from tests.integration.test_local_tier import (
    LEASE,
    WAIT,
    Process,
    _stall_listener,
    spawn,
    tier_of,
    tier_url,
    until,
)
from tests.modes import async_url
from tests.support import close_cache_and_engine

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sa_redis_cache.local import LocalTier

__all__ = ["spawn", "tier_url"]  # the fixtures, shared with test_local_tier.py


def _from_cache(pid: int) -> Any:
    return select(Product).where(Product.id == pid).options(FromCache())


def _database_price(s: Session, pid: int) -> Decimal:
    """The oracle: the price the session's own connection reads, no cache involved."""
    price: Decimal = s.execute(select(Product.price).where(Product.id == pid)).scalar_one()
    return price


class LateReports:
    """Reports that Redis sent this process but that have not reached it yet.

    The reports of a change travel on the tier's invalidation connection, the replies to
    the writer on another: nothing orders their arrival (a network between the two hosts,
    a busy socket). While :meth:`hold_back` is in force, every report the tier reads is
    kept aside, as if still on its way; :meth:`deliver` applies them, in order.
    """

    def __init__(self, tier: LocalTier) -> None:
        self.tier = tier
        self._apply = tier._apply
        self._late: list[Any] = []
        self._holding = False

        def applying(message: Any) -> None:
            if self._holding:
                self._late.append(message)
            else:
                self._apply(message)

        tier._apply = applying  # type: ignore[method-assign]  # the arrival, delayed

    def hold_back(self) -> None:
        self._holding = True

    def deliver(self) -> None:
        with self.tier.lock:  # as the tier applies reports: under its lock
            self._holding = False
            late, self._late = self._late, []
            for message in late:
                self._apply(message)


@pytest.fixture
def late(spawn: Callable[..., Process]) -> Iterator[tuple[Process, LateReports]]:
    """A process with a long lease (none ends during the test), its reports deliverable late."""
    reader = spawn(local_lease=30.0)
    reports = LateReports(reader.tier)
    try:
        yield reader, reports
    finally:
        reports.deliver()


# -- read your writes: DML on the session's own connection ------------------------------


def _text_update(s: Session, pid: int) -> None:
    s.execute(sa.text("UPDATE products SET price = 8.00 WHERE id = :id"), {"id": pid})


def _core_update(s: Session, pid: int) -> None:
    table = cast("sa.Table", Product.__table__)
    s.connection().execute(update(table).where(table.c.id == pid).values(price=Decimal("8.00")))


def _driver_sql(s: Session, pid: int) -> None:
    s.connection().exec_driver_sql(
        "UPDATE products SET price = 8.00 WHERE id = %(id)s", {"id": pid}
    )


def _bulk_mappings(s: Session, pid: int) -> None:
    s.bulk_update_mappings(Product, [{"id": pid, "price": Decimal("8.00")}])


def _orm_bulk(s: Session, pid: int) -> None:
    s.execute(update(Product).where(Product.id == pid).values(price=Decimal("8.00")))


WRITES = {
    "text": _text_update,
    "core": _core_update,
    "driver_sql": _driver_sql,
    "bulk_mappings": _bulk_mappings,
    "orm_bulk": _orm_bulk,
}


@pytest.mark.parametrize("write", sorted(WRITES))
@pytest.mark.parametrize("get", [False, True], ids=["from_cache", "get"])
def test_a_transaction_reads_its_own_dml_whenever_the_reports_arrive(
    late: tuple[Process, LateReports], product: int, write: str, *, get: bool
) -> None:
    """DML the session ran on its own connection (textual, Core, bulk mappings: not a
    flush) makes its table one the transaction wrote: its reads come from the database,
    never from a local entry whose report of the change has not arrived yet."""
    reader, reports = late
    reader.hold(product, get=get)
    with reader.factory() as s:
        reports.hold_back()
        try:
            WRITES[write](s, product)
            oracle = _database_price(s, product)
            if get:
                got = s.get(Product, product)
                assert got is not None
                served = got.price
            else:
                served = s.scalars(_from_cache(product)).one().price
        finally:
            # before the rollback, whose fence this process acknowledges once it read it
            reports.deliver()
        s.rollback()
    assert oracle == Decimal("8.00")
    assert served == oracle, "the local tier served the row as it was before the write"
    assert reader.price(product, get=get) == Decimal("1.00")


# -- the invalidation connection dropped under a waiting writer --------------------------


def test_a_holder_that_lost_its_connection_holds_up_no_commit_once_its_lease_ended(
    spawn: Callable[..., Process], product: int, redis_client: redis.Redis
) -> None:
    """A holder whose invalidation connection is killed while a commit waits for it loses
    the fence's report with the connection: it empties its tier and, reconnected, holds
    the table again. The writer must stop waiting once the lease the fence named ended,
    not take the new registration for that lease renewed and wait for an acknowledgement
    that can no longer come (up to five leases, then an error)."""
    reader = spawn()
    writer = spawn()
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)  # nothing reads the fence's report meanwhile
    returned = threading.Event()

    def commit() -> None:
        writer.set_price(product, "2.00")
        returned.set()

    committer = threading.Thread(target=commit)
    try:
        (link,) = tier._listener._links
        committer.start()
        socks = [sock for sock, _ in tier._socks]
        readable, _, _ = wait_readable(socks, [], [], WAIT)
        assert readable, "redis never sent the commit's reports"
        assert not returned.is_set()
        redis_client.client_kill_filter(_id=str(link.sub_id))
    finally:
        release.set()
    breaks = tier.breaks
    until(lambda: tier.breaks > breaks or not tier.ready, "the tier noticed the kill")
    assert tier.wait_ready(WAIT)
    # read again: the table is held anew, and renewed by the listener from then on
    assert reader.price(product) == Decimal("2.00")
    committer.join(WAIT)
    assert returned.is_set()
    assert writer.total("fence_timeouts") == 0, "the writer waited out its cap"


def _dml_before_joining(conn: sa.Connection, factory: Any, pid: int) -> None:
    conn.execute(sa.text("UPDATE products SET price = 8.00 WHERE id = :id"), {"id": pid})


def _session_before_joining(conn: sa.Connection, factory: Any, pid: int) -> None:
    with factory(bind=conn, join_transaction_mode="create_savepoint") as first:
        first.execute(update(Product).where(Product.id == pid).values(price=Decimal("8.00")))
        first.commit()  # the savepoint's: the connection's transaction goes on


JOINED_WRITES = {"dml": _dml_before_joining, "session": _session_before_joining}


@pytest.mark.parametrize("write", sorted(JOINED_WRITES))
@pytest.mark.parametrize("get", [False, True], ids=["from_cache", "get"])
def test_a_session_joined_to_a_transaction_that_wrote_reads_the_write(
    late: tuple[Process, LateReports], product: int, write: str, *, get: bool
) -> None:
    """A session joined to the application's transaction (``Session(bind=connection)``)
    reads what that transaction wrote before the session began on it (Core DML, or an
    earlier joined session's flush), not a local entry whose report has not arrived."""
    reader, reports = late
    reader.hold(product, get=get)
    with reader.engine.connect() as conn:
        conn.begin()  # the application's transaction, which the sessions join
        reports.hold_back()
        try:
            JOINED_WRITES[write](conn, reader.factory, product)
            with reader.factory(bind=conn, join_transaction_mode="create_savepoint") as s:
                oracle = _database_price(s, product)
                if get:
                    got = s.get(Product, product)
                    assert got is not None
                    served = got.price
                else:
                    served = s.scalars(_from_cache(product)).one().price
        finally:
            reports.deliver()
        conn.rollback()
    assert oracle == Decimal("8.00")
    assert served == oracle, "the local tier served the row as it was before the write"
    assert reader.price(product, get=get) == Decimal("1.00")


def test_the_listener_reconnects_at_once_when_a_reading_thread_found_the_connection_broken(
    spawn: Callable[..., Process], product: int, redis_client: redis.Redis
) -> None:
    """A reading thread that finds the invalidation connection closed empties the tier and
    lets go of the connection; the listener, which still watched it, must take that as
    the end of its connections and reconnect, not spin on the closed socket (readable at
    every poll) until its next renewal, a third of a lease later, with the tier idle."""
    reader = spawn(local_lease=60.0)  # renewals 20 s apart: longer than WAIT
    reader.hold(product)
    tier = reader.tier
    release = _stall_listener(tier)
    try:
        (link,) = tier._listener._links
        socks = [sock for sock, _ in tier._socks]
        redis_client.client_kill_filter(_id=str(link.sub_id))
        readable, _, _ = wait_readable(socks, [], [], WAIT)
        assert readable, "redis never closed the connection"
        assert not tier.serving()  # found by this thread
    finally:
        release.set()
    assert tier.wait_ready(WAIT), "the listener went on with the dropped connection"
    reader.hold(product)


# -- threads and tasks sharing one cache --------------------------------------------------


def test_objects_built_from_one_local_entry_in_two_threads_share_no_mutable_value(
    spawn: Callable[..., Process], product: int, shop_engine: sa.Engine
) -> None:
    """Two threads get the same row from the local tier at once (a query and a get) and
    change its JSON in place: neither sees the other's change, and the tier keeps the
    database's value."""
    stored = {"tags": ["a", {"deep": [1]}], "size": {"w": 1}}
    with Session(shop_engine) as s:
        s.execute(update(Product).where(Product.id == product).values(attributes=stored))
        s.commit()
    reader = spawn(local_lease=30.0)  # no lapse under a loaded machine empties the tier
    reader.hold(product)
    reader.hold(product, get=True)
    both = threading.Barrier(2, timeout=WAIT)
    seen: dict[int, Any] = {}

    def change(at: int) -> None:
        with reader.factory() as s:
            got = s.get(Product, product) if at else s.scalars(_from_cache(product)).one()
            assert got is not None
            both.wait()  # both hold their objects
            got.attributes["tags"][1]["deep"].append(at)
            got.attributes["size"]["w"] = 10 + at
            got.attributes["tags"].append(f"thread {at}")
            both.wait()  # both changed theirs
            seen[at] = got.attributes
            s.rollback()

    statements = reader.sql.count
    threads = [threading.Thread(target=change, args=(at,)) for at in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert reader.sql.count == statements  # both served from the cache (a thread's
    # counters reach stats() later: the tiers are told apart by the reads below)
    for at in range(2):
        assert seen[at] == {
            "tags": ["a", {"deep": [1, at]}, f"thread {at}"],
            "size": {"w": 10 + at},
        }
    hits = reader.total("local_hits")
    with reader.factory() as s:
        assert s.scalars(_from_cache(product)).one().attributes == stored
    with reader.factory() as s:
        got = s.get(Product, product)
        assert got is not None
        assert got.attributes == stored
    assert reader.total("local_hits") == hits + 2
    assert reader.sql.count == statements


def test_asyncio_tasks_of_one_cache_see_a_commit_of_another_task_at_once(
    database_url: str, redis_url: str, namespace: str, product: int
) -> None:
    """Tasks of one event loop share one cache: readers keep reading (local hits) while
    another task commits; every read that starts after the commit returned sees it, as
    the database does."""

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(redis_url, namespace=namespace, local=True, local_lease=LEASE)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        committed = asyncio.Event()
        stale: list[tuple[Decimal, Decimal]] = []

        async def price(s: Any, *, get: bool) -> Decimal:
            if get:
                got = await s.get(Product, product)
                assert got is not None
                return Decimal(got.price)
            return Decimal((await s.scalars(_from_cache(product))).one().price)

        async def read(*, get: bool) -> None:
            for _ in range(200):
                after = committed.is_set()
                async with factory() as s:
                    served = await price(s, get=get)
                    oracle = (
                        await s.execute(select(Product.price).where(Product.id == product))
                    ).scalar_one()
                if after and served != oracle:
                    stale.append((served, oracle))
                await asyncio.sleep(0)  # the other tasks' turn: no timing involved

        async def write() -> None:
            for _ in range(20):
                await asyncio.sleep(0)
            async with factory() as s:
                await s.execute(
                    update(Product).where(Product.id == product).values(price=Decimal("4.00"))
                )
                await s.commit()
            committed.set()

        try:
            assert tier_of(cache).wait_ready(WAIT)
            for _ in range(3):
                async with factory() as s:
                    await price(s, get=False)
                    await price(s, get=True)
            await asyncio.gather(read(get=False), read(get=True), write())
            assert stale == []
            assert cache.stats()["total"]["local_hits"] > 0
        finally:
            await close_cache_and_engine(cache, engine)

    asyncio.run(scenario())


# -- a commit between a reader's Redis look and the tier keeping what it read -----------


def _flush(p: Process, pid: int, price: str) -> None:
    with p.factory() as s:
        got = s.get(Product, pid, populate_existing=True)
        assert got is not None
        got.price = Decimal(price)
        s.commit()


def _bulk(p: Process, pid: int, price: str) -> None:
    p.set_price(pid, price)


def _session_text(p: Process, pid: int, price: str) -> None:
    with p.factory() as s:
        s.execute(sa.text("UPDATE products SET price = :p WHERE id = :id"), {"p": price, "id": pid})
        s.commit()


def _commit_as_you_go(p: Process, pid: int, price: str) -> None:
    with p.engine.connect() as conn:
        conn.execute(
            sa.text("UPDATE products SET price = :p WHERE id = :id"), {"p": price, "id": pid}
        )
        conn.commit()
        # the connection is kept open: its commit, not its checkin, must have finished


def _engine_begin(p: Process, pid: int, price: str) -> None:
    table = cast("sa.Table", Product.__table__)
    with p.engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == pid).values(price=Decimal(price)))


def _autocommit(p: Process, pid: int, price: str) -> None:
    with p.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            sa.text("UPDATE products SET price = :p WHERE id = :id"), {"p": price, "id": pid}
        )


COMMITS = {
    "flush": _flush,
    "orm_bulk": _bulk,
    "session_text": _session_text,
    "commit_as_you_go": _commit_as_you_go,
    "engine_begin": _engine_begin,
    "autocommit": _autocommit,
}


@pytest.mark.parametrize("commit", sorted(COMMITS))
@pytest.mark.parametrize("get", [False, True], ids=["from_cache", "get"])
def test_a_commit_between_a_look_and_its_keeping_is_never_served_after_it_returned(
    spawn: Callable[..., Process], product: int, commit: str, *, get: bool
) -> None:
    """Thread B read the row's entry valid in Redis and is about to keep it in the tier
    when thread A, of the same cache, commits a change of the row and returns. B's read
    began before the commit and may give the old price; the tier must not keep it, and
    every read that starts after the commit returned gives the new one."""
    process = spawn(local_lease=30.0)
    process.price(product, get=get)  # the fill: the next read is a Redis hit, kept
    store = process.tier.store
    put = store.put
    at_put, go_on = threading.Event(), threading.Event()
    kept: list[bool] = []

    def paused_put(*args: Any, **kwargs: Any) -> bool:
        if threading.current_thread() is reader:
            at_put.set()
            assert go_on.wait(WAIT)
        kept.append(put(*args, **kwargs))
        return kept[-1]

    store.put = paused_put  # type: ignore[method-assign]  # the point between look and keep
    served: list[Decimal] = []
    reader = threading.Thread(target=lambda: served.append(process.price(product, get=get)))
    reader.start()
    try:
        assert at_put.wait(WAIT), "the read never reached the tier with a Redis hit"
        COMMITS[commit](process, product, "6.00")
    finally:
        go_on.set()
        reader.join(WAIT)
    assert served == [Decimal("1.00")]  # began before the commit: the old price is fine
    assert kept == [False], "the tier kept a value read before a commit that returned"
    with Session(process.engine) as oracle:
        assert _database_price(oracle, product) == Decimal("6.00")
    assert process.price(product, get=get) == Decimal("6.00")
    assert process.price(product, get=not get) == Decimal("6.00")


@pytest.mark.parametrize("killed", ["pubsub", "control"])
def test_a_look_from_before_a_dropped_connection_is_not_kept_after_it(
    spawn: Callable[..., Process], product: int, redis_client: redis.Redis, killed: str
) -> None:
    """Thread B read the row's entry valid in Redis and is about to keep it when the
    tier's invalidation (or tracking) connection is killed; a commit lands while the tier
    reconnects, unreported to it. Once tracking is back, B's value, read under the old
    connection, must not be kept: the tier serves the commit's price from then on."""
    # a killed control connection is found by the next renewal, a third of a lease later;
    # the writer waits for the old connection's lease to end
    process = spawn(local_lease=3.0)
    writer = spawn()
    process.price(product)  # the fill: the next read is a Redis hit, kept
    tier = process.tier
    store = tier.store
    put = store.put
    at_put, go_on = threading.Event(), threading.Event()
    kept: list[bool] = []

    def paused_put(*args: Any, **kwargs: Any) -> bool:
        if threading.current_thread() is reader:
            at_put.set()
            assert go_on.wait(WAIT)
        kept.append(put(*args, **kwargs))
        return kept[-1]

    store.put = paused_put  # type: ignore[method-assign]  # the point between look and keep
    reader = threading.Thread(target=process.price, args=(product,))
    reader.start()
    try:
        assert at_put.wait(WAIT), "the read never reached the tier with a Redis hit"
        (link,) = tier._listener._links
        breaks = tier.breaks
        if killed == "pubsub":
            redis_client.client_kill_filter(_id=str(link.sub_id))
        else:
            (control,) = [
                c for c in redis_client.client_list() if c.get("redir") == str(link.sub_id)
            ]
            redis_client.client_kill_filter(_id=control["id"])
        writer.set_price(product, "7.00")
        until(lambda: tier.breaks > breaks, "the tier noticed the kill")
        assert tier.wait_ready(WAIT)
    finally:
        go_on.set()
        reader.join(WAIT)
    assert kept == [False], "the tier kept a value read under the connection it lost"
    assert process.price(product) == Decimal("7.00")
    assert process.price(product, get=True) == Decimal("7.00")


# -- explicit invalidations after a write behind the cache's back ------------------------

REGION = "review"


def _region_stmt(pid: int) -> Any:
    return select(Product).where(Product.id == pid).options(FromCache(region=REGION))


INVALIDATIONS: dict[str, Callable[[Cache, int], object]] = {
    "invalidate": lambda cache, pid: cache.invalidate(Product, pid),
    "invalidate_model": lambda cache, pid: cache.invalidate_model(Product),
    "invalidate_table": lambda cache, pid: cache.invalidate_table("products"),
    "invalidate_query": lambda cache, pid: cache.invalidate_query(_region_stmt(pid)),
    "invalidate_region": lambda cache, pid: cache.invalidate_region(REGION),
    "clear": lambda cache, pid: cache.clear(),
}
# what each retires: invalidate_query and invalidate_region only query entries
QUERIES_ONLY = {"invalidate_query", "invalidate_region"}


def _region_price(p: Process, pid: int, *, get: bool) -> Decimal:
    with p.factory() as s:
        if get:
            got = s.get(Product, pid)
            assert got is not None
            return got.price
        return Decimal(s.scalars(_region_stmt(pid)).one().price)


@pytest.mark.parametrize("how", sorted(INVALIDATIONS))
@pytest.mark.parametrize("where", ["same", "other"])
def test_an_explicit_invalidation_that_returned_is_seen_by_every_tier(
    spawn: Callable[..., Process],
    product: int,
    shop_engine: sa.Engine,
    how: str,
    where: str,
) -> None:
    """A row changed behind the cache's back (a plain engine) is served at its old price
    by the local tier until the application says so; once that call returned, in this
    process or in another, no read gets the old price."""
    reader = spawn(local_lease=30.0)
    caller = reader if where == "same" else spawn()
    kinds = [False] if how in QUERIES_ONLY else [False, True]
    for get in kinds:
        for _ in range(3):
            _region_price(reader, product, get=get)
    with Session(shop_engine) as s:
        s.execute(update(Product).where(Product.id == product).values(price=Decimal("3.00")))
        s.commit()
    for get in kinds:  # still served: the cache was not told
        assert _region_price(reader, product, get=get) == Decimal("1.00")
    INVALIDATIONS[how](caller.cache, product)
    for get in kinds:
        assert _region_price(reader, product, get=get) == Decimal("3.00"), get


AINVALIDATIONS: dict[str, Callable[[Cache, int, Any], Any]] = {
    "ainvalidate": lambda cache, pid, engine: cache.ainvalidate(Product, pid),
    "ainvalidate_model": lambda cache, pid, engine: cache.ainvalidate_model(Product),
    "ainvalidate_table": lambda cache, pid, engine: cache.ainvalidate_table("products"),
    "ainvalidate_query": lambda cache, pid, engine: cache.ainvalidate_query(
        _region_stmt(pid), bind=engine
    ),
    "ainvalidate_region": lambda cache, pid, engine: cache.ainvalidate_region(REGION),
    "aclear": lambda cache, pid, engine: cache.aclear(),
}


@pytest.mark.parametrize("how", sorted(AINVALIDATIONS))
def test_an_awaited_invalidation_is_seen_by_the_next_task_read(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    shop_engine: sa.Engine,
    how: str,
) -> None:
    """The awaitable invalidations, called by one task, and read by the next task of the
    same event loop through the same cache's local tier."""

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(redis_url, namespace=namespace, local=True, local_lease=30.0)
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        kinds = [False] if how.removeprefix("a") in QUERIES_ONLY else [False, True]

        async def price(*, get: bool) -> Decimal:
            async with factory() as s:
                if get:
                    got = await s.get(Product, product)
                    assert got is not None
                    return Decimal(got.price)
                return Decimal((await s.scalars(_region_stmt(product))).one().price)

        try:
            assert tier_of(cache).wait_ready(WAIT)
            for _ in range(3):
                for get in kinds:
                    await price(get=get)
            with Session(shop_engine) as s:
                s.execute(
                    update(Product).where(Product.id == product).values(price=Decimal("3.00"))
                )
                s.commit()
            hits = cache.stats()["total"]["local_hits"]
            for get in kinds:
                assert await price(get=get) == Decimal("1.00")
            assert cache.stats()["total"]["local_hits"] == hits + len(kinds)
            await asyncio.create_task(AINVALIDATIONS[how](cache, product, engine))
            reads = [asyncio.create_task(price(get=get)) for get in kinds]
            assert await asyncio.gather(*reads) == [Decimal("3.00")] * len(kinds)
        finally:
            await close_cache_and_engine(cache, engine)

    asyncio.run(scenario())


# -- what a read changes in Redis must not empty the tier ---------------------------------


@pytest.fixture
def other_product(shop_engine: sa.Engine) -> Iterator[int]:
    """A second product of the test's own, never read before the test reads it."""
    with Session(shop_engine) as s:
        p = Product(category_id=1, name="scratch 2", price=Decimal("2.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        pid = p.id
    yield pid
    with Session(shop_engine) as s:
        s.execute(sa.delete(Product).where(Product.id == pid))
        s.commit()


def test_reading_a_row_for_the_first_time_keeps_the_tables_local_query_entries(
    spawn: Callable[..., Process], product: int, other_product: int
) -> None:
    """The first entity read of a row creates its write counter; refreshing the TTL of
    the table's version in the same script changed that key in Redis, whose report
    dropped every local query entry of the table, in every process, at each row read
    for the first time (or once its counter expired). A read changes no value: the tier
    keeps what it holds."""
    reader = spawn(local_lease=30.0)
    reader.hold(product)
    hits = reader.total("local_hits")
    with reader.factory() as s:
        got = s.get(Product, other_product)  # a miss: its write counter is created
        assert got is not None
    assert reader.price(product) == Decimal("1.00")
    assert reader.total("local_hits") == hits + 1, "the query's local entry was dropped"


# -- session operations around another thread's commit ------------------------------------


def test_refresh_populate_existing_and_savepoints_read_what_the_database_holds(
    spawn: Callable[..., Process], product: int
) -> None:
    """A session that kept an object built from the local tier (``expire_on_commit=False``)
    while another thread committed: ``refresh()``, ``populate_existing`` and a read after
    a rolled-back savepoint that wrote the row each give what the database holds."""
    process = spawn(local_lease=30.0)
    process.hold(product)
    process.hold(product, get=True)
    kept = process.factory(expire_on_commit=False)
    try:
        obj = kept.scalars(_from_cache(product)).one()
        kept.commit()
        assert obj.price == Decimal("1.00")
        writer = threading.Thread(target=process.set_price, args=(product, "5.00"))
        writer.start()
        writer.join(WAIT)
        assert obj.price == Decimal("1.00")  # the identity map's, as without a cache
        kept.refresh(obj)
        assert obj.price == Decimal("5.00") == _database_price(kept, product)
    finally:
        kept.close()
    with process.factory() as s:
        old = s.scalars(_from_cache(product)).one()
        s.execute(update(Product).where(Product.id == product).values(price=Decimal("6.00")))
        # the bulk update synchronised the object; populate_existing must read the row
        again = s.scalars(_from_cache(product).execution_options(populate_existing=True)).one()
        assert again is old
        assert again.price == Decimal("6.00") == _database_price(s, product)
        got = s.get(Product, product, populate_existing=True)
        assert got is not None
        assert got.price == Decimal("6.00")
        s.rollback()
    with process.factory() as s:
        nested = s.begin_nested()
        changed = s.get(Product, product)
        assert changed is not None
        assert changed.price == Decimal("5.00")
        changed.price = Decimal("9.00")
        s.flush()
        nested.rollback()
        s.expire_all()
        assert s.scalars(_from_cache(product)).one().price == Decimal("5.00")
        got = s.get(Product, product)
        assert got is not None
        assert got.price == Decimal("5.00") == _database_price(s, product)
        s.commit()
    assert process.price(product) == Decimal("5.00")
    assert process.price(product, get=True) == Decimal("5.00")


# -- a history of threads sharing one cache -----------------------------------------------

HISTORY_ROWS = 4
HISTORY_WRITES = 60


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
def test_threads_sharing_one_cache_never_read_before_a_commit_that_returned(
    database_url: str, redis_url: str, namespace: str, strategy: str
) -> None:
    """Writer threads commit increments of a few rows' versions in every way the library
    sees (an ORM flush, an ORM bulk update, textual DML on the session's connection, Core
    on an engine connection committed as it goes, autocommit), and some flush a change
    and roll it back; each raises the row's floor once its commit returned. Reader
    threads of the same cache note the floors before each read (``get``, ``FromCache`` by
    id and of every row): no read returns a version below its floor, none returns a
    version no commit made (a rolled-back one is negative)."""
    from tests.local_history import local_history_model, prepare_table

    model: Any = local_history_model(strategy)
    table = cast("sa.Table", model.__table__)
    setup = sa.create_engine(database_url)
    prepare_table(setup, strategy, HISTORY_ROWS)
    setup.dispose()
    process = Process(database_url, redis_url, namespace, local_lease=30.0)
    floor = [0] * HISTORY_ROWS
    lock = threading.Lock()
    failures: list[str] = []
    done = threading.Event()
    reads = [0]

    def committed(row: int, version: int) -> None:
        with lock:
            floor[row] = max(floor[row], version)

    def next_version(conn: sa.Connection, row: int) -> int:
        return int(
            conn.execute(
                select(table.c.version).where(table.c.id == row).with_for_update()
            ).scalar_one()
        )

    def write(turn: int) -> None:
        row = turn % HISTORY_ROWS
        how = turn % 6
        if how == 0:  # an ORM flush
            with process.factory() as s:
                obj: Any = s.get(model, row, with_for_update=True)
                obj.version += 1
                obj.payload = f"v{obj.version}"
                version = obj.version
                s.commit()
        elif how == 1:  # an ORM bulk update
            with process.factory() as s:
                version = next_version(s.connection(), row) + 1
                s.execute(update(model).where(model.id == row).values(version=version))
                s.commit()
        elif how == 2:  # textual DML on the session's connection
            with process.factory() as s:
                version = next_version(s.connection(), row) + 1
                s.execute(
                    sa.text(f"UPDATE {table.name} SET version = :v WHERE id = :id"),  # noqa: S608
                    {"v": version, "id": row},
                )
                s.commit()
        elif how == 3:  # Core, committed as it goes
            with process.engine.connect() as conn:
                version = next_version(conn, row) + 1
                conn.execute(update(table).where(table.c.id == row).values(version=version))
                conn.commit()
        elif how == 4:  # autocommit, one statement
            with process.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                version = int(
                    conn.execute(
                        update(table)
                        .where(table.c.id == row)
                        .values(version=table.c.version + 1)
                        .returning(table.c.version)
                    ).scalar_one()
                )
        else:  # a change flushed, read back in its transaction, and rolled back
            with process.factory() as s:
                undone: Any = s.get(model, row, with_for_update=True)
                undone.version = -1 - undone.version
                s.flush()
                stmt = select(model).where(model.id == row).options(FromCache())
                assert s.scalars(stmt).one().version < 0  # its own write
                s.rollback()
            return
        committed(row, version)

    read_more = threading.Condition()

    def read_past(wanted: int) -> Callable[[], bool]:
        return lambda: reads[0] >= wanted or bool(failures)

    def writer(start: int) -> None:
        try:
            for turn in range(start, HISTORY_WRITES, 2):
                with read_more:  # the readers' turn: the tier keeps what they read again
                    wanted = reads[0] + 3 * HISTORY_ROWS
                    read_more.wait_for(read_past(wanted), WAIT)
                write(turn)
        except Exception as exc:
            failures.append(f"writer: {exc!r}")

    def reader(kind: int) -> None:
        rng = iter(range(10**9))
        try:
            while not done.is_set():
                row = next(rng) % HISTORY_ROWS
                with lock:
                    before = list(floor)
                with process.factory() as s:
                    if kind == 0:
                        obj: Any = s.get(model, row)
                        seen = {row: obj.version}
                    elif kind == 1:
                        stmt = select(model).where(model.id == row).options(FromCache())
                        seen = {row: s.scalars(stmt).one().version}
                    else:
                        stmt = select(model).order_by(model.id).options(FromCache())
                        seen = {o.id: o.version for o in s.scalars(stmt)}
                with read_more:
                    reads[0] += 1
                    read_more.notify_all()
                for at, version in seen.items():
                    if version < before[at]:
                        failures.append(f"reader {kind}: row {at} at {version} < {before[at]}")
        except Exception as exc:
            failures.append(f"reader {kind}: {exc!r}")

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    try:
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join(120)
        done.set()
        for thread in readers:
            thread.join(WAIT)
        assert failures == []
        assert reads[0] > HISTORY_WRITES
        assert process.total("local_hits") > 0
    finally:
        done.set()
        process.close()


@pytest.mark.parametrize(
    "lock", ["FOR UPDATE", "FOR NO KEY UPDATE SKIP LOCKED", "FOR SHARE", "FOR KEY SHARE NOWAIT"]
)
def test_a_textual_locking_read_retires_nothing(
    spawn: Callable[..., Process], product: int, lock: str
) -> None:
    """``SELECT ... FOR UPDATE`` through ``text()`` writes nothing: its commit must not
    retire every table's entries (and empty every local tier of them), as the textual DML
    whose tables cannot be told does."""
    reader = spawn(local_lease=30.0)
    reader.hold(product)
    reader.hold(product, get=True)
    with reader.factory() as s:
        locked = s.execute(
            sa.text(f"SELECT id FROM products WHERE id = :id {lock}"),  # noqa: S608 - a constant
            {"id": product},
        ).scalar_one()
        assert locked == product
        s.commit()
    hits = reader.total("local_hits")
    assert reader.price(product) == Decimal("1.00")
    assert reader.price(product, get=True) == Decimal("1.00")
    assert reader.total("local_hits") == hits + 2, "the locking read retired the entries"


# -- every kind of mutable value, shared by sessions of two threads ----------------------


def test_no_kind_of_mutable_value_is_shared_between_threads_sessions(
    database_url: str, redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """ARRAY (one and two dimensions, tracked by ``MutableList``), JSONB tracked by
    ``MutableDict`` and a ``MutableComposite``: two threads build the same row from the
    local tier at once and change every value in place; neither sees the other's
    change, the database keeps its values, and so does the tier."""
    from sqlalchemy.dialects.postgresql import ARRAY, JSONB
    from sqlalchemy.ext.mutable import MutableComposite, MutableDict, MutableList
    from sqlalchemy.orm import Mapped, composite, mapped_column

    from tests.integration.test_attach import private_base

    class Point(MutableComposite):
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

        def __setattr__(self, key: str, value: Any) -> None:
            object.__setattr__(self, key, value)
            self.changed()

        def __composite_values__(self) -> tuple[int, int]:
            return self.x, self.y

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

        __hash__ = None  # type: ignore[assignment]  # mutable

    stored = {
        "ints": [1, 2],
        "grid": [[1, 2], [3, 4]],
        "tags": ["a"],
        "doc": {"k": [1, {"deep": "v"}]},
    }
    with private_base() as base:
        bag: Any = type(
            "ReviewBag",
            (base,),
            {
                "__tablename__": "review_local_bags",
                "__annotations__": {"id": Mapped[int], "px": Mapped[int], "py": Mapped[int]},
                "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
                "ints": mapped_column(ARRAY(sa.Integer)),
                "grid": mapped_column(ARRAY(sa.Integer, dimensions=2)),
                "tags": mapped_column(MutableList.as_mutable(ARRAY(sa.Text))),
                "doc": mapped_column(MutableDict.as_mutable(JSONB)),
                "px": mapped_column(sa.Integer),
                "py": mapped_column(sa.Integer),
                "point": composite(Point, "px", "py"),
            },
        )
        table = cast("sa.Table", bag.__table__)
        table.drop(shop_engine, checkfirst=True)
        table.create(shop_engine)
        with shop_engine.begin() as conn:
            conn.execute(sa.insert(table).values(id=1, px=1, py=2, **stored))
        process = Process(database_url, redis_url, namespace, local_lease=30.0)
        try:
            stmt = select(bag).where(bag.id == 1).options(FromCache())

            def values(obj: Any) -> dict[str, Any]:
                return {k: getattr(obj, k) for k in stored} | {"point": (obj.px, obj.py)}

            original = stored | {"point": (1, 2)}
            for _ in range(3):
                with process.factory() as s:
                    s.scalars(stmt).one()
                    s.get(bag, 1)
            both = threading.Barrier(2, timeout=WAIT)
            seen: dict[int, Any] = {}
            failures: list[str] = []

            def change(at: int) -> None:
                try:
                    with process.factory() as s:
                        obj: Any = s.get(bag, 1) if at else s.scalars(stmt).one()
                        both.wait()
                        obj.ints.append(at)
                        obj.grid[0][0] = 10 + at
                        obj.tags.append(f"t{at}")
                        obj.doc["k"][1]["deep"] = at
                        obj.point.x = 20 + at
                        both.wait()
                        seen[at] = values(obj)
                        s.rollback()
                except Exception as exc:
                    failures.append(repr(exc))
                    both.abort()

            hits = process.total("local_hits")
            threads = [threading.Thread(target=change, args=(at,)) for at in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert failures == []
            for at in range(2):
                assert seen[at] == {
                    "ints": [1, 2, at],
                    "grid": [[10 + at, 2], [3, 4]],
                    "tags": ["a", f"t{at}"],
                    "doc": {"k": [1, {"deep": at}]},
                    "point": (20 + at, 2),
                }
            with Session(shop_engine) as oracle:
                row = oracle.execute(sa.select(table).where(table.c.id == 1)).one()
                assert {k: row._mapping[k] for k in stored} == stored
            with process.factory() as s:
                assert values(s.scalars(stmt).one()) == original
            with process.factory() as s:
                assert values(s.get(bag, 1)) == original
            assert process.total("local_hits") >= hits + 2
        finally:
            process.close()
            table.drop(shop_engine)
