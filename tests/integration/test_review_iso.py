"""A review of tenant isolation: every read path, every way of naming a tenant.

Two schemas hold the same tables with different rows. One cache (one namespace) serves
sessions of both, each way SQLAlchemy offers to put a session in a tenant: an engine's
``schema_translate_map``, a connection's, the session's connection's, a statement's, a
session's ``binds``, a ``get_bind`` override, a ``search_path`` set by a connect event, and
SQLAlchemy's own multi-tenancy recipe (models in a placeholder schema the map translates).
A plain session on an engine the cache never saw is the oracle: every read must return
what it returns, before and after writes in one tenant.
"""

from __future__ import annotations

import asyncio
import contextvars
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from devservices.scratch import scratch_database
from sa_redis_cache import Cache, CachePolicy, FlushWorker, FromCache, schema
from tests.modes import async_url
from tests.support import tenant_schemas
from tests.wb_support import drain, rows

pytest_plugins = ["tests.wb_fixtures"]

SUFFIX = secrets.token_hex(3)
TENANTS = (f"iso_rv_a_{SUFFIX}", f"iso_rv_b_{SUFFIX}")
PLACEHOLDER = "per_tenant"  # SQLAlchemy's recipe: models name it, the map translates it


class Base(DeclarativeBase):
    pass


class Acct(Base):
    __tablename__ = "isorv_acct"
    __cache__ = CachePolicy(strategy="write_through")

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    secret: Mapped[str] = mapped_column(String(80))
    notes: Mapped[list[Note]] = relationship(back_populates="acct", lazy="select")


class Note(Base):
    __tablename__ = "isorv_note"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    acct_id: Mapped[int] = mapped_column(ForeignKey("isorv_acct.id"))
    body: Mapped[str] = mapped_column(String(80))
    acct: Mapped[Acct] = relationship(back_populates="notes", lazy="select")


class Placed(Base):
    """A model of SQLAlchemy's multi-tenancy recipe: its schema is a placeholder."""

    __tablename__ = "isorv_placed"
    __table_args__ = {"schema": PLACEHOLDER}  # noqa: RUF012 - SQLAlchemy's own form
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    secret: Mapped[str] = mapped_column(String(80))


ACCT = Base.metadata.tables["isorv_acct"]
NOTE = Base.metadata.tables["isorv_note"]


def translate(tenant: str) -> dict[str | None, str]:
    return {None: tenant, PLACEHOLDER: tenant}


def secret_of(tenant: str) -> str:
    return f"secret of {tenant}"


@pytest.fixture(scope="module")
def oracle(database_url: str) -> Iterator[dict[str, sa.Engine]]:
    """The tenants' schemas, filled, and an engine per tenant that no cache ever sees."""
    with tenant_schemas(database_url, TENANTS, Base.metadata, translate=translate) as engines:
        restore(engines)
        yield engines


def restore(engines: dict[str, sa.Engine]) -> None:
    for tenant, e in engines.items():
        with e.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
        with Session(e) as s:
            s.add(Acct(id=1, secret=secret_of(tenant)))
            s.add(Note(id=1, acct_id=1, body=secret_of(tenant)))
            s.add(Placed(id=1, secret=secret_of(tenant)))
            s.commit()


@pytest.fixture
def fresh(oracle: dict[str, sa.Engine]) -> Iterator[dict[str, sa.Engine]]:
    yield oracle
    restore(oracle)


@pytest.fixture(params=["redis", "local"])
def cache(redis_url: str, namespace: str, request: pytest.FixtureRequest) -> Iterator[Cache]:
    """A cache on Redis alone, or with the in-process local tier in front of it."""
    local = request.param == "local"
    made = Cache(redis_url, namespace=namespace, local=local, local_lease=30.0)
    if local:
        tier = made.inspector.local_tier
        assert tier is not None
        tier.start()
        assert tier.wait_ready(10.0)
    yield made
    made.detach()


OWN_ENGINES: list[sa.Engine] = []  # made by a way, disposed after its test


@pytest.fixture
def app_engine(database_url: str, cache: Cache) -> Iterator[sa.Engine]:
    """The application's engine (the cache attaches to it; the oracle's is another)."""
    made = sa.create_engine(database_url)
    yield made
    cache.detach()
    made.dispose()
    while OWN_ENGINES:
        OWN_ENGINES.pop().dispose()


# ---------------------------------------------------------------- reads


