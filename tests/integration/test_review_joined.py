"""A review of the cache under the transaction patterns applications and their test suites
use, with the database as the oracle: SQLAlchemy's "join a session into an external
transaction" recipe in each ``join_transaction_mode``, savepoints (``begin_nested``),
``autobegin=False``, ``session.begin()`` / ``sessionmaker.begin()`` / ``scoped_session``,
two-phase sessions, and Core writes on a session's connection. For the invalidate
(``Category``) and write-through (``Product``) strategies, through ``FromCache`` and
``session.get``: no cache (this process's, or another process's on another engine, with or
without its local tier) may serve a value the database rolled back, or an uncommitted one
to anyone outside the transaction; and the transaction reads its own writes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from examples.shop import Base, Category, Product, seed
from sa_redis_cache import Cache, FromCache
from tests.support import close_cache_and_engine
from tests.wb_support import drain, rows

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sa_redis_cache.local import LocalTier

JOINED = ["conditional_savepoint", "create_savepoint", "rollback_only"]


@dataclass
class Subject:
    """A model of one strategy, the attribute a test changes and two values of it."""

    model: Any
    attribute: str
    old: Any
    new: Any


@pytest.fixture(params=["invalidate", "write_through"])
def subject(
    request: pytest.FixtureRequest, shop_engine: sa.Engine, category: int, product: int
) -> Subject:
    if request.param == "invalidate":
        with shop_engine.connect() as c:
            name = c.scalar(sa.text("SELECT name FROM categories WHERE id = :i"), {"i": category})
        return Subject(Category, "name", name, f"{name} (renamed)")
    return Subject(Product, "price", Decimal("1.00"), Decimal("7.00"))


def pk_of(subject: Subject, category: int, product: int) -> int:
    return category if subject.model is Category else product


@dataclass
class World:
    """This process's cached factory, another process's (its own engine and cache, with or
    without a local tier), and the oracle (a plain engine no cache saw)."""

    mine: sessionmaker[Session]
    other: sessionmaker[Session]
    oracle: sa.Engine
    engine: sa.Engine
    subject: Subject
    pk: int

    def read(self, factory: sessionmaker[Session] | Session) -> tuple[Any, Any]:
        """(FromCache value, session.get value) of the subject's row, in a fresh session
        (or in the session given)."""
        model, attribute = self.subject.model, self.subject.attribute
        if isinstance(factory, Session):
            s = factory
            stmt = select(model).where(model.id == self.pk).options(FromCache())
            by_query = getattr(s.scalars(stmt).one(), attribute)
            got = s.get(model, self.pk)
            return by_query, getattr(got, attribute)
        with factory() as s:
            stmt = select(model).where(model.id == self.pk).options(FromCache())
            by_query = getattr(s.scalars(stmt).one(), attribute)
        with factory() as s:
            got = s.get(model, self.pk)
            assert got is not None
            return by_query, getattr(got, attribute)

    def truth(self) -> Any:
        table = self.subject.model.__table__
        with self.oracle.connect() as c:
            return c.scalar(select(table.c[self.subject.attribute]).where(table.c.id == self.pk))

    def everyone_reads(self, value: Any) -> None:
        """The database holds ``value``, and every cache serves it (twice: a fill made by
        the first read is what the second one gets)."""
        assert self.truth() == value
        for _ in range(2):
            assert self.read(self.mine) == (value, value)
            assert self.read(self.other) == (value, value)

    def change(self, s: Session) -> None:
        row = s.get(self.subject.model, self.pk)
        assert row is not None
        setattr(row, self.subject.attribute, self.subject.new)


@pytest.fixture(params=["redis", "local", "both_local"])
def world(
    request: pytest.FixtureRequest,
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    redis_url: str,
    namespace: str,
    subject: Subject,
    category: int,
    product: int,
) -> Iterator[World]:
    """``redis``: no local tier; ``local``: the other process has one; ``both_local``: this
    process's cache (on an engine of its own) has one too."""
    engines = [sa.create_engine(shop_engine.url) for _ in range(3)]
    other_engine, oracle, my_engine = engines
    local = request.param != "redis"
    caches = [Cache(redis_url, namespace=namespace, default_ttl=300, local=local)]
    other = sessionmaker(other_engine)
    caches[0].attach(other)
    mine, engine = session_factory, shop_engine
    if request.param == "both_local":
        caches.append(Cache(redis_url, namespace=namespace, default_ttl=300, local=True))
        mine, engine = sessionmaker(my_engine), my_engine
        caches[1].attach(mine)
    try:
        for cache in caches if local else ():
            tier: LocalTier | None = cache.inspector.local_tier
            assert tier is not None
            assert tier.wait_ready(10.0)
        made = World(mine, other, oracle, engine, subject, pk_of(subject, category, product))
        made.everyone_reads(subject.old)  # every cache holds the old value
        yield made
    finally:
        for cache in caches:
            cache.detach()
        for made_engine in engines:
            made_engine.dispose()


