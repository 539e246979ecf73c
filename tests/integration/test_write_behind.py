"""Write-behind on the session side (docs/design.md, "Write-behind"): flushes diverted, commits
queued.

The models come from :mod:`tests.wb_support` in a registry disposed of after each test;
the positive tests use a Redis server started here with AOF ``always``, since ``attach()``
refuses write-behind models on the shared test server, which has AOF off. The scenarios
run with a ``Session`` and with an ``AsyncSession`` (``in_mode``, see :mod:`tests.modes`),
on that server and on a Redis Cluster with AOF started here (``cluster-sync``,
``cluster-async``: the module is marked ``cluster``, so every run has them); in the async
modes they also fail on any round trip of the synchronous Redis client, so the enqueue
and the queued-state reads are proven to await the asyncio one.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import Integer, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from devservices import RedisCluster, RedisServer
from examples.shop import Category
from sa_redis_cache import (
    Cache,
    CachePolicy,
    CacheUnavailableError,
    ConfigurationError,
    FlushWorker,
    FromCache,
    schema,
)
from sa_redis_cache.redis_io import client_from_url
from sa_redis_cache.strategies.write_behind.ids import ID_BLOCKS
from tests.modes import CLUSTER_MODES, SyncFacade
from tests.wb_support import drain, private_models

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, aof_cluster
pytestmark = pytest.mark.cluster

if TYPE_CHECKING:
    from tests.modes import Db, Runner


@pytest.fixture(scope="module")
def wb_engine(engine: sa.Engine) -> sa.Engine:
    schema.upgrade(engine)
    return engine


@pytest.fixture
def models(wb_engine: sa.Engine) -> Iterator[tuple[Any, Any]]:
    with private_models() as found:
        found[0].metadata.create_all(wb_engine)
        yield found


@pytest.fixture
def mode_redis_url(aof_redis: RedisServer) -> str:
    """``in_mode``'s caches use the AOF server: ``attach()`` demands it for these models."""
    return aof_redis.url


@pytest.fixture
def mode_cluster_url(aof_cluster: RedisCluster) -> str:
    """The cluster modes' caches use a cluster with AOF, for the same reason."""
    return aof_cluster.url


def stream_entries(client: redis.Redis, namespace: str, table: str) -> int:
    streams = client.scan_iter(match=f"sarc:{namespace}:{{{namespace}:{table}}}:wb:*")
    return sum(int(client.xlen(stream)) for stream in streams)


def keys_of(client: redis.Redis, namespace: str, kind: str) -> list[bytes]:
    return list(client.scan_iter(match=f"sarc:{namespace}:*:{kind}:*"))


def in_database(engine: sa.Engine, model: Any, pk: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(model.__table__).where(model.__table__.c.id == pk)).first()


# -- flush and commit -----------------------------------------------------------------------


def test_flush_and_commit_emit_no_sql_and_the_session_keeps_the_state(
    in_mode: Runner, models: Any, wb_engine: sa.Engine
) -> None:
    page_view, _ = models

    def scenario(db: Db) -> uuid.UUID:
        with db.session() as s:
            view = page_view(path="/books/1")
            s.add(view)
            s.flush()
            s.commit()
            # expire_on_commit would make the next access read the database, which has no row
            assert (view.path, view.views, view.note) == ("/books/1", 0, None)
            assert isinstance(view.id, uuid.UUID)
            assert view.viewed_at.tzinfo is not None
            view.views = 5
            s.commit()
            assert view.views == 5
            s.delete(view)
            s.commit()
        assert db.sql.statements == []
        pk: uuid.UUID = view.id
        return pk

    pk, _ = in_mode(scenario)
    assert in_database(wb_engine, page_view, pk) is None


