"""One scenario, two modes: a synchronous ``Session``, or an ``AsyncSession`` on asyncio.

A scenario is a plain function of a :class:`Db`. It opens sessions with ``db.session()``
and calls ``scalars``, ``get``, ``commit``... on them, the same code in both modes:

* ``sync``: the scenario runs as is, on a sync engine and a ``sessionmaker``;
* ``async``: the scenario runs inside ``greenlet_spawn`` under ``asyncio.run``, on an async
  engine (``postgresql+psycopg_async``) and an ``async_sessionmaker``; each facade method
  that does I/O awaits the ``AsyncSession`` method through SQLAlchemy's greenlet bridge,
  so the cache's hooks run exactly as under ``await session.scalars(...)`` in an
  application. The others (``expire``, ``no_autoflush``, ``in``...) act on the synchronous
  session underneath, as ``AsyncSession`` itself does; lazy loads work too, since the
  scenario runs in a SQLAlchemy greenlet.

The points where a scenario forces an interleaving (``db.seams``, :mod:`tests.seams`: after
a database read, before the post-commit work) are SQLAlchemy events, which run inside the
session's own greenlet under asyncio; so a listener may open another ``db.session()``
(e.g. to commit a write between a miss's database read and its fill) in both modes.

The runner counts the round trips each Redis client makes during the scenario: in the
async mode the synchronous client must make none (the cache used the asyncio client).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.util import greenlet_spawn

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.redis_io import async_client_from_url, client_from_url, is_cluster
from tests.seams import Seams
from tests.support import SQLCounter

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

T = TypeVar("T")

MODES = ("sync", "async")
CLUSTER_MODES = ("cluster-sync", "cluster-async")
"""The same scenarios on a Redis Cluster (the session's ``devservices.RedisCluster``):
``cluster-sync`` with a ``redis.cluster.RedisCluster``, ``cluster-async`` with its asyncio
twin. The runner is given the cluster's ``?cluster=true`` URL."""


def async_url(database_url: str) -> str:
    """The same database through psycopg's asyncio driver."""
    url = sa.make_url(database_url).set(drivername="postgresql+psycopg_async")
    return url.render_as_string(hide_password=False)


def _rows(result: Any) -> list[Any]:
    """The rows of a result; none for a statement that returns none (DML).

    Only a database cursor's result can return no rows: one served by the cache is an
    ``IteratorResult``, without ``returns_rows``.
    """
    if isinstance(result, CursorResult) and not result.returns_rows:
        return []
    return list(result.all())


class Savepoint:
    """A savepoint of a facade's session (``begin_nested()``).

    ``commit()`` releases it and ``rollback()`` rolls it back; as a context manager it is
    released at the end of the block, or rolled back when the block raises.
    """

    def __init__(self, commit: Callable[[], None], rollback: Callable[[], None]) -> None:
        self.commit = commit
        self.rollback = rollback

    def __enter__(self) -> Savepoint:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


class SyncFacade:
    """The scenario's view of a ``Session``."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def scalars(
        self, stmt: Any, params: Any = None, *, unique: bool = False, **kw: Any
    ) -> list[Any]:
        result = self.session.scalars(stmt, params, **kw)
        return list((result.unique() if unique else result).all())

    def scalar(self, stmt: Any, params: Any = None, **kw: Any) -> Any:
        return self.session.scalar(stmt, params, **kw)

    def execute(self, stmt: Any, params: Any = None, **kw: Any) -> list[Any]:
        result = self.session.execute(stmt, params, **kw)
        return _rows(result)

    def get(self, model: Any, pk: Any, **kw: Any) -> Any:
        return self.session.get(model, pk, **kw)

    def refresh(self, obj: object) -> None:
        self.session.refresh(obj)

    def add(self, obj: object) -> None:
        self.session.add(obj)

    def add_all(self, objs: Iterable[object]) -> None:
        self.session.add_all(objs)

    def delete(self, obj: object) -> None:
        self.session.delete(obj)

    def flush(self) -> None:
        self.session.flush()

    def begin_nested(self) -> Savepoint:
        tx = self.session.begin_nested()
        return Savepoint(tx.commit, tx.rollback)

    def commit(self) -> None:
        self.session.commit()

    def rollback(self) -> None:
        self.session.rollback()

    def close(self) -> None:
        self.session.close()

    # -- no I/O: the same on the synchronous session under an AsyncSession ------------------

    def expire(self, obj: object) -> None:
        self.session.expire(obj)

    def expunge_all(self) -> None:
        self.session.expunge_all()

    @property
    def no_autoflush(self) -> AbstractContextManager[Session]:
        return self.session.no_autoflush

    @property
    def dirty(self) -> Any:
        return self.session.dirty

    def __contains__(self, obj: object) -> bool:
        return obj in self.session


class AsyncFacade(SyncFacade):
    """The scenario's view of an ``AsyncSession``: each call that does I/O awaits it."""

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session.sync_session)
        self.asession = session

    def scalars(
        self, stmt: Any, params: Any = None, *, unique: bool = False, **kw: Any
    ) -> list[Any]:
        result = await_(self.asession.scalars(stmt, params, **kw))
        return list((result.unique() if unique else result).all())

    def scalar(self, stmt: Any, params: Any = None, **kw: Any) -> Any:
        return await_(self.asession.scalar(stmt, params, **kw))

    def execute(self, stmt: Any, params: Any = None, **kw: Any) -> list[Any]:
        result = await_(self.asession.execute(stmt, params, **kw))
        return _rows(result)

    def get(self, model: Any, pk: Any, **kw: Any) -> Any:
        return await_(self.asession.get(model, pk, **kw))

    def refresh(self, obj: object) -> None:
        await_(self.asession.refresh(obj))

    def add(self, obj: object) -> None:
        self.asession.add(obj)

    def add_all(self, objs: Iterable[object]) -> None:
        self.asession.add_all(objs)

    def delete(self, obj: object) -> None:
        await_(self.asession.delete(obj))

    def flush(self) -> None:
        await_(self.asession.flush())

    def begin_nested(self) -> Savepoint:
        tx = await_(self.asession.begin_nested())
        return Savepoint(lambda: await_(tx.commit()), lambda: await_(tx.rollback()))

    def commit(self) -> None:
        await_(self.asession.commit())

    def rollback(self) -> None:
        await_(self.asession.rollback())

    def close(self) -> None:
        await_(self.asession.close())


