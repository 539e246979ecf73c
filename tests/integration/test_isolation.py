"""Tenants and databases never read each other's rows (the entity cache above all).

Two schemas, ``iso_tenant_x`` and ``iso_tenant_y``, hold the same tables with different
secrets. One cache serves sessions of both, through ``schema_translate_map`` (one schema
per tenant), through a ``search_path`` set in the connect arguments, and through two
databases that share one namespace. Before entity keys carried the database and schema,
``session.get(Acct, 1)`` in tenant y returned tenant x's secret.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from devservices.scratch import scratch_database
from sa_redis_cache import Cache, CachePolicy, FromCache
from tests.modes import async_url
from tests.support import SQLCounter

TENANTS = ("iso_tenant_x", "iso_tenant_y")


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "iso_acct"
    __cache__ = CachePolicy(strategy="write_through")

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    secret: Mapped[str] = mapped_column(String(80))


class Note(Base):
    __tablename__ = "iso_note"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(ForeignKey("iso_acct.id"))
    acct: Mapped[Acct] = relationship(lazy="select")


def secret_of(where: str) -> str:
    return f"secret of {where}"


def fill(engine: sa.Engine, where: str) -> None:
    """The tables in the engine's default schema, with one account and one note."""
    with engine.begin() as conn:
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
    with Session(engine) as s:
        s.add(Acct(id=1, secret=secret_of(where)))
        s.add(Note(id=1, acct_id=1))
        s.commit()


@pytest.fixture(scope="module")
def tenants(engine: sa.Engine) -> Iterator[dict[str, sa.Engine]]:
    """An engine per tenant schema, each translating the default schema to its own."""
    with engine.begin() as conn:
        for name in TENANTS:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    engines: dict[str, sa.Engine] = {
        name: engine.execution_options(schema_translate_map={None: name}) for name in TENANTS
    }
    for name, tenant in engines.items():
        fill(tenant, name)
    yield engines
    with engine.begin() as conn:
        for name in TENANTS:
            conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))


@pytest.fixture
def cache(redis_url: str, namespace: str) -> Iterator[Cache]:
    made = Cache(redis_url, namespace=namespace)
    yield made
    made.detach()


def attached(cache: Cache, engines: dict[str, sa.Engine]) -> dict[str, sessionmaker[Session]]:
    factories = {name: sessionmaker(e) for name, e in engines.items()}
    for factory in factories.values():
        cache.attach(factory)
    return factories


Read = Callable[[Session], str]


def by_get(s: Session) -> str:
    acct = s.get(Acct, 1)
    assert acct is not None
    return acct.secret


def by_lazy_load(s: Session) -> str:
    note = s.get(Note, 1)
    assert note is not None
    return note.acct.secret  # a many-to-one lazy load by primary key: the entity cache


def by_query(s: Session) -> str:
    return s.scalars(select(Acct.secret).where(Acct.id == 1).options(FromCache())).one()


READS: dict[str, Read] = {"get": by_get, "lazy_load": by_lazy_load, "query": by_query}


def each_reads_its_own(factories: dict[str, sessionmaker[Session]], read: Read) -> None:
    """Twice round the tenants: the second round is served from the cache, still apart."""
    for _ in range(2):
        for name, factory in factories.items():
            with factory() as s:
                assert read(s) == secret_of(name)


@pytest.mark.parametrize("read", READS.values(), ids=list(READS))
def test_tenants_by_schema_translate_map(
    tenants: dict[str, sa.Engine], cache: Cache, read: Read
) -> None:
    each_reads_its_own(attached(cache, tenants), read)
    assert cache.stats()["total"]["hits"] >= len(TENANTS)  # the cache did serve them


@pytest.mark.parametrize("read", READS.values(), ids=list(READS))
def test_tenants_by_the_sessions_connection_options(
    tenants: dict[str, sa.Engine], engine: sa.Engine, cache: Cache, read: Read
) -> None:
    """One factory for every tenant; each session names its tenant's schema when it
    begins, with ``session.connection(execution_options=...)``: reads that follow run
    under that map, and so are keyed by it (the engine's own options name none)."""
    factory = sessionmaker(engine)
    cache.attach(factory)
    for _ in range(2):  # the second round is served from the cache, still apart
        for name in TENANTS:
            with factory() as s:
                s.connection(execution_options={"schema_translate_map": {None: name}})
                assert read(s) == secret_of(name)
    assert cache.stats()["total"]["hits"] >= len(TENANTS)  # the cache did serve them


@pytest.mark.parametrize("read", READS.values(), ids=list(READS))
def test_tenants_by_search_path_in_the_connect_arguments(
    tenants: dict[str, sa.Engine], database_url: str, cache: Cache, read: Read
) -> None:
    """The same URL, a different search_path: the URL alone cannot tell them apart."""
    engines = {
        name: sa.create_engine(database_url, connect_args={"options": f"-csearch_path={name}"})
        for name in TENANTS
    }
    try:
        each_reads_its_own(attached(cache, engines), read)
    finally:
        for e in engines.values():
            e.dispose()


@pytest.fixture
def two_databases(services: Any) -> Iterator[dict[str, sa.Engine]]:
    """Two scratch databases, ``a`` and ``b``, each filled with its own secrets."""
    with (
        scratch_database(services.database_url, f"sarc_iso_{secrets.token_hex(4)}") as url_a,
        scratch_database(services.database_url, f"sarc_iso_{secrets.token_hex(4)}") as url_b,
    ):
        engines = {"a": sa.create_engine(url_a), "b": sa.create_engine(url_b)}
        try:
            for name, e in engines.items():
                fill(e, name)
            yield engines
        finally:
            for e in engines.values():
                e.dispose()


