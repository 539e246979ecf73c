"""Joined sessions and hits' later loads under asyncio, as a pytest suite on asyncio uses
the library: an ``AsyncSession`` joined to a transaction the application began on an
``AsyncConnection`` (``AsyncSession(bind=conn, join_transaction_mode=...)`` after
``await conn.begin()``), and ``FromCache`` hits whose objects load more later
(``await obj.awaitable_attrs.rel``).

* Write-behind of a joined session follows the application's transaction: nothing is
  queued at the session's commit, the application's commit queues it (the database
  committed first), its rollback, or that of a savepoint open at the flush, drops it, and
  the transaction's other sessions read it by primary key
  (``test_write_behind_joined.py`` has the synchronous cases).
* A write-through or cache-aside write of a joined session is finished when the
  application's transaction is: a value it rolls back is never served, a value it commits
  is (``test_joined_transactions.py``).
* The objects a hit builds keep the statement's ``with_loader_criteria()``: their lazy
  loads, and loads below an eager one, are filtered as the uncached query's objects' are
  (``test_unloaded_attributes.py``).

Every case runs under ``asyncio.run`` on an ``AsyncEngine`` (``postgresql+psycopg_async``)
with the cache attached to an ``async_sessionmaker`` (the main joined cases also to an
``AsyncSession`` subclass the test instantiates itself, as a pytest-asyncio fixture does;
the hit cases on the Redis and the local tier). The cache's Redis clients are tapped
(:class:`tests.seams.RedisTap`), so a case also checks that the synchronous client made no
round trip from the event loop: a call there would block the loop.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Numeric, String, select
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    AsyncTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defaultload,
    mapped_column,
    relationship,
    selectinload,
    with_loader_criteria,
)

from examples.shop import Category, Product
from sa_redis_cache import Cache, CachePolicy, CacheUnavailableError, FromCache
from sa_redis_cache.protocol import scripts
from tests.modes import async_url
from tests.seams import RedisTap, RoundTrip
from tests.support import SQLCounter
from tests.wb_support import drain, rows

if TYPE_CHECKING:
    import redis

    from devservices import RedisServer

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, models, client, make_worker

JOINED = ["conditional_savepoint", "create_savepoint", "rollback_only"]
ENDINGS = ["rollback", "commit", "close"]
WAIT = 10.0  # seconds a local tier may take to turn tracking on
ENQUEUE_SHA = scripts.script("wb_enqueue").sha


# -- the asyncio application -----------------------------------------------------------------


ATTACHED = ["async_sessionmaker", "AsyncSession subclass"]
"""How the cache is attached: to the ``async_sessionmaker`` the joined sessions come from
(``factory(bind=conn, ...)``), or to an ``AsyncSession`` subclass that a pytest-asyncio
fixture instantiates itself (``AppSession(bind=conn, ...)``)."""


@dataclass
class AsyncApp:
    """What a case's coroutine gets: an async engine, the cache on it, the cache's session
    factory, a factory the cache is not attached to, the engine's SQL counter, and the tap
    on the cache's asyncio Redis client."""

    engine: AsyncEngine
    cache: Cache
    factory: async_sessionmaker[AsyncSession]
    plain: async_sessionmaker[AsyncSession]
    sql: SQLCounter
    tap: RedisTap
    attached: str
    local: bool = False
    # round trips of the cache's synchronous client made on the event loop's thread
    sync_trips: list[RoundTrip] = field(default_factory=list)

    def local_hits(self) -> int:
        """Hits of the cache's local tier so far."""
        return int(self.cache.stats()["total"].get("local_hits", 0))

    def joined(self, conn: AsyncConnection, mode: str) -> AsyncSession:
        """A session of the cache joined to the transaction the application holds on
        ``conn``, made as the attachment says."""
        if self.attached == "AsyncSession subclass":
            # as a pytest-asyncio fixture makes it: the class, not a factory
            return self.factory.class_(bind=conn, join_transaction_mode=mode)
        return self.factory(bind=conn, join_transaction_mode=mode)


async def add_view(
    app: AsyncApp, conn: AsyncConnection, page_view: Any, path: str, mode: str = "create_savepoint"
) -> Any:
    """A page view committed by a session joined to ``conn``'s transaction; its id."""
    async with app.joined(conn, mode) as s:
        view = page_view(path=path)
        s.add(view)
        await s.commit()
        return view.id


