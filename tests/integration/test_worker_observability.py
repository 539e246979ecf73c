"""What a flush worker shows: backlog progress on stderr, stats, and Prometheus metrics.

The runner is started as a process whose stderr is a file (not a TTY): it must follow a
backlog with structured log lines, never terminal escapes; ``--progress`` draws the rich
bar there anyway. Stats and metrics are read in-process around deterministic
``run_once`` calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from devservices import PostgresServer, RedisServer, ServerStartError
from sa_redis_cache import Cache, FlushWorker, schema
from sa_redis_cache.metrics import WorkerCollector
from sa_redis_cache.strategies.write_behind.worker.progress import BacklogProgress, choose_mode
from tests.wb_support import drain, private_models, queue

if TYPE_CHECKING:
    from collections.abc import Iterator

pytest_plugins = ["tests.wb_fixtures"]

ROOT = Path(__file__).resolve().parents[2]


def queue_many(factory: sessionmaker[Session], model: Any, count: int) -> None:
    with factory() as s:
        s.add_all(model(path=f"/b/{i}", views=i) for i in range(count))
        s.commit()


def count_rows(engine: sa.Engine, model: Any) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


def run_worker(
    database_url: str, server: RedisServer, namespace: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [
                sys.executable, "-m", "sa_redis_cache.worker",
                "--database-url", database_url, "--redis-url", server.url,
                "--namespace", namespace, "--model", "tests.wb_support:worker_models",
                "--batch-size", "10", "--progress-threshold", "50", *extra,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling observable state, bounded by the deadline


def stop(proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    return log.read_text().splitlines()


def records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("flag", [None, "--progress"])
def test_the_runner_follows_a_backlog_on_stderr(
    factory: sessionmaker[Session],
    models: Any,
    worker_engine: sa.Engine,
    aof_redis: RedisServer,
    database_url: str,
    namespace: str,
    tmp_path: Path,
    flag: str | None,
) -> None:
    page_view, _ = models
    queue_many(factory, page_view, 120)
    log = tmp_path / "worker.log"
    extra = ["--progress-interval", "0.01"] + ([flag] if flag else [])
    proc = run_worker(database_url, aof_redis, namespace, log, *extra)
    try:
        wait_for(lambda: count_rows(worker_engine, page_view) == 120, "the backlog to land")
        wait_for(lambda: "backlog drained" in log.read_text(), "the end of the backlog")
    finally:
        lines = stop(proc, log)
    found = records(lines)
    messages = [r["message"] for r in found]
    start = next(r for r in found if r["message"].startswith("write-behind backlog found"))
    assert start["wb_backlog"] == 120
    end = next(r for r in found if r["message"].startswith("write-behind backlog drained"))
    assert end["wb_backlog_start"] == 120
    assert end["wb_backlog"] <= 10
    batches = [r for r in found if r["message"] == "write-behind batch flushed"]
    assert sum(r["wb_entries"] for r in batches) == 120
    assert {"wb_table", "wb_partition", "wb_applied", "wb_db_ms"} <= set(batches[0])
    if flag is None:  # not a TTY: log lines only, no terminal drawing
        assert start["wb_progress"] == "log"
        assert all(line.startswith("{") for line in lines), lines
        for r in found:
            if r["message"].startswith("write-behind backlog:"):
                assert {"wb_backlog", "wb_backlog_start", "wb_rate", "wb_eta_s"} <= set(r)
    else:  # asked for: rich draws the bar even into a file (its final state)
        assert start["wb_progress"] == "bar"
        assert any(re.search(r"write-behind backlog .*\d+/120", line) for line in lines)
    # SIGTERM stops the reading and finishes the batch in flight (docs/write-behind.md):
    # its line may follow the signal's, nothing else may
    stopped = next(i for i, m in enumerate(messages) if "signal 15: stopping" in m)
    assert set(messages[stopped + 1 :]) <= {"write-behind batch flushed"}, messages[stopped:]


def test_log_lines_report_the_backlog_as_it_drains(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    page_view, _ = models
    queue_many(factory, page_view, 200)
    worker = make_worker(batch_size=10)
    progress = BacklogProgress(worker, threshold=50, mode="log", interval=0)
    caplog.set_level(logging.INFO, logger="sa_redis_cache")
    assert progress.start()
    assert progress.start_backlog == 200
    worker.run_once()
    progress.update()  # interval 0: looks at the queue on every call
    lines = [r for r in caplog.records if r.getMessage().startswith("write-behind backlog:")]
    assert len(lines) == 1
    line: Any = lines[0]
    assert 0 < line.wb_backlog < 200
    assert line.wb_backlog_start == 200
    assert line.wb_rate > 0
    drain(worker)
    progress.update()
    assert not progress.active
    assert caplog.records[-1].getMessage().startswith("write-behind backlog drained")
    # below the threshold nothing is followed
    assert not BacklogProgress(worker, threshold=50, mode="log").start()


def test_progress_mode_follows_the_terminal(tmp_path: Path) -> None:
    with (tmp_path / "err").open("w") as not_a_tty:
        assert choose_mode(forced=False, disabled=False, stream=not_a_tty) == "log"
        assert choose_mode(forced=True, disabled=False, stream=not_a_tty) == "bar"
        assert choose_mode(forced=False, disabled=True, stream=not_a_tty) == "off"


# --------------------------------------------------------------------------- stats, metrics


def sample(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` whose labels include ``labels`` in a Prometheus exposition."""
    for line in text.splitlines():
        found = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if found is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(found.group(2))
    raise AssertionError(f"{name} {labels} not in the exposition")


