"""Helpers shared by test modules (fixtures live in the conftest files)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.protocol import KeyScheme

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.orm import Session

    from sa_redis_cache.local import LocalTier


class SQLCounter:
    """Statements sent to the database while it listens."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    def reset(self) -> None:
        """Forget what ran so far."""
        self.statements.clear()


def read_both(
    factory: sessionmaker[Session], model: Any, pk: int, attribute: str
) -> tuple[Any, Any]:
    """A row's ``attribute`` through FromCache and through session.get, each in a fresh
    session."""
    with factory() as s:
        stmt = select(model).where(model.id == pk).options(FromCache())
        by_query = getattr(s.scalars(stmt).one(), attribute)
    with factory() as s:
        got = s.get(model, pk)
        assert got is not None
        return by_query, getattr(got, attribute)


def read_price(factory: sessionmaker[Session], pid: int) -> tuple[Decimal, Decimal]:
    """A product's price through FromCache and through session.get, each in a fresh session."""
    return read_both(factory, Product, pid, "price")


class Two:
    """Two processes' caches on one namespace: ``writer`` commits, ``reader`` reads.

    Each has an engine of its own, as processes do (a cache attached to an engine would
    see the other's statements on it as Core DML, and bypass the tables they write). A
    commit whose invalidation did not reach Redis shows only through the reader.
    """

    def __init__(self, engine: sa.Engine, url: str, namespace: str) -> None:
        self.engine = sa.create_engine(engine.url)
        self.writer = Cache(url, namespace=namespace)
        self.reader = Cache(url, namespace=namespace)
        self.write = sessionmaker(self.engine)
        self.read = sessionmaker(engine)
        self.writer.attach(self.write)
        self.reader.attach(self.read)
        self.keys = KeyScheme(namespace)

    def close(self) -> None:
        """Detach both caches and dispose of the writer's engine."""
        self.writer.detach()
        self.reader.detach()
        self.engine.dispose()


@dataclass
class TierWorld:
    """A cached and a plain session factory on one engine of their own, and its SQL
    counter; the cache serves hits from Redis, or from its local tier (``local``)."""

    cache: Cache
    cached: sessionmaker[Session]
    plain: sessionmaker[Session]
    sql: SQLCounter
    local: bool

    def local_hits(self) -> int:
        """How many hits the local tier served so far."""
        return int(self.cache.stats()["total"].get("local_hits", 0))

    def agree(self, read: Callable[[Session], Any]) -> Any:
        """``read`` through the cache equals ``read`` of the database; that value."""
        with self.cached() as s:
            got = read(s)
        with self.plain() as s:
            want = read(s)
        assert got == want
        return got

    def selects_of(self, table: str) -> int:
        """How many statements counted read ``table``."""
        return sum(f"FROM {table}" in statement for statement in self.sql.statements)


@contextmanager
def tier_world(tier: str, database_url: str, redis_url: str, namespace: str) -> Iterator[TierWorld]:
    """A :class:`TierWorld` whose hits come from ``tier``, ``"redis"`` or ``"local"``
    (``Cache(local=True)``, ready before it is yielded).

    The integration tests' ``tiered`` fixture runs a test with each.
    """
    local = tier == "local"
    engine = sa.create_engine(database_url)
    sql = SQLCounter()
    sa.event.listen(engine, "before_cursor_execute", sql)
    cache = Cache(redis_url, namespace=namespace, default_ttl=300, local=local)
    cached = sessionmaker(engine)
    cache.attach(cached)
    try:
        if local:
            found: LocalTier | None = cache.inspector.local_tier
            assert found is not None
            assert found.wait_ready(10.0)
        yield TierWorld(cache, cached, sessionmaker(engine), sql, local)
    finally:
        cache.detach()
        engine.dispose()


@contextmanager
def tenant_schemas(
    database_url: str,
    names: Sequence[str],
    *metadatas: sa.MetaData,
    translate: Callable[[str], dict[str | None, str]] = lambda name: {None: name},
) -> Iterator[dict[str, sa.Engine]]:
    """A schema per name, made afresh with the tables of ``metadatas``, and an engine copy
    per name whose ``schema_translate_map`` is ``translate(name)``; the schemas are
    dropped afterwards.

    Example::

        with tenant_schemas(database_url, ("t_a", "t_b"), Base.metadata) as engines:
            ...
    """
    base = sa.create_engine(database_url)
    with base.begin() as conn:
        for name in names:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    engines: dict[str, sa.Engine] = {
        name: base.execution_options(schema_translate_map=translate(name)) for name in names
    }
    for tenant in engines.values():
        with tenant.begin() as conn:
            for metadata in metadatas:
                metadata.create_all(conn)
    try:
        yield engines
    finally:
        with base.begin() as conn:
            for name in names:
                conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
        base.dispose()


def cache_on_a_small_pool(
    engine: sa.Engine, url: str, namespace: str, max_connections: int
) -> tuple[redis.Redis, Cache, sessionmaker[Session]]:
    """A client whose pool holds at most ``max_connections``, a cache on it (in a namespace
    of its own) and a sessionmaker attached to it. Detach the cache and close the client.

    Example::

        client, cache, factory = cache_on_a_small_pool(engine, url, namespace, 8)
    """
    client = redis.Redis.from_url(url, max_connections=max_connections)
    cache = Cache(client, namespace=f"{namespace}-small", default_ttl=300)
    factory: sessionmaker[Session] = sessionmaker(engine)
    cache.attach(factory)
    return client, cache, factory


def exit_code_of_a_forked_child(child: Callable[[], int]) -> int:
    """Fork; the child runs ``child`` and exits with what it returns (4 if it raised),
    without running the parent's cleanups; the parent waits and returns that code.

    Example::

        assert exit_code_of_a_forked_child(lambda: 0 if cache.stats() else 3) == 0
    """
    pid = os.fork()
    if pid == 0:
        code = 4
        try:
            code = child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def close_cache_and_engine(cache: Cache, engine: AsyncEngine) -> None:
    """The end of an asyncio test's own cache and engine, on the loop that used them:
    detach the cache, close the asyncio client it made, dispose of the engine's pool."""
    cache.detach()
    await cache.aclose()
    await engine.dispose()
