"""Stampede control: concurrent misses fill once; early refresh and stale serving (docs/design.md,
"Failure and bad input")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, OrderLine, Product
from sa_redis_cache import Cache, FromCache, stampede
from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.reads import entity_entry
from tests.seams import RedisTap, RoundTrip, Seams, once
from tests.support import SQLCounter

T = TypeVar("T")

CALLERS = 64
TIMEOUT = 60


TAPS_CACHE = True  # the cache's client is tapped: tests see its round trips (conftest)


@pytest.fixture
def seams(shop_engine: sa.Engine, redis_tap: RedisTap) -> Iterator[Seams]:
    points = Seams(engine=shop_engine, tap=redis_tap)
    yield points
    points.close()


def concurrent_misses(
    session_factory: sessionmaker[Session],
    seams: Seams,
    read: Callable[[Session], T],
) -> list[T]:
    """``read`` by CALLERS threads at once, each in its own session; their results.

    The filler is held after its database read until every other caller is waiting on
    its lease, so the test forces the worst interleaving instead of hoping for it.
    """
    waiting = threading.Semaphore(0)

    def hold_filler() -> None:
        for _ in range(CALLERS - 1):
            assert waiting.acquire(timeout=TIMEOUT)

    points = [seams.lease_wait(waiting.release), seams.after_database_read(hold_filler)]
    start = threading.Barrier(CALLERS)
    results: list[Any] = [None] * CALLERS

    def call(i: int) -> None:
        start.wait(TIMEOUT)
        with session_factory() as s:
            results[i] = read(s)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for remove in points:
        remove()  # the test's own reads afterwards are not the filler's
    assert not any(t.is_alive() for t in threads)
    return results


def expensive() -> Any:
    return (
        select(Product.category_id, func.count(OrderLine.id), func.sum(OrderLine.unit_price))
        .join(OrderLine, OrderLine.product_id == Product.id)
        .group_by(Product.category_id)
        .order_by(Product.category_id)
    )


def test_64_concurrent_misses_send_one_query(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    cache: Cache,
) -> None:
    stmt = expensive().options(FromCache(lease_wait=TIMEOUT))
    with sessionmaker(session_factory.kw["bind"])() as s:
        expected = s.execute(expensive()).all()
    sql.reset()
    results = concurrent_misses(session_factory, seams, lambda s: s.execute(stmt).all())
    assert sql.count == 1
    assert all(r == expected for r in results)
    region = cache.stats()["regions"]["default"]
    assert region["lease_waits"] == CALLERS - 1
    assert region["hits"] == CALLERS - 1


def test_without_leases_every_caller_reads_the_database(
    session_factory: sessionmaker[Session], sql: SQLCounter, seams: Seams
) -> None:
    """The control: the same interleaving with lease=False reaches Postgres once per caller."""
    callers = 4
    arrived = threading.Barrier(callers)
    seams.after_database_read(lambda: arrived.wait(TIMEOUT))
    stmt = expensive().options(FromCache(lease=False))
    sql.reset()

    def call() -> None:
        with session_factory() as s:
            s.execute(stmt).all()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sql.count == callers


def test_expired_entry_is_served_stale_while_one_caller_refreshes(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stmt = expensive().options(FromCache(ttl=60, stale_ttl=600, xfetch_beta=0))
    with session_factory() as s:
        expected = s.execute(stmt).all()
    # an hour later: past the logical TTL, within stale_ttl
    later = stampede.now_ms() + 3_600_000
    monkeypatch.setattr(stampede, "now_ms", lambda: later)
    lease_key = (
        next(k for k in cache.client.scan_iter(match=f"sarc:{cache.namespace}:*:q:*")).decode()
        + ":lease"
    )
    cache.client.set(lease_key, "someone else", px=60_000)  # another caller is refreshing
    sql.reset()
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    assert sql.count == 0
    assert cache.stats()["regions"]["default"]["stale_served"] == 1
    cache.client.delete(lease_key)
    with session_factory() as s:
        assert s.execute(stmt).all() == expected  # this caller takes the lease: refresh
    assert sql.count == 1
    assert cache.stats()["regions"]["default"]["early_refreshes"] == 1


def test_xfetch_refreshes_early_only_near_expiry() -> None:
    timing = stampede.Timing(delta_ms=50, expires_ms=1_000_000)
    far = sum(stampede.due(timing, 1.0, now=1_000_000 - 60_000) for _ in range(2000))
    near = sum(stampede.due(timing, 1.0, now=1_000_000 - 10) for _ in range(2000))
    assert far == 0  # a minute before expiry a 50 ms read never refreshes
    assert near > 1500  # 10 ms before, almost every call does
    assert stampede.due(timing, 1.0, now=1_000_000)
    assert not stampede.due(timing, 0.0, now=1_000_000 - 10)


def test_xfetch_never_refreshes_an_entry_younger_than_its_read() -> None:
    """An entry filled 50 ms ago whose read took 80 ms is not due, whatever XFetch draws:
    its refresher may still be returning (two reads for one expiry otherwise)."""
    young = stampede.Timing(delta_ms=80, expires_ms=1_000_200, filled_ms=1_000_000)
    assert not any(stampede.due(young, 1e9, now=1_000_050) for _ in range(200))
    assert stampede.due(young, 1e9, now=1_000_080)  # as old as its read: XFetch decides
    assert stampede.due(young, 0.0, now=1_000_200)  # expired: due whatever its age


def test_a_query_entry_is_not_refreshed_early_before_it_is_as_old_as_its_read(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    seams: Seams,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [stampede.now_ms()]
    monkeypatch.setattr(stampede, "now_ms", lambda: clock[0])

    def slow_read() -> None:
        clock[0] += 1_000  # the database read takes 1 s by the cache's clock

    stmt = expensive().options(FromCache(ttl=60, xfetch_beta=1e9))
    remove = seams.after_database_read(slow_read)
    with session_factory() as s:
        expected = s.execute(stmt).all()  # fills: delta 1 s, filled at the clock's now
    remove()
    sql.reset()
    clock[0] += 500  # half a read time after the fill: XFetch alone would refresh now
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    assert sql.count == 0
    assert cache.stats()["regions"]["default"]["early_refreshes"] == 0
    clock[0] += 600  # older than its read: the huge beta makes the refresh due
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    assert sql.count == 1
    assert cache.stats()["regions"]["default"]["early_refreshes"] == 1


def test_a_fill_landing_before_the_lease_is_asked_for_is_served(
    session_factory: sessionmaker[Session], sql: SQLCounter, seams: Seams
) -> None:
    """The first look missed; another caller filled (and released the lease) just before
    this one asks for it: the lease request's second look serves that fill, no query."""
    stmt = expensive().options(FromCache())
    nested = {"done": False}

    def another_caller_fills() -> None:
        if not nested["done"]:
            nested["done"] = True
            with session_factory() as s:
                s.execute(stmt).all()

    seams.before_lease(another_caller_fills)
    sql.reset()
    with session_factory() as s:
        s.execute(stmt).all()
    assert nested["done"]
    assert sql.count == 1  # only the other caller's fill reached Postgres