def total(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def test_stats_and_metrics_move_with_the_work(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    client: redis.Redis,
    namespace: str,
) -> None:
    page_view, _ = models
    worker = make_worker(max_backoff=0)  # a failed partition is retried at once
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))

    def scrape() -> str:
        return generate_latest(registry).decode()

    before = worker.stats()
    assert (before.length, before.pending, before.rows_applied) == (0, 0, 0)
    assert before.dead_letter_count == 0
    for i in range(30):
        queue(factory, page_view, path=f"/m/{i}", views=i)
    queue(factory, page_view, path="/poison", views=-1)
    queued = worker.stats()
    assert queued.length == 31
    assert queued.lag_seconds >= 0
    first = scrape()
    assert total(first, "sarc_wb_queue_length") == 31
    assert sample(first, "sarc_wb_rows_applied_total", namespace=namespace) == 0
    assert sample(first, "sarc_wb_queue_up", namespace=namespace) == 1

    # delivered and committed, not acknowledged: pending entries, and lag
    def no_ack(*args: Any) -> None:
        raise RedisConnectionError("the acknowledgement is lost")

    worker._after_flush = no_ack
    worker.run_once()
    stuck = worker.stats()
    assert stuck.pending == 31
    assert stuck.length == 31
    assert stuck.errors >= 1
    del worker._after_flush
    drain(worker)

    after = worker.stats()
    assert (after.length, after.pending, after.lag_seconds) == (0, 0, 0.0)
    assert after.rows_applied == 30
    assert after.entries == 31
    assert after.batches >= 1
    assert after.dead_letters == 1  # this worker's own count
    assert after.open_dead_letters == 1  # the database's
    assert after.held == 4
    second = scrape()
    assert sample(second, "sarc_wb_rows_applied_total", namespace=namespace) == 30
    assert sample(second, "sarc_wb_entries_total", namespace=namespace) == 31
    assert sample(second, "sarc_wb_errors_total", namespace=namespace) >= 1
    assert sample(second, "sarc_wb_dead_letters_total", namespace=namespace) == 1
    assert sample(second, "sarc_wb_dead_letters_unreplayed", source="database") == 1
    assert total(second, "sarc_wb_queue_length") == 0
    assert total(second, "sarc_wb_partition_held") == 4

    # lag: the age of the oldest entry, from the time in its stream id
    now_ms = int(client.time()[0]) * 1000
    empty = worker.partitions[0].stream
    client.delete(empty)  # an id in the past needs a stream without a newer top id
    client.xadd(empty, {"o": "u"}, id=f"{now_ms - 5000}-0")
    assert 4.5 < worker.stats().lag_seconds < 60
    assert sample(scrape(), "sarc_wb_lag_seconds", partition="0") > 4.5
    client.delete(empty)