def test_every_operation_of_a_commit_is_queued_at_once(
    in_mode: Runner, models: Any, mode_redis_client: redis.Redis, namespace: str
) -> None:
    page_view, _ = models

    def scenario(db: Db) -> None:
        with db.session() as s:
            s.add_all([page_view(path=f"/p/{i}") for i in range(10)])
            s.flush()
            assert (
                stream_entries(mode_redis_client, namespace, "wb_page_views") == 0
            )  # not before commit
            s.commit()

    in_mode(scenario)
    assert stream_entries(mode_redis_client, namespace, "wb_page_views") == 10
    assert len(keys_of(mode_redis_client, namespace, "wbp")) == 10
    # nothing unflushed may expire
    for key in keys_of(mode_redis_client, namespace, "wbp") + keys_of(
        mode_redis_client, namespace, "e"
    ):
        assert mode_redis_client.pttl(key) == -1


def test_read_your_writes_from_another_session_and_another_cache(
    in_mode: Runner, models: Any
) -> None:
    """Each ``in_mode`` call has a cache of its own, as another process would."""
    page_view, _ = models

    def bump(db: Db, pk: uuid.UUID, views: int) -> None:
        with db.session() as s:
            got = s.get(page_view, pk)
            assert got is not None
            assert (got.path, got.views) == ("/queued", views)
            got.views = views + 1  # an update of a row the database has never seen
            s.commit()

    def first_cache(db: Db) -> uuid.UUID:
        with db.session() as s:
            view = page_view(path="/queued", views=3)
            s.add(view)
            s.commit()
            pk: uuid.UUID = view.id
        bump(db, pk, 3)  # another session
        assert db.sql.statements == []
        return pk

    pk, _ = in_mode(first_cache)

    def second_cache(db: Db) -> None:
        bump(db, pk, 4)
        with db.session() as s:
            got = s.get(page_view, pk)
            assert got is not None
            assert got.views == 5
            s.delete(got)
            s.commit()
        assert db.sql.statements == []

    def third_cache(db: Db) -> None:
        with db.session() as s:
            assert s.get(page_view, pk) is None
        assert db.sql.statements == []

    in_mode(second_cache)
    in_mode(third_cache)


def test_the_queued_state_survives_invalidations_and_generation_bumps(
    in_mode: Runner, models: Any
) -> None:
    page_view, _ = models

    def scenario(db: Db) -> None:
        with db.session() as s:
            view = page_view(path="/kept")
            s.add(view)
            s.commit()
            pk = view.id
        db.invalidate("invalidate", page_view, pk)
        db.invalidate("invalidate_model", page_view)  # bumps the entity generation
        with db.session() as s:
            got = s.get(page_view, pk)
            assert got is not None
            assert got.path == "/kept"
        assert db.sql.statements == []

    in_mode(scenario)


def test_refresh_and_expired_attributes_read_the_queued_state(in_mode: Runner, models: Any) -> None:
    page_view, _ = models

    def scenario(db: Db) -> None:
        with db.session() as s:
            view = page_view(path="/r", views=1)
            s.add(view)
            s.commit()
            s.expire(view)
            view.note = "changed while expired"  # the flush must load the rest, from Redis
            s.commit()
            s.refresh(view)
            assert (view.path, view.views, view.note) == ("/r", 1, "changed while expired")
        assert db.sql.statements == []

    in_mode(scenario)


def test_ids_from_a_sequence_are_reserved_in_blocks(in_mode: Runner, models: Any) -> None:
    _, stock = models

    def scenario(db: Db) -> None:
        # blocks are per process and database URL: an earlier mode's leftovers would count
        ID_BLOCKS.clear()
        with db.session() as s:
            levels = [stock(warehouse="north", quantity=i) for i in range(60)]
            s.add_all(levels)
            s.commit()
            ids = [level.id for level in levels]
        assert len(set(ids)) == 60
        nextvals = [q for q in db.sql.statements if "nextval" in q]
        assert len(nextvals) == 2  # increment=50: one nextval per 50 ids
        assert len(db.sql.statements) == 2

    in_mode(scenario)


# -- reads of unflushed changes, plain SQLAlchemy as the oracle ---------------------------