def test_a_query_miss_takes_its_lease_in_its_first_look(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    redis_tap: RedisTap,
    cache: Cache,
) -> None:
    """One round trip before the database read: the look asks for the lease when the
    entry is absent (lua/look.lua), so no second look is needed; the fill releases it."""
    stmt = expensive().options(FromCache())
    with session_factory() as s:
        expected = s.execute(stmt).all()  # connections, the region, the counters
    cache.invalidate_query(stmt)
    trips: list[RoundTrip] = []
    before_read: list[int] = []
    seams.after_database_read(lambda: before_read.append(len(trips)))
    redis_tap.listen(trips.append)
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    redis_tap.remove(trips.append)
    assert before_read == [1], trips
    assert len(trips) == 2, trips  # the look with its lease, then the fill
    assert cache.stats()["regions"]["default"]["fills"] == 2
    # the fill released it
    assert not list(cache.client.scan_iter(match=f"sarc:{cache.namespace}:*:lease"))
    sql.reset()
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    assert sql.count == 0


def test_a_statement_that_hit_last_time_is_looked_at_with_a_plain_mget(
    session_factory: sessionmaker[Session], redis_tap: RedisTap, cache: Cache
) -> None:
    """Hits are the common case: a key whose last look found its entry is read with an
    MGET (a script look costs a hit more); a miss makes its next look take the lease."""
    stmt = expensive().options(FromCache())

    def commands_of_one_read() -> list[str]:
        trips: list[RoundTrip] = []
        redis_tap.listen(trips.append)
        with session_factory() as s:
            s.execute(stmt).all()
        redis_tap.remove(trips.append)
        return [str(command[0]).upper() for trip in trips for command in trip]

    with session_factory() as s:
        s.execute(stmt).all()  # a miss and its fill
    assert commands_of_one_read()[0] == "EVALSHA"  # the last look missed: look.lua
    assert commands_of_one_read() == ["MGET"]  # the last look hit
    cache.invalidate_query(stmt)
    assert commands_of_one_read()[0] == "MGET"  # still thought hot: the miss is found...
    assert commands_of_one_read()[0] == "EVALSHA"  # ...and the next look takes the lease