@asynccontextmanager
async def async_app(
    database_url: str,
    redis_url: str,
    namespace: str,
    attached: str = ATTACHED[0],
    *,
    local: bool = False,
) -> AsyncIterator[AsyncApp]:
    """An :class:`AsyncApp` made on the running loop, torn down at the end of the block;
    with ``local``, its cache has a local tier, ready when the block starts."""
    engine = create_async_engine(async_url(database_url))
    sql = SQLCounter()
    sa.event.listen(engine.sync_engine, "before_cursor_execute", sql)
    tap, sync_tap = RedisTap(), RedisTap()
    client = sync_tap.client(redis_url)
    aclient = tap.async_client(redis_url)
    cache = Cache(client, async_client=aclient, namespace=namespace, default_ttl=300, local=local)
    factory: async_sessionmaker[AsyncSession]
    if attached == "AsyncSession subclass":

        class AppSession(AsyncSession):
            pass

        cache.attach(AppSession)
        factory = async_sessionmaker(engine, class_=AppSession)
    else:
        factory = async_sessionmaker(engine)
        cache.attach(factory)
    app = AsyncApp(engine, cache, factory, async_sessionmaker(engine), sql, tap, attached, local)
    tier = cache.inspector.local_tier
    assert not local or (tier is not None and tier.wait_ready(WAIT))
    loop_thread = threading.get_ident()

    def on_sync_trip(trip: RoundTrip) -> None:
        if threading.get_ident() == loop_thread:
            app.sync_trips.append(trip)

    sync_tap.listen(on_sync_trip)  # from here on: attach() may ask with it
    try:
        yield app
    finally:
        sync_tap.remove(on_sync_trip)  # detach() publishes the last counters with it
        cache.detach()
        client.close()
        await aclient.aclose()
        await engine.dispose()


# -- 1. write-behind of a joined AsyncSession --------------------------------------------------


@dataclass
class WriteBehindCase:
    """The write-behind side: the page views model, a client of the AOF Redis the cache
    queues in, and where everything lives."""

    database_url: str
    redis_url: str
    namespace: str
    engine: sa.Engine
    client: redis.Redis
    page_view: Any

    def queued(self) -> int:
        """Operations in the page views' streams of this namespace."""
        pattern = f"sarc:{self.namespace}:*wb_page_views*:wb:*"
        return sum(int(self.client.xlen(s)) for s in self.client.scan_iter(match=pattern))

    def app(self, attached: str = ATTACHED[0]) -> Any:
        """:func:`async_app` on the AOF Redis (``attach()`` demands AOF for the model)."""
        return async_app(self.database_url, self.redis_url, self.namespace, attached)


@pytest.fixture
def wb(
    database_url: str,
    aof_redis: RedisServer,
    namespace: str,
    engine: sa.Engine,
    client: redis.Redis,
    models: Any,
) -> WriteBehindCase:
    return WriteBehindCase(database_url, aof_redis.url, namespace, engine, client, models[0])


async def read_view(app: AsyncApp, page_view: Any, pk: Any) -> str | None:
    """The page view's path as a session of its own reads it (queued writes included)."""
    async with app.factory() as s:
        found = await s.get(page_view, pk)
        return None if found is None else str(found.path)


async def end(trans: AsyncTransaction, ending: str) -> None:
    """End the application's transaction: ``await trans.commit()``, ``await
    trans.rollback()``, or nothing (``"close"``: the connection's close rolls it back, as
    a fixture that leaves its ``async with engine.connect()`` block does)."""
    if ending != "close":
        await getattr(trans, ending)()


