"""The per-slot fill of docs/guarantees.md, "Redis Cluster": a statement over two tables
whose counters live in two slots (on the cluster) is refused when its foreign table moved
or is being written, and read fresh afterwards.

The scenarios run in every mode (on a single server the two tables share a server, and
the same outcomes must hold); in the cluster modes they first check that the tables'
counters really are in two slots, so that the two-step fill is what runs.
"""

from __future__ import annotations

import secrets
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.compat import key_slot
from tests.seams import Seams, once

if TYPE_CHECKING:
    from collections.abc import Iterator

    from devservices.cluster import RedisCluster
    from tests.modes import Db, Runner

pytestmark = pytest.mark.cluster
TIMEOUT = 10.0


@pytest.fixture
def category(shop_engine: sa.Engine) -> Iterator[int]:
    """A category of the test's own, with one product (price 1.00); both deleted after."""
    with Session(shop_engine) as s:
        c = Category(name=f"cluster-{secrets.token_hex(4)}")
        s.add(c)
        s.flush()
        s.add(Product(category_id=c.id, name="in cluster", price=Decimal("1.00"), status="ACTIVE"))
        s.commit()
        cid = c.id
    yield cid
    with Session(shop_engine) as s:
        s.execute(delete(Product).where(Product.category_id == cid))
        s.execute(delete(Category).where(Category.id == cid))
        s.commit()


def joined(cid: int) -> Any:
    """Product names with their category's name: two tables, one statement."""
    return (
        select(Product.name, Category.name)
        .join(Category, Category.id == Product.category_id)
        .where(Category.id == cid)
        .options(FromCache())
    )


def read(db: Db, cid: int) -> list[tuple[str, str]]:
    with db.session() as s:
        return [tuple(row) for row in s.execute(joined(cid))]


def rename(db: Db, cid: int, name: str) -> None:
    with db.session() as s:
        c = s.get(Category, cid, populate_existing=True)
        c.name = name
        s.commit()


def two_slots(db: Db) -> None:
    if db.mode.startswith("cluster"):
        keys = db.cache._core.keys
        slots = {key_slot(keys.version_key(t)) for t in ("products", "categories")}
        assert len(slots) == 2  # else this test would not exercise the two-step fill


@pytest.mark.parametrize("written", ["categories", "products"])
def test_a_two_slot_fill_is_refused_when_a_table_moved_after_the_read(
    in_mode: Runner, category: int, written: str
) -> None:
    def scenario(db: Db) -> None:
        two_slots(db)

        def write() -> None:
            if written == "categories":
                rename(db, category, f"renamed-{category}")
            else:
                with db.session() as s:
                    (p,) = s.scalars(select(Product).where(Product.category_id == category))
                    p.name = "renamed product"
                    s.commit()

        db.seams.after_database_read(once(write))
        before = read(db, category)  # read before the commit: returned, not stored
        assert db.cache.stats()["total"]["fill_refused"] == 1
        after = read(db, category)
        assert after != before
        db.sql.reset()
        assert read(db, category) == after  # stored now, and served
        assert db.sql.count == 0

    in_mode(scenario)


@pytest.mark.parametrize("written", ["categories", "products"])
def test_a_two_slot_fill_is_refused_while_a_table_is_being_written(
    in_mode: Runner, category: int, written: str
) -> None:
    def scenario(db: Db) -> None:
        two_slots(db)
        committed = read(db, category)
        with db.session() as writer:
            if written == "categories":
                writer.get(Category, category).name = f"pending-{category}"
            else:
                (p,) = writer.scalars(select(Product).where(Product.category_id == category))
                p.name = "pending product"
            writer.flush()  # the table is marked, not committed
            assert read(db, category) == committed  # another session: not yet
            assert db.cache.stats()["total"]["fill_refused"] == 1
            writer.commit()
        assert read(db, category) != committed

    in_mode(scenario)


def test_a_commit_retires_a_two_slot_entry(in_mode: Runner, category: int) -> None:
    def scenario(db: Db) -> None:
        two_slots(db)
        first = read(db, category)
        db.sql.reset()
        assert read(db, category) == first
        assert db.sql.count == 0  # a hit: every table's counter matched, in each slot
        rename(db, category, f"again-{category}")
        assert read(db, category)[0][1] == f"again-{category}"

    in_mode(scenario)


def test_explicit_invalidations_and_clear_reach_every_slot(in_mode: Runner, category: int) -> None:
    def misses_once(db: Db) -> None:
        db.sql.reset()
        read(db, category)
        assert db.sql.count == 1  # the invalidation made it a miss
        db.sql.reset()
        read(db, category)
        assert db.sql.count == 0  # filled again

    def scenario(db: Db) -> None:
        two_slots(db)
        read(db, category)
        db.invalidate("invalidate_model", Category)
        misses_once(db)
        db.invalidate("invalidate_query", joined(category))
        misses_once(db)
        # clear() in the sync modes, await aclear() in the async ones
        assert db.invalidate("clear") > 0  # every primary scanned
        misses_once(db)

    in_mode(scenario)


def test_concurrent_misses_on_a_cluster_send_one_query(
    redis_cluster: RedisCluster, shop_engine: sa.Engine, namespace: str
) -> None:
    """The stampede lease on a cluster: the filler holds its database read until every
    other caller waits on its lease (``lease_waits`` counts them before they wait); one
    query reaches Postgres, and every caller gets its rows."""
    callers = 8
    cache = Cache(redis_cluster.url, namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    seams = Seams(engine=shop_engine)
    statement = (
        select(Product.category_id, func.count(Product.id))
        .group_by(Product.category_id)
        .order_by(Product.category_id)
    )
    cached = statement.options(FromCache(lease_wait=TIMEOUT))
    queries: list[str] = []

    def waiting() -> int:
        return int(cache.stats()["regions"].get("default", {}).get("lease_waits", 0))

    def hold_filler() -> None:
        queries.append("read")
        deadline = time.monotonic() + TIMEOUT
        while waiting() < callers - 1:  # the others count themselves, then wait
            assert time.monotonic() < deadline, "the other callers never waited"
            time.sleep(0.005)

    try:
        with Session(shop_engine) as s:
            expected = s.execute(statement).all()
        seams.after_database_read(hold_filler)
        start = threading.Barrier(callers)
        results: list[Any] = [None] * callers

        def call(i: int) -> None:
            start.wait(TIMEOUT)
            with factory() as s:
                results[i] = s.execute(cached).all()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert queries == ["read"]
        assert all(r == expected for r in results)
        assert cache.stats()["regions"]["default"]["hits"] == callers - 1
    finally:
        seams.close()
        cache.detach()
        cache.client.close()
