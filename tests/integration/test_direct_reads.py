"""``session.execute``/``scalars``/``scalar`` of a ``FromCache`` statement served before
SQLAlchemy's execute pipeline (``QueryReads.direct_read``), as ``session.get`` is
(test_direct_get.py).

The fast path must serve exactly what the pipeline would (rows, objects, the identity
map, the counters), skip the pipeline on a hit, leave every read it cannot answer to the
pipeline untouched (another ``do_orm_execute`` listener, execution options, a session
with pending changes, a write-behind model, an overridden method), and cost a miss or a
Redis error no second round trip.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache, stampede
from tests.modes import async_url
from tests.seams import RedisTap, RoundTrip
from tests.support import close_cache_and_engine

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support import SQLCounter


TAPS_CACHE = True  # the cache's client is tapped: tests see its round trips (conftest)


@pytest.fixture
def pipeline_runs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every statement SQLAlchemy's execute pipeline runs (``Session._execute_internal``)."""
    calls: list[Any] = []
    original = Session._execute_internal

    def spy(self: Session, statement: Any, *args: Any, **kw: Any) -> Any:
        calls.append(statement)
        return original(self, statement, *args, **kw)

    monkeypatch.setattr(Session, "_execute_internal", spy)
    return calls


def by_id(pid: int) -> sa.Select[Any]:
    return select(Product).where(Product.id == pid).options(FromCache())


def warm(factory: sessionmaker[Session], statement: Any) -> None:
    """A miss (it fills) and a hit through the pipeline: the entry is known to be there
    (a fill does not say so: the next look is the pipeline's, which may take the lease)."""
    for _ in range(2):
        with factory() as s:
            s.execute(statement).all()


@pytest.fixture
def known(session_factory: sessionmaker[Session], product: int) -> sa.Select[Any]:
    """The product's ``FromCache`` statement, warmed: its entry is known to be there."""
    statement = by_id(product)
    warm(session_factory, statement)
    return statement


def test_a_hit_skips_the_execute_pipeline_in_execute_scalars_and_scalar(
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
    known: sa.Select[Any],
    pipeline_runs: list[Any],
) -> None:
    statement = known
    hits_before = cache.stats()["regions"]["default"]["hits"]
    sql.reset()
    pipeline_runs.clear()
    with session_factory() as s:
        row = s.execute(statement).one()
        obj = row[0]
        assert row._fields == ("Product",)
        assert obj in s
        assert obj.name == "scratch"
        assert obj.price == Decimal("1.00")
        assert s.scalars(statement).all() == [obj]  # the identity map's object
        assert s.scalar(statement) is obj
        assert s.scalars(statement).one() is obj
    assert pipeline_runs == []
    assert sql.count == 0
    region = cache.stats()["regions"]["default"]
    assert region["hits"] == hits_before + 4
    assert cache.stats()["latency"]["regions"]["default"]["hit"]["count"] >= 4


def test_a_hit_fills_the_sessions_own_object_as_the_database_load_would(
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
    product: int,
    known: sa.Select[Any],
) -> None:
    """A hit into a session that already holds the row's object gives that object and
    fills the attributes it has expired from the entry, with no SQL, as SQLAlchemy's load
    of the same row does (hydrate looks the session's objects up before making new ones)."""
    with session_factory() as s:
        held = s.get(Product, product)
        assert held is not None
        expected = held.name
        s.expire(held, ["name"])
        hits = cache.stats()["regions"]["default"]["hits"]
        sql.reset()
        got = s.scalars(known).one()
        assert got is held
        assert "name" not in sa.inspect(held).unloaded
        assert held.name == expected
        assert sql.count == 0
        assert cache.stats()["regions"]["default"]["hits"] == hits + 1


def test_columns_and_labels_come_back_as_the_pipeline_returns_them(
    session_factory: sessionmaker[Session], product: int, pipeline_runs: list[Any]
) -> None:
    statement = (
        select(Product.id, Product.name.label("title"), Product.price)
        .where(Product.id == product)
        .options(FromCache())
    )
    with Session(session_factory.kw["bind"]) as plain:
        expected = plain.execute(statement).all()
    warm(session_factory, statement)
    pipeline_runs.clear()
    with session_factory() as s:
        rows = s.execute(statement).all()
        first = s.scalars(statement).first()
    assert pipeline_runs == []
    assert rows == expected
    assert rows[0]._fields == ("id", "title", "price")
    assert first == product