@contextmanager
def external(engine: sa.Engine) -> Iterator[tuple[sa.Connection, sa.RootTransaction]]:
    with engine.connect() as connection:
        yield connection, connection.begin()


# --- the external-transaction recipe -----------------------------------------------------


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_joined_session_then_the_application_ends_the_transaction(
    world: World, mode: str, ending: str
) -> None:
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            world.change(s)
            s.commit()
            # the transaction reads its own write, before and after the session's commit
            assert world.read(s) == (new, new)
        with world.mine(bind=connection, join_transaction_mode=mode) as s2:
            assert world.read(s2) == (new, new)
        # nobody outside the transaction sees it, nor keeps it
        world.everyone_reads(old)
        if ending == "rollback":
            outer.rollback()
            world.everyone_reads(old)
        else:
            outer.commit()
            world.everyone_reads(new)
    world.everyone_reads(old if ending == "rollback" else new)


@pytest.mark.parametrize("mode", JOINED)
def test_a_joined_session_used_again_after_its_commit_reads_the_transactions_rows(
    world: World, mode: str
) -> None:
    """The same session, after its commit, begins again on the same connection."""
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        s = world.mine(bind=connection, join_transaction_mode=mode)
        world.change(s)
        s.commit()
        s.expire_all()
        assert world.read(s) == (new, new)
        s.close()
        world.everyone_reads(old)
        outer.rollback()
    world.everyone_reads(old)


@pytest.mark.parametrize("mode", JOINED)
def test_a_read_in_the_outer_transaction_before_the_session_wrote(world: World, mode: str) -> None:
    """A test that reads (through a joined session) before the code under test writes."""
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            assert world.read(s) == (old, old)
            world.change(s)
            s.flush()
            assert world.read(s) == (new, new)
            world.everyone_reads(old)
            s.commit()
        outer.rollback()
    world.everyone_reads(old)


@pytest.mark.parametrize("ending", ["rollback", "commit"])
def test_control_fully(world: World, ending: str) -> None:
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode="control_fully") as s:
            world.change(s)
            s.flush()
            world.everyone_reads(old)
            if ending == "rollback":
                s.rollback()
            else:
                s.commit()
        assert not outer.is_active
    world.everyone_reads(old if ending == "rollback" else new)


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_an_application_savepoint_around_the_joined_session(
    world: World, mode: str, ending: str
) -> None:
    """The fixture opens a savepoint per test (``connection.begin_nested()``) and rolls it
    back; the outer transaction commits."""
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        savepoint = connection.begin_nested()
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            world.change(s)
            s.commit()
        world.everyone_reads(old)
        if ending == "rollback":
            savepoint.rollback()
        else:
            savepoint.commit()
        outer.commit()
    world.everyone_reads(old if ending == "rollback" else new)


# --- savepoints in a session of its own ----------------------------------------------------


@pytest.mark.parametrize("how", ["context", "explicit"])
def test_a_rolled_back_savepoint_leaves_nothing(world: World, how: str) -> None:
    old, new = world.subject.old, world.subject.new
    with world.mine() as s:
        assert world.read(s) == (old, old)
        if how == "context":

            def fail_in_a_savepoint() -> None:
                with s.begin_nested():
                    world.change(s)
                    s.flush()
                    assert world.read(s) == (new, new)
                    world.everyone_reads(old)
                    raise ZeroDivisionError

            with pytest.raises(ZeroDivisionError):
                fail_in_a_savepoint()
        else:
            nested = s.begin_nested()
            world.change(s)
            s.flush()
            assert world.read(s) == (new, new)
            world.everyone_reads(old)
            nested.rollback()
        assert world.read(s) == (old, old)
        world.everyone_reads(old)
        s.commit()
    world.everyone_reads(old)