Options = dict[str, Any] | None


def by_get(s: Session, opts: Options) -> str:
    acct = s.get(Acct, 1, execution_options=opts) if opts else s.get(Acct, 1)
    assert acct is not None
    return acct.secret


def by_lazy_load(s: Session, opts: Options) -> str:
    note = s.get(Note, 1, execution_options=opts) if opts else s.get(Note, 1)
    assert note is not None
    return note.acct.secret


def by_collection(s: Session, opts: Options) -> str:
    acct = s.get(Acct, 1, execution_options=opts) if opts else s.get(Acct, 1)
    assert acct is not None
    return acct.notes[0].body


def by_query(s: Session, opts: Options) -> str:
    stmt = select(Acct.secret).where(Acct.id == 1).options(FromCache())
    if opts:
        stmt = stmt.execution_options(**opts)
    return s.scalars(stmt).one()


def by_query_call_options(s: Session, opts: Options) -> str:
    stmt = select(Acct).where(Acct.id == 1).options(FromCache())
    return s.scalars(stmt, execution_options=opts or {}).one().secret


def by_placed_get(s: Session, opts: Options) -> str:
    placed = s.get(Placed, 1, execution_options=opts) if opts else s.get(Placed, 1)
    assert placed is not None
    return placed.secret


def by_placed_query(s: Session, opts: Options) -> str:
    stmt = select(Placed).where(Placed.id == 1).options(FromCache())
    if opts:
        stmt = stmt.execution_options(**opts)
    return s.scalars(stmt).one().secret


Read = Callable[[Session, Options], str]
READS: dict[str, Read] = {
    "get": by_get,
    "lazy_load": by_lazy_load,
    "collection": by_collection,
    "query": by_query,
    "query_call_options": by_query_call_options,
    "placed_get": by_placed_get,
    "placed_query": by_placed_query,
}
# lazy loads do not carry a statement's execution options (SQLAlchemy's own behaviour)
PER_STATEMENT_READS = ("get", "query", "query_call_options", "placed_get", "placed_query")
# a search_path names no placeholder schema
SEARCH_PATH_READS = ("get", "lazy_load", "collection", "query", "query_call_options")


def oracle_read(oracle: dict[str, sa.Engine], tenant: str, read: str) -> str:
    with Session(oracle[tenant]) as s:
        return READS[read](s, None)


# ---------------------------------------------------------------- ways to name a tenant


@dataclass
class Way:
    """How a session is put in a tenant: ``session(tenant)`` opens one, ``opts(tenant)``
    gives the statement's options (None: the session alone names the tenant)."""

    session: Callable[[str], Any]
    opts: Callable[[str], Options] = lambda _: None


CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("iso_rv_tenant")


def routed_sessions(
    cache: Cache, engines: Mapping[str, sa.Engine]
) -> Callable[[str], AbstractContextManager[Session]]:
    """A ``Session`` subclass whose ``get_bind`` picks ``engines[CURRENT]``, attached to
    ``cache``; what opens one of its sessions with ``CURRENT`` set to a name."""

    class Routed(Session):
        def get_bind(self, mapper: Any = None, clause: Any = None, **kw: Any) -> Any:
            return engines[CURRENT.get()]

    cache.attach(Routed)

    @contextmanager
    def routed(name: str) -> Iterator[Session]:
        token = CURRENT.set(name)
        try:
            with Routed() as s:
                yield s
        finally:
            CURRENT.reset(token)

    return routed


def per_tenant(cache: Cache, engine: sa.Engine) -> dict[str, sessionmaker[Session]]:
    """A sessionmaker per tenant on a copy of ``engine`` translating to it, attached."""
    factories = {
        t: sessionmaker(engine.execution_options(schema_translate_map=translate(t)))
        for t in TENANTS
    }
    for f in factories.values():
        cache.attach(f)
    return factories