def test_a_miss_after_a_write_looks_once_and_reads_the_new_row(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_tap: RedisTap,
    sql: SQLCounter,
    product: int,
    known: sa.Select[Any],
) -> None:
    """The fast path's look (an MGET that finds the entry retired) is the pipeline's first
    look: the miss costs what it costs without the fast path (the look, the lease, the
    fill), with no second look before the database read."""
    statement = known
    with session_factory() as s:
        s.get_one(Product, product).name = "renamed"
        s.commit()
    trips: list[RoundTrip] = []
    redis_tap.listen(trips.append)
    sql.reset()
    with session_factory() as s:
        assert s.scalars(statement).one().name == "renamed"
    assert sql.count == 1
    assert len(trips) == 3
    looks = [t for t in trips if t[0][0].upper() in ("MGET", "EVALSHA") and len(t) == 1]
    assert [t[0][0].upper() for t in looks] == ["MGET", "EVALSHA"]  # the look, the fill
    trips.clear()
    with session_factory() as s:
        assert s.scalars(statement).one().name == "renamed"  # refilled: a hit
    assert len(trips) == 1
    assert sql.count == 1


def test_a_redis_error_in_the_fast_look_is_the_reads_only_attempt(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_tap: RedisTap,
    sql: SQLCounter,
    product: int,
    known: sa.Select[Any],
) -> None:
    statement = known
    attempts: list[RoundTrip] = []

    def fail_reads(trip: RoundTrip) -> None:
        attempts.append(trip)
        raise redis.ConnectionError("injected: Redis went away")

    errors_before = cache.stats()["regions"]["default"]["errors"]
    redis_tap.listen(fail_reads)
    sql.reset()
    try:
        with session_factory() as s:
            assert s.scalars(statement).one().id == product  # from the database
    finally:
        redis_tap.remove(fail_reads)
    assert sql.count == 1
    assert len(attempts) == 1  # the pipeline did not look again
    assert cache.stats()["regions"]["default"]["errors"] == errors_before + 1


def test_another_do_orm_execute_listener_sees_every_read(
    session_factory: sessionmaker[Session],
    known: sa.Select[Any],
    pipeline_runs: list[Any],
) -> None:
    """A listener may change what a read returns (``with_loader_criteria`` for tenants):
    the cache must not answer before it."""
    statement = known
    seen: list[Any] = []

    def hide_scratch_products(orm_context: Any) -> None:
        seen.append(orm_context.statement)
        orm_context.statement = orm_context.statement.where(Product.name != "scratch")

    event.listen(session_factory, "do_orm_execute", hide_scratch_products, insert=True)
    try:
        pipeline_runs.clear()
        with session_factory() as s:
            assert s.scalars(statement).all() == []
    finally:
        event.remove(session_factory, "do_orm_execute", hide_scratch_products)
    assert len(seen) == 1
    assert pipeline_runs[0] is statement


def test_execution_options_parameters_and_keywords_take_the_pipeline(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    product: int,
    known: sa.Select[Any],
    pipeline_runs: list[Any],
) -> None:
    statement = known
    pipeline_runs.clear()
    sql.reset()
    with session_factory() as s:
        refreshing = statement.execution_options(populate_existing=True)
        fresh = s.scalars(refreshing).one()
        assert fresh.name == "scratch"
        assert pipeline_runs == [refreshing]
        assert sql.count == 1  # populate_existing bypasses the cache, as before
        s.execute(statement, execution_options={"yield_per": 10}).all()
        assert pipeline_runs[1] is statement
        assert sql.count == 2
        bound = select(Product).where(Product.id == sa.bindparam("pid")).options(FromCache())
        assert s.scalars(bound, {"pid": product}).one() is fresh
        assert pipeline_runs[2] is bound


def test_pending_changes_are_flushed_before_the_read(
    session_factory: sessionmaker[Session], sql: SQLCounter, product: int, known: sa.Select[Any]
) -> None:
    statement = known
    with session_factory() as s:
        s.get_one(Product, product).price = Decimal("9.50")
        sql.reset()
        # autoflush writes the change; the transaction wrote the table: the database reads
        assert s.scalars(statement).one().price == Decimal("9.50")
        assert sql.count == 2  # the UPDATE, then the SELECT
        s.rollback()


def test_an_overridden_execute_is_left_alone(
    shop_engine: sa.Engine, cache: Cache, product: int
) -> None:
    calls: list[Any] = []

    class AuditedSession(Session):
        def execute(self, statement: Any, *args: Any, **kw: Any) -> Any:
            calls.append(statement)
            return super().execute(statement, *args, **kw)

    factory = sessionmaker(shop_engine, class_=AuditedSession)
    cache.attach(factory)
    assert factory.class_.execute is not Session.execute
    statement = by_id(product)
    for _ in range(3):
        with factory() as s:
            assert s.execute(statement).scalar_one().id == product
    assert len(calls) == 3
    assert cache.stats()["regions"]["default"]["hits"] == 2


