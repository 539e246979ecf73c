"""Write-behind in a session joined to the application's transaction (SQLAlchemy's "join a
session into an external transaction", the usual test-suite recipe): the session's
``commit()`` commits nothing, so its operations are queued when the application commits
the connection's transaction, and never when it rolls back, wholly or to a savepoint
that holds the session's work (docs/decisions.md, "Writes").
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
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


@dataclass
class Joined:
    """What every case here uses: the cache's session factory, its engine and Redis, and
    the page views model (write-behind)."""

    factory: sessionmaker[Session]
    engine: sa.Engine
    client: redis.Redis
    namespace: str
    page_view: Any

    def queued(self, namespace: str | None = None) -> int:
        """Operations in the page views' streams of ``namespace`` (the cache's)."""
        pattern = f"sarc:{namespace or self.namespace}:*wb_page_views*:wb:*"
        return sum(int(self.client.xlen(s)) for s in self.client.scan_iter(match=pattern))

    def add_view(
        self, connection: sa.Connection, mode: str, factory: sessionmaker[Session] | None = None
    ) -> Any:
        """A page view committed by a session joined to ``connection``'s transaction; its
        id."""
        with (factory or self.factory)(bind=connection, join_transaction_mode=mode) as s:
            view = self.page_view(path=f"/joined/{mode}")
            s.add(view)
            s.commit()
            return view.id

    def get(self, pk: Any) -> Any:
        """The page view ``pk`` as a session of its own reads it (queued writes included)."""
        with self.factory() as s:
            return s.get(self.page_view, pk)


@pytest.fixture
def joined(
    factory: sessionmaker[Session],
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
) -> Joined:
    return Joined(factory, engine, client, namespace, models[0])


@pytest.mark.parametrize("ending", ["rollback", "commit"])
@pytest.mark.parametrize("mode", JOINED)
def test_the_applications_commit_or_rollback_decides(
    joined: Joined, make_worker: Any, mode: str, ending: str
) -> None:
    """Nothing is queued at the session's commit; the application's rollback queues
    nothing, its commit queues the operation, which the worker then writes."""
    with joined.engine.connect() as connection:
        outer = connection.begin()
        pk = joined.add_view(connection, mode)
        assert joined.queued() == 0, "queued before the application committed"
        getattr(outer, ending)()
    committed = ending == "commit"
    assert joined.queued() == int(committed)
    found = joined.get(pk)
    assert (found.path if found else None) == (f"/joined/{mode}" if committed else None)
    drain(make_worker())
    expected = (f"/joined/{mode}", 0) if committed else None
    assert rows(joined.engine, joined.page_view).get(pk) == expected


def test_a_rolled_back_savepoint_that_holds_the_session_drops_its_operations(
    joined: Joined,
) -> None:
    with joined.engine.connect() as connection:
        outer = connection.begin()
        before = connection.begin_nested()
        dropped = joined.add_view(connection, "create_savepoint")
        before.rollback()
        after = connection.begin_nested()
        kept = joined.add_view(connection, "create_savepoint")
        after.commit()  # released: its work is the outer transaction's
        outer.commit()
    assert joined.queued() == 1
    assert joined.get(dropped) is None
    assert joined.get(kept) is not None


def test_redis_down_at_the_application_commit_raises_after_the_database_commit(
    joined: Joined, aof_redis: RedisServer
) -> None:
    """The database commits first, as for a session of its own: when Redis then refuses
    the operations, the application's commit raises, saying the transaction is
    committed, and the connection goes back to the pool with no transaction open."""
    engine, page_view = joined.engine, joined.page_view
    core_row = uuid.uuid4()
    with engine.connect() as connection:
        outer = connection.begin()
        queued_view = joined.add_view(connection, "create_savepoint")
        connection.execute(
            sa.insert(page_view.__table__).values(id=core_row, path="/core", views=0)
        )
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


def test_a_database_commit_that_fails_queues_nothing(joined: Joined, make_worker: Any) -> None:
    """COMMIT itself fails (a deferred constraint): the database keeps nothing, and the
    operations, queued only after it, are not queued either; the error is SQLAlchemy's."""
    with joined.engine.connect() as connection:
        outer = connection.begin()
        connection.execute(
            sa.text("CREATE TEMP TABLE wb_deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        )
        connection.execute(sa.text("INSERT INTO wb_deferred VALUES (1), (1)"))
        pk = joined.add_view(connection, "create_savepoint")
        with pytest.raises(sa.exc.IntegrityError):
            outer.commit()
    assert joined.queued() == 0
    drain(make_worker())
    assert pk not in rows(joined.engine, joined.page_view)


@pytest.mark.parametrize("mode", JOINED)
def test_the_transactions_other_sessions_read_the_joined_sessions_writes(
    joined: Joined, mode: str
) -> None:
    """As with plain SQLAlchemy, a session joined to the same transaction after the first
    one committed reads its row (by primary key: write-behind rows are not in the
    database yet); a session outside the transaction does not."""
    with joined.engine.connect() as connection:
        outer = connection.begin()
        pk = joined.add_view(connection, mode)
        with joined.factory(bind=connection, join_transaction_mode=mode) as s:
            assert s.get_one(joined.page_view, pk).path == f"/joined/{mode}"
        assert joined.get(pk) is None
        outer.rollback()


def test_a_rollback_after_the_database_dropped_the_connection_is_sqlalchemys(
    joined: Joined,
) -> None:
    """The listeners a joined session's hand-over adds never read the connection: one the
    database dropped rolls back as in plain SQLAlchemy (a look at its ``info`` raised
    ``PendingRollbackError`` there, over the original error)."""
    engine = joined.engine
    with engine.connect() as connection:
        outer = connection.begin()
        joined.add_view(connection, "create_savepoint")  # listens on engine
        pid = connection.scalar(sa.text("SELECT pg_backend_pid()"))
        with engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        with pytest.raises(sa.exc.OperationalError):
            connection.execute(sa.text("SELECT 1"))
        outer.rollback()
    with joined.factory() as s:
        s.execute(sa.text("SELECT 1"))
        s.rollback()


@pytest.mark.parametrize("mode", ["rollback_only", "conditional_savepoint"])
def test_a_savepoint_decides_by_what_it_held_at_the_flush(joined: Joined, mode: str) -> None:
    """As SQL would: a row flushed before the application's savepoint survives that
    savepoint's rollback; one flushed inside it is undone by it, though the session
    committed after the rollback (savepoint membership is the flush's, not the
    session's commit's)."""
    page_view = joined.page_view
    with joined.engine.connect() as connection:
        outer = connection.begin()
        with joined.factory(bind=connection, join_transaction_mode=mode) as s:
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
    assert joined.queued() == 1
    assert joined.get(before.id) is not None
    assert joined.get(inside.id) is None


@pytest.mark.parametrize("rolled_back", ["before_the_sessions_commit", "after_it"])
@pytest.mark.parametrize("second", ["update", "delete"])
def test_a_savepoint_rollback_undoes_only_the_write_made_inside_it(
    joined: Joined, make_worker: Any, second: str, rolled_back: str
) -> None:
    """One session writes a row, then, inside the application's savepoint, writes it
    again; the savepoint rolls back, before or after the session commits. As with SQL,
    the first write stays and is queued at the application's commit (the second one's
    operation had replaced it, and the rollback dropped the row's write altogether)."""
    page_view = joined.page_view
    with joined.engine.connect() as connection:
        outer = connection.begin()
        with joined.factory(bind=connection, join_transaction_mode="rollback_only") as s:
            view = page_view(path="/first")
            s.add(view)
            s.flush()
            pk = view.id
            savepoint = connection.begin_nested()
            if second == "update":
                view.path = "/second"
            else:
                s.delete(view)
            s.flush()
            if rolled_back == "after_it":
                s.commit()
            savepoint.rollback()
            s.commit()
        outer.commit()
    assert joined.queued() == 1
    assert joined.get(pk).path == "/first"
    drain(make_worker())
    assert rows(joined.engine, page_view).get(pk) == ("/first", 0)


def test_an_autocommit_connection_queues_at_the_sessions_commit(joined: Joined) -> None:
    """On an AUTOCOMMIT connection each statement commits: the session's commit is the
    row's, whatever the application does with its (empty) transaction afterwards."""
    with joined.engine.connect() as plain:
        connection = plain.execution_options(isolation_level="AUTOCOMMIT")
        outer = connection.begin()
        pk = joined.add_view(connection, "rollback_only")
        assert joined.queued() == 1
        outer.rollback()
    assert joined.get(pk) is not None


def test_a_two_phase_transaction_is_refused_at_the_flush(joined: Joined) -> None:
    """A two-phase commit (``COMMIT PREPARED``) leaves no moment at which the database has
    committed and the operations could still be queued: the flush is refused, saying
    so, and changes nothing; the session's other work and the transaction go on."""
    page_view = joined.page_view
    with joined.engine.connect() as connection:
        outer = connection.begin_twophase()
        with joined.factory(bind=connection, join_transaction_mode="create_savepoint") as s:
            view = page_view(path="/two-phase")
            s.add(view)
            with pytest.raises(ConfigurationError, match="two-phase transaction"):
                s.flush()
            assert view in s.new, "the refused flush took the object out of the session"
            assert s.is_active
            s.expunge(view)
            s.commit()
        assert connection.scalar(sa.text("SELECT 1")) == 1
        outer.rollback()
    assert joined.queued() == 0


def test_detach_is_refused_while_writes_wait_for_the_applications_commit(
    joined: Joined,
) -> None:
    """A detached cache would not see the commit, and the writes would be lost: detach()
    says so and detaches nothing; once the transaction ends it detaches."""
    namespace = f"{joined.namespace}d"
    cache = Cache(joined.client, namespace=namespace)
    other = sessionmaker(joined.engine)
    cache.attach(other)
    with joined.engine.connect() as connection:
        outer = connection.begin()
        joined.add_view(connection, "create_savepoint", other)
        with pytest.raises(ConfigurationError, match="Commit or roll back that transaction"):
            cache.detach()
        outer.commit()
    assert joined.queued(namespace) == 1
    cache.detach()


def test_one_caches_failure_keeps_no_other_caches_writes_back(joined: Joined) -> None:
    """Two caches on one engine, each with a joined session's write in one transaction;
    the second's Redis is down at the commit: it raises, and the first's are queued."""
    with RedisServer(appendonly=True, appendfsync="always") as down:
        down_client = client_from_url(down.url)
        cache = Cache(down_client, namespace=f"{joined.namespace}x")
        other = sessionmaker(joined.engine)
        cache.attach(other)
        try:
            with joined.engine.connect() as connection:
                outer = connection.begin()
                joined.add_view(connection, "create_savepoint", other)
                kept = joined.add_view(connection, "create_savepoint")
                down.stop()
                with pytest.raises(CacheUnavailableError, match="committed to the database"):
                    outer.commit()
        finally:
            down.start()
            cache.detach()
            down_client.close()
    assert joined.queued() == 1
    assert joined.get(kept) is not None
