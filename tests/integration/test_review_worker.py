"""An oracle review of the flush worker and its command line, as an operator uses them.

Each test compares what the docs promise (docs/write-behind.md, docs/cli.md,
docs/operations.md, ``FlushWorker``'s docstring, ``worker --help``) with what real
services do: the table after draining write-behind commits equals the table plain
SQLAlchemy commits leave (the oracle), and bad input is one ``Error:`` line and a
non-zero exit.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import event, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, FlushWorker, schema
from sa_redis_cache.cli import cli
from sa_redis_cache.cli.admin import worker_main
from sa_redis_cache.errors import ConfigurationError
from tests.slow_proxy import SlowProxy
from tests.wb_support import drain, letters, offsets, queue, rows

if TYPE_CHECKING:
    from collections.abc import Iterator

pytest_plugins = ["tests.wb_fixtures"]

MODELS = "tests.wb_support:active_models"


def table_rows(engine: sa.Engine, model: Any) -> dict[Any, tuple[Any, ...]]:
    """Every row of ``model``'s table, by id, as the database holds it."""
    with engine.connect() as conn:
        return {r.id: tuple(r) for r in conn.execute(sa.select(model.__table__))}


# --------------------------------------------------------------------------- data shapes


def test_a_none_given_for_a_column_with_a_default_takes_the_default_as_plain_sqlalchemy(
    engine: sa.Engine,
    models: Any,
    factory: sessionmaker[Session],
    make_worker: Any,
    namespace: str,
) -> None:
    """SQLAlchemy's INSERT leaves out a None it does not evaluate (any type but JSON's), so
    the column's Python default applies: ``PageView(views=None)`` is stored with views 0.
    Write-behind queued the None, and the worker dead-lettered the row (NOT NULL)."""
    page_view = models[0]
    queued, plain = uuid.uuid4(), uuid.uuid4()
    with factory() as s:
        obj = page_view(id=queued, path="/q", views=None)
        s.add(obj)
        s.commit()
        assert obj.views == 0
    with Session(engine) as s:  # the oracle: the same object committed without the cache
        s.add(page_view(id=plain, path="/q", views=None))
        s.commit()
    drain(make_worker())
    assert letters(engine, namespace) == []
    found = table_rows(engine, page_view)
    assert found[queued][1:4] == found[plain][1:4] == ("/q", 0, None)


@contextmanager
def behind(
    base: type[DeclarativeBase],
    engine: sa.Engine,
    database_url: str,
    client: redis.Redis,
    namespace: str,
) -> Iterator[tuple[sessionmaker[Session], sa.Engine]]:
    """The write-behind models of ``base`` on fresh tables: an attached factory and the
    worker's own engine; the tables and the models are dropped after."""
    schema.upgrade(engine)
    base.metadata.create_all(engine)
    cache = Cache(client, namespace=namespace)
    made = sessionmaker(engine)
    cache.attach(made)
    worker_engine = sa.create_engine(database_url)
    try:
        yield made, worker_engine
    finally:
        cache.detach()
        worker_engine.dispose()
        base.metadata.drop_all(engine)
        base.registry.dispose()
        gc.collect()