def make_way(name: str, cache: Cache, engine: sa.Engine, database_url: str) -> Way:
    if name == "engine":
        factories = per_tenant(cache, engine)
        return Way(lambda t: factories[t]())
    if name == "connection_bind":
        factory = sessionmaker(engine)
        cache.attach(factory)

        @contextmanager
        def on_connection(t: str) -> Iterator[Session]:
            with engine.connect() as conn:
                c = conn.execution_options(schema_translate_map=translate(t))
                with factory(bind=c) as s:
                    yield s

        return Way(on_connection)
    if name == "session_connection":
        factory = sessionmaker(engine)
        cache.attach(factory)

        @contextmanager
        def begun(t: str) -> Iterator[Session]:
            with factory() as s:
                s.connection(execution_options={"schema_translate_map": translate(t)})
                yield s

        return Way(begun)
    if name == "statement":
        factory = sessionmaker(engine)
        cache.attach(factory)
        return Way(lambda t: factory(), lambda t: {"schema_translate_map": translate(t)})
    if name == "binds":
        option_engines = {
            t: engine.execution_options(schema_translate_map=translate(t)) for t in TENANTS
        }
        factory = sessionmaker()
        cache.attach(factory)
        return Way(
            lambda t: factory(
                binds={Acct: option_engines[t], Note: option_engines[t], Placed: option_engines[t]}
            )
        )
    if name == "get_bind":
        option_engines = {
            t: engine.execution_options(schema_translate_map=translate(t)) for t in TENANTS
        }
        return Way(routed_sessions(cache, option_engines))
    if name == "search_path_event":
        engines = {}
        for t in TENANTS:
            e = sa.create_engine(database_url)

            def set_path(dbapi_connection: Any, _: Any, t: str = t) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute(f"SET search_path TO {t}")
                cursor.close()
                dbapi_connection.commit()

            sa.event.listen(e, "connect", set_path)
            engines[t] = e
            OWN_ENGINES.append(e)
        factories = {t: sessionmaker(e) for t, e in engines.items()}
        for f in factories.values():
            cache.attach(f)
        return Way(lambda t: factories[t]())
    if name == "session_options":
        factory = sessionmaker(engine)
        cache.attach(factory)
        return Way(lambda t: factory(execution_options={"schema_translate_map": translate(t)}))
    raise AssertionError(name)


WAYS = (
    "engine",
    "connection_bind",
    "session_connection",
    "statement",
    "binds",
    "get_bind",
    "search_path_event",
    "session_options",
)


def reads_of(way: str) -> tuple[str, ...]:
    if way == "statement":
        return PER_STATEMENT_READS
    if way == "search_path_event":
        return SEARCH_PATH_READS
    return tuple(READS)


CASES = [(w, r) for w in WAYS for r in reads_of(w)]


def skip_unsupported(way: str) -> None:
    if (
        way == "session_options"
        and "execution_options" not in Session.__init__.__code__.co_varnames
    ):
        pytest.skip("Session(execution_options=...) is SQLAlchemy 2.1's")


@pytest.mark.parametrize(("way", "read"), CASES, ids=[f"{w}-{r}" for w, r in CASES])
def test_each_tenant_reads_its_own_rows(
    fresh: dict[str, sa.Engine],
    cache: Cache,
    app_engine: sa.Engine,
    database_url: str,
    way: str,
    read: str,
) -> None:
    skip_unsupported(way)
    w = make_way(way, cache, app_engine, database_url)
    for _ in range(4):  # the local tier keeps an entry once Redis served it
        for t in TENANTS:
            with w.session(t) as s:
                assert READS[read](s, w.opts(t)) == oracle_read(fresh, t, read), (way, read, t)
    total = cache.stats()["total"]
    assert total["hits"] >= len(TENANTS)  # the cache did serve them
    if cache.inspector.local_tier is not None:
        assert total["local_hits"] >= len(TENANTS), cache.stats()


def write_orm(s: Session, opts: Options, value: str, *, placed: bool = True) -> None:
    acct = s.get(Acct, 1, execution_options=opts) if opts else s.get(Acct, 1)
    assert acct is not None
    acct.secret = value
    note = s.get(Note, 1, execution_options=opts) if opts else s.get(Note, 1)
    assert note is not None
    note.body = value
    if placed:
        row = s.get(Placed, 1, execution_options=opts) if opts else s.get(Placed, 1)
        assert row is not None
        row.secret = value
    s.commit()


@pytest.mark.parametrize("way", [w for w in WAYS if w != "statement"])
def test_a_write_in_one_tenant_is_read_there_and_not_elsewhere(
    fresh: dict[str, sa.Engine],
    cache: Cache,
    app_engine: sa.Engine,
    database_url: str,
    way: str,
) -> None:
    skip_unsupported(way)
    w = make_way(way, cache, app_engine, database_url)
    reads = reads_of(way)
    a, b = TENANTS
    for _ in range(2):  # fill every entry of both tenants
        for t in TENANTS:
            for read in reads:
                with w.session(t) as s:
                    READS[read](s, w.opts(t))
    with w.session(a) as s:
        write_orm(s, w.opts(a), "rewritten in a", placed=way != "search_path_event")
    for _ in range(2):
        for t in (b, a):
            for read in reads:
                with w.session(t) as s:
                    got = READS[read](s, w.opts(t))
                assert got == oracle_read(fresh, t, read), (way, read, t)