@pytest.mark.parametrize("attached", ATTACHED)
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("mode", JOINED)
def test_the_applications_commit_or_rollback_decides_under_asyncio(
    wb: WriteBehindCase, make_worker: Callable[..., Any], mode: str, ending: str, attached: str
) -> None:
    """Nothing is queued at the joined ``AsyncSession``'s commit; until the application
    ends its transaction, a second session joined to the connection reads the row by
    primary key and a session of its own does not; ``await trans.commit()`` queues the
    operation (read by everyone, written by the worker), ``await trans.rollback()`` and
    the connection's close queue nothing."""
    page_view, path = wb.page_view, f"/joined/{mode}"

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with wb.app(attached) as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                async with app.joined(conn, mode) as s:
                    view = page_view(path=path)
                    s.add(view)
                    await s.commit()
                    pk = view.id
                seen["queued at the session's commit"] = wb.queued()
                async with app.joined(conn, mode) as s:
                    other = await s.get(page_view, pk)
                    seen["joined reader"] = None if other is None else other.path
                seen["reader of its own"] = await read_view(app, page_view, pk)
                await end(trans, ending)
                seen["queued at the end"] = wb.queued()
            seen["read after"] = await read_view(app, page_view, pk)
            seen["sync round trips"] = app.sync_trips
        seen["pk"] = pk
        return seen

    seen = asyncio.run(main())
    pk = seen.pop("pk")
    committed = ending == "commit"
    assert seen == {
        "queued at the session's commit": 0,
        "joined reader": path,
        "reader of its own": None,
        "queued at the end": int(committed),
        "read after": path if committed else None,
        "sync round trips": [],
    }
    drain(make_worker())
    assert rows(wb.engine, page_view).get(pk) == ((path, 0) if committed else None)


def test_the_database_commits_before_the_operations_are_queued_under_asyncio(
    wb: WriteBehindCase,
) -> None:
    """When the enqueue script is sent from ``await trans.commit()``, the transaction's
    other work (a Core row) is already visible to another connection: the database
    committed first, as for a session of its own, so a COMMIT that failed would have
    queued nothing."""
    page_view = wb.page_view
    core_row = uuid.uuid4()
    visible_at_enqueue: list[bool] = []

    def on_trip(trip: RoundTrip) -> None:
        if any(len(c) > 1 and c[0].upper() == "EVALSHA" and c[1] == ENQUEUE_SHA for c in trip):
            # on the loop, outside any greenlet: a synchronous engine of its own may read
            visible_at_enqueue.append(core_row in rows(wb.engine, page_view))

    async def main() -> tuple[Any, list[RoundTrip]]:
        async with wb.app() as app:
            app.tap.listen(on_trip)
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                await conn.execute(
                    sa.insert(page_view.__table__).values(id=core_row, path="/core", views=0)
                )
                view_id = await add_view(app, conn, page_view, "/queued")
                assert visible_at_enqueue == []
                await trans.commit()
            return view_id, app.sync_trips

    pk, sync_trips = asyncio.run(main())
    assert visible_at_enqueue == [True]
    assert wb.queued() == 1
    assert pk not in rows(wb.engine, page_view)  # queued, not written: the worker writes it
    assert sync_trips == []


def test_a_database_commit_that_fails_queues_nothing_under_asyncio(
    wb: WriteBehindCase, make_worker: Callable[..., Any]
) -> None:
    """COMMIT itself fails (a deferred constraint): ``await trans.commit()`` raises
    SQLAlchemy's error, the database keeps nothing, and the operations, queued only after
    a COMMIT that succeeded, are not queued; the connection goes back to the pool."""
    page_view = wb.page_view

    async def main() -> tuple[Any, list[RoundTrip]]:
        async with wb.app() as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                deferred = "x int UNIQUE DEFERRABLE INITIALLY DEFERRED"
                await conn.execute(sa.text(f"CREATE TEMP TABLE ajr_deferred ({deferred})"))
                await conn.execute(sa.text("INSERT INTO ajr_deferred VALUES (1), (1)"))
                view_id = await add_view(app, conn, page_view, "/never")
                with pytest.raises(sa.exc.IntegrityError):
                    await trans.commit()
            async with app.plain() as s:  # the pool hands out a working connection
                assert (await s.execute(sa.text("SELECT 1"))).scalar() == 1
            return view_id, app.sync_trips

    pk, sync_trips = asyncio.run(main())
    assert wb.queued() == 0
    drain(make_worker())
    assert pk not in rows(wb.engine, page_view)
    assert sync_trips == []