def test_a_json_column_left_unset_is_sql_null_as_plain_sqlalchemy_leaves_it(
    engine: sa.Engine, database_url: str, client: redis.Redis, namespace: str
) -> None:
    """SQLAlchemy's INSERT leaves out a JSON column the object was never given: SQL NULL.
    The queued row held None, which the worker wrote as JSON null (``doc IS NULL`` false);
    the entry now names the columns whose None is SQL NULL."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "wb_review_json_nulls"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=2)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        note: Mapped[str | None]
        doc: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    with behind(Base, engine, database_url, client, namespace) as (made, worker_engine):
        queued, plain = uuid.uuid4(), uuid.uuid4()
        with made() as s:
            s.add(Doc(id=queued, note="q"))
            s.commit()
        with Session(engine) as s:  # the oracle
            s.add(Doc(id=plain, note="q"))
            s.commit()
        drain(FlushWorker(worker_engine, client, namespace=namespace, models=[Doc]))
        with engine.connect() as conn:
            found: dict[Any, Any] = dict(
                conn.execute(text("SELECT id, doc IS NULL FROM wb_review_json_nulls")).all()
            )
        assert found == {queued: True, plain: True}


def test_an_aware_datetime_in_a_naive_timestamp_column_as_plain_sqlalchemy(
    engine: sa.Engine, database_url: str, client: redis.Redis, namespace: str
) -> None:
    """Postgres stores an aware datetime given to a ``timestamp`` column as its wall time
    in the session's zone. The queue kept it aware: the session read back another value
    than the database would hold, and a batch mixing it with naive values made psycopg's
    array dumper raise TypeError out of ``run_once``, killing the worker on every restart."""

    class Base(DeclarativeBase):
        pass

    class Stamp(Base):
        __tablename__ = "wb_review_stamps"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=1)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        at: Mapped[datetime | None] = mapped_column(sa.DateTime())

    plus_two = timezone(timedelta(hours=2))
    values = [datetime(2020, 1, 1, 12, tzinfo=plus_two), datetime(2020, 1, 1, 12), None]
    with behind(Base, engine, database_url, client, namespace) as (made, worker_engine):
        queued = [uuid.uuid4() for _ in values]
        plain = [uuid.uuid4() for _ in values]
        with made() as s:
            s.add_all(Stamp(id=k, at=v) for k, v in zip(queued, values, strict=True))
            s.commit()
        with Session(engine) as s:  # the oracle
            s.add_all(Stamp(id=k, at=v) for k, v in zip(plain, values, strict=True))
            s.commit()
        with made() as s:  # read back from the queue, as the database will hold it
            read = [s.get(Stamp, k).at for k in queued]  # type: ignore[union-attr]
        worker = FlushWorker(worker_engine, client, namespace=namespace, models=[Stamp])
        drain(worker)
        with engine.connect() as conn:
            found: dict[Any, Any] = dict(
                conn.execute(text("SELECT id, at FROM wb_review_stamps")).all()
            )
        assert [found[k] for k in queued] == [found[k] for k in plain] == read
        assert worker.dead_letters == 0


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("option", ["--max-backoff", "--progress-interval"])
def test_a_number_of_seconds_that_is_not_finite_is_a_usage_error(
    models: Any, option: str, value: str
) -> None:
    """click's FloatRange lets ``nan`` through: ``--max-backoff nan`` made a worker that
    retried a failure in a busy loop, thousands of connection attempts a second."""
    del models
    result = CliRunner().invoke(
        cli,
        [
            "worker",
            "--model",
            MODELS,
            "--database-url",
            "postgresql://x@127.0.0.1:1/x",
            option,
            value,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: Invalid value for '{option}': {float(value)} is not a number of seconds"
    ], result.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_flush_worker_refuses_a_backoff_that_is_not_a_number_of_seconds(
    worker_engine: sa.Engine, client: redis.Redis, namespace: str, models: Any, value: float
) -> None:
    with pytest.raises(ConfigurationError, match="max_backoff"):
        FlushWorker(
            worker_engine, client, namespace=namespace, models=[models[0]], max_backoff=value
        )


def test_python_m_worker_says_redis_refused_in_one_line_not_a_traceback(
    database_url: str, wb_redis_url: str, models: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m sa_redis_cache.worker`` runs the command outside the ``sa-redis-cache``
    group, whose error translation it missed: a Redis that answers with an error (here a
    database index out of range) was a traceback there, one line under the group."""
    del models
    url = wb_redis_url.rsplit("/", 1)[0] + "/99"
    status = worker_main(["--database-url", database_url, "--redis-url", url, "--model", MODELS])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"Error: Redis at {url} failed: DB index is out of range"
    ], err