@pytest.mark.parametrize("read", READS.values(), ids=list(READS))
def test_two_databases_share_a_namespace(
    two_databases: dict[str, sa.Engine], cache: Cache, read: Read
) -> None:
    each_reads_its_own(attached(cache, two_databases), read)


def owner_of(_: Session, note: Note) -> Acct:
    return note.acct


def test_async_tenants_by_schema_translate_map(
    tenants: dict[str, sa.Engine], database_url: str, cache: Cache
) -> None:
    async def main() -> None:
        base = create_async_engine(async_url(database_url))
        factories = {
            name: async_sessionmaker(base.execution_options(schema_translate_map={None: name}))
            for name in TENANTS
        }
        for factory in factories.values():
            cache.attach(factory)
        try:
            for _ in range(2):
                for name, factory in factories.items():
                    async with factory() as s:
                        acct = await s.get(Acct, 1)
                        assert acct is not None
                        assert acct.secret == secret_of(name)
                        note = await s.get(Note, 1)
                        assert note is not None
                        owner = await s.run_sync(owner_of, note)  # a lazy load
                        assert owner.secret == secret_of(name)
            assert cache.stats()["models"]["Acct"]["hits"] >= len(TENANTS)
        finally:
            await cache.aclose()
            await base.dispose()

    asyncio.run(main())


def test_a_write_in_one_tenant_is_read_there_and_leaves_the_other_alone(
    tenants: dict[str, sa.Engine], cache: Cache
) -> None:
    factories = attached(cache, tenants)
    x, y = TENANTS
    each_reads_its_own(factories, by_get)
    try:
        with factories[x]() as s:
            acct = s.get(Acct, 1)
            assert acct is not None
            acct.secret = "x rewritten"
            s.commit()  # write-through: tenant x's entry holds the new state
        with factories[x]() as s:
            assert by_get(s) == "x rewritten"
        with factories[y]() as s:
            assert by_get(s) == secret_of(y)
    finally:
        with factories[x]() as s:
            acct = s.get(Acct, 1)
            assert acct is not None
            acct.secret = secret_of(x)
            s.commit()


def test_per_request_connections_are_not_kept(
    tenants: dict[str, sa.Engine], engine: sa.Engine, cache: Cache, namespace: str
) -> None:
    """``Session(bind=connection)`` per request: the cache holds no connection, and what it
    remembers for ``invalidate_query()`` stays one entry, however many requests ran."""
    tenant = tenants[TENANTS[0]]

    class RequestSession(Session):
        pass

    cache.attach(RequestSession)
    stmt = select(Acct.secret).where(Acct.id == 1).options(FromCache())
    sql = SQLCounter()
    sa.event.listen(engine, "before_cursor_execute", sql)

    def request() -> weakref.ref[Any]:
        with tenant.connect() as conn, RequestSession(bind=conn) as s:
            assert s.scalars(stmt).one() == secret_of(TENANTS[0])
            assert by_get(s) == secret_of(TENANTS[0])
            return weakref.ref(conn)

    try:
        connections = [request() for _ in range(300)]
        gc.collect()
        assert all(conn() is None for conn in connections)
        assert len(cache._reads.queries.seen_databases()) == 1
        assert sql.count == 2  # the first request's query and get; the others hit
        assert cache.invalidate_query(stmt) == 1
    finally:
        sa.event.remove(engine, "before_cursor_execute", sql)


def test_the_entity_key_names_the_database_and_schema(
    tenants: dict[str, sa.Engine], cache: Cache, redis_client: redis.Redis, namespace: str
) -> None:
    each_reads_its_own(attached(cache, tenants), by_get)
    keys = sorted(redis_client.scan_iter(match=f"sarc:{namespace}:*iso_acct*:e:*"))
    assert len(keys) == len(TENANTS)
    scopes = {key.rsplit(b":", 2)[1] for key in keys}
    assert len(scopes) == len(TENANTS)


def test_a_sharded_session_reads_the_shards_and_fills_nothing(
    two_databases: dict[str, sa.Engine], cache: Cache
) -> None:
    """``ShardedSession`` picks a read's shard in its own ``do_orm_execute`` listener, after
    the cache's: keyed by the bind ``shard_chooser`` names, shard b's row was stored as
    database a's, and a plain session on database a then read it. Its reads bypass."""

    class Sharded(ShardedSession):
        pass

    cache.attach(Sharded)
    plain = sessionmaker(two_databases["a"])
    cache.attach(plain)

    def sharded() -> Session:
        return Sharded(
            shards=two_databases,
            shard_chooser=lambda *_, **__: "a",
            identity_chooser=lambda *_, **__: ["a", "b"],
            execute_chooser=lambda _: ["a", "b"],
        )

    everyone = select(Acct).order_by(Acct.id).options(FromCache())
    for _ in range(2):
        with sharded() as s:
            got = s.get(Acct, 1, identity_token="b")  # noqa: S106 - a shard's name
            assert got is not None
            assert got.secret == secret_of("b")
            rows = s.scalars(everyone).all()
            assert sorted((sa.inspect(a).identity_token, a.secret) for a in rows) == [
                ("a", secret_of("a")),
                ("b", secret_of("b")),
            ]
    for _ in range(2):
        with plain() as s:
            own = s.get(Acct, 1)
            assert own is not None
            assert own.secret == secret_of("a")