def test_redis_down_at_the_applications_commit_raises_after_the_database_commit_under_asyncio(
    wb: WriteBehindCase, aof_redis: RedisServer
) -> None:
    """Redis refuses the operations once the database has committed: ``await
    trans.commit()`` raises :class:`CacheUnavailableError` saying the transaction is
    committed (the Core row of the same transaction is in the database), and the
    connection is left with no transaction open."""
    page_view = wb.page_view
    core_row = uuid.uuid4()

    async def main() -> tuple[Any, bool]:
        async with wb.app() as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                await conn.execute(
                    sa.insert(page_view.__table__).values(id=core_row, path="/core", views=0)
                )
                view_id = await add_view(app, conn, page_view, "/lost")
                aof_redis.stop()
                try:
                    with pytest.raises(CacheUnavailableError, match="committed to the database"):
                        await trans.commit()
                finally:
                    aof_redis.start()
                in_transaction = conn.in_transaction()
            return view_id, in_transaction

    pk, in_transaction = asyncio.run(main())
    assert not in_transaction
    assert set(rows(wb.engine, page_view)) == {core_row}
    assert pk not in rows(wb.engine, page_view)


def test_a_rolled_back_application_savepoint_drops_the_sessions_operations_under_asyncio(
    wb: WriteBehindCase,
) -> None:
    """A session that committed inside ``await conn.begin_nested()``: the savepoint's
    rollback drops its operation, a released savepoint keeps the other's."""
    page_view = wb.page_view

    async def main() -> dict[str, Any]:
        async with wb.app() as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                before = await conn.begin_nested()
                dropped = await add_view(app, conn, page_view, "/dropped")
                await before.rollback()
                after = await conn.begin_nested()
                kept = await add_view(app, conn, page_view, "/kept")
                await after.commit()  # released: its work is the outer transaction's
                await trans.commit()
            return {
                "queued": wb.queued(),
                "dropped": await read_view(app, page_view, dropped),
                "kept": await read_view(app, page_view, kept),
                "sync round trips": app.sync_trips,
            }

    assert asyncio.run(main()) == {
        "queued": 1,
        "dropped": None,
        "kept": "/kept",
        "sync round trips": [],
    }


@pytest.mark.parametrize("mode", ["rollback_only", "conditional_savepoint"])
def test_a_savepoint_open_at_the_flush_decides_under_asyncio(
    wb: WriteBehindCase, mode: str
) -> None:
    """As SQL would: a row flushed before the application's savepoint survives its
    rollback, one flushed inside it does not, though the session commits after the
    rollback (membership is the flush's, not the session's commit's)."""
    page_view = wb.page_view

    async def main() -> dict[str, Any]:
        async with wb.app() as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                async with app.joined(conn, mode) as s:
                    before = page_view(path="/before")
                    s.add(before)
                    await s.flush()
                    savepoint = await conn.begin_nested()
                    inside = page_view(path="/inside")
                    s.add(inside)
                    await s.flush()
                    await savepoint.rollback()
                    await s.commit()
                await trans.commit()
            return {
                "queued": wb.queued(),
                "before": await read_view(app, page_view, before.id),
                "inside": await read_view(app, page_view, inside.id),
                "sync round trips": app.sync_trips,
            }

    assert asyncio.run(main()) == {
        "queued": 1,
        "before": "/before",
        "inside": None,
        "sync round trips": [],
    }


@pytest.mark.parametrize("rolled_back", ["before_the_sessions_commit", "after_it"])
@pytest.mark.parametrize("second", ["update", "delete"])
def test_a_savepoint_rollback_undoes_only_the_write_made_inside_it_under_asyncio(
    wb: WriteBehindCase, make_worker: Callable[..., Any], second: str, rolled_back: str
) -> None:
    """One session writes a row, then, inside ``await conn.begin_nested()``, writes it
    again; the savepoint rolls back, before or after the session commits. As with SQL,
    the first write stays and is queued at the application's commit."""
    page_view = wb.page_view

    async def main() -> tuple[Any, str | None, list[RoundTrip]]:
        async with wb.app() as app:
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                async with app.joined(conn, "rollback_only") as s:
                    view = page_view(path="/first")
                    s.add(view)
                    await s.flush()
                    pk = view.id
                    savepoint = await conn.begin_nested()
                    if second == "update":
                        view.path = "/second"
                    else:
                        await s.delete(view)
                    await s.flush()
                    if rolled_back == "after_it":
                        await s.commit()
                    await savepoint.rollback()
                    await s.commit()
                await trans.commit()
            return pk, await read_view(app, page_view, pk), app.sync_trips

    pk, path, sync_trips = asyncio.run(main())
    assert (wb.queued(), path, sync_trips) == (1, "/first", [])
    drain(make_worker())
    assert rows(wb.engine, page_view).get(pk) == ("/first", 0)


