"""Deterministic interleavings of readers and writers (DESIGN.md §4), forced with test hooks.

Each test parks one thread at an exact point of the protocol (after a miss's database
read, or between a writer's database commit and its cache work), runs the other side to
completion, releases the first, and checks that the cache ends equal to the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache

TIMEOUT = 30


class Parking:
    """Parks the thread named ``who`` at a hook until the test lets it go."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.arrived = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        if threading.current_thread().name == self.who:
            self.arrived.set()
            assert self.release.wait(TIMEOUT), "the test never released the parked thread"


def in_thread(name: str, fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a named thread; its return value or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the test re-raises it after join
            out.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, out


def joined(thread: threading.Thread, out: list[Any]) -> Any:
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@pytest.fixture
def hooks(cache: Cache) -> Iterator[dict[str, Callable[[], None]]]:
    registry = cache._core.hooks  # the test-hook table of this cache
    yield registry
    registry.clear()


def set_price(factory: sessionmaker[Session], pid: int, price: str) -> None:
    with factory() as s:
        p = s.get(Product, pid, populate_existing=True)
        assert p is not None
        p.price = Decimal(price)
        s.commit()


def cached_price(factory: sessionmaker[Session], pid: int) -> Decimal:
    with factory() as s:
        stmt = select(Product).where(Product.id == pid).options(FromCache())
        return s.scalars(stmt).one().price


def db_price(factory: sessionmaker[Session], pid: int) -> Decimal:
    with factory() as s:
        return s.scalars(select(Product.price).where(Product.id == pid)).one()


def test_fill_after_a_commit_that_followed_the_read_is_refused(
    session_factory: sessionmaker[Session], hooks: dict[str, Any], product: int, cache: Cache
) -> None:
    """DESIGN §7: the stamp taken after the read left a stale entry valid for ever."""
    park = Parking("reader")
    hooks["after_database_read"] = park
    reader, out = in_thread("reader", lambda: cached_price(session_factory, product))
    assert park.arrived.wait(TIMEOUT)  # the reader has read 1.00 and not filled yet
    set_price(session_factory, product, "2.00")
    park.release.set()
    assert joined(reader, out) == Decimal("1.00")  # it started before the commit
    hooks.clear()
    assert (
        cached_price(session_factory, product)
        == Decimal("2.00")
        == db_price(session_factory, product)
    )
    assert cache.stats()["regions"]["default"]["fill_refused"] >= 1


def test_entity_fill_after_a_commit_is_refused(
    session_factory: sessionmaker[Session], hooks: dict[str, Any], product: int
) -> None:
    park = Parking("reader")
    hooks["after_database_read"] = park

    def read() -> Decimal:
        with session_factory() as s:
            p = s.get(Product, product)
            assert p is not None
            return p.price

    reader, out = in_thread("reader", read)
    assert park.arrived.wait(TIMEOUT)
    set_price(session_factory, product, "3.00")
    park.release.set()
    assert joined(reader, out) == Decimal("1.00")
    hooks.clear()
    assert read() == Decimal("3.00")


def test_fill_during_an_open_write_transaction_is_refused(
    session_factory: sessionmaker[Session], product: int, cache: Cache
) -> None:
    writer = session_factory()
    try:
        p = writer.get(Product, product)
        assert p is not None
        p.price = Decimal("4.00")
        writer.flush()  # marked in Redis, not committed
        assert cached_price(session_factory, product) == Decimal("1.00")
        assert cache.stats()["regions"]["default"]["fill_refused"] == 1
        writer.commit()
    finally:
        writer.close()
    assert cached_price(session_factory, product) == Decimal("4.00")


def test_rollback_leaves_the_cache_as_it_was(
    session_factory: sessionmaker[Session], product: int, cache: Cache
) -> None:
    assert cached_price(session_factory, product) == Decimal("1.00")
    with session_factory() as s:
        p = s.get(Product, product)
        assert p is not None
        p.price = Decimal("5.00")
        s.flush()
        s.rollback()
    # the marks were released: the first read after the rollback fills again
    before = cache.stats()["regions"]["default"]["fills"]
    assert cached_price(session_factory, product) == Decimal("1.00")
    assert cache.stats()["regions"]["default"]["fills"] == before + 1
    with session_factory() as s:
        assert s.get(Product, product).price == Decimal("1.00")  # type: ignore[union-attr]


def test_write_through_writers_whose_cache_writes_arrive_reversed(
    session_factory: sessionmaker[Session],
    hooks: dict[str, Any],
    product: int,
    redis_client: Any,
    namespace: str,
) -> None:
    """Writer A commits first but its cache write arrives after writer B's."""
    park = Parking("writer-a")
    hooks["before_post_commit"] = park
    a, a_out = in_thread("writer-a", lambda: set_price(session_factory, product, "6.00"))
    assert park.arrived.wait(TIMEOUT)  # A committed in Postgres, its cache work is pending
    set_price(session_factory, product, "7.00")  # B: flushes after A's commit, commits, writes
    park.release.set()
    joined(a, a_out)
    hooks.clear()
    assert db_price(session_factory, product) == Decimal("7.00")
    with session_factory() as s:
        p = s.get(Product, product)
        assert p is not None
        assert p.price == Decimal("7.00")


def test_savepoint_rollback_discards_and_release_keeps(
    session_factory: sessionmaker[Session], product: int, sql: Any
) -> None:
    with session_factory() as s:
        p = s.get(Product, product)
        assert p is not None
        p.name = "kept"
        with s.begin_nested():
            p.price = Decimal("8.00")
        nested = s.begin_nested()
        p.price = Decimal("9.00")
        s.flush()
        nested.rollback()
        s.commit()
    with session_factory() as s:
        fresh = s.get(Product, product, populate_existing=True)
        assert fresh is not None
        assert (fresh.name, fresh.price) == ("kept", Decimal("8.00"))
    sql.reset()
    with session_factory() as s:
        cached = s.get(Product, product)
        assert cached is not None
        assert (cached.name, cached.price) == ("kept", Decimal("8.00"))


def test_repeatable_read_reader_cannot_fill_its_old_snapshot(
    shop_engine: sa.Engine, session_factory: sessionmaker[Session], cache: Cache, product: int
) -> None:
    rr_factory = sessionmaker(shop_engine.execution_options(isolation_level="REPEATABLE READ"))
    cache.attach(rr_factory)
    reader = rr_factory()
    try:
        reader.execute(select(Category.id).limit(1)).all()  # the snapshot is taken here
        set_price(session_factory, product, "10.00")
        stmt = select(Product).where(Product.id == product).options(FromCache())
        assert reader.scalars(stmt).one().price == Decimal("1.00")  # its snapshot
        reader.expunge_all()
        got = reader.get(Product, product)
        assert got is not None
        assert got.price == Decimal("1.00")
    finally:
        reader.close()
    assert cached_price(session_factory, product) == Decimal("10.00")
    with session_factory() as s:
        assert s.get(Product, product).price == Decimal("10.00")  # type: ignore[union-attr]


def test_bulk_update_invalidates_queries_and_entities(
    session_factory: sessionmaker[Session], product: int
) -> None:
    assert cached_price(session_factory, product) == Decimal("1.00")
    with session_factory() as s:
        s.get(Product, product)
    with session_factory() as s:
        s.execute(update(Product).where(Product.id == product).values(price=Decimal("11.00")))
        s.commit()
    assert cached_price(session_factory, product) == Decimal("11.00")
    with session_factory() as s:
        assert s.get(Product, product).price == Decimal("11.00")  # type: ignore[union-attr]


def test_transaction_reads_its_own_writes(
    session_factory: sessionmaker[Session], product: int, sql: Any
) -> None:
    assert cached_price(session_factory, product) == Decimal("1.00")
    with session_factory() as s:
        s.execute(update(Product).where(Product.id == product).values(price=Decimal("12.00")))
        sql.reset()
        stmt = select(Product.price).where(Product.id == product).options(FromCache())
        assert s.scalars(stmt).one() == Decimal("12.00")
        assert sql.count == 1
        s.rollback()
    assert cached_price(session_factory, product) == Decimal("1.00")