def text_update(conn: sa.Connection, tenant: str, table: str, value: str) -> None:
    sql = f"UPDATE {tenant}.{table} SET secret = :v WHERE id = 1"  # noqa: S608
    conn.execute(sa.text(sql), {"v": value})


def in_the_tenants_schema(tenant: str, table: str) -> sa.Table:
    """``table`` of ``tenant``'s schema, declared by a MetaData of its own (no model's)."""
    return sa.Table(
        table,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("secret", String(80)),
        schema=tenant,
    )


def core_update_of_a_table_in_the_tenants_schema(
    conn: sa.Connection, tenant: str, table: str, value: str
) -> None:
    own = in_the_tenants_schema(tenant, table)
    conn.execute(sa.update(own).where(own.c.id == 1).values(secret=value))


def core_update_translated(conn: sa.Connection, tenant: str, table: str, value: str) -> None:
    model_table = Base.metadata.tables[table if table == "isorv_acct" else f"{PLACEHOLDER}.{table}"]
    c = conn.execution_options(schema_translate_map=translate(tenant))
    c.execute(sa.update(model_table).where(model_table.c.id == 1).values(secret=value))


DML = {
    "text": text_update,
    "core_table_in_schema": core_update_of_a_table_in_the_tenants_schema,
    "core_translated": core_update_translated,
}


def filled(factories: dict[str, sessionmaker[Session]], read: str) -> None:
    """``read`` twice in each tenant (filled, then served)."""
    for _ in range(2):
        for t in TENANTS:
            with factories[t]() as s:
                READS[read](s, None)


@pytest.mark.parametrize("through", ["tenant_engine", "root_engine"])
@pytest.mark.parametrize("dml", list(DML))
@pytest.mark.parametrize("read", ["get", "query", "placed_get", "placed_query"])
def test_dml_naming_the_tenants_schema_retires_its_entries(
    fresh: dict[str, sa.Engine],
    cache: Cache,
    app_engine: sa.Engine,
    dml: str,
    read: str,
    through: str,
) -> None:
    factories = per_tenant(cache, app_engine)
    filled(factories, read)
    a, b = TENANTS
    table = "isorv_placed" if read.startswith("placed") else "isorv_acct"
    tenant_engine = app_engine.execution_options(schema_translate_map=translate(a))
    with (tenant_engine if through == "tenant_engine" else app_engine).begin() as conn:
        DML[dml](conn, a, table, "changed by DML")
    for t in (a, b):
        with factories[t]() as s:
            assert READS[read](s, None) == oracle_read(fresh, t, read), (dml, read, t)


def test_a_tenants_statement_is_a_hit_from_its_second_read(
    fresh: dict[str, sa.Engine], cache: Cache, app_engine: sa.Engine
) -> None:
    """SQLAlchemy adds ``"_none"`` to a ``schema_translate_map`` the first time it compiles
    under it: the tenant's first entry was keyed without it and never read again."""
    tenant = app_engine.execution_options(schema_translate_map={None: TENANTS[0]})
    factory = sessionmaker(tenant)
    cache.attach(factory)
    for _ in range(2):
        with factory() as s:
            assert by_query(s, None) == secret_of(TENANTS[0])
    counted = cache.stats()["total"]
    assert (counted["misses"], counted["hits"]) == (1, 1)