@pytest.fixture
def oracle_model(wb_engine: sa.Engine) -> Iterator[Any]:
    """A model with PageView's columns and no cache policy, read and written by plain
    sessions: what SQLAlchemy itself does with the same script."""

    class Base(DeclarativeBase):
        pass

    class PlainView(Base):
        __tablename__ = "wb_oracle_views"
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(String(200))
        views: Mapped[int] = mapped_column(default=0)
        note: Mapped[str | None]

    Base.metadata.create_all(wb_engine)
    yield PlainView
    Base.metadata.drop_all(wb_engine)
    Base.registry.dispose()


@contextmanager
def plain_session(engine: sa.Engine) -> Iterator[SyncFacade]:
    """A session no cache is attached to."""
    with Session(engine) as s:
        yield SyncFacade(s)


def seen(obj: Any) -> Any:
    return None if obj is None else (obj.path, obj.views, obj.note)


def unflushed_reads(session: Callable[[], Any], model: Any, keys: list[uuid.UUID]) -> list[Any]:
    """``session.get`` of rows whose changes in the transaction are not flushed yet: what
    it returns, with autoflush on and under ``no_autoflush``."""
    a, b, c, d, e, f = keys
    out: list[Any] = []
    with session() as s:
        s.add_all([model(id=k, path=f"/{n}") for n, k in (("a", a), ("d", d), ("e", e))])
        s.commit()
    with session() as s:
        fresh = model(id=b, path="/fresh")
        s.add(fresh)
        got = s.get(model, b)
        out.append(("a pending new object", seen(got), got is fresh))
        s.delete(s.get(model, a))
        s.flush()
        again = model(id=a, path="/again", views=2)
        s.add(again)
        got = s.get(model, a)
        out.append(("deleted, flushed, added again", seen(got), got is again))
        first = model(id=c, path="/first")
        s.add(first)
        got = s.get(model, c) or model(id=c, path="/created")  # get-or-create
        s.add(got)
        got.views = 7
        out.append(("get-or-create", seen(got), got is first))
        gone = s.get(model, d)
        s.delete(gone)
        out.append(("deleted, not flushed", s.get(model, d) is gone))
        s.get(model, e).views = 5  # another row's load flushes the delete
        out.append(("deleted, after another load", seen(s.get(model, d))))
        s.commit()
    with session() as s:
        with s.no_autoflush:
            late = model(id=f, path="/late")
            s.add(late)
            out.append(("no_autoflush: pending", seen(s.get(model, f))))
            gone = s.get(model, e)
            s.delete(gone)
            s.get(model, a)  # another row: loaded without a flush
            out.append(("no_autoflush: deleted", s.get(model, e) is gone))
        got = s.get(model, f)
        out.append(("autoflush again", seen(got), got is late))
        s.commit()
    with session() as s:
        out.append(("committed", [seen(s.get(model, k)) for k in keys]))
    return out


def test_get_sees_unflushed_changes_as_plain_sqlalchemy_does(
    in_mode: Runner, models: Any, oracle_model: Any, wb_engine: sa.Engine
) -> None:
    """A primary-key load runs the autoflush first, as SQLAlchemy's own does (after the
    ``do_orm_execute`` hooks): a pending object is found, a deleted one is gone, a
    get-or-create does not make a second object of one key; ``no_autoflush`` flushes
    nothing."""
    page_view, _ = models
    keys = [uuid.uuid4() for _ in range(6)]
    expected = unflushed_reads(lambda: plain_session(wb_engine), oracle_model, keys)
    assert expected[0] == ("a pending new object", ("/fresh", 0, None), True)  # the oracle's
    got, _ = in_mode(lambda db: unflushed_reads(db.session, page_view, keys))
    assert got == expected