def test_a_first_look_that_finds_the_entry_takes_no_lease(
    session_factory: sessionmaker[Session], sql: SQLCounter, cache: Cache
) -> None:
    stmt = expensive().options(FromCache())
    with session_factory() as s:
        expected = s.execute(stmt).all()
    for _ in range(3):
        with session_factory() as s:
            assert s.execute(stmt).all() == expected
    assert not list(cache.client.scan_iter(match=f"sarc:{cache.namespace}:*:lease"))
    assert cache.stats()["regions"]["default"]["hits"] == 3


def test_an_entity_fill_landing_before_the_lease_is_asked_for_is_served(
    session_factory: sessionmaker[Session], sql: SQLCounter, seams: Seams
) -> None:
    """An entity miss still asks for the lease with a second look (SET NX + MGET): a fill
    that landed between its first look and that request is served, no second query."""
    filled: list[str] = []

    def another_caller_fills() -> None:
        with session_factory() as s:
            filled.append(s.get_one(Category, 2).name)

    seams.before_lease(once(another_caller_fills))
    sql.reset()
    with session_factory() as s:
        name = s.get_one(Category, 2).name
    assert filled == [name]
    assert sql.count == 1  # only the other caller's fill reached Postgres
    with session_factory() as s:
        assert s.get_one(Category, 2).name == name