# -- 2. write-through and cache-aside writes of a joined AsyncSession ---------------------------


@dataclass(frozen=True)
class Written:
    """A model, the attribute a case changes, its new value, and how to read the row
    from the database."""

    model: Any
    attribute: str
    new: Any
    sql: str


WRITTEN = {
    "write_through": Written(
        Product, "price", Decimal("9.00"), "SELECT price FROM products WHERE id = :pk"
    ),
    "cache_aside": Written(
        Category,
        "name",
        "renamed in a joined session",
        "SELECT name FROM categories WHERE id = :pk",
    ),
}


async def read_both(
    app: AsyncApp,
    model: Any,
    pk: int,
    attribute: str,
    opener: Callable[[], AsyncSession] | None = None,
) -> tuple[Any, Any, int]:
    """A row's ``attribute`` through ``FromCache`` and through ``session.get``, each in a
    fresh ``AsyncSession`` of the cache (of ``opener``'s when given), and how many
    statements they sent."""
    opener = opener or app.factory
    app.sql.reset()
    async with opener() as s:
        stmt = select(model).where(model.id == pk).options(FromCache())
        by_query = getattr((await s.scalars(stmt)).one(), attribute)
    async with opener() as s:
        got = await s.get(model, pk)
        assert got is not None
        by_get = getattr(got, attribute)
    return by_query, by_get, app.sql.count


@pytest.mark.parametrize("attached", ATTACHED)
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("strategy", list(WRITTEN))
@pytest.mark.parametrize("mode", JOINED)
def test_a_joined_write_is_served_only_once_the_application_commits_under_asyncio(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    category: int,
    mode: str,
    strategy: str,
    ending: str,
    attached: str,
) -> None:
    """A joined ``AsyncSession`` changes a cached row and commits (no database commit).
    Fresh sessions of the cache read the last committed value meanwhile, and sessions
    joined to the same transaction its uncommitted one; after
    ``await trans.rollback()`` (or the connection's close) they read the old value, after
    ``await trans.commit()`` the new one, while the connection is still open and after it
    went back to the pool, where the second read is a hit (no SQL): what the cache serves
    is the database's."""
    written = WRITTEN[strategy]
    model, attribute = written.model, written.attribute
    pk = product if model is Product else category

    async def main() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with async_app(database_url, redis_url, namespace, attached) as app:
            old = (await read_both(app, model, pk, attribute))[0]
            seen["warm"] = await read_both(app, model, pk, attribute)
            async with app.engine.connect() as conn:
                trans = await conn.begin()
                async with app.joined(conn, mode) as s:
                    changed = await s.get(model, pk)
                    assert changed is not None
                    setattr(changed, attribute, written.new)
                    await s.commit()
                seen["before the end"] = (await read_both(app, model, pk, attribute))[:2]
                # the transaction's other sessions read its uncommitted row, as in SQL
                seen["joined reader"] = (
                    await read_both(app, model, pk, attribute, lambda: app.joined(conn, mode))
                )[:2]
                await end(trans, ending)
                seen["ended, connection open"] = (await read_both(app, model, pk, attribute))[:2]
            seen["checked in"] = (await read_both(app, model, pk, attribute))[:2]
            seen["served"] = await read_both(app, model, pk, attribute)
            async with app.plain() as s:
                seen["database"] = (await s.execute(sa.text(written.sql), {"pk": pk})).scalar()
            seen["sync round trips"] = app.sync_trips
        seen["old"] = old
        return seen

    seen = asyncio.run(main())
    old = seen.pop("old")
    now = written.new if ending == "commit" else old
    assert seen == {
        "warm": (old, old, 0),
        "before the end": (old, old),
        "joined reader": (written.new, written.new),
        "ended, connection open": (now, now),
        "checked in": (now, now),
        "served": (now, now, 0),
        "database": now,
        "sync round trips": [],
    }