def test_asyncio_tenants_by_every_session_option_and_their_writes(
    fresh: dict[str, sa.Engine], cache: Cache, database_url: str
) -> None:
    """``AsyncSession``: a tenant named by the session's connection, by the statement, by
    an engine copy; a write (ORM, and text DML naming the tenant's schema on the engine
    itself) in tenant a is read there, and tenant b keeps its own rows."""
    a, b = TENANTS

    def owner(_: Session, note: Note) -> str:
        return note.acct.secret

    async def main() -> None:
        root = create_async_engine(async_url(database_url))
        copies = {t: root.execution_options(schema_translate_map=translate(t)) for t in TENANTS}
        by_copy = {t: async_sessionmaker(e) for t, e in copies.items()}
        plain = async_sessionmaker(root)
        for factory in [*by_copy.values(), plain]:
            cache.attach(factory)

        async def read_all(t: str, how: str) -> tuple[str, str, str, str]:
            opts = {"schema_translate_map": translate(t)}
            factory = by_copy[t] if how == "copy" else plain
            async with factory() as s:
                if how == "connection":
                    await s.connection(execution_options=opts)
                stmt_opts = opts if how == "statement" else {}
                acct = await s.get(Acct, 1, execution_options=stmt_opts)
                assert acct is not None
                placed = await s.get(Placed, 1, execution_options=stmt_opts)
                assert placed is not None
                query = select(Placed.secret).where(Placed.id == 1).options(FromCache())
                queried = (await s.scalars(query.execution_options(**stmt_opts))).one()
                lazy = acct.secret
                if how != "statement":  # lazy loads do not carry a statement's options
                    note = await s.get(Note, 1)
                    assert note is not None
                    lazy = await s.run_sync(owner, note)
                return acct.secret, placed.secret, queried, lazy

        def expected(t: str) -> tuple[str, str, str, str]:
            with Session(fresh[t]) as s:
                acct, placed = s.get_one(Acct, 1), s.get_one(Placed, 1)
                return acct.secret, placed.secret, placed.secret, acct.secret

        hows = ("copy", "connection", "statement")
        try:
            for _ in range(3):
                for how in hows:
                    for t in TENANTS:
                        assert await read_all(t, how) == expected(t), (how, t)
            async with plain() as s:
                await s.connection(execution_options={"schema_translate_map": translate(a)})
                acct = await s.get(Acct, 1)
                assert acct is not None
                acct.secret = "async write in a"
                await s.commit()
            async with root.begin() as conn:
                await conn.execute(
                    sa.text(f"UPDATE {a}.isorv_placed SET secret = 'async DML in a'")  # noqa: S608
                )
            for _ in range(2):
                for how in hows:
                    for t in (b, a):
                        assert await read_all(t, how) == expected(t), (how, t)
            assert cache.stats()["total"]["hits"] > 0
        finally:
            await cache.aclose()
            await root.dispose()

    asyncio.run(main())


@pytest.fixture
def two_databases(services: Any, cache: Cache) -> Iterator[dict[str, sa.Engine]]:
    """Two scratch databases with the same tables (no placeholder schema) and rows of
    their own; the engines are the application's (the oracle makes its own)."""
    tables = [ACCT, NOTE]
    with (
        scratch_database(services.database_url, f"sarc_isorv_{secrets.token_hex(4)}") as url_a,
        scratch_database(services.database_url, f"sarc_isorv_{secrets.token_hex(4)}") as url_b,
    ):
        engines = {"a": sa.create_engine(url_a), "b": sa.create_engine(url_b)}
        try:
            for name, e in engines.items():
                with e.begin() as conn:
                    Base.metadata.create_all(conn, tables=tables)
                    conn.execute(sa.insert(ACCT).values(id=1, secret=secret_of(name)))
                    conn.execute(sa.insert(NOTE).values(id=1, acct_id=1, body=secret_of(name)))
            yield engines
        finally:
            cache.detach()
            for e in engines.values():
                e.dispose()


DATABASE_READS = ("get", "lazy_load", "collection", "query", "query_call_options")


@pytest.mark.parametrize("way", ["engines", "binds", "get_bind"])
def test_two_databases_read_and_write_apart(
    two_databases: dict[str, sa.Engine], cache: Cache, way: str
) -> None:
    oracles = {n: sa.create_engine(e.url) for n, e in two_databases.items()}
    if way == "engines":
        factories = {n: sessionmaker(e) for n, e in two_databases.items()}
        for f in factories.values():
            cache.attach(f)
        opened: Callable[[str], Any] = lambda n: factories[n]()  # noqa: E731
    elif way == "binds":
        factory = sessionmaker()
        cache.attach(factory)
        opened = lambda n: factory(  # noqa: E731
            binds={Acct: two_databases[n], Note: two_databases[n]}
        )
    else:
        opened = routed_sessions(cache, two_databases)

    def check(order: tuple[str, ...]) -> None:
        for read in DATABASE_READS:
            for n in order:
                token = CURRENT.set(n)
                try:
                    with opened(n) as s:
                        got = READS[read](s, None)
                finally:
                    CURRENT.reset(token)
                with Session(oracles[n]) as s:
                    assert got == READS[read](s, None), (way, read, n)

    try:
        for _ in range(3):
            check(("a", "b"))
        token = CURRENT.set("a")
        try:
            with opened("a") as s:
                write_orm(s, None, "ORM write in a", placed=False)
        finally:
            CURRENT.reset(token)
        check(("b", "a"))
        with two_databases["a"].begin() as conn:
            conn.execute(sa.text("UPDATE isorv_acct SET secret = 'text DML in a'"))
            conn.execute(sa.update(NOTE).values(body="Core DML in a"))
        check(("b", "a"))
        assert cache.stats()["total"]["hits"] > 0
    finally:
        for e in oracles.values():
            e.dispose()