@dataclass
class Db:
    """What a scenario gets: the mode, the cache, a session opener, counters and seams."""

    mode: str
    cache: Cache
    sql: SQLCounter
    open_session: Callable[[], SyncFacade]
    seams: Seams
    round_trips: dict[str, int] = field(default_factory=lambda: {"sync": 0, "async": 0})

    @contextmanager
    def session(self) -> Iterator[SyncFacade]:
        """A new session (closed at the end of the block)."""
        facade = self.open_session()
        try:
            yield facade
        finally:
            facade.close()

    def invalidate(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``cache.<method>(...)`` in the sync mode, ``await cache.a<method>(...)`` in async.

        ``method`` is ``"invalidate"``, ``"invalidate_model"``, ``"invalidate_table"``,
        ``"invalidate_query"``, ``"invalidate_region"`` or ``"clear"``.
        """
        if self.mode in ("sync", "cluster-sync"):
            return getattr(self.cache, method)(*args, **kwargs)
        return await_(getattr(self.cache, "a" + method)(*args, **kwargs))


def _count_cluster(client: Any, counts: dict[str, int], kind: str) -> None:
    """Count a cluster client's commands and pipelines (it has a pool per node), and the
    calls the cache sends on one node's connection (``cluster_io``'s ``run_then``: it
    looks the node up first)."""
    execute, pipeline, node_of = client.execute_command, client.pipeline, client.get_node_from_key
    # the scenario's thread only: the local tier's listener thread routes its renewals
    # through the client's slot map, which blocks no event loop
    scenario_thread = threading.get_ident()

    def count() -> None:
        if threading.get_ident() == scenario_thread:
            counts[kind] += 1

    def counting(*args: Any, **kwargs: Any) -> Any:
        count()
        return execute(*args, **kwargs)

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        count()
        return pipeline(*args, **kwargs)

    def counting_node_of(*args: Any, **kwargs: Any) -> Any:
        count()
        return node_of(*args, **kwargs)

    client.execute_command = counting
    client.pipeline = counting_pipeline
    client.get_node_from_key = counting_node_of


def _count_sync(client: Any, counts: dict[str, int]) -> None:
    if is_cluster(client):
        _count_cluster(client, counts, "sync")
        return
    pool = client.connection_pool
    original = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        counts["sync"] += 1
        return original(*args, **kwargs)

    pool.get_connection = counting


def _count_async(client: Any, counts: dict[str, int]) -> None:
    if is_cluster(client):
        _count_cluster(client, counts, "async")
        return
    pool = client.connection_pool
    original: Any = pool.get_connection  # untyped in redis.asyncio

    async def counting(*args: Any, **kwargs: Any) -> Any:
        counts["async"] += 1
        return await original(*args, **kwargs)

    pool.get_connection = counting


@dataclass
class Runner:
    """Runs scenarios in one mode against one database and one Redis namespace.

    Each call makes its own engine, Redis clients and cache (attached to a session
    factory) and disposes of them at the end: two calls are two processes, as far as the
    cache can tell. In the async mode the call fails when the scenario made a round trip
    on the synchronous Redis client, or none on the asyncio one. ``cache_kwargs``,
    ``engine_kwargs`` and ``session_kwargs`` go to ``Cache``, the engine and the factory
    (``dataclasses.replace(in_mode, cache_kwargs=...)`` in a test).

    Example::

        result, db = Runner("async", database_url, redis_url, namespace)(scenario)
    """

    mode: str
    database_url: str
    redis_url: str
    namespace: str
    cache_kwargs: dict[str, Any] = field(default_factory=dict)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    session_kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, scenario: Callable[[Db], T]) -> tuple[T, Db]:
        if self.mode in ("sync", "cluster-sync"):
            return self._sync(scenario)
        return asyncio.run(self._async(scenario))

    def _sync(self, scenario: Callable[[Db], T]) -> tuple[T, Db]:
        engine = sa.create_engine(self.database_url, **self.engine_kwargs)
        client = client_from_url(self.redis_url)
        cache = Cache(client, namespace=self.namespace, **self.cache_kwargs)
        sql = SQLCounter()
        sa.event.listen(engine, "before_cursor_execute", sql)
        factory = sessionmaker(engine, **self.session_kwargs)
        cache.attach(factory)
        seams = Seams(engine=engine, session_class=factory)
        db = Db(self.mode, cache, sql, lambda: SyncFacade(factory()), seams)
        _count_sync(client, db.round_trips)
        try:
            return scenario(db), db
        finally:
            seams.close()
            cache.detach()
            client.close()
            engine.dispose()

    async def _async(self, scenario: Callable[[Db], T]) -> tuple[T, Db]:
        engine = create_async_engine(async_url(self.database_url), **self.engine_kwargs)
        client = client_from_url(self.redis_url)
        aclient = async_client_from_url(self.redis_url)
        cache = Cache(client, async_client=aclient, namespace=self.namespace, **self.cache_kwargs)
        sql = SQLCounter()
        sa.event.listen(engine.sync_engine, "before_cursor_execute", sql)
        factory = async_sessionmaker(engine, **self.session_kwargs)
        cache.attach(factory)
        # the class this factory's sessions are made from, after attach() chose it
        session_class = factory.kw.get("sync_session_class", Session)
        seams = Seams(engine=engine.sync_engine, session_class=session_class)
        db = Db(self.mode, cache, sql, lambda: AsyncFacade(factory()), seams)
        _count_sync(client, db.round_trips)
        _count_async(aclient, db.round_trips)
        blocking = 0
        try:
            result = await greenlet_spawn(scenario, db)
            # counted before detach(): its last stats publish is synchronous by design, and
            # on a cluster it shares the cache's client (a pool per node)
            blocking = db.round_trips["sync"]
        finally:
            seams.close()
            cache.detach()
            client.close()
            await aclient.aclose()
            await engine.dispose()
        assert db.round_trips["async"] > 0, "the asyncio client was never used"
        assert blocking == 0, f"{blocking} Redis round trip(s) blocked the event loop"
        return result, db


# -- shop helpers shared by the scenarios -------------------------------------------------


def set_price(db: Db, pid: int, price: str) -> None:
    """Commit a new price for product ``pid`` (read with ``populate_existing``)."""
    with db.session() as s:
        p = s.get(Product, pid, populate_existing=True)
        p.price = Decimal(price)
        s.commit()


def cached_price(db: Db, pid: int) -> Decimal:
    """Product ``pid``'s price through ``FromCache``, in a fresh session."""
    stmt = select(Product).where(Product.id == pid).options(FromCache())
    with db.session() as s:
        price: Decimal = s.scalars(stmt)[0].price
        return price


def db_price(db: Db, pid: int) -> Decimal:
    """Product ``pid``'s price as the database holds it (no ``FromCache``: read there)."""
    with db.session() as s:
        price: Decimal = s.scalar(select(Product.price).where(Product.id == pid))
        return price