# -- 3. with_loader_criteria on the objects of a FromCache hit ----------------------------------

TIERS = ["redis", "local"]
"""Hits of the Redis tier, or of the local tier (``Cache(local=True)``)."""


@dataclass
class Tree:
    """The private models of this section (``ajr_*`` tables): categories, their items,
    the items' tags; every relationship lazy."""

    cat: Any
    item: Any
    tag: Any


@pytest.fixture(scope="module")
def tree(engine: sa.Engine) -> Iterator[Tree]:
    """Two categories (items 1-3 priced 1-3, items 4-5), each item with tags of weight
    1-3; tables made and dropped here, registry disposed of afterwards."""

    class Base(AsyncAttrs, DeclarativeBase):
        pass

    class AjrCat(Base):
        __tablename__ = "ajr_cat"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40))
        items: Mapped[list[AjrItem]] = relationship(order_by="AjrItem.id")

    class AjrItem(Base):
        __tablename__ = "ajr_item"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        cat_id: Mapped[int] = mapped_column(ForeignKey("ajr_cat.id"))
        name: Mapped[str] = mapped_column(String(40))
        price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
        tags: Mapped[list[AjrTag]] = relationship(order_by="AjrTag.id")

    class AjrTag(Base):
        __tablename__ = "ajr_tag"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        item_id: Mapped[int] = mapped_column(ForeignKey("ajr_item.id"))
        label: Mapped[str] = mapped_column(String(40))
        weight: Mapped[int]

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([AjrCat(id=1, name="c1"), AjrCat(id=2, name="c2")])
        s.flush()
        s.add_all(
            AjrItem(id=i, cat_id=1 if i <= 3 else 2, name=f"i{i}", price=Decimal(i))
            for i in range(1, 6)
        )
        s.flush()
        s.add_all(
            AjrTag(id=10 * i + w, item_id=i, label=f"t{i}.{w}", weight=w)
            for i in range(1, 6)
            for w in range(1, 4)
        )
        s.commit()
    try:
        yield Tree(AjrCat, AjrItem, AjrTag)
    finally:
        Base.metadata.drop_all(engine)
        Base.registry.dispose()


async def served(app: AsyncApp, stmt: Any, session: AsyncSession) -> Any:
    """The one object of ``stmt`` as a hit gives it in ``session`` (of the local tier when
    the cache has one): the statement is read in sessions of the cache first (a fill,
    then a hit), then in ``session`` with no SQL."""
    for _ in range(2):
        async with app.factory() as s:
            (await s.scalars(stmt)).one()
    if app.local:
        # the report Redis sends of this test's own fill may reach the tier after the
        # Redis hit it kept, and drop it: read until one is served locally
        for _ in range(10):
            before = app.local_hits()
            async with app.factory() as s:
                (await s.scalars(stmt)).one()
            if app.local_hits() > before:
                break
        else:
            raise AssertionError("the local tier never kept the entry")
    before = app.local_hits()
    app.sql.reset()
    found = (await session.scalars(stmt)).one()
    assert app.sql.count == 0, "the query was not served from the cache"
    assert app.local_hits() == before + app.local, "the hit was not the local tier's"
    return found


async def compare(app: AsyncApp, stmt: Any, loaded: Callable[[Any], Any]) -> tuple[Any, Any]:
    """What ``await loaded(obj)`` gives for the object of ``stmt``: as plain SQLAlchemy
    loads it, and as a hit of the cache gives it."""
    async with app.plain() as s:
        expected = await loaded((await s.scalars(stmt)).one())
    async with app.factory() as s:
        got = await loaded(await served(app, stmt, s))
    return expected, got