def test_a_refresh_landing_before_the_lease_is_asked_for_is_not_repeated(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two callers find the entry past its logical expiry; the other one refreshes it (and
    releases the lease) between this caller's look and its lease request: the request
    sees the entry changed, takes no lease and serves what it read: one query, not two."""
    stmt = expensive().options(FromCache(ttl=60, stale_ttl=600, xfetch_beta=0))
    with session_factory() as s:
        expected = s.execute(stmt).all()
    later = stampede.now_ms() + 3_600_000  # past the logical TTL, within stale_ttl
    monkeypatch.setattr(stampede, "now_ms", lambda: later)
    nested = {"done": False}

    def another_caller_refreshes() -> None:
        if not nested["done"]:
            nested["done"] = True
            with session_factory() as s:
                s.execute(stmt).all()

    seams.before_lease(another_caller_refreshes)
    sql.reset()
    with session_factory() as s:
        assert s.execute(stmt).all() == expected
    assert nested["done"]
    assert sql.count == 1  # only the other caller's refresh reached Postgres
    assert cache.stats()["regions"]["default"]["early_refreshes"] == 1
    lease_key = (
        next(k for k in cache.client.scan_iter(match=f"sarc:{cache.namespace}:*:q:*")).decode()
        + ":lease"
    )
    assert cache.client.get(lease_key) is None  # nobody was left holding the lease


def test_an_entity_refresh_landing_before_the_lease_is_asked_for_is_not_repeated(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_factory() as s:
        name = s.get_one(Category, 1).name
    later = stampede.now_ms() + 3_600_000  # at the entry's logical expiry: due for sure
    monkeypatch.setattr(stampede, "now_ms", lambda: later)
    nested = {"done": False}

    def another_caller_refreshes() -> None:
        if not nested["done"]:
            nested["done"] = True
            with session_factory() as s:
                s.get_one(Category, 1)

    seams.before_lease(another_caller_refreshes)
    sql.reset()
    with session_factory() as s:
        assert s.get_one(Category, 1).name == name
    assert nested["done"]
    assert sql.count == 1


# -- the entity cache (session.get) ------------------------------------------------------


def entity_key(cache: Cache, table: str) -> bytes:
    key = next(cache.client.scan_iter(match=f"sarc:{cache.namespace}:{{*:{table}}}:e:*"))
    assert isinstance(key, bytes)
    return key


def test_64_concurrent_entity_misses_send_one_query(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    info = cache._core.models.entity_infos[inspect(Category)]
    monkeypatch.setattr(info, "policy", replace(Category.__cache__, lease_wait=TIMEOUT))
    sql.reset()

    def name(s: Session) -> str | None:
        category = s.get(Category, 1)
        return None if category is None else category.name

    names = concurrent_misses(session_factory, seams, name)
    assert sql.count == 1
    with sessionmaker(session_factory.kw["bind"])() as s:
        expected = s.get_one(Category, 1).name
    assert names == [expected] * CALLERS
    model = cache.stats()["models"]["Category"]
    assert model["lease_waits"] == CALLERS - 1
    assert model["hits"] == CALLERS - 1


def test_an_entity_entry_near_expiry_is_refreshed_by_one_caller(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_factory() as s:
        name = s.get_one(Category, 1).name  # fills, stamped with its read time and expiry
    later = stampede.now_ms() + 3_600_000  # at the entry's logical expiry: due for sure
    monkeypatch.setattr(stampede, "now_ms", lambda: later)
    lease_key = entity_key(cache, "categories").decode() + ":lease"
    cache.client.set(lease_key, "someone else", px=60_000)  # another caller is refreshing
    sql.reset()
    with session_factory() as s:
        assert s.get_one(Category, 1).name == name  # served meanwhile
    assert sql.count == 0
    cache.client.delete(lease_key)
    with session_factory() as s:
        assert s.get_one(Category, 1).name == name  # this caller refreshes
    assert sql.count == 1
    assert cache.stats()["models"]["Category"]["early_refreshes"] == 1
    assert cache.client.get(lease_key) is None  # the refresh's fill released the lease


def test_a_write_through_entry_is_never_refreshed_early(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    product: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer stamps the bare generation: no read time is known, so no XFetch."""
    with session_factory() as s:
        s.get_one(Product, product).price = Decimal("2.50")
        s.commit()  # write-through: the entity entry holds the new state
    later = stampede.now_ms() + 3_600_000
    monkeypatch.setattr(stampede, "now_ms", lambda: later)
    sql.reset()
    with session_factory() as s:
        assert s.get_one(Product, product).price == Decimal("2.50")
    assert sql.count == 0
    assert cache.stats()["models"]["Product"]["early_refreshes"] == 0


def test_entity_entry_stamps_of_both_writers_parse() -> None:
    assert entity_entry(pack([[7, 5], None])) == (7, 5, None, None)
    assert entity_entry(pack([[7, 5, 3, 1000], None])) == (7, 5, stampede.Timing(3, 1000), None)
    filled = entity_entry(pack([[7, 5, 3, 1000, 900], None]))
    assert filled == (7, 5, stampede.Timing(3, 1000, 900), None)
    for foreign in ([[7, 5, 3], None], [["7", 5, 3, 1000], None], [7, None], [7.0, None], [7]):
        with pytest.raises(CodecError):
            entity_entry(pack(foreign))


@pytest.mark.parametrize("read", ["query", "entity"])
def test_a_holder_that_fails_hands_its_lease_to_one_waiter(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    seams: Seams,
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
    read: str,
) -> None:
    """The lease holder's database read fails once every other caller waits for its fill.
    Its lease is released unfilled: one waiter takes it at its next look, reads the
    database and fills for the rest. (Each waiter used to poll without asking for the
    lease, wait all of ``lease_wait``, then read the database itself: as many queries as
    waiters, after a minute here.)"""
    callers = 16
    info = cache._core.models.entity_infos[inspect(Category)]
    monkeypatch.setattr(info, "policy", replace(Category.__cache__, lease_wait=TIMEOUT))
    stmt = select(Category.name).where(Category.id == 1).options(FromCache(lease_wait=TIMEOUT))

    def name(s: Session) -> str:
        if read == "entity":
            return s.get_one(Category, 1).name
        return str(s.scalars(stmt).one())

    waiting = threading.Semaphore(0)

    def fail_once_all_wait() -> None:
        for _ in range(callers - 1):
            assert waiting.acquire(timeout=TIMEOUT)
        raise RuntimeError("the holder's read failed")

    with sessionmaker(session_factory.kw["bind"])() as s:
        expected = s.get_one(Category, 1).name
    seams.lease_wait(waiting.release)
    seams.after_database_read(once(fail_once_all_wait))
    sql.reset()
    start = threading.Barrier(callers)
    names: list[str] = []
    failures: list[BaseException] = []

    def call() -> None:
        start.wait(TIMEOUT)
        try:
            with session_factory() as s:
                names.append(name(s))
        except RuntimeError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    seams.close()
    assert not any(t.is_alive() for t in threads)
    assert len(failures) == 1
    assert names == [expected] * (callers - 1)
    assert sql.count == 2, sql.statements  # the failed read, and the one that filled