def test_a_row_switch_keeps_the_new_row_as_plain_sqlalchemy_does(
    in_mode: Runner,
    models: Any,
    oracle_model: Any,
    wb_engine: sa.Engine,
    mode_redis_client: redis.Redis,
    namespace: str,
) -> None:
    """A delete and an add of the same primary key in one flush: SQLAlchemy turns them
    into an UPDATE of the row (columns the new object leaves unset keep the old row's
    values, no insert default). Queued, the new row wins over the delete: in reads before
    the worker drains and in the table after."""
    page_view, _ = models
    pk = uuid.uuid4()

    def create(session: Callable[[], Any], model: Any) -> None:
        with session() as s:
            s.add(model(id=pk, path="/old", views=1, note="kept"))
            s.commit()

    def switch(session: Callable[[], Any], model: Any) -> Any:
        with session() as s:
            s.delete(s.get(model, pk))
            s.add(model(id=pk, path="/new"))
            s.commit()
        with session() as s:
            return seen(s.get(model, pk))

    def query(db: Db) -> Any:
        with db.session() as s:
            stmt = select(page_view).where(page_view.id == pk).options(FromCache())
            return [seen(o) for o in s.scalars(stmt)]

    def drained() -> Any:
        worker = FlushWorker(wb_engine, mode_redis_client, namespace=namespace, models=[page_view])
        try:
            drain(worker)
        finally:
            worker.release()
        row = in_database(wb_engine, page_view, pk)
        return (row.path, row.views, row.note)

    create(lambda: plain_session(wb_engine), oracle_model)
    expected = switch(lambda: plain_session(wb_engine), oracle_model)
    assert expected == ("/new", 1, "kept")
    in_mode(lambda db: create(db.session, page_view))
    assert drained() == ("/old", 1, "kept")
    assert in_mode(query)[0] == [("/old", 1, "kept")]  # cached before the switch
    got, _ = in_mode(lambda db: switch(db.session, page_view))
    assert got == expected
    # queries read the database: the row as of the last drain (docs/write-behind.md)
    assert in_mode(query)[0] == [("/old", 1, "kept")]
    assert drained() == expected
    assert in_mode(query)[0] == [expected]


# -- rollback, savepoints, failure --------------------------------------------------------


def test_rollback_and_savepoint_rollback_queue_nothing(
    in_mode: Runner, models: Any, mode_redis_client: redis.Redis, namespace: str
) -> None:
    page_view, _ = models

    def scenario(db: Db) -> None:
        with db.session() as s:
            dropped = page_view(path="/rolled-back")
            s.add(dropped)
            s.flush()
            s.rollback()
            assert dropped not in s
        with db.session() as s:
            kept = page_view(path="/kept")
            s.add(kept)
            s.flush()
            savepoint = s.begin_nested()
            inner = page_view(path="/inner")
            s.add(inner)
            kept.views = 9
            s.flush()
            savepoint.rollback()
            released = s.begin_nested()
            s.add(page_view(path="/released"))
            released.commit()
            s.commit()
            assert kept.views == 0  # the savepoint's change was rolled back
        assert stream_entries(mode_redis_client, namespace, "wb_page_views") == 2
        with db.session() as s:
            assert s.get(page_view, kept.id) is not None
            assert s.get(page_view, inner.id) is None

    in_mode(scenario)


def test_redis_down_at_commit_raises_and_queues_nothing(
    in_mode: Runner, shop_engine: sa.Engine, models: Any, namespace: str
) -> None:
    if in_mode.mode in CLUSTER_MODES:
        # a node of a cluster lost mid-run: tests/chaos/test_wb_cluster_failover.py
        pytest.skip("stops a single server of its own")
    page_view, _ = models
    with RedisServer(appendonly=True, appendfsync="always") as server:

        def scenario(db: Db) -> str:
            server.stop()
            with db.session() as s:
                name = f"wb-{uuid.uuid4().hex[:8]}"
                category = Category(name=name)
                view = page_view(path="/lost")
                s.add_all([category, view])
                with pytest.raises(CacheUnavailableError, match="none of them was queued"):
                    s.commit()
                assert view not in s  # made transient again: it was never stored
                # the session is usable after the error
                assert s.scalar(select(func.count()).select_from(Category)) is not None
            return name

        name, _ = replace(in_mode, redis_url=server.url)(scenario)
        # the ordinary row of that commit is committed (documented): clean it up
        with Session(shop_engine) as s:
            assert s.scalar(select(Category).where(Category.name == name))
            s.execute(sa.delete(Category).where(Category.name == name))
            s.commit()
        server.start()
        client = redis.Redis.from_url(server.url)
        try:
            assert stream_entries(client, namespace, "wb_page_views") == 0
            assert keys_of(client, namespace, "wbp") == []
            assert keys_of(client, namespace, "e") == []
        finally:
            client.close()