def test_a_savepoint_read_first_then_written_then_rolled_back(world: World) -> None:
    """A read inside a savepoint, before the write in it: its fill may land (committed
    data), and nothing of the write after it survives the savepoint's rollback."""
    old = world.subject.old
    with world.mine() as s:
        nested = s.begin_nested()
        assert world.read(s) == (old, old)
        world.change(s)
        s.flush()
        nested.rollback()
        s.expire_all()
        assert world.read(s) == (old, old)
        s.commit()
    world.everyone_reads(old)


def test_a_released_savepoint_commits_with_its_transaction(world: World) -> None:
    old, new = world.subject.old, world.subject.new
    with world.mine() as s:
        with s.begin_nested():
            world.change(s)
        world.everyone_reads(old)
        s.commit()
    world.everyone_reads(new)


# --- session shapes -----------------------------------------------------------------------


def test_autobegin_false(world: World) -> None:
    old, new = world.subject.old, world.subject.new
    s = world.mine(autobegin=False)
    with pytest.raises(sa.exc.InvalidRequestError, match="Autobegin is disabled"):
        s.get(world.subject.model, world.pk)
    with pytest.raises(sa.exc.InvalidRequestError, match="Autobegin is disabled"):
        s.scalars(
            select(world.subject.model)
            .where(world.subject.model.id == world.pk)
            .options(FromCache())
        ).one()
    with s.begin():
        world.change(s)
        s.flush()
        world.everyone_reads(old)
        s.rollback()
    world.everyone_reads(old)
    with s.begin():
        world.change(s)
    s.close()
    world.everyone_reads(new)


def test_sessionmaker_begin_that_raises_after_a_flush(world: World) -> None:
    old = world.subject.old

    def fail() -> None:
        with world.mine.begin() as s:
            world.change(s)
            s.flush()
            assert world.read(s) == (world.subject.new, world.subject.new)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail()
    world.everyone_reads(old)


def test_scoped_session_rollback_and_remove(world: World) -> None:
    old, new = world.subject.old, world.subject.new
    scoped = scoped_session(world.mine)
    try:
        world.change(scoped())
        scoped.flush()
        assert world.read(scoped()) == (new, new)
        world.everyone_reads(old)
    finally:
        scoped.remove()  # a request's teardown: close, no commit
    world.everyone_reads(old)


@pytest.fixture(scope="module")
def prepared_postgres() -> Iterator[str]:
    """A throwaway Postgres that allows prepared transactions (the run's does not), with
    the shop's tables: its URL."""
    from devservices import PostgresServer

    with PostgresServer(settings={"max_prepared_transactions": "4"}) as server:
        engine = sa.create_engine(server.url)
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            seed(s, products=4, customers=2, orders=2)
        engine.dispose()
        yield server.url


@pytest.mark.parametrize("model", ["invalidate", "write_through"])
def test_two_phase_session(
    prepared_postgres: str, redis_url: str, namespace: str, model: str
) -> None:
    """``Session(twophase=True)``: PREPARE TRANSACTION, then COMMIT PREPARED (or a
    rollback): every cache follows the database."""
    target, attribute = (Category, "name") if model == "invalidate" else (Product, "price")
    engines = [sa.create_engine(prepared_postgres) for _ in range(3)]
    caches = [Cache(redis_url, namespace=namespace, default_ttl=300) for _ in range(2)]
    mine = sessionmaker(engines[0], twophase=True)
    other = sessionmaker(engines[1])
    caches[0].attach(mine)
    caches[1].attach(other)

    def everyone_reads(value: Any) -> None:
        with engines[2].connect() as c:
            table = target.__table__
            truth = c.scalar(select(table.c[attribute]).where(table.c.id == 1))
        assert truth == value
        for factory in (mine, other, mine, other):
            with factory() as s:
                stmt = select(target).where(target.id == 1).options(FromCache())
                assert getattr(s.scalars(stmt).one(), attribute) == value
            with factory() as s:
                assert getattr(s.get(target, 1), attribute) == value

    try:
        with mine() as s:
            old = getattr(s.get(target, 1), attribute)
        new = f"{old} (2pc)" if model == "invalidate" else old + Decimal("1.00")
        everyone_reads(old)
        with mine() as s:
            setattr(s.get(target, 1), attribute, new)
            s.flush()
            everyone_reads(old)
            s.rollback()
        everyone_reads(old)
        with mine() as s:
            setattr(s.get(target, 1), attribute, new)
            s.commit()
        everyone_reads(new)
        with mine() as s:  # Core DML on the two-phase session's connection
            table = cast("sa.Table", target.__table__)
            s.connection().execute(sa.update(table).where(table.c.id == 1).values({attribute: old}))
            s.commit()
        everyone_reads(old)
        # a session joined to the application's two-phase transaction
        for ending, expected in (("rollback", old), ("commit", new)):
            with engines[0].connect() as connection:
                outer = connection.begin_twophase()
                with mine(
                    bind=connection, join_transaction_mode="rollback_only", twophase=False
                ) as s:
                    setattr(s.get(target, 1), attribute, new)
                    s.commit()
                everyone_reads(old)
                outer.prepare()
                everyone_reads(old)
                getattr(outer, ending)()
                everyone_reads(expected)
            everyone_reads(expected)
    finally:
        for cache in caches:
            cache.detach()
        for engine in engines:
            engine.dispose()


