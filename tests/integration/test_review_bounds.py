"""A review of the resources a long-running process gives the cache: memory, Redis and
database connections, file descriptors.

Each probe runs a workload a real application runs for ever (event loops made and closed
one after another, an engine per tenant) far past a handful of rounds, then checks the
library let go of what each round made: the sizes of its internal structures, weak
references to the objects a round made (dead once nothing holds them), and the clients
Redis lists. No timing: every bound is a count.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import weakref
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import ORMExecuteState, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.protocol import keys
from tests.modes import async_url

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


def _clients_named(client: redis.Redis, name: str) -> int:
    """How many connections Redis lists under ``name`` (CLIENT LIST)."""
    return sum(1 for c in client.client_list() if c.get("name") == name)


# -- event loops -------------------------------------------------------------------------


def test_each_event_loop_the_cache_served_leaves_no_client_behind_once_it_ends(
    database_url: str,
    redis_url: str,
    namespace: str,
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
) -> None:
    """A cache made from a URL makes an asyncio client per event loop; a process that
    runs ``asyncio.run`` again and again (a worker per job, a CLI, sync code calling async
    helpers) without ``await cache.aclose()`` used to keep every loop's client, its
    socket and Redis connection, and the loop itself: the client's connections hold their
    loop, so the weak key of the per-loop map never died. A loop that shuts down
    (``asyncio.run`` finalizes async generators before closing it) now closes its
    client: the map empties, the loops are freed and Redis lists no connection per loop."""
    name = f"bounds-{namespace}"
    cache = Cache(f"{redis_url}?client_name={name}", namespace=namespace)
    engine = create_async_engine(async_url(database_url), poolclass=sa.pool.NullPool)
    factory = async_sessionmaker(engine)
    cache.attach(factory)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    prices: list[Decimal] = []

    async def request(pid: int) -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        async with factory() as s:
            stmt = select(Product.price).where(Product.id == pid).options(FromCache())
            prices.append((await s.execute(stmt)).scalar_one())
            found = await s.get(Product, pid)
            assert found is not None

    try:
        for i in range(40):
            asyncio.run(request(1 + i % 5))
        gc.collect()
        async_clients = cache._core.async_clients
        assert async_clients is not None
        assert len(async_clients._by_loop) == 0
        assert [ref() for ref in loops] == [None] * 40
        # the synchronous client's connections at most: none per loop
        assert _clients_named(redis_client, name) <= 2
        with sa.orm.Session(shop_engine) as s:
            rows = s.execute(select(Product.id, Product.price).where(Product.id <= 5))
            oracle = dict(rows.all())
        assert prices == [oracle[1 + i % 5] for i in range(40)]
    finally:
        cache.detach()
        cache.client.close()


def test_aclose_still_closes_the_running_loops_client_before_the_loop_ends(
    database_url: str, redis_url: str, namespace: str, shop_engine: sa.Engine
) -> None:
    """``await cache.aclose()`` (the documented way, and ``cache.lifespan``'s) closes the
    loop's client then and there, and the loop's shutdown finds nothing left to close;
    a read after it makes a new client, closed in turn by the shutdown."""
    cache = Cache(redis_url, namespace=namespace)
    engine = create_async_engine(async_url(database_url), poolclass=sa.pool.NullPool)
    factory = async_sessionmaker(engine)
    cache.attach(factory)
    seen: list[Any] = []

    async def main() -> None:
        async_clients = cache._core.async_clients
        assert async_clients is not None
        async with factory() as s:
            await s.get(Product, 1)
        first = async_clients.current().client
        await cache.aclose()
        seen.append(len(async_clients._by_loop))
        async with factory() as s:
            await s.get(Product, 2)
        assert async_clients.current().client is not first
        seen.append(len(async_clients._by_loop))

    try:
        asyncio.run(main())
        async_clients = cache._core.async_clients
        assert async_clients is not None
        assert seen == [0, 1]
        assert len(async_clients._by_loop) == 0
    finally:
        cache.detach()
        cache.client.close()


# -- engines per tenant ------------------------------------------------------------------


def test_an_engine_per_tenant_leaves_no_dialect_behind_once_dropped(
    database_url: str, namespace: str, cache: Cache, shop_engine: sa.Engine, product: int
) -> None:
    """Write-through remembers each model's RETURNING clause and result processors per
    dialect; keyed by the dialect itself, in plain dicts, they kept every engine's dialect
    (and grew by an entry each) for the life of the process when an application makes an
    engine per tenant or request. Now held weakly: once the engines are disposed of and
    dropped (and SQLAlchemy's own bounded statement cache of the mapper is emptied), no
    dialect survives and the memos are empty, while every write was written through. The
    cache's record of the listeners it put on each engine (for ``detach()``) grew by four
    per engine too, each a dead weak reference once the engine was freed: now swept."""
    factory = sessionmaker()
    cache.attach(factory)
    dialects: list[weakref.ref[Dialect]] = []

    def tenant(i: int) -> None:
        engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
        with factory(bind=engine) as s:
            found = s.get(Product, product)
            assert found is not None
            found.price = Decimal(i + 1)
            s.commit()
        with factory(bind=engine) as s:
            again = s.get(Product, product)
            assert again is not None
            assert again.price == Decimal(i + 1)
        engine.dispose()
        dialects.append(weakref.ref(engine.dialect))

    returning = cache._hooks.invalidation.returning
    records: list[int] = []
    for i in range(40):
        tenant(i)
        gc.collect()
        records.append(len(cache._core._listeners))
    # SQLAlchemy's own cache of the mapper's flush statements (an LRU) holds dialects too
    Product.__mapper__._compiled_cache.clear()
    gc.collect()
    assert [ref() for ref in dialects] == [None] * 40
    assert (len(returning._clauses), len(returning._processors)) == (0, 0)
    # the records of each engine's listeners (for detach()) leave with the engine: a few
    # live ones and the freed ones not swept yet, not four per engine ever made
    assert max(records) <= 64
    assert cache.stats()["models"]["Product"]["hits"] >= 40


# -- listeners made per session ------------------------------------------------------------


class _Tenant:
    """What a per-request listener holds (a tenant, a request): freed with its session."""

    def __init__(self, name: str) -> None:
        self.name = name


def _tenant_filter(tenant: _Tenant, orm_context: ORMExecuteState) -> None:
    """A ``do_orm_execute`` listener as applications write them per request."""
    orm_context.update_execution_options(tenant=tenant.name)


class _TenantFilter:
    """The same listener as a callable object."""

    def __init__(self, tenant: _Tenant) -> None:
        self.tenant = tenant

    def __call__(self, orm_context: ORMExecuteState) -> None:
        _tenant_filter(self.tenant, orm_context)


def test_a_listener_made_per_session_is_warned_of_once_and_not_kept(
    cache: Cache, shop_engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``do_orm_execute`` listener registered on each session after the cache's is
    warned of once (it does not see cached reads). Remembered by the listener object when
    it had no ``__code__`` of its own (a ``functools.partial``, a callable object), each
    session's was a new one: a WARNING per session, and a set keeping every listener and
    what it holds (the request's tenant) for the life of the process. Now one warning per
    function or class, and nothing of the sessions kept."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    tenants: list[weakref.ref[_Tenant]] = []
    makers = (lambda t: functools.partial(_tenant_filter, t), _TenantFilter)
    with caplog.at_level(logging.WARNING, logger="sa_redis_cache.sessions"):
        for i in range(40):
            tenant = _Tenant(f"t{i}")
            tenants.append(weakref.ref(tenant))
            with factory() as s:
                sa.event.listen(s, "do_orm_execute", makers[i % 2](tenant))
                assert s.scalars(select(Product.id).where(Product.id == 1)).all() == [1]
            del tenant, s
    gc.collect()
    warned = [r for r in caplog.records if "runs after the cache's" in r.getMessage()]
    assert len(warned) == 2  # the function (through its partials) and the class
    assert len(cache._hooks._warned_listeners) == 2
    assert [ref() for ref in tenants] == [None] * 40


# -- tables no model maps ----------------------------------------------------------------------


def test_dml_on_ever_new_tables_keeps_the_key_prefixes_bounded(
    monkeypatch: pytest.MonkeyPatch,
    cache: Cache,
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
) -> None:
    """Core and textual DML invalidate the table they name, mapped or not, and the key
    prefix of each table was remembered for the life of the cache: an application that
    writes temporary or per-day tables added an entry for every one it ever wrote. The
    memo is bounded (lowered here, so that a hundred tables pass it twice) and every
    write still bumps its table's version."""
    monkeypatch.setattr(keys, "PREFIXES_REMEMBERED", 40, raising=False)
    cache.attach(shop_engine)
    scheme = cache._core.keys
    largest = 0
    names = [f"bounds_tmp_{i}" for i in range(100)]
    with shop_engine.begin() as connection:
        for name in names:
            connection.execute(sa.text(f"CREATE TEMP TABLE {name} (x int) ON COMMIT DROP"))
            connection.execute(sa.text(f"INSERT INTO {name} VALUES (1)"))  # noqa: S608
            largest = max(largest, len(scheme._prefixes))
    assert largest <= 40
    bumped = redis_client.exists(*(scheme.version_key(name) for name in names))
    assert bumped == len(names)