def test_metrics_without_redis_or_database(make_worker: Any, namespace: str) -> None:
    worker = make_worker()
    # nothing listens on port 1
    worker.client = redis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker, database=False))
    text = generate_latest(registry).decode()
    assert sample(text, "sarc_wb_queue_up", namespace=namespace) == 0
    assert sample(text, "sarc_wb_dead_letters_unreplayed", source="worker") == 0
    assert "sarc_wb_queue_length" not in text


@pytest.fixture(scope="module")
def own_postgres(unavailable: Any) -> Iterator[PostgresServer]:
    """A Postgres server of this module's own: a test stops and starts it."""
    try:
        server = PostgresServer().start()
    except ServerStartError as exc:
        unavailable(f"cannot start a throwaway Postgres: {exc}")
    try:
        yield server
    finally:
        server.close()


@contextmanager
def attached_page_views(
    engine: sa.Engine, client: redis.Redis, namespace: str
) -> Iterator[tuple[Any, sessionmaker[Session]]]:
    """A private write-behind model's table in ``engine``'s database, and a session
    factory a cache in ``namespace`` is attached to (detached at the end)."""
    schema.upgrade(engine)
    with private_models() as (page_view, _):
        page_view.metadata.create_all(engine)
        cache = Cache(client, namespace=namespace)
        factory = sessionmaker(engine)
        cache.attach(factory)
        try:
            yield page_view, factory
        finally:
            cache.detach()


def test_a_database_outage_is_logged_while_it_lasts_and_published(
    own_postgres: PostgresServer,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = sa.create_engine(own_postgres.url, poolclass=NullPool)
    with attached_page_views(engine, client, namespace) as (page_view, factory):
        queued = [queue(factory, page_view, path=f"/o/{i}", views=i) for i in range(5)]
        worker = FlushWorker(
            engine, client, namespace=namespace, models=[page_view], consumer="w1", max_backoff=0
        )
        worker.database.every = 0  # repeat the line at every failure (every 15 s by default)
        registry = CollectorRegistry()
        registry.register(WorkerCollector(worker, database=False))
        own_postgres.stop()
        try:
            with caplog.at_level(logging.WARNING):
                for _ in range(3):
                    assert worker.run_once() == 0
            said = [r.getMessage() for r in caplog.records]
            assert sum(m.startswith("write-behind worker cannot reach") for m in said) == 1, said
            assert sum(m.startswith("write-behind worker still cannot") for m in said) >= 2, said
            stats = worker.stats(database=False)
            assert not stats.database_up
            assert stats.database_down_seconds > 0
            text = generate_latest(registry).decode()
            assert sample(text, "sarc_wb_database_up", namespace=namespace) == 0
            assert sample(text, "sarc_wb_database_down_seconds", namespace=namespace) > 0
        finally:
            own_postgres.start()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert drain(worker) == 5
        assert any("reaches the database again" in r.getMessage() for r in caplog.records)
        assert worker.stats(database=False).database_up
        assert sample(generate_latest(registry).decode(), "sarc_wb_database_up") == 1
        assert count_rows(engine, page_view) == len(queued)
        worker.release()
    engine.dispose()


def test_a_database_lost_while_the_worker_names_its_streams_is_an_outage_it_outlasts(
    database_url: str, engine: sa.Engine, client: redis.Redis, namespace: str
) -> None:
    """Postgres accepts the worker's first connection and drops it before answering the
    identity query (it was shutting down): the worker starts anyway, reports the outage,
    and names its streams and drains them once the database answers."""
    with attached_page_views(engine, client, namespace) as (page_view, factory):
        queued = [queue(factory, page_view, path=f"/lost/{i}", views=i) for i in range(3)]
        worker_engine = sa.create_engine(database_url)
        dropped: list[int] = []

        @sa.event.listens_for(worker_engine, "checkout")
        def drop_the_first_checkout(dbapi_connection: Any, *_: Any) -> None:
            if dropped:
                return
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                dropped.append(cursor.fetchone()[0])
            with engine.connect() as admin:
                admin.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": dropped[0]})

        try:
            worker = FlushWorker(
                worker_engine, client, namespace=namespace, models=[page_view], consumer="w1"
            )
            assert dropped, "the identity query never ran on a dropped connection"
            assert not worker.database.up
            assert drain(worker) == len(queued)
            assert worker.stats(database=False).database_up
            assert count_rows(engine, page_view) == len(queued)
            worker.release()
        finally:
            worker_engine.dispose()
