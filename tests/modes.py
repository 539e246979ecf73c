"""One scenario, two modes: a synchronous ``Session``, or an ``AsyncSession`` on asyncio.

A scenario is a plain function of a :class:`Db`. It opens sessions with ``db.session()``
and calls ``scalars``, ``get``, ``commit``... on them, the same code in both modes:

* ``sync``: the scenario runs as is, on a sync engine and a ``sessionmaker``;
* ``async``: the scenario runs inside ``greenlet_spawn`` under ``asyncio.run``, on an async
  engine (``postgresql+psycopg_async``) and an ``async_sessionmaker``; each facade method
  awaits the ``AsyncSession`` method through SQLAlchemy's greenlet bridge, so the cache's
  hooks run exactly as under ``await session.scalars(...)`` in an application.

Test hooks (``db.cache._core.hooks``) run inside the session's own greenlet under asyncio,
so a hook may open another ``db.session()`` (e.g. to commit a write between a miss's
database read and its fill) in both modes.

The runner counts the round trips each Redis client makes during the scenario: in the
async mode the synchronous client must make none (the cache used the asyncio client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from sa_redis_cache import Cache
from tests.support import SQLCounter

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

T = TypeVar("T")

MODES = ("sync", "async")


def async_url(database_url: str) -> str:
    """The same database through psycopg's asyncio driver."""
    url = sa.make_url(database_url).set(drivername="postgresql+psycopg_async")
    return url.render_as_string(hide_password=False)


class SyncFacade:
    """The scenario's view of a ``Session``."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def scalars(self, stmt: Any, **kw: Any) -> list[Any]:
        return list(self.session.scalars(stmt, **kw).all())

    def execute(self, stmt: Any, **kw: Any) -> list[Any]:
        result = self.session.execute(stmt, **kw)
        return list(result.all()) if result.returns_rows else []

    def get(self, model: Any, pk: Any, **kw: Any) -> Any:
        return self.session.get(model, pk, **kw)

    def add(self, obj: Any) -> None:
        self.session.add(obj)

    def delete(self, obj: Any) -> None:
        self.session.delete(obj)

    def flush(self) -> None:
        self.session.flush()

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()

    def close(self) -> None:
        self.session.close()


class AsyncFacade(SyncFacade):
    """The scenario's view of an ``AsyncSession``: each call awaits the async method."""

    def __init__(self, session: AsyncSession) -> None:
        self.asession = session

    def scalars(self, stmt: Any, **kw: Any) -> list[Any]:
        return list(await_(self.asession.scalars(stmt, **kw)).all())

    def execute(self, stmt: Any, **kw: Any) -> list[Any]:
        result = await_(self.asession.execute(stmt, **kw))
        return list(result.all()) if result.returns_rows else []

    def get(self, model: Any, pk: Any, **kw: Any) -> Any:
        return await_(self.asession.get(model, pk, **kw))

    def add(self, obj: Any) -> None:
        self.asession.add(obj)

    def delete(self, obj: Any) -> None:
        await_(self.asession.delete(obj))

    def flush(self) -> None:
        await_(self.asession.flush())

    def commit(self) -> None:
        await_(self.asession.commit())

    def rollback(self) -> None:
        await_(self.asession.rollback())

    def close(self) -> None:
        await_(self.asession.close())


@dataclass
class Db:
    """What a scenario gets: the mode, the cache, a session opener and counters."""

    mode: str
    cache: Cache
    sql: SQLCounter
    open_session: Callable[[], SyncFacade]
    round_trips: dict[str, int] = field(default_factory=lambda: {"sync": 0, "async": 0})

    @contextmanager
    def session(self) -> Iterator[SyncFacade]:
        """A new session (closed at the end of the block)."""
        facade = self.open_session()
        try:
            yield facade
        finally:
            facade.close()


def _count_sync(client: redis.Redis, counts: dict[str, int]) -> None:
    pool = client.connection_pool
    original = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        counts["sync"] += 1
        return original(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]


def _count_async(client: redis.asyncio.Redis, counts: dict[str, int]) -> None:
    pool = client.connection_pool
    original = pool.get_connection

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counts["async"] += 1
        return await original(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]


@dataclass
class Runner:
    """Runs scenarios in one mode against one database and one Redis namespace.

    ``expect_sync_redis``: the scenario uses a path that keeps the synchronous client under
    asyncio (write-behind); otherwise the async mode asserts it made no sync round trip.
    """

    mode: str
    database_url: str
    redis_url: str
    namespace: str
    cache_kwargs: dict[str, Any] = field(default_factory=dict)
    session_kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, scenario: Callable[[Db], T], *, expect_sync_redis: bool = False
    ) -> tuple[T, Db]:
        if self.mode == "sync":
            return self._sync(scenario)
        return asyncio.run(self._async(scenario, expect_sync_redis=expect_sync_redis))

    def _sync(self, scenario: Callable[[Db], T]) -> tuple[T, Db]:
        engine = sa.create_engine(self.database_url)
        client = redis.Redis.from_url(self.redis_url)
        cache = Cache(client, namespace=self.namespace, **self.cache_kwargs)
        sql = SQLCounter()
        sa.event.listen(engine, "before_cursor_execute", sql)
        factory = sessionmaker(engine, **self.session_kwargs)
        cache.attach(factory)
        db = Db("sync", cache, sql, lambda: SyncFacade(factory()))
        _count_sync(client, db.round_trips)
        try:
            return scenario(db), db
        finally:
            cache.detach()
            client.close()
            engine.dispose()

    async def _async(self, scenario: Callable[[Db], T], *, expect_sync_redis: bool) -> tuple[T, Db]:
        engine = create_async_engine(async_url(self.database_url))
        client = redis.Redis.from_url(self.redis_url)
        aclient = redis.asyncio.Redis.from_url(self.redis_url)
        cache = Cache(client, async_client=aclient, namespace=self.namespace, **self.cache_kwargs)
        sql = SQLCounter()
        sa.event.listen(engine.sync_engine, "before_cursor_execute", sql)
        factory = async_sessionmaker(engine, **self.session_kwargs)
        cache.attach(factory)
        db = Db("async", cache, sql, lambda: AsyncFacade(factory()))
        _count_sync(client, db.round_trips)
        _count_async(aclient, db.round_trips)
        try:
            result = await greenlet_spawn(scenario, db)
        finally:
            cache.detach()
            client.close()
            await aclient.aclose()
            await engine.dispose()
        if not expect_sync_redis:
            assert db.round_trips["async"] > 0, "the asyncio client was never used"
            assert db.round_trips["sync"] == 0, (
                f"{db.round_trips['sync']} Redis round trip(s) blocked the event loop"
            )
        return result, db