@pytest.mark.parametrize("read", ["get", "query", "placed_get", "placed_query"])
def test_dml_through_a_session_naming_the_tenants_schema_retires_its_entries(
    fresh: dict[str, sa.Engine], cache: Cache, app_engine: sa.Engine, read: str
) -> None:
    """The same DML, run by a session of an attached factory: its hooks mark what the
    statement names, and the engine leaves the statement to them."""
    factories = per_tenant(cache, app_engine)
    filled(factories, read)
    a, b = TENANTS
    table = "isorv_placed" if read.startswith("placed") else "isorv_acct"
    own = in_the_tenants_schema(a, table)
    with factories[b]() as s:  # any tenant's session: the statement names the schema
        changed = {"secret": "changed by a session"}
        s.execute(sa.update(own).where(own.c.id == 1).values(changed))
        s.commit()
    for t in (a, b):
        with factories[t]() as s:
            assert READS[read](s, None) == oracle_read(fresh, t, read), (read, t)


@pytest.fixture
def shared_rows(engine: sa.Engine) -> Iterator[str]:
    """The tables in the database's default schema too, with a row no tenant owns."""
    tables = [ACCT, NOTE]
    with engine.begin() as conn:
        Base.metadata.create_all(conn, tables=tables)
        conn.execute(sa.insert(ACCT).values({"id": 1, "secret": "shared"}))
    yield "shared"
    with engine.begin() as conn:
        Base.metadata.drop_all(conn, tables=tables)


def by_get_call(s: Session, opts: Options) -> str:
    return by_get(s, opts)


def by_query_statement(s: Session, opts: Options) -> str:
    return by_query(s, opts)


PRECEDENCE_READS: dict[str, Read] = {
    "get_call_options": by_get_call,  # session.get(..., execution_options=...)
    "query_call_options": by_query_call_options,  # session.scalars(stmt, execution_options=)
    "query_statement_options": by_query_statement,  # stmt.execution_options(...)
}


@pytest.mark.parametrize("given", ["other_tenant", "none"])
@pytest.mark.parametrize("read", list(PRECEDENCE_READS))
def test_a_map_given_with_a_read_is_keyed_as_sqlalchemy_applies_it(
    fresh: dict[str, sa.Engine],
    shared_rows: str,
    cache: Cache,
    app_engine: sa.Engine,
    engine: sa.Engine,
    read: str,
    given: str,
) -> None:
    """A session on tenant a's engine copy reads with a map of its own (tenant b's, or
    None: translate nothing). SQLAlchemy puts the call's options over the connection's,
    and the connection's over the statement's: a statement's map loses to the engine's.
    The cache took the statement's, keyed tenant a's row as tenant b's, and tenant b's
    next plain read was served it; a None map it skipped, and keyed the shared row as
    tenant a's. Every read must return what the same read returns without the cache."""
    a, b = TENANTS
    mapped = {t: app_engine.execution_options(schema_translate_map=translate(t)) for t in TENANTS}
    factories = {"a": sessionmaker(mapped[a]), "b": sessionmaker(mapped[b])}
    factories["untranslated"] = sessionmaker(app_engine)
    for f in factories.values():
        cache.attach(f)
    oracles = {"a": fresh[a], "b": fresh[b], "untranslated": engine}
    opts = {"schema_translate_map": translate(b) if given == "other_tenant" else None}
    do = PRECEDENCE_READS[read]
    for _ in range(2):
        with factories["a"]() as s:
            got = do(s, opts)
        with Session(oracles["a"]) as s:
            assert got == do(s, opts)
        for who in ("a", "b", "untranslated"):
            with factories[who]() as s:
                got = do(s, None)
            with Session(oracles[who]) as s:
                assert got == do(s, None), who


