"""Part of ``make demo`` (:mod:`examples.demo`): a write-behind burst drained by a worker.

The telemetry example's ``PageView`` (``strategy="write_behind"``) takes a burst of page
views: each commit queues its rows in Redis in one script and sends no SQL. A flush worker
(:class:`~sa_redis_cache.FlushWorker`) then drains the queue into Postgres, with the
progress display of ``sa-redis-cache worker`` (its progress module): a
rich progress bar on a terminal, its plain log lines otherwise. The rows are counted in
Postgres afterwards.

Write-behind needs a Redis that keeps its data across a restart (AOF). When the demo's
Redis has AOF off, a throwaway ``redis-server`` with ``appendonly yes`` is started on a
free port for this part and stopped after it; without the binary the part is skipped and
says so.

Example::

    result = write_behind_burst(engine, redis_url, "demo", out, checks, views=2_000)
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer, ServerStartError, redact
from sa_redis_cache import Cache, FlushWorker, schema
from sa_redis_cache.redis_io import client_from_url
from sa_redis_cache.strategies.write_behind.checks import redis_problems
from sa_redis_cache.strategies.write_behind.worker.progress import BacklogProgress, choose_mode

if TYPE_CHECKING:
    from collections.abc import Iterator

    from examples.checks import Checks
    from examples.demo import Output, SQLCounter

COMMIT_SIZE = 100
"""Page views per commit: a burst of requests, each committing a few, not one per view."""

BATCH_SIZE = 100
"""Rows per worker batch (one database transaction each); the worker's default is 500."""


@dataclass
class BurstResult:
    """What the write-behind part did, for the summary."""

    queued: int = 0
    drained: int = 0
    batches: int = 0
    rows_in_postgres: int = 0
    skipped: str | None = None


@contextlib.contextmanager
def aof_redis(redis_url: str, out: Output) -> Iterator[str | None]:
    """The demo's Redis when it keeps data across restarts, else a throwaway one with AOF.

    Yields None (after saying why) when neither is possible.
    """
    from examples.telemetry import PageView

    client = client_from_url(redis_url)  # a ?cluster=true URL makes a cluster client
    try:
        problems = redis_problems(client, PageView.__cache__)
    finally:
        client.close()
    if not problems:
        out.line(f"The demo's Redis ({redact(redis_url)}) has AOF on: the queue lives there.")
        yield redis_url
        return
    try:
        server = RedisServer(appendonly=True, appendfsync="everysec").start()
    except ServerStartError as exc:
        out.line(
            f"The demo's Redis has AOF off, and no redis-server could be started ({exc}). "
            "Write-behind refuses a Redis that would lose its queue on a restart: start "
            "Redis with --appendonly yes (compose.yaml does) to see this part."
        )
        yield None
        return
    out.line(
        f"The demo's Redis has AOF off, and write-behind refuses a Redis that would lose its "
        f"queue on a restart: this part uses a redis-server started for it with appendonly "
        f"yes, on port {server.port}."
    )
    try:
        yield server.url
    finally:
        server.close()


class _PrintBacklogLines(logging.Handler):
    """The progress display's plain-text form: its backlog lines, printed as the demo's."""

    def __init__(self, out: Output) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # not the per-batch lines, nor the closing one: the progress stops following with
        # one batch still to go, so its count falls short of the demo's "Drained:" line
        if message.startswith("write-behind backlog") and not message.startswith(
            "write-behind backlog drained"
        ):
            self.out.line(f"  worker: {message}")


def _drain(worker: FlushWorker, out: Output, deadline: float) -> bool:
    """Run ``worker`` until its streams are empty, with the progress display; True if so."""
    mode = choose_mode(forced=False, disabled=False)
    # the queue is looked at after every pass (one XLEN per partition): a demo's burst
    # drains in a few passes, which the worker's usual throttling would not show
    progress = BacklogProgress(worker, threshold=0, mode=mode, interval=0, refresh=0)
    logger = logging.getLogger("sa_redis_cache")  # the package root: the worker logs under it
    handler: logging.Handler | None = None
    level = logger.level
    if mode == "log":  # no terminal: the progress comes as lines, printed here
        handler = _PrintBacklogLines(out)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    began, entries = time.monotonic(), worker.entries
    try:
        progress.start()
        while worker.backlog():
            if time.monotonic() > deadline:
                return False
            worker.run_once(block_ms=100)
            progress.update()
        if handler is not None:  # the count once drained (the progress's own stops short)
            out.line(
                f"  worker: write-behind backlog drained: {worker.entries - entries} entries "
                f"flushed by this worker in {time.monotonic() - began:.1f} s"
            )
        return True
    finally:
        progress.close()
        worker.release()
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