# --------------------------------------------------------------------------- takeover


def test_a_worker_stopped_inside_its_batch_transaction_is_replaced_within_its_lease(
    database_url: str,
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    """A worker stopped (SIGSTOP, a VM pause) after its batch's statements and before its
    COMMIT holds the partition's offset row in an open transaction for as long as it is
    stopped: the successor's token move gave up after a heartbeat on every pass, so the
    partition waited for the stopped worker instead of moving within its lease. The
    database now ends such a transaction once it has been idle for a lease; the stopped
    worker's batch is rolled back, the successor applies everything once."""
    page_view, _ = models
    own_engine = sa.create_engine(database_url)  # the stopped process's own connections
    stopped = FlushWorker(
        own_engine,
        client,
        namespace=namespace,
        models=[page_view],
        consumer="w1",
        lease_ms=1000,
    )
    stopped.run_once()  # takes every partition
    ids = [queue(factory, page_view, path=f"/s/{i}", views=i) for i in range(8)]
    expected = {pk: (f"/s/{i}", i) for i, pk in enumerate(ids)}
    inside, resume = threading.Event(), threading.Event()

    def stop_before_commit(conn: Any) -> None:
        del conn
        if not inside.is_set():
            inside.set()
            resume.wait(30)  # the stop: every statement sent, the COMMIT not yet

    event.listen(own_engine, "commit", stop_before_commit)
    runner = threading.Thread(target=stopped.run_once)
    runner.start()
    try:
        assert inside.wait(10)
        for p in stopped.partitions:  # its lease runs out meanwhile
            client.delete(p.lease)
        client.zrem(stopped._workers_key(page_view.__tablename__), "w1")
        successor = make_worker("w2", max_backoff=0.2)
        deadline = time.monotonic() + 10
        while rows(worker_engine, page_view) != expected:
            assert time.monotonic() < deadline, "the partition waited for the stopped worker"
            successor.run_once()
    finally:
        resume.set()
        runner.join(30)
        event.remove(own_engine, "commit", stop_before_commit)
    assert stopped.applied == 0
    assert stopped.fenced >= 1  # its batch was refused, not an outage of the database
    assert stopped.database.up
    assert rows(worker_engine, page_view) == expected
    assert offsets(worker_engine, namespace) == len(ids)  # nothing applied twice
    stopped.release()
    own_engine.dispose()


def test_an_empty_consumer_name_is_refused_not_replaced_by_a_random_one(
    worker_engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> None:
    """``--consumer "$NAME"`` with NAME unset gave the worker a random name: a replacement
    meant to resume its predecessor's partitions at once waited for their leases. The
    command line passes the name to ``FlushWorker``, whose refusal is its usage error."""
    with pytest.raises(ConfigurationError, match="consumer='': give a non-empty name"):
        FlushWorker(worker_engine, client, namespace=namespace, models=[models[0]], consumer="")


def test_a_model_named_twice_is_flushed_and_counted_once(
    factory: sessionmaker[Session],
    models: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    """``worker --model m:PageView --model m:PageView`` made each stream two partitions of
    the worker: the queue's length, the backlog (and its progress) and the metrics counted
    every queued entry twice."""
    page_view = models[0]
    ids = [queue(factory, page_view, path=f"/d/{i}", views=i) for i in range(6)]
    worker = FlushWorker(worker_engine, client, namespace=namespace, models=[page_view] * 2)
    try:
        assert len(worker.partitions) == len({p.stream for p in worker.partitions})
        assert worker.stats(database=False).length == len(ids)
        assert worker.backlog() == len(ids)
        assert drain(worker) == len(ids)
        assert set(rows(worker_engine, page_view)) == set(ids)
        assert offsets(worker_engine, namespace) == len(ids)
    finally:
        worker.release()


class _Sealed(sa.types.TypeDecorator[str]):
    """A string column whose bind needs a key that only the application's process has
    (an encryption key missing from the worker's environment)."""

    impl = sa.String
    cache_ok = True
    key_missing = False

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if _Sealed.key_missing:
            raise RuntimeError("no sealing key in this process")
        return value


def test_a_batch_that_raises_outside_the_database_leaves_the_worker_running(
    engine: sa.Engine,
    database_url: str,
    client: redis.Redis,
    namespace: str,
    models: Any,
    factory: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that is not a database error (here a column type's bind that raises in
    the worker's process) came out of ``run_once``: ``run()`` and the command ended, and
    every restart ended the same way, leaving every partition of every model unflushed."""
    page_view = models[0]

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = "wb_review_notes"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=1)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        body: Mapped[str] = mapped_column(_Sealed(100))

    Base.metadata.create_all(engine)
    cache = Cache(client, namespace=namespace)
    made = sessionmaker(engine)
    cache.attach(made)
    worker_engine = sa.create_engine(database_url)
    try:
        with made() as s:
            s.add(Note(body="sealed"))
            s.commit()
        views = [queue(factory, page_view, path=f"/n/{i}", views=i) for i in range(4)]
        worker = FlushWorker(
            worker_engine,
            client,
            namespace=namespace,
            models=[Note, page_view],
            max_backoff=0.1,
        )
        _Sealed.key_missing = True
        with caplog.at_level("ERROR"):
            for _ in range(3):
                worker.run_once()
        assert set(rows(worker_engine, page_view)) == set(views)  # the others went on
        assert any("raised RuntimeError" in r.getMessage() for r in caplog.records)
        _Sealed.key_missing = False  # the key is given to the worker: it drains
        deadline = time.monotonic() + 10
        while worker.stats(database=False).length:
            assert time.monotonic() < deadline
            worker.run_once()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT body FROM wb_review_notes")).scalars().all() == [
                "sealed"
            ]
        worker.release()
    finally:
        _Sealed.key_missing = False
        cache.detach()
        worker_engine.dispose()
        Base.metadata.drop_all(engine)
        Base.registry.dispose()
        del Note, Base
        gc.collect()


# --------------------------------------------------------------------------- outages


def test_an_idle_worker_reports_a_database_outage_in_its_stats_and_metric(
    database_url: str,
    client: redis.Redis,
    namespace: str,
    models: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With nothing queued the worker asks the database nothing, and reported it up (and
    ``sarc_wb_database_up`` 1) through a whole outage: the alert of docs/operations.md
    never fired. The dead-letter count that ``stats()`` runs is an attempt of its own."""
    from prometheus_client import CollectorRegistry, generate_latest

    from sa_redis_cache.metrics import WorkerCollector

    url = sa.make_url(database_url)
    proxy = SlowProxy(url.host or "127.0.0.1", url.port or 5432, delay=0.0).__enter__()
    through = url.set(host="127.0.0.1", port=proxy.port)
    engine = sa.create_engine(through, poolclass=sa.pool.NullPool)
    try:
        worker = FlushWorker(engine, client, namespace=namespace, models=[models[0]])
        assert worker.run_once() == 0  # an empty queue
        assert worker.stats().database_up
        registry = CollectorRegistry()
        registry.register(WorkerCollector(worker))
        proxy.__exit__(None, None, None)  # the database goes away
        with caplog.at_level("WARNING"):
            assert worker.run_once() == 0  # still nothing to apply: nothing noticed
            stats = worker.stats()
        assert not stats.database_up
        assert stats.open_dead_letters is None
        said = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("write-behind worker cannot reach the database") for m in said)
        metrics = generate_latest(registry).decode()
        assert (
            f'sarc_wb_database_up{{consumer="{worker.consumer}",namespace="{namespace}"}} 0.0'
            in metrics
        )
        worker.release()
    finally:
        proxy.__exit__(None, None, None)
        engine.dispose()
