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
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from sa_redis_cache import Cache, CacheUnavailableError, ConfigurationError
from sa_redis_cache.redis_io import client_from_url
from tests.wb_support import drain, rows

if TYPE_CHECKING:
    import redis

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


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_the_applications_commit_or_rollback_decides(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Any,
    mode: str,
    ending: str,
) -> None:
    """Nothing is queued at the session's commit; the application's rollback queues
    nothing, its commit queues the operation, which the worker then writes."""
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        pk = add_view(factory, connection, mode, page_view)
        assert queued(client, namespace) == 0, "queued before the application committed"
        getattr(outer, ending)()
    committed = ending == "commit"
    assert queued(client, namespace) == int(committed)
    with factory() as s:
        found = s.get(page_view, pk)
        assert (found.path if found else None) == (f"/joined/{mode}" if committed else None)
    drain(make_worker())
    assert rows(engine, page_view).get(pk) == ((f"/joined/{mode}", 0) if committed else None)


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


def test_redis_down_at_the_application_commit_raises_after_the_database_commit(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    aof_redis: RedisServer,
    models: Any,
) -> None:
    """The database commits first, as for a session of its own: when Redis then refuses
    the operations, the application's commit raises, saying the transaction is
    committed, and the connection goes back to the pool with no transaction open."""
    page_view, _ = models
    table = page_view.__table__
    core_row = uuid.uuid4()
    with engine.connect() as connection:
        outer = connection.begin()
        queued_view = add_view(factory, connection, "create_savepoint", page_view)
        connection.execute(sa.insert(table).values(id=core_row, path="/core", views=0))
        aof_redis.stop()
        try:
            with pytest.raises(CacheUnavailableError, match="committed to the database"):
                outer.commit()
        finally:
            aof_redis.start()
        assert not connection.in_transaction()
    assert set(rows(engine, page_view)) == {core_row}
    assert queued_view not in rows(engine, page_view)
    with engine.connect() as connection:
        status = connection.connection.dbapi_connection.info.transaction_status  # type: ignore[union-attr]
        assert status == psycopg.pq.TransactionStatus.IDLE


def test_a_database_commit_that_fails_queues_nothing(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Any,
) -> None:
    """COMMIT itself fails (a deferred constraint): the database keeps nothing, and the
    operations, queued only after it, are not queued either; the error is SQLAlchemy's."""
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        connection.execute(
            sa.text("CREATE TEMP TABLE wb_deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        )
        connection.execute(sa.text("INSERT INTO wb_deferred VALUES (1), (1)"))
        pk = add_view(factory, connection, "create_savepoint", page_view)
        with pytest.raises(sa.exc.IntegrityError):
            outer.commit()
    assert queued(client, namespace) == 0
    drain(make_worker())
    assert pk not in rows(engine, page_view)


@pytest.mark.parametrize("mode", JOINED)
def test_the_transactions_other_sessions_read_the_joined_sessions_writes(
    factory: sessionmaker[Session], engine: sa.Engine, models: Any, mode: str
) -> None:
    """As with plain SQLAlchemy, a session joined to the same transaction after the first
    one committed reads its row (by primary key: write-behind rows are not in the
    database yet); a session outside the transaction does not."""
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        pk = add_view(factory, connection, mode, page_view)
        with factory(bind=connection, join_transaction_mode=mode) as s:
            assert s.get_one(page_view, pk).path == f"/joined/{mode}"
        with factory() as s:
            assert s.get(page_view, pk) is None
        outer.rollback()


def test_a_rollback_after_the_database_dropped_the_connection_is_sqlalchemys(
    factory: sessionmaker[Session], engine: sa.Engine, models: Any
) -> None:
    """The listeners a joined session's hand-over adds never read the connection: one the
    database dropped rolls back as in plain SQLAlchemy (a look at its ``info`` raised
    ``PendingRollbackError`` there, over the original error)."""
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        add_view(factory, connection, "create_savepoint", page_view)  # listens on engine
        pid = connection.scalar(sa.text("SELECT pg_backend_pid()"))
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa.exc.OperationalError):
            connection.execute(sa.text("SELECT 1"))
        outer.rollback()
    with factory() as s:
        s.execute(sa.text("SELECT 1"))
        s.rollback()


@pytest.mark.parametrize("mode", ["rollback_only", "conditional_savepoint"])
def test_a_savepoint_decides_by_what_it_held_at_the_flush(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    mode: str,
) -> None:
    """As SQL would: a row flushed before the application's savepoint survives that
    savepoint's rollback; one flushed inside it is undone by it, though the session
    committed after the rollback (savepoint membership is the flush's, not the
    session's commit's)."""
    page_view, _ = models
    with engine.connect() as connection:
        outer = connection.begin()
        with factory(bind=connection, join_transaction_mode=mode) as s:
            before = page_view(path="/before")
            s.add(before)
            s.flush()
            savepoint = connection.begin_nested()
            inside = page_view(path="/inside")
            s.add(inside)
            s.flush()
            savepoint.rollback()
            s.commit()
        outer.commit()
    assert queued(client, namespace) == 1
    with factory() as s:
        assert s.get(page_view, before.id) is not None
        assert s.get(page_view, inside.id) is None


def test_an_autocommit_connection_queues_at_the_sessions_commit(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    """On an AUTOCOMMIT connection each statement commits: the session's commit is the
    row's, whatever the application does with its (empty) transaction afterwards."""
    page_view, _ = models
    with engine.connect() as plain:
        connection = plain.execution_options(isolation_level="AUTOCOMMIT")
        outer = connection.begin()
        pk = add_view(factory, connection, "rollback_only", page_view)
        assert queued(client, namespace) == 1
        outer.rollback()
    with factory() as s:
        assert s.get(page_view, pk) is not None


def test_detach_is_refused_while_writes_wait_for_the_applications_commit(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    """A detached cache would not see the commit, and the writes would be lost: detach()
    says so and detaches nothing; once the transaction ends it detaches."""
    page_view, _ = models
    cache = Cache(client, namespace=f"{namespace}d")
    other = sessionmaker(engine)
    cache.attach(other)
    with engine.connect() as connection:
        outer = connection.begin()
        add_view(other, connection, "create_savepoint", page_view)
        with pytest.raises(ConfigurationError, match="Commit or roll back that transaction"):
            cache.detach()
        outer.commit()
    assert queued(client, f"{namespace}d") == 1
    cache.detach()


def test_one_caches_failure_keeps_no_other_caches_writes_back(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> None:
    """Two caches on one engine, each with a joined session's write in one transaction;
    the second's Redis is down at the commit: it raises, and the first's are queued."""
    page_view, _ = models
    with RedisServer(appendonly=True, appendfsync="always") as down:
        down_client = client_from_url(down.url)
        cache = Cache(down_client, namespace=f"{namespace}x")
        other = sessionmaker(engine)
        cache.attach(other)
        try:
            with engine.connect() as connection:
                outer = connection.begin()
                add_view(other, connection, "create_savepoint", page_view)
                kept = add_view(factory, connection, "create_savepoint", page_view)
                down.stop()
                with pytest.raises(CacheUnavailableError, match="committed to the database"):
                    outer.commit()
        finally:
            down.start()
            cache.detach()
            down_client.close()
    assert queued(client, namespace) == 1
    with factory() as s:
        assert s.get(page_view, kept) is not None