def test_detach_gives_back_sqlalchemys_methods(shop_engine: sa.Engine, cache: Cache) -> None:
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    replaced = ("get", "execute", "scalars", "scalar")
    assert all(getattr(factory.class_, name) is not getattr(Session, name) for name in replaced)
    cache.detach()
    assert all(getattr(factory.class_, name) is getattr(Session, name) for name in replaced)


@pytest.fixture
def categories_renamed_back(shop_engine: sa.Engine) -> Iterator[None]:
    with Session(shop_engine) as s:
        name = s.get_one(Category, 1).name
    yield
    with Session(shop_engine) as s:
        s.get_one(Category, 1).name = name
        s.commit()


def test_a_hit_inside_a_transaction_that_wrote_another_table(
    session_factory: sessionmaker[Session],
    known: sa.Select[Any],
    pipeline_runs: list[Any],
    categories_renamed_back: None,
) -> None:
    """A transaction that wrote another table still reads this one from the cache; once
    it writes this table, from the database (its own uncommitted row)."""
    statement = known
    with session_factory() as s:
        s.get_one(Category, 1).name = "renamed in a transaction"
        s.flush()
        pipeline_runs.clear()
        mine = s.scalars(statement).one()
        assert mine.name == "scratch"
        assert pipeline_runs == []
        mine.name = "mine"
        s.flush()
        assert s.scalars(statement).one() is mine
        assert mine.name == "mine"
        assert pipeline_runs == [statement]  # the database read, in the pipeline
        s.rollback()


@pytest.mark.skipif(
    "execution_options" not in Session.__init__.__code__.co_varnames,
    reason="Session(execution_options=...) is newer than this SQLAlchemy",
)
def test_session_wide_execution_options_take_the_pipeline(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    product: int,
    known: sa.Select[Any],
) -> None:
    """``Session(execution_options=...)`` reaches every read of the session: a
    ``populate_existing`` there bypasses the cache for ``get`` and ``FromCache`` alike."""
    statement = known
    with session_factory() as s:
        s.get_one(Product, product)
    with session_factory() as s:
        s.get_one(Product, product)  # an entity-cache hit: the entry is known to be there
    refreshing = sessionmaker(
        shop_engine,
        class_=session_factory.class_,
        execution_options={"populate_existing": True},
    )
    sql.reset()
    with refreshing() as s:
        assert s.scalars(statement).one().id == product
        assert sql.count == 1
        s.expunge_all()
        assert s.get_one(Product, product).id == product
        assert sql.count == 2


def test_a_local_hit_skips_the_execute_pipeline_and_a_local_miss_takes_it(
    shop_engine: sa.Engine,
    redis_url: str,
    namespace: str,
    product: int,
    sql: SQLCounter,
    pipeline_runs: list[Any],
) -> None:
    cache = Cache(redis_url, namespace=namespace, local=True)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10.0)
        statement = by_id(product)
        warm(factory, statement)  # a fill, then a Redis hit the tier keeps
        pipeline_runs.clear()
        sql.reset()
        with factory() as s:
            assert s.scalars(statement).one().name == "scratch"
        assert pipeline_runs == []
        assert cache.stats()["total"]["local_hits"] == 1
        with factory() as s:
            s.get_one(Product, product).name = "renamed"
            s.commit()  # returns once this process dropped its local entry
        pipeline_runs.clear()
        with factory() as s:
            assert s.scalars(statement).one().name == "renamed"
        assert pipeline_runs[0] is statement  # the local miss: the pipeline reads
        assert cache.stats()["total"]["local_hits"] == 1
    finally:
        cache.detach()


def test_the_breakers_probe_is_left_to_the_pipeline(
    session_factory: sessionmaker[Session], cache: Cache, product: int, sql: SQLCounter
) -> None:
    """After an outage the half-open breaker lets one call through. A read served before
    the pipeline that then leaves the read to it (here: a statement not known to be
    cached) must not take that probe: the pipeline's read sends it, and closes the
    breaker."""
    with session_factory() as s:
        s.scalars(select(Category).options(FromCache())).all()  # the database is known
    breaker = cache._core.breaker
    now = [0.0]
    breaker.clock = lambda: now[0]
    for _ in range(breaker.threshold):
        breaker.failure()
    assert breaker.state == "open"
    now[0] += breaker.reset_after + 1  # half-open at the next call
    sql.reset()
    with session_factory() as s:
        assert s.scalars(by_id(product)).one().id == product
    assert breaker.state == "closed"
    assert cache.stats()["regions"]["default"]["misses"] == 2  # the warm-up and this one


