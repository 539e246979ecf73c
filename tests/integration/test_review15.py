"""Review of the issue-15 commit path and ``session.get`` fast path: writes whose rows'
keys change during the flush, and what the fast path must check like the pipeline."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache
from tests.conftest import delete_namespace


def test_a_primary_key_update_drops_the_entry_of_the_old_key(
    session_factory: sessionmaker[Session], cache: Cache, shop_engine: sa.Engine
) -> None:
    """The row leaves its old key: a get of the old key must not be served the cached
    row after the commit returned."""
    with Session(shop_engine) as s:
        p = Product(category_id=1, name="pk-move", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        old = p.id
        new = s.scalar(sa.select(sa.func.max(Product.id))) or 0
        new += 1000
    try:
        with session_factory() as s:
            assert s.get(Product, old) is not None  # fills the entry of the old key
        with session_factory() as s:
            assert s.get(Product, old) is not None  # a hit
        assert cache.stats()["models"]["Product"]["hits"] >= 1
        with session_factory() as s:
            s.get_one(Product, old).id = new
            s.commit()
        with session_factory() as s:
            assert s.get(Product, old) is None
        with session_factory() as s:
            assert s.scalars(sa.select(Product).where(Product.id == old)).first() is None
    finally:
        with Session(shop_engine) as s:
            s.execute(sa.delete(Product).where(Product.id.in_([old, new])))
            s.commit()


def test_a_get_in_a_session_of_another_cache_is_that_caches_read(
    session_factory: sessionmaker[Session],
    cache: Cache,
    shop_engine: sa.Engine,
    redis_url: str,
    namespace: str,
    product: int,
) -> None:
    """Two caches (two namespaces) attached to plain-Session sessionmakers: the fast path
    installed on ``Session`` by the first must not serve the second's sessions from the
    first's entries, which the second's writes do not reach."""
    other = Cache(redis.Redis.from_url(redis_url), namespace=f"{namespace}b", default_ttl=300)
    try:
        other_factory = sessionmaker(shop_engine)
        other.attach(other_factory)
        with session_factory() as s:
            assert s.get_one(Product, product).name == "scratch"  # fills the first's entry
        with other_factory() as s:
            s.get_one(Product, product).name = "renamed"
            s.commit()
        with other_factory() as s:
            assert s.get_one(Product, product).name == "renamed"
    finally:
        other.detach()
        delete_namespace(redis.Redis.from_url(redis_url), f"{namespace}b")


def _waits_for_a_lock(engine: sa.Engine, pid: int) -> None:
    """Return once backend ``pid`` waits for a lock (fails after 10 s)."""
    with engine.connect() as watch:
        deadline = time.monotonic() + 10
        while not watch.exec_driver_sql(
            "select 1 from pg_stat_activity where pid = %(pid)s and wait_event_type = 'Lock'",
            {"pid": pid},
        ).first():
            assert time.monotonic() < deadline, "the second writer never waited"


def test_a_flush_waiting_for_a_row_lock_holds_no_connection_another_writer_needs(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int
) -> None:
    """A bounded, blocking pool (one connection here; N connections and N+1 threads in
    general): a flush blocked on a row lock must not hold the pool's connection, or the
    lock's holder waits for it before it can commit (a deadlock until the pool's
    timeout, forever without one) and its marks fail."""
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=1, timeout=2)
    client = redis.Redis(connection_pool=pool)
    cache = Cache(client, namespace=f"{namespace}p", default_ttl=300)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    with Session(shop_engine) as s:
        other = Product(category_id=1, name="other", price=Decimal("1.00"), status="ACTIVE")
        s.add(other)
        s.commit()
        other_id = other.id
    pid: list[int] = []
    started = threading.Event()
    failures: list[BaseException] = []

    def blocked_writer() -> None:
        try:
            with factory() as s:
                row = s.get_one(Product, product)
                pid.append(s.connection().exec_driver_sql("select pg_backend_pid()").scalar_one())
                started.set()
                row.name = "second"
                s.flush()  # waits for the main thread's row lock
                s.commit()
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
            started.set()

    try:
        with factory() as first:
            first.get_one(Product, product).name = "first"
            first.flush()  # holds the row lock
            thread = threading.Thread(target=blocked_writer)
            thread.start()
            assert started.wait(10)
            _waits_for_a_lock(shop_engine, pid[0])
            first.get_one(Product, other_id).name = "also first"
            first.flush()  # its marks need a connection of the pool
            first.commit()
        thread.join(10)
        assert not thread.is_alive()
        assert not failures
        assert cache.stats()["total"]["errors"] == 0
    finally:
        cache.detach()
        client.close()
        delete_namespace(redis.Redis.from_url(redis_url), f"{namespace}p")
        with Session(shop_engine) as s:
            s.execute(sa.delete(Product).where(Product.id == other_id))
            s.commit()


def test_a_flush_refused_by_a_before_flush_listener_gives_its_connection_back(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int
) -> None:
    """An application's ``before_flush`` validation raising after the marks were sent,
    in a session whose transaction had not begun: closing the session must read the
    marks' replies and give their connection back to the pool."""
    client = redis.Redis.from_url(redis_url)
    cache = Cache(client, namespace=f"{namespace}v", default_ttl=300)
    factory = sessionmaker(shop_engine, expire_on_commit=False)
    cache.attach(factory)
    refusing = False

    def refuse(session: Session, *_: object) -> None:
        if refusing:
            raise ValueError("refused by the application")

    sa.event.listen(factory, "before_flush", refuse)  # after the cache's

    try:
        with factory() as s:
            row = s.get_one(Product, product)
            s.commit()
            row.name = "refused"
            refusing = True
            with pytest.raises(ValueError, match="refused"):
                s.flush()
            refusing = False
        pool = client.connection_pool
        assert not pool._in_use_connections
        with factory() as s:
            assert s.get_one(Product, product).name == "scratch"
    finally:
        cache.detach()
        client.close()
        delete_namespace(redis.Redis.from_url(redis_url), f"{namespace}v")


def test_a_write_through_of_an_object_loaded_before_another_commit(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    """The second transaction loaded the row before the first changed and committed
    another column (READ COMMITTED); its own UPDATE sets one column, but the state written
    through is its whole object, with the first column as it was before the first commit
    returned. (With a lock wait instead, the second's UPDATE waiting for the first's row
    lock, the same happens whenever the first's commit.lua runs before the second's.)"""
    second = session_factory()
    try:
        row = second.get_one(Product, product)
        with session_factory() as first:
            first.get_one(Product, product).name = "first"
            first.commit()
        row.price = Decimal("2.00")
        second.commit()
    finally:
        second.close()
    with session_factory() as s:
        got = s.get_one(Product, product)
        assert (got.name, got.price) == ("first", Decimal("2.00"))