WB_TENANTS = (f"iso_rv_wb_a_{SUFFIX}", f"iso_rv_wb_b_{SUFFIX}")


@pytest.fixture
def wb_tenants(database_url: str, models: Any) -> Iterator[dict[str, sa.Engine]]:
    """An engine copy per tenant schema holding the write-behind table and the library's."""
    with tenant_schemas(database_url, WB_TENANTS, models[0].metadata, schema.metadata) as copies:
        yield copies


def test_a_write_behind_row_queued_under_a_session_wide_map_belongs_to_its_tenant(
    wb_tenants: dict[str, sa.Engine],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    """``Session(execution_options={"schema_translate_map": ...})`` (SQLAlchemy 2.1) gives
    the map to each connection the session makes. A flush that had no connection yet when
    the row was queued keyed it as the untranslated schema's: tenant a's worker never
    drained it, and a worker on the default schema would have written it there."""
    skip_unsupported("session_options")
    page_view, _ = models
    a, b = WB_TENANTS
    cache = Cache(client, namespace=namespace)
    factory = sessionmaker(engine)
    cache.attach(factory)
    workers: list[FlushWorker] = []

    def session_of(t: str) -> Session:
        return factory(execution_options={"schema_translate_map": {None: t}})

    try:
        with session_of(a) as s:
            view = page_view(path="/queued in a", views=1)
            s.add(view)
            s.commit()
            pk = view.id
        with session_of(a) as s:
            got = s.get(page_view, pk)
            assert got is not None
            assert got.path == "/queued in a"
        with session_of(b) as s:
            assert s.get(page_view, pk) is None
        for t in (b, a):
            made = FlushWorker(wb_tenants[t], client, namespace=namespace, models=[page_view])
            workers.append(made)
            drain(made)
        assert rows(wb_tenants[a], page_view) == {pk: ("/queued in a", 1)}
        assert rows(wb_tenants[b], page_view) == {}
    finally:
        for made in workers:
            made.release()
        cache.detach()


class AdminBase(DeclarativeBase):
    pass


class TenantAAcct(AdminBase):
    """Tenant a's accounts mapped by their schema: the table ``Acct`` reads in tenant a."""

    __tablename__ = "isorv_acct"
    __table_args__ = {"schema": TENANTS[0]}  # noqa: RUF012 - SQLAlchemy's own form
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    secret: Mapped[str] = mapped_column(String(80))


def read_admin(s: Session, _: Options) -> str:
    got = s.get(TenantAAcct, 1)
    assert got is not None
    query = select(TenantAAcct.secret).where(TenantAAcct.id == 1).options(FromCache())
    return f"{got.secret}/{s.scalars(query).one()}"


def read_tenant(s: Session, _: Options) -> str:
    return f"{by_get(s, None)}/{by_query(s, None)}"


@pytest.mark.parametrize("writer", ["tenant_model", "schema_model"])
def test_a_write_through_one_model_of_a_table_retires_another_models_entries(
    fresh: dict[str, sa.Engine], cache: Cache, app_engine: sa.Engine, writer: str
) -> None:
    """``Acct`` read in tenant a (``schema_translate_map``) and ``TenantAAcct`` (declared in
    tenant a's schema) are one table under two names. A flush of either retired only its
    own name's entries: the other's served the row as it was before the commit."""
    a = TENANTS[0]
    tenant = sessionmaker(app_engine.execution_options(schema_translate_map=translate(a)))
    admin = sessionmaker(app_engine)
    cache.attach(tenant)
    cache.attach(admin)
    for _ in range(2):
        for factory, read in ((tenant, read_tenant), (admin, read_admin)):
            with factory() as s:
                read(s, None)
    value = f"written through {writer}"
    with (tenant if writer == "tenant_model" else admin)() as s:
        if writer == "tenant_model":
            s.get_one(Acct, 1).secret = value
        else:
            s.get_one(TenantAAcct, 1).secret = value
        s.commit()
    with Session(fresh[a]) as s:
        expected = s.get_one(Acct, 1).secret
    assert expected == f"written through {writer}"
    for _ in range(2):
        with tenant() as s:
            assert read_tenant(s, None) == f"{expected}/{expected}"
        with admin() as s:
            assert read_admin(s, None) == f"{expected}/{expected}"