# --- Core writes on the session's connection --------------------------------------------


@pytest.mark.parametrize("ending", ["rollback", "commit"])
def test_core_update_on_the_sessions_connection(world: World, ending: str) -> None:
    old, new = world.subject.old, world.subject.new
    model, attribute = world.subject.model, world.subject.attribute
    with world.mine() as s:
        assert world.read(s) == (old, old)
        s.connection().execute(
            sa.update(model.__table__)
            .where(model.__table__.c.id == world.pk)
            .values({attribute: new})
        )
        s.expire_all()
        assert world.read(s) == (new, new)
        world.everyone_reads(old)
        if ending == "rollback":
            s.rollback()
        else:
            s.commit()
    world.everyone_reads(old if ending == "rollback" else new)


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_core_update_in_a_joined_session(world: World, mode: str, ending: str) -> None:
    old, new = world.subject.old, world.subject.new
    model, attribute = world.subject.model, world.subject.attribute
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            assert world.read(s) == (old, old)
            s.connection().execute(
                sa.update(model.__table__)
                .where(model.__table__.c.id == world.pk)
                .values({attribute: new})
            )
            s.expire_all()
            assert world.read(s) == (new, new)
            s.commit()
        world.everyone_reads(old)
        if ending == "rollback":
            outer.rollback()
        else:
            outer.commit()
        world.everyone_reads(old if ending == "rollback" else new)
    world.everyone_reads(old if ending == "rollback" else new)


# --- write-behind ---------------------------------------------------------------------------


@dataclass
class Behind:
    """A write-behind model (PageView) with one row queued and written, this process's
    factory, another process's (its own engine and cache), and a worker."""

    mine: sessionmaker[Session]
    other: sessionmaker[Session]
    engine: sa.Engine
    model: Any
    pk: Any
    worker: Any

    def read(self, factory: sessionmaker[Session] | Session) -> tuple[Any, Any]:
        """(FromCache, session.get) of the row's path."""
        if isinstance(factory, Session):
            stmt = select(self.model).where(self.model.id == self.pk).options(FromCache())
            found = factory.scalars(stmt).one_or_none()
            got = factory.get(self.model, self.pk)
            return (found and found.path), (got and got.path)
        with factory() as s:
            return self.read(s)

    def get(self, factory: sessionmaker[Session]) -> Any:
        with factory() as s:
            got = s.get(self.model, self.pk)
            return got and got.path

    def truth(self) -> Any:
        drain(self.worker)
        found = rows(self.engine, self.model).get(self.pk)
        return found and found[0]

    def everyone_gets(self, value: Any) -> None:
        for _ in range(2):
            assert self.get(self.mine) == value
            assert self.get(self.other) == value

    def path_in(self, s: Session) -> Any:
        """The row's path as ``s`` reads it by primary key."""
        row = s.get(self.model, self.pk)
        assert row is not None
        return row.path

    def change(self, s: Session, path: str) -> None:
        row = s.get(self.model, self.pk)
        assert row is not None
        row.path = path


pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture
def behind(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    wb_redis_url: str,
    namespace: str,
    models: Any,
    make_worker: Any,
) -> Iterator[Behind]:
    other_engine = sa.create_engine(engine.url)
    other_cache = Cache(wb_redis_url, namespace=namespace)
    other = sessionmaker(other_engine)
    other_cache.attach(other)
    model = models[0]
    try:
        with factory() as s:
            view = model(path="/old")
            s.add(view)
            s.commit()
            pk = view.id
        made = Behind(factory, other, engine, model, pk, make_worker())
        assert made.truth() == "/old"
        made.everyone_gets("/old")
        yield made
    finally:
        other_cache.detach()
        other_engine.dispose()


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_write_behind_joined(behind: Behind, mode: str, ending: str) -> None:
    with behind.engine.connect() as connection:
        outer = connection.begin()
        with behind.mine(bind=connection, join_transaction_mode=mode) as s:
            behind.change(s, "/new")
            s.commit()
            assert behind.get(behind.mine) == "/old"
        with behind.mine(bind=connection, join_transaction_mode=mode) as s2:
            assert behind.path_in(s2) == "/new"
        behind.everyone_gets("/old")
        getattr(outer, ending)()
        expected = "/new" if ending == "commit" else "/old"
        behind.everyone_gets(expected)
    behind.everyone_gets(expected)
    assert behind.truth() == expected
    behind.everyone_gets(expected)


def test_write_behind_rolled_back_savepoint(behind: Behind) -> None:
    with behind.mine() as s:
        nested = s.begin_nested()
        behind.change(s, "/new")
        s.flush()
        assert behind.path_in(s) == "/new"
        behind.everyone_gets("/old")
        nested.rollback()
        assert behind.path_in(s) == "/old"
        s.commit()
    behind.everyone_gets("/old")
    assert behind.truth() == "/old"


def test_write_behind_autobegin_false(behind: Behind) -> None:
    s = behind.mine(autobegin=False)
    with pytest.raises(sa.exc.InvalidRequestError, match="Autobegin is disabled"):
        s.get(behind.model, behind.pk)
    with s.begin():
        behind.change(s, "/new")
    s.close()
    behind.everyone_gets("/new")
    assert behind.truth() == "/new"


def test_write_behind_sessionmaker_begin_that_raises(behind: Behind) -> None:
    def fail() -> None:
        with behind.mine.begin() as s:
            behind.change(s, "/new")
            s.flush()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail()
    behind.everyone_gets("/old")
    assert behind.truth() == "/old"


# --- applications: FastAPI dependencies, Flask-SQLAlchemy, async_scoped_session -------------


def test_fastapi_dependency_request_that_raises_after_a_flush(world: World) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    def get_db() -> Iterator[Session]:
        with world.mine() as s:
            yield s

    def get_db_committing() -> Iterator[Session]:
        s = world.mine()
        try:
            yield s
            s.commit()
        except Exception:
            s.rollback()
            raise
        finally:
            s.close()

    @app.post("/change")
    def change(s: Session = Depends(get_db)) -> None:  # noqa: B008 - FastAPI's form
        world.change(s)
        s.flush()
        assert world.read(s) == (world.subject.new, world.subject.new)
        raise RuntimeError("after the flush")

    @app.post("/change-committing")
    def change_committing(s: Session = Depends(get_db_committing)) -> None:  # noqa: B008
        world.change(s)
        s.flush()
        assert world.read(s) == (world.subject.new, world.subject.new)
        raise RuntimeError("after the flush")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/change").status_code == 500
        world.everyone_reads(world.subject.old)
        assert client.post("/change-committing").status_code == 500
        world.everyone_reads(world.subject.old)


def test_flask_sqlalchemy_request_that_raises_after_a_flush(
    database_url: str, redis_url: str, namespace: str
) -> None:
    from examples import flask_app

    app = flask_app.create_app(database_url, redis_url, namespace)
    db, book = flask_app.db, flask_app.Book

    @app.post("/books/<int:book_id>/fail")
    def fail(book_id: int) -> dict[str, Any]:
        found = db.session.get(book, book_id)
        assert found is not None
        found.title = "rolled back"
        db.session.flush()
        assert db.session.get(book, book_id) is found
        raise RuntimeError("after the flush")

    oracle = sa.create_engine(database_url)
    try:
        with app.app_context():
            db.drop_all()
            db.create_all()
            db.session.add(book(id=1, title="kept", shelf="new"))
            db.session.commit()
        client = app.test_client()
        assert client.get("/books/1").json == {"title": "kept", "shelf": "new"}
        app.testing = False
        assert client.post("/books/1/fail").status_code == 500
        for _ in range(2):
            assert client.get("/books/1").json == {"title": "kept", "shelf": "new"}
            assert client.get("/shelves/new").json == {"titles": ["kept"]}
        with oracle.connect() as c:
            assert c.scalar(sa.text("SELECT title FROM flask_books WHERE id = 1")) == "kept"
    finally:
        with app.app_context():
            db.drop_all()
            engines = list(db.engines.values())
        app.extensions["sa_redis_cache"].detach()
        for engine in engines:
            engine.dispose()
        oracle.dispose()