def test_asyncsession_hits_skip_the_execute_pipeline_too(
    database_url: str,
    redis_url: str,
    namespace: str,
    product: int,
    pipeline_runs: list[Any],
) -> None:
    """``AsyncSession`` passes its own defaults (``prebuffer_rows``, ``options=None``...)
    to the sync session's methods: they are plain calls, served the same way, through the
    asyncio client; anything else it passes takes the pipeline."""
    cache = Cache(redis_url, namespace=namespace)
    statement = by_id(product)
    outcome: dict[str, Any] = {}

    async def main() -> None:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine)
        cache.attach(factory)
        try:
            for _ in range(2):  # fills, then hits through the pipeline
                async with factory() as s:
                    (await s.execute(statement)).all()
                    await s.get(Product, product)
            pipeline_runs.clear()
            async with factory() as s:
                outcome["execute"] = (await s.execute(statement)).scalar_one().name
                outcome["scalars"] = (await s.scalars(statement)).one().name
                outcome["scalar"] = (await s.scalar(statement)).name
            async with factory() as s:
                got = await s.get(Product, product)
                outcome["get"] = None if got is None else got.name
            outcome["direct"] = len(pipeline_runs)
            async with factory() as s:
                fresh = await s.get(Product, product, populate_existing=True)
                outcome["populate_existing"] = None if fresh is None else fresh.name
            outcome["with it"] = len(pipeline_runs)
        finally:
            await close_cache_and_engine(cache, engine)

    try:
        asyncio.run(main())
    finally:
        cache.client.close()
    names = {k: outcome[k] for k in ("execute", "scalars", "scalar", "get", "populate_existing")}
    assert set(names.values()) == {"scratch"}
    assert outcome["direct"] == 0
    assert outcome["with it"] == 1
    assert cache.stats()["regions"]["default"]["hits"] == 4  # one pipeline hit, three direct


def test_an_early_refresh_is_drawn_once_per_read(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    known: sa.Select[Any],
    sql: SQLCounter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """XFetch draws whether a hit refreshes its entry early. A direct read whose draw says
    so hands its look to the pipeline with the draw: drawing again there would make an
    early refresh rarer (two draws must agree) than XFetch's rate."""
    with session_factory() as s:
        s.get_one(Product, product)
    with session_factory() as s:
        s.get_one(Product, product)  # an entity hit: its next get is a direct read
    answers: list[bool] = []

    def draw(*_args: Any) -> bool:
        return answers.pop(0)  # IndexError: a second draw

    monkeypatch.setattr(stampede, "due", draw)
    sql.reset()
    answers.append(True)
    with session_factory() as s:
        assert s.scalars(known).one().name == "scratch"
    answers.append(True)
    with session_factory() as s:
        assert s.get_one(Product, product).name == "scratch"
    assert answers == []
    assert sql.count == 2  # each refresh read the database
    stats = cache.stats()
    assert stats["regions"]["default"]["early_refreshes"] == 1
    assert stats["models"]["Product"]["early_refreshes"] == 1


def test_scoped_session_reads_are_served_before_the_pipeline(
    session_factory: sessionmaker[Session],
    product: int,
    known: sa.Select[Any],
    pipeline_runs: list[Any],
) -> None:
    """``scoped_session`` passes its own defaults (``bind_arguments=None``, ...) on."""
    scoped = scoped_session(session_factory)
    try:
        for _ in range(2):  # the entity entry: filled, then a hit through the pipeline
            scoped.get(Product, product)
            scoped.remove()
        pipeline_runs.clear()
        assert scoped.execute(known).scalar_one().name == "scratch"
        assert scoped.scalars(known).one().name == "scratch"
        assert scoped.scalar(known).name == "scratch"
        scoped.remove()
        got = scoped.get(Product, product)
        assert got is not None
        assert got.name == "scratch"
    finally:
        scoped.remove()
    assert pipeline_runs == []


def test_detach_leaves_a_method_the_application_set_after_attach(
    shop_engine: sa.Engine, cache: Cache
) -> None:
    factory = sessionmaker(shop_engine)
    cache.attach(factory)

    def audited_execute(self: Session, statement: Any, *args: Any, **kw: Any) -> Any:
        return Session.execute(self, statement, *args, **kw)

    factory.class_.execute = audited_execute  # type: ignore[method-assign]
    cache.detach()
    assert factory.class_.execute is audited_execute
    assert factory.class_.scalars is Session.scalars