def test_a_commit_whose_reply_never_came_says_its_writes_may_be_queued(
    wb_engine: sa.Engine, models: Any, namespace: str
) -> None:
    """Redis paused during the commit's round trips: a reply times out, and what was sent
    runs once Redis resumes (it may be the enqueue). The error must not say that nothing
    was queued, as it does when Redis refused the connection or the script."""
    page_view, _ = models
    with RedisServer(appendonly=True, appendfsync="always") as server:
        cache = Cache(server.url, namespace=namespace)  # 0.25 s socket timeouts
        factory = sessionmaker(wb_engine)
        cache.attach(factory)
        try:
            with factory() as s:
                s.add(page_view(path="/paused"))
                s.flush()
                assert server.pid is not None
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(CacheUnavailableError, match="queued is unknown"):
                        s.commit()
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                # the session stays usable: the error came after the database commit
                assert s.scalar(select(func.count()).select_from(page_view)) is not None
        finally:
            cache.detach()


# -- attach() ------------------------------------------------------------------------------


def test_attach_refuses_write_behind_on_a_redis_without_aof(
    wb_engine: sa.Engine,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    assert redis_client.config_get("appendonly")["appendonly"] == "no"
    client = client_from_url(redis_url)
    cache = Cache(client, namespace=namespace)
    try:
        with pytest.raises(ConfigurationError, match=r"PageView: .*appendonly.*accept_volatile"):
            cache.attach(sessionmaker(wb_engine))
    finally:
        # its client's connections, closed rather than left to the collector: the
        # refusal's traceback, kept by pytest, holds the one that asked
        cache.detach()
        client.close()


def test_attach_accepts_volatile_when_the_policy_says_so(
    wb_engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    class Base(DeclarativeBase):
        pass

    class Volatile(Base):
        __tablename__ = "wb_volatile"
        __cache__ = CachePolicy(strategy="write_behind", accept_volatile=True)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)

    cache = Cache(redis_url, namespace=namespace)
    try:
        cache.attach(sessionmaker(wb_engine))
    finally:
        cache.detach()
        Base.registry.dispose()


@pytest.mark.parametrize(
    ("column", "fix"),
    [
        (lambda: mapped_column(Integer, primary_key=True), r"default=uuid\.uuid4"),
        (
            lambda: mapped_column(String, primary_key=True, server_default=sa.text("'x'")),
            "server-side default",
        ),
        (
            lambda: mapped_column(Integer, sa.Identity(), primary_key=True),
            "server-side default|identity",
        ),
    ],
)
def test_attach_refuses_keys_only_the_database_insert_knows(
    aof_redis: RedisServer, wb_engine: sa.Engine, namespace: str, column: Any, fix: str
) -> None:
    class Base(DeclarativeBase):
        pass

    class Keyed(Base):
        __tablename__ = "wb_keyed"
        __cache__ = CachePolicy(strategy="write_behind")
        id = column()

    cache = Cache(aof_redis.url, namespace=namespace)
    try:
        with pytest.raises(ConfigurationError, match=f"Keyed.*{fix}"):
            cache.attach(sessionmaker(wb_engine))
    finally:
        Base.registry.dispose()