def test_async_scoped_session_rollback(
    world: World, database_url: str, redis_url: str, namespace: str
) -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import (
        async_scoped_session,
        async_sessionmaker,
        create_async_engine,
    )

    from tests.modes import async_url

    model, attribute = world.subject.model, world.subject.attribute
    old, new = world.subject.old, world.subject.new

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache = Cache(redis_url, namespace=namespace, default_ttl=300)
        cache.attach(factory)
        scoped = async_scoped_session(factory, scopefunc=asyncio.current_task)
        try:

            async def read() -> tuple[Any, Any]:
                stmt = select(model).where(model.id == world.pk).options(FromCache())
                by_query = getattr((await scoped.scalars(stmt)).one(), attribute)
                got = await scoped.get(model, world.pk)
                return by_query, getattr(got, attribute)

            assert await read() == (old, old)
            row = await scoped.get(model, world.pk)
            setattr(row, attribute, new)
            await scoped.flush()
            assert await read() == (new, new)
            await asyncio.to_thread(world.everyone_reads, old)
            await scoped.rollback()
            assert await read() == (old, old)
            await scoped.remove()
            await asyncio.to_thread(world.everyone_reads, old)
            async with factory.begin() as s:
                row = await s.get(model, world.pk)
                setattr(row, attribute, new)
            await asyncio.to_thread(world.everyone_reads, new)
            assert await read() == (new, new)
            await scoped.remove()
        finally:
            await close_cache_and_engine(cache, engine)

    asyncio.run(scenario())


@pytest.mark.parametrize("ending", ["close", "rollback"])
@pytest.mark.parametrize("mode", JOINED)
def test_a_joined_session_closed_without_its_commit(world: World, mode: str, ending: str) -> None:
    """The session flushed and ended without committing. A ``rollback_only`` session's
    close (``conditional_savepoint`` outside a savepoint too) rolls nothing back: the
    application's commit commits the flushed row, and no cache may keep the old one (a
    read before that commit filled it). A rollback, or the close of a session that made a
    savepoint, undoes it."""
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        s = world.mine(bind=connection, join_transaction_mode=mode)
        world.change(s)
        s.flush()
        getattr(s, ending)()
        s.close()
        # reads meanwhile fill what the database had committed
        world.everyone_reads(old)
        kept = ending == "close" and mode != "create_savepoint"
        assert outer.is_active == (ending == "close" or mode == "create_savepoint")
        if outer.is_active:
            outer.commit()
    world.everyone_reads(new if kept else old)


@pytest.mark.parametrize("application", ["commit", "rollback"])
@pytest.mark.parametrize("ending", ["close", "rollback"])
@pytest.mark.parametrize("mode", JOINED)
def test_write_behind_joined_session_closed_without_its_commit(
    behind: Behind, mode: str, ending: str, application: str
) -> None:
    """As plain SQLAlchemy: a ``rollback_only`` session's close leaves its flushed rows in
    the application's transaction, which its commit commits (and its rollback undoes); a
    rollback, or the close of a session that made a savepoint, undoes them."""
    with behind.engine.connect() as connection:
        outer = connection.begin()
        s = behind.mine(bind=connection, join_transaction_mode=mode)
        behind.change(s, "/new")
        s.flush()
        getattr(s, ending)()
        s.close()
        behind.everyone_gets("/old")
        kept = (
            outer.is_active
            and application == "commit"
            and (ending, mode) in {("close", "rollback_only"), ("close", "conditional_savepoint")}
        )
        if outer.is_active:
            getattr(outer, application)()
    expected = "/new" if kept else "/old"
    behind.everyone_gets(expected)
    assert behind.truth() == expected


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_a_session_of_the_transaction_that_began_before_another_wrote(
    world: World, mode: str, ending: str
) -> None:
    """Two sessions on the application's connection (a fixture's and the code under test's):
    the one that began first reads what the other wrote, as the database shows it."""
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        reader = world.mine(bind=connection, join_transaction_mode=mode)
        assert world.read(reader) == (old, old)
        reader.expunge_all()
        with world.mine(bind=connection, join_transaction_mode=mode) as writer:
            world.change(writer)
            writer.commit()
        assert world.read(reader) == (new, new)
        reader.close()
        world.everyone_reads(old)
        getattr(outer, ending)()
    world.everyone_reads(new if ending == "commit" else old)


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_core_write_on_the_applications_connection_before_the_session(
    world: World, mode: str, ending: str
) -> None:
    """A fixture writes with Core on the connection, then a joined session reads."""
    old, new = world.subject.old, world.subject.new
    model, attribute = world.subject.model, world.subject.attribute
    table = cast("sa.Table", model.__table__)
    with external(world.engine) as (connection, outer):
        connection.execute(sa.update(table).where(table.c.id == world.pk).values({attribute: new}))
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            assert world.read(s) == (new, new)
        world.everyone_reads(old)
        getattr(outer, ending)()
        world.everyone_reads(new if ending == "commit" else old)
    world.everyone_reads(new if ending == "commit" else old)


