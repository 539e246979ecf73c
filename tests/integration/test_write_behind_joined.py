"""Write-behind in a session joined to the application's transaction (SQLAlchemy's "join a
session into an external transaction", the usual test-suite recipe): the session's
``commit()`` commits nothing, so its operations are queued when the application commits
the connection's transaction, and never when it rolls back, wholly or to a savepoint
that holds the session's work (docs/decisions.md, "Writes").
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa

from sa_redis_cache import CacheUnavailableError
from tests.wb_support import drain, rows

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from devservices import RedisServer

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, models, factory, make_worker

JOINED = ["conditional_savepoint", "create_savepoint", "rollback_only"]


def queued(client: redis.Redis, namespace: str) -> int:
    """Operations in the page views' streams."""
    streams = client.scan_iter(match=f"sarc:{namespace}:*wb_page_views*:wb:*")
    return sum(int(client.xlen(stream)) for stream in streams)


def add_view(
    factory: sessionmaker[Session], connection: sa.Connection, mode: str, model: Any
) -> Any:
    """A page view committed by a session joined to ``connection``'s transaction; its id."""
    with factory(bind=connection, join_transaction_mode=mode) as s:
        view = model(path=f"/joined/{mode}")
        s.add(view)
        s.commit()
        return view.id


@pytest.mark.parametrize("mode", JOINED)
def test_an_application_rollback_queues_nothing(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Any,
    mode: str,
) -> None:
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        pk = add_view(factory, connection, mode, page_view)
        assert queued(client, namespace) == 0, "queued before the application committed"
        outer.rollback()
    assert queued(client, namespace) == 0
    drain(make_worker())
    assert pk not in rows(engine, page_view)
    with factory() as s:
        assert s.get(page_view, pk) is None


@pytest.mark.parametrize("mode", JOINED)
def test_an_application_commit_queues_the_operations(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Any,
    mode: str,
) -> None:
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        pk = add_view(factory, connection, mode, page_view)
        outer.commit()
    assert queued(client, namespace) == 1
    with factory() as s:
        assert s.get_one(page_view, pk).path == f"/joined/{mode}"
    drain(make_worker())
    assert rows(engine, page_view)[pk] == (f"/joined/{mode}", 0)


def test_a_rolled_back_savepoint_that_holds_the_session_drops_its_operations(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        before = connection.begin_nested()
        dropped = add_view(factory, connection, "create_savepoint", page_view)
        before.rollback()
        after = connection.begin_nested()
        kept = add_view(factory, connection, "create_savepoint", page_view)
        after.commit()  # released: its work is the outer transaction's
        outer.commit()
    assert queued(client, namespace) == 1
    with factory() as s:
        assert s.get(page_view, dropped) is None
        assert s.get(page_view, kept) is not None


def test_redis_down_at_the_application_commit_refuses_it(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    aof_redis: RedisServer,
    models: Any,
) -> None:
    """The operations are queued before the database commits: when Redis refuses them,
    the application's commit raises and the database commits nothing of it."""
    page_view, _ = models
    table = page_view.__table__
    with engine.connect() as connection:
        outer = connection.begin()
        add_view(factory, connection, "create_savepoint", page_view)
        connection.execute(sa.insert(table).values(id=uuid.uuid4(), path="/core", views=0))
        aof_redis.stop()
        try:
            with pytest.raises(CacheUnavailableError, match="joined to this transaction"):
                outer.commit()
        finally:
            aof_redis.start()
        # the same pooled connection serves the next read: no transaction is left open
        # on it (SQLAlchemy counts a commit that raised as the transaction's end)
        assert not connection.in_transaction()
    assert rows(engine, page_view) == {}
    with engine.connect() as connection:
        status = connection.connection.dbapi_connection.info.transaction_status  # type: ignore[union-attr]
        assert status == psycopg.pq.TransactionStatus.IDLE
