"""Deterministic interleavings of readers and writers (docs/design.md, "Consistency"), forced from
outside.

Each test runs one side of the protocol up to an exact point (after a miss's database
read, or between a writer's database commit and its cache work), where a listener
(:mod:`tests.seams`: SQLAlchemy events, no hook in the library) runs the other side to
completion; then it checks that the cache ends equal to the database. The scenarios run
with a ``Session`` and with an ``AsyncSession`` (``in_mode``, see :mod:`tests.modes`):
under asyncio the listener runs in the session's greenlet.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select, update

from examples.shop import Category, Product
from sa_redis_cache import FromCache
from tests.modes import cached_price, db_price, set_price
from tests.seams import once

if TYPE_CHECKING:
    from tests.modes import Db, Runner


# the CI subset that runs on a Redis Cluster in every run (tests/integration/conftest.py)
pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("read", ["query", "entity"])
def test_a_fill_that_read_before_a_commit_is_refused(
    in_mode: Runner, product: int, read: str
) -> None:
    """docs/design.md, "Known failures": the stamp taken after the read left a stale entry valid
    for ever.

    The stale set: a write commits between a miss's database read and its fill.
    """

    def load(db: Db) -> Decimal:
        if read == "query":
            return cached_price(db, product)
        with db.session() as s:
            price: Decimal = s.get(Product, product).price
            return price

    def scenario(db: Db) -> None:
        fired: list[str] = []

        def write_in_between() -> None:
            fired.append("write")
            set_price(db, product, "2.00")

        db.seams.after_database_read(once(write_in_between))
        assert load(db) == Decimal("1.00")  # read before the commit: returned, not stored
        assert fired == ["write"]
        assert load(db) == Decimal("2.00") == db_price(db, product)
        assert load(db) == Decimal("2.00")
        assert db.cache.stats()["total"]["fill_refused"] >= 1

    in_mode(scenario)


def test_fill_during_an_open_write_transaction_is_refused(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        with db.session() as writer:
            p = writer.get(Product, product)
            assert p is not None
            p.price = Decimal("4.00")
            writer.flush()  # marked in Redis, not committed
            assert cached_price(db, product) == Decimal("1.00")
            assert db.cache.stats()["regions"]["default"]["fill_refused"] == 1
            writer.commit()
        assert cached_price(db, product) == Decimal("4.00")

    in_mode(scenario)


def test_rollback_leaves_the_cache_as_it_was(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        assert cached_price(db, product) == Decimal("1.00")
        with db.session() as s:
            p = s.get(Product, product)
            assert p is not None
            p.price = Decimal("5.00")
            s.flush()  # marked in Redis: no fill is accepted meanwhile
            s.rollback()
        # the marks were released: the first read after the rollback fills again
        before = db.cache.stats()["regions"]["default"]["fills"]
        assert cached_price(db, product) == Decimal("1.00")
        assert db.cache.stats()["regions"]["default"]["fills"] == before + 1
        db.sql.reset()
        assert cached_price(db, product) == Decimal("1.00")
        assert db.sql.count == 0
        with db.session() as s:
            assert s.get(Product, product).price == Decimal("1.00")

    in_mode(scenario)


def test_write_through_writers_whose_cache_writes_arrive_reversed(
    in_mode: Runner, product: int
) -> None:
    """Writer A commits first but its cache write arrives after writer B's."""

    def scenario(db: Db) -> None:
        def writer_b() -> None:
            # A committed in Postgres, its cache work is pending
            set_price(db, product, "7.00")  # B: flushes after A's commit, commits, writes

        db.seams.before_post_commit(once(writer_b))
        set_price(db, product, "6.00")  # A
        assert db_price(db, product) == Decimal("7.00")
        with db.session() as s:
            p = s.get(Product, product)
            assert p is not None
            assert p.price == Decimal("7.00")

    in_mode(scenario)


def test_savepoint_rollback_discards_and_release_keeps(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        with db.session() as s:
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
        with db.session() as s:
            fresh = s.get(Product, product, populate_existing=True)
            assert fresh is not None
            assert (fresh.name, fresh.price) == ("kept", Decimal("8.00"))
        with db.session() as s:
            cached = s.get(Product, product)
            assert cached is not None
            assert (cached.name, cached.price) == ("kept", Decimal("8.00"))

    in_mode(scenario)


def test_repeatable_read_reader_cannot_fill_its_old_snapshot(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        with db.session() as reader:
            reader.execute(select(Category.id).limit(1))  # the snapshot is taken here
            set_price(db, product, "10.00")
            stmt = select(Product).where(Product.id == product).options(FromCache())
            assert reader.scalars(stmt)[0].price == Decimal("1.00")  # its snapshot
            reader.expunge_all()
            got = reader.get(Product, product)
            assert got is not None
            assert got.price == Decimal("1.00")
        assert cached_price(db, product) == Decimal("10.00")
        with db.session() as s:
            assert s.get(Product, product).price == Decimal("10.00")

    replace(in_mode, engine_kwargs={"isolation_level": "REPEATABLE READ"})(scenario)


@pytest.mark.parametrize("first", ["FromCache", "session.get"])
def test_repeatable_read_snapshot_starts_at_a_first_read_the_cache_could_serve(
    in_mode: Runner, product: int, first: str
) -> None:
    """The transaction's first read would be a hit; served from the cache, it began no
    transaction, so the snapshot came at a later statement, after another commit. It is
    still a hit: the statement that takes the snapshot is a ``SELECT 1``."""

    def scenario(db: Db) -> None:
        assert cached_price(db, product) == Decimal("1.00")  # the entries are there
        with db.session() as s:
            s.get(Product, product)
        with db.session() as reader:
            db.sql.reset()
            if first == "FromCache":
                stmt = select(Product).where(Product.id == product).options(FromCache())
                assert reader.scalars(stmt)[0].price == Decimal("1.00")
            else:
                got = reader.get(Product, product)
                assert got is not None
                assert got.price == Decimal("1.00")
            assert db.sql.statements == ["SELECT 1"]
            set_price(db, product, "10.00")
            uncached = select(Product.price).where(Product.id == product)
            assert reader.scalars(uncached) == [Decimal("1.00")]  # the same snapshot
        assert cached_price(db, product) == Decimal("10.00")

    replace(in_mode, engine_kwargs={"isolation_level": "REPEATABLE READ"})(scenario)


def test_bulk_update_invalidates_queries_and_entities(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        assert cached_price(db, product) == Decimal("1.00")
        with db.session() as s:
            s.get(Product, product)
        with db.session() as s:
            s.execute(update(Product).where(Product.id == product).values(price=Decimal("11.00")))
            s.commit()
        assert cached_price(db, product) == Decimal("11.00")
        with db.session() as s:
            assert s.get(Product, product).price == Decimal("11.00")

    in_mode(scenario)


def test_transaction_reads_its_own_writes(in_mode: Runner, product: int) -> None:
    def scenario(db: Db) -> None:
        assert cached_price(db, product) == Decimal("1.00")
        with db.session() as s:
            s.execute(update(Product).where(Product.id == product).values(price=Decimal("12.00")))
            db.sql.reset()
            stmt = select(Product.price).where(Product.id == product).options(FromCache())
            assert s.scalars(stmt) == [Decimal("12.00")]
            assert db.sql.count == 1
            s.rollback()
        assert cached_price(db, product) == Decimal("1.00")

    in_mode(scenario)