@pytest.mark.parametrize("tier", TIERS)
def test_with_loader_criteria_filters_an_awaited_lazy_load_of_a_hits_object(
    tree: Tree, database_url: str, redis_url: str, namespace: str, tier: str
) -> None:
    """``await cat.awaitable_attrs.items`` on a hit's category applies the statement's
    ``with_loader_criteria(Item, ...)``, with the values of the execution that built the
    object, as on the uncached query's."""
    cat, item = tree.cat, tree.item

    def statement(limit: int) -> Any:
        return (
            select(cat)
            .where(cat.id == 1)
            .options(FromCache(), with_loader_criteria(item, lambda c: c.price < limit))
        )

    async def names(obj: Any) -> list[str]:
        return [i.name for i in await obj.awaitable_attrs.items]

    async def main() -> tuple[list[Any], list[RoundTrip]]:
        async with async_app(database_url, redis_url, namespace, local=tier == "local") as app:
            found = [await compare(app, statement(limit), names) for limit in (2, 10, 2)]
            return found, app.sync_trips

    found, sync_trips = asyncio.run(main())
    expected = [["i1"], ["i1", "i2", "i3"], ["i1"]]
    assert [plain for plain, _ in found] == expected  # the criteria filter, uncached
    assert [hit for _, hit in found] == expected
    assert sync_trips == []


@pytest.mark.parametrize("tier", TIERS)
def test_with_loader_criteria_filters_a_selectinload_below_a_hits_lazy_load(
    tree: Tree, database_url: str, redis_url: str, namespace: str, tier: str
) -> None:
    """``defaultload(Cat.items).selectinload(Item.tags)``: the awaited lazy load of a hit's
    category's items selectin-loads their tags in the same await, and
    ``with_loader_criteria(Tag, ...)`` filters them there as on the uncached objects."""
    cat, item, tag = tree.cat, tree.item, tree.tag

    def statement(weight: int) -> Any:
        return (
            select(cat)
            .where(cat.id == 1)
            .options(
                FromCache(),
                defaultload(cat.items).selectinload(item.tags),
                with_loader_criteria(tag, lambda t: t.weight < weight),
            )
        )

    async def labels(obj: Any) -> list[list[str]]:
        # tags were loaded with the items: read without await (a load would raise here)
        return [[t.label for t in i.tags] for i in await obj.awaitable_attrs.items]

    async def main() -> tuple[list[Any], list[RoundTrip]]:
        async with async_app(database_url, redis_url, namespace, local=tier == "local") as app:
            found = [await compare(app, statement(weight), labels) for weight in (2, 4)]
            return found, app.sync_trips

    found, sync_trips = asyncio.run(main())
    expected = [
        [["t1.1"], ["t2.1"], ["t3.1"]],
        [["t1.1", "t1.2", "t1.3"], ["t2.1", "t2.2", "t2.3"], ["t3.1", "t3.2", "t3.3"]],
    ]
    assert [plain for plain, _ in found] == expected
    assert [hit for _, hit in found] == expected
    assert sync_trips == []


@pytest.mark.parametrize("tier", TIERS)
def test_with_loader_criteria_filters_lazy_loads_below_a_cached_selectinload(
    tree: Tree, database_url: str, redis_url: str, namespace: str, tier: str
) -> None:
    """``selectinload(Cat.items)`` with criteria on items and tags: the hit's items (from
    the entry) are the filtered ones, and ``await item.awaitable_attrs.tags`` on each,
    an object the hit built below the eager load, applies the tags' criteria."""
    cat, item, tag = tree.cat, tree.item, tree.tag

    def statement(limit: int, weight: int) -> Any:
        return (
            select(cat)
            .where(cat.id == 1)
            .options(
                FromCache(),
                selectinload(cat.items),
                with_loader_criteria(item, lambda c: c.price < limit),
                with_loader_criteria(tag, lambda t: t.weight < weight),
            )
        )

    async def labels(obj: Any) -> list[tuple[str, list[str]]]:
        return [(i.name, [t.label for t in await i.awaitable_attrs.tags]) for i in obj.items]

    async def main() -> tuple[list[Any], list[RoundTrip]]:
        async with async_app(database_url, redis_url, namespace, local=tier == "local") as app:
            found = [
                await compare(app, statement(limit, weight), labels)
                for limit, weight in ((3, 2), (10, 3), (3, 2))
            ]
            return found, app.sync_trips

    found, sync_trips = asyncio.run(main())
    narrow = [("i1", ["t1.1"]), ("i2", ["t2.1"])]
    wide = [(f"i{i}", [f"t{i}.1", f"t{i}.2"]) for i in (1, 2, 3)]
    assert [plain for plain, _ in found] == [narrow, wide, narrow]
    assert [hit for _, hit in found] == [narrow, wide, narrow]
    assert sync_trips == []