def write_behind_burst(
    engine: sa.Engine,
    redis_url: str,
    namespace: str,
    out: Output,
    checks: Checks,
    sql: SQLCounter,
    *,
    views: int,
) -> BurstResult:
    """Queue ``views`` page views through write-behind sessions; drain them with a worker."""
    # imported here: its write-behind models make every attach() in the process check AOF,
    # and the demo's main cache may sit on a Redis that has it off
    from examples.telemetry import PageView

    result = BurstResult()
    with aof_redis(redis_url, out) as url:
        if url is None:
            result.skipped = "no Redis with AOF"
            return result
        schema.upgrade(engine)  # the worker's offsets and dead letters
        table: Any = PageView.__table__
        table.create(engine, checkfirst=True)
        client = client_from_url(url)
        cache = Cache(client, namespace=namespace)
        factory = sessionmaker(engine)
        cache.attach(factory)
        try:
            _burst(factory, out, checks, sql, views, result)
            before = _count_rows(engine, table)
            out.line(f"Postgres holds {before} page views so far: the rows wait in Redis.")
            checks.expect(before == 0, "nothing reaches Postgres before the worker runs")
            worker = FlushWorker(
                engine, client, namespace=namespace, models=[PageView], batch_size=BATCH_SIZE
            )
            out.line(
                f"A flush worker drains the queue ({PageView.__cache__.partitions} partitions, "
                f"batches of {BATCH_SIZE}, one transaction each):"
            )
            began = time.perf_counter()
            drained = _drain(worker, out, deadline=time.monotonic() + 120)
            elapsed = time.perf_counter() - began
            checks.expect(drained, "the worker drains the queue")
            result.drained, result.batches = worker.applied, worker.batches
            result.rows_in_postgres = _count_rows(engine, table)
            out.line(
                f"Drained: {result.drained:,} page views in {result.batches} batches "
                f"({elapsed:.2f} s, {worker.dead_letters} dead letters); Postgres now holds "
                f"{result.rows_in_postgres:,} rows in page_views."
            )
            checks.expect(result.rows_in_postgres == views, "Postgres holds every queued page view")
        finally:
            cache.detach()
            client.close()
    return result


def _burst(
    factory: sessionmaker[Any],
    out: Output,
    checks: Checks,
    sql: SQLCounter,
    views: int,
    result: BurstResult,
) -> None:
    from examples.telemetry import PageView

    commits = (views + COMMIT_SIZE - 1) // COMMIT_SIZE
    sql_before = sql.count
    began = time.perf_counter()
    last_id = None
    for c in range(commits):
        with factory() as session:
            batch = [
                PageView(path=f"/products/{i % 97 + 1}", product_id=i % 97 + 1, duration_ms=i % 900)
                for i in range(c * COMMIT_SIZE, min(views, (c + 1) * COMMIT_SIZE))
            ]
            session.add_all(batch)
            session.commit()
            last_id = batch[-1].id
            result.queued += len(batch)
    elapsed = time.perf_counter() - began
    used = sql.count - sql_before
    out.line(
        f"{result.queued:,} page views committed in {commits} commits of up to {COMMIT_SIZE} "
        f"in {elapsed:.2f} s ({elapsed / commits * 1000:.1f} ms per commit), with {used} SQL "
        "statements: each commit queued its rows in Redis, in one script."
    )
    checks.expect(used == 0, "write-behind commits send no SQL")
    with factory() as session:
        sql_before = sql.count
        view = session.get(PageView, last_id)
        used = sql.count - sql_before
    out.line(
        f"A fresh session reads the last one by primary key at once ({used} SQL): "
        f"{view.path if view else None!r}, from its queued state."
    )
    checks.expect(view is not None and used == 0, "a queued page view is read from Redis")