def test_a_savepoint_rolled_back_after_an_outer_write_of_the_row(world: World) -> None:
    """Written in the transaction, written again in a savepoint that rolls back: the
    transaction commits its first write."""
    old, new = world.subject.old, world.subject.new
    model, attribute = world.subject.model, world.subject.attribute
    third = f"{old} (savepoint)" if model is Category else Decimal("3.00")
    with world.mine() as s:
        world.change(s)
        s.flush()
        nested = s.begin_nested()
        setattr(s.get(model, world.pk), attribute, third)
        s.flush()
        assert world.read(s)[0] == third
        nested.rollback()
        assert world.read(s) == (new, new)
        world.everyone_reads(old)
        s.commit()
    world.everyone_reads(new)


@pytest.mark.parametrize("inner", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_a_savepoint_inside_a_joined_session(world: World, mode: str, inner: str) -> None:
    old, new = world.subject.old, world.subject.new
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            nested = s.begin_nested()
            world.change(s)
            s.flush()
            getattr(nested, inner)()
            s.commit()
        world.everyone_reads(old)
        outer.commit()
    world.everyone_reads(new if inner == "commit" else old)


def test_write_behind_savepoint_rolled_back_after_an_outer_write(behind: Behind) -> None:
    with behind.mine() as s:
        behind.change(s, "/a")
        s.flush()
        nested = s.begin_nested()
        behind.change(s, "/b")
        s.flush()
        assert behind.path_in(s) == "/b"
        nested.rollback()
        assert behind.path_in(s) == "/a"
        s.commit()
    behind.everyone_gets("/a")
    assert behind.truth() == "/a"


@pytest.mark.parametrize("inner", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_write_behind_savepoint_inside_a_joined_session(
    behind: Behind, mode: str, inner: str
) -> None:
    with behind.engine.connect() as connection:
        outer = connection.begin()
        with behind.mine(bind=connection, join_transaction_mode=mode) as s:
            behind.change(s, "/a")
            s.flush()
            nested = s.begin_nested()
            behind.change(s, "/b")
            s.flush()
            getattr(nested, inner)()
            s.commit()
        behind.everyone_gets("/old")
        outer.commit()
    expected = "/b" if inner == "commit" else "/a"
    behind.everyone_gets(expected)
    assert behind.truth() == expected


@pytest.mark.parametrize("mode", JOINED)
def test_write_behind_joined_session_invalidated(behind: Behind, mode: str) -> None:
    """``session.invalidate()`` drops the application's connection: its transaction is
    gone, and so are the session's writes."""
    with behind.engine.connect() as connection:
        outer = connection.begin()
        s = behind.mine(bind=connection, join_transaction_mode=mode)
        behind.change(s, "/new")
        s.flush()
        s.invalidate()
        behind.everyone_gets("/old")
        with pytest.raises(sa.exc.SQLAlchemyError):
            outer.commit()
    behind.everyone_gets("/old")
    assert behind.truth() == "/old"


@pytest.mark.parametrize("mode", JOINED)
def test_joined_session_invalidated(world: World, mode: str) -> None:
    old = world.subject.old
    with external(world.engine) as (connection, outer):
        s = world.mine(bind=connection, join_transaction_mode=mode)
        world.change(s)
        s.flush()
        s.invalidate()
        world.everyone_reads(old)
        with pytest.raises(sa.exc.SQLAlchemyError):
            outer.commit()
    world.everyone_reads(old)


@pytest.mark.parametrize("ending", ["close", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_async_joined_session_then_the_application_commits(
    world: World, database_url: str, redis_url: str, namespace: str, mode: str, ending: str
) -> None:
    """``AsyncSession(bind=async_connection)``: committed, or closed after a flush without
    committing, then the application commits."""
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    from tests.modes import async_url

    model, attribute = world.subject.model, world.subject.attribute
    old, new = world.subject.old, world.subject.new
    kept = ending == "commit" or mode != "create_savepoint"

    async def scenario() -> None:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        cache = Cache(redis_url, namespace=namespace, default_ttl=300)
        cache.attach(factory)
        try:
            async with engine.connect() as connection:
                outer = await connection.begin()
                s = factory(bind=connection, join_transaction_mode=mode)
                row = await s.get(model, world.pk)
                setattr(row, attribute, new)
                await s.flush()
                if ending == "commit":
                    await s.commit()
                await s.close()
                await asyncio.to_thread(world.everyone_reads, old)
                await outer.commit()
            await asyncio.to_thread(world.everyone_reads, new if kept else old)
            async with factory() as s:
                stmt = select(model).where(model.id == world.pk).options(FromCache())
                assert getattr((await s.scalars(stmt)).one(), attribute) == (new if kept else old)
        finally:
            await close_cache_and_engine(cache, engine)

    asyncio.run(scenario())


@pytest.mark.parametrize("began", ["hits", "connection"])
@pytest.mark.parametrize("mode", JOINED)
def test_a_mark_that_expired_in_a_long_application_transaction(
    world: World, redis_client: Any, namespace: str, mode: str, began: str
) -> None:
    """The application's transaction outlives the writer mark (60 s; expired here by
    removing it): a session of that transaction that began before the write, and so does
    not know it, reads the uncommitted row; it must not store it for everyone."""
    from sa_redis_cache.protocol import KeyScheme

    old, new = world.subject.old, world.subject.new
    table = world.subject.model.__table__.name
    with external(world.engine) as (connection, outer):
        reader = world.mine(bind=connection, join_transaction_mode=mode)
        assert world.read(reader) == (old, old)  # hits: no connection taken
        if began == "connection":
            reader.execute(sa.text("SELECT 1"))
        reader.expunge_all()
        with world.mine(bind=connection, join_transaction_mode=mode) as writer:
            world.change(writer)
            writer.commit()
        redis_client.delete(KeyScheme(namespace).writers_key(table))  # 60 s later
        assert world.read(reader) == (new, new)
        reader.close()
        world.everyone_reads(old)
        outer.rollback()
    world.everyone_reads(old)


@pytest.mark.parametrize("ending", ["commit", "close"])
@pytest.mark.parametrize("mode", JOINED)
def test_orm_bulk_update_in_a_joined_session(world: World, mode: str, ending: str) -> None:
    """``session.execute(update(Model))`` in a joined session, committed or closed without
    committing, then the application commits."""
    old, new = world.subject.old, world.subject.new
    model, attribute = world.subject.model, world.subject.attribute
    kept = ending == "commit" or mode != "create_savepoint"
    with external(world.engine) as (connection, outer):
        with world.mine(bind=connection, join_transaction_mode=mode) as s:
            s.execute(sa.update(model).where(model.id == world.pk).values({attribute: new}))
            assert world.read(s) == (new, new)
            if ending == "commit":
                s.commit()
        world.everyone_reads(old)
        outer.commit()
    world.everyone_reads(new if kept else old)


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", [*JOINED, "own"])
def test_textual_update_in_a_session(world: World, mode: str, ending: str) -> None:
    """``session.execute(text("UPDATE ..."))`` in a session of its own (then its rollback or
    commit) or joined to the application's transaction (then the application's)."""
    old, new = world.subject.old, world.subject.new
    sql = sa.text(
        "UPDATE categories SET name = :v WHERE id = :i"
        if world.subject.model is Category
        else "UPDATE products SET price = :v WHERE id = :i"
    )
    with external(world.engine) as (connection, outer):
        if mode == "own":
            outer.rollback()
            s = world.mine()
        else:
            s = world.mine(bind=connection, join_transaction_mode=mode)
        s.execute(sql, {"v": new, "i": world.pk})
        assert world.read(s) == (new, new)
        world.everyone_reads(old)
        if mode == "own":
            getattr(s, ending)()
        else:
            s.commit()
            world.everyone_reads(old)
            getattr(outer, ending)()
        s.close()
    world.everyone_reads(new if ending == "commit" else old)
