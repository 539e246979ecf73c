"""Write-behind, measured in one run: commits/s, worker rows/s, and a hot row's writes.

Runnable on its own (it does not go through ``benchmarks.run``)::

    python -m benchmarks.cases_write_behind [--smoke] [--out results.md]

Postgres comes from ``devservices`` (``DATABASE_URL`` or the local server,
else a throwaway one); the benchmark creates a database of its own there and drops it at
the end. The write-behind queue lives in a throwaway ``RedisServer(appendonly=True,
appendfsync="everysec")`` started for the run, as a production queue would (AOF on).

Three measures, printed as one markdown table:

1. **Commits per second**: one new row per ORM ``commit()``, through write-behind (one Lua
   call, no SQL) against a plain ORM session on an identical table (one INSERT and a
   Postgres commit). The contenders run in alternating batches so drift hits both alike;
   no worker runs meanwhile. Target: write-behind ≥ 5x plain.
2. **Rows per second the worker flushes**: a backlog of queued inserts, drained by one
   :class:`~sa_redis_cache.FlushWorker` (``run_once`` until dry), against the floor: a
   raw psycopg batched upsert of the same rows, in transactions of the worker's batch
   size, as ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO UPDATE``. Alternating
   rounds. Target: the worker ≥ 0.7x. For context, two more floors: ``executemany``
   (pipelined), and the unnest statement with its arrays bound in binary, as the worker
   itself does: that is the database's share of the worker's work alone.
3. **Database writes for 1,000 updates to one hot row**, counted by a row-level trigger:
   once with the worker draining after the updates, once with a worker running while
   they are made. A plain ORM session makes one row write per update.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import redis
import sqlalchemy as sa
from sqlalchemy import String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.types import DateTime

from devservices import RedisServer, bring_up, redact
from sa_redis_cache import Cache, CachePolicy, FlushWorker, schema

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

COMMITS_TARGET = 5.0
FLUSH_TARGET = 0.7
BATCH_SIZE = 500
PARTITIONS = 4
HOT_UPDATES = 1000


class WbBase(DeclarativeBase):
    """Base of the benchmark's own tables (apart from the shop's)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class BenchView(WbBase):
    """A page view written behind: UUID key from Python, nothing only the insert knows."""

    __tablename__ = "bench_wb_views"
    __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=PARTITIONS)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    path: Mapped[str] = mapped_column(String(200))
    views: Mapped[int] = mapped_column(default=0)
    note: Mapped[str | None]
    viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PlainView(WbBase):
    """The same table shape, written by plain ORM commits (no cache policy)."""

    __tablename__ = "bench_wb_plain_views"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    path: Mapped[str] = mapped_column(String(200))
    views: Mapped[int] = mapped_column(default=0)
    note: Mapped[str | None]
    viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class HotRow(WbBase):
    """One counter updated many times; a trigger counts the row writes it receives."""

    __tablename__ = "bench_wb_hot"
    __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=1)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    hits: Mapped[int] = mapped_column(default=0)


FLOOR_TABLE = "bench_wb_floor"
COLUMNS = ("id", "path", "views", "note", "viewed_at")
COUNT_WRITES = f"""
CREATE TABLE IF NOT EXISTS bench_wb_writes (n bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (LIKE bench_wb_plain_views INCLUDING ALL);
CREATE OR REPLACE FUNCTION bench_wb_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN UPDATE bench_wb_writes SET n = n + 1; RETURN NULL; END $$;
DROP TRIGGER IF EXISTS bench_wb_hot_writes ON bench_wb_hot;
CREATE TRIGGER bench_wb_hot_writes AFTER INSERT OR UPDATE OR DELETE ON bench_wb_hot
    FOR EACH ROW EXECUTE FUNCTION bench_wb_count();
"""  # noqa: S608 - constant table names
FLOOR_UPSERT = f"""
INSERT INTO {FLOOR_TABLE} (id, path, views, note, viewed_at)
SELECT * FROM unnest(%s::uuid[], %s::varchar[], %s::int[], %s::varchar[], %s::timestamptz[])
ON CONFLICT (id) DO UPDATE SET path = excluded.path, views = excluded.views,
    note = excluded.note, viewed_at = excluded.viewed_at
"""  # noqa: S608 - constant table names


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much to do; ``--smoke`` is a quick check that everything runs."""

    commit_batches: int
    commits_per_batch: int
    backlog: int
    flush_rounds: int


FULL = Sizes(commit_batches=10, commits_per_batch=300, backlog=20_000, flush_rounds=3)
SMOKE = Sizes(commit_batches=4, commits_per_batch=50, backlog=2_000, flush_rounds=1)


@dataclass(slots=True)
class Row:
    """One line of the report table."""

    measure: str
    ours: str
    baseline: str
    ratio: str
    target: str
    met: str


@dataclass(slots=True)
class World:
    """The benchmark's database, Redis and sessions."""

    url: str
    redis_url: str
    client: redis.Redis
    cache: Cache
    namespace: str
    wb_engine: sa.Engine
    plain_engine: sa.Engine
    worker_engine: sa.Engine
    wb: sessionmaker[Session]
    plain: sessionmaker[Session]


# --------------------------------------------------------------------------- set-up


@contextmanager
def _database(server_url: str) -> Iterator[str]:
    """A database of our own on the server (dropped at the end)."""
    admin_url = sa.make_url(server_url)
    name = f"sarc_bench_wb_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def world(server_url: str) -> Iterator[World]:
    """Database, a throwaway AOF Redis (everysec), a cache and three engines."""
    with ExitStack() as stack:
        url = stack.enter_context(_database(server_url))
        server = stack.enter_context(RedisServer(appendonly=True, appendfsync="everysec"))
        engines = [sa.create_engine(url) for _ in range(3)]
        for engine in engines:
            stack.callback(engine.dispose)
        wb_engine, plain_engine, worker_engine = engines
        schema.upgrade(wb_engine)
        WbBase.metadata.create_all(wb_engine)
        with wb_engine.begin() as conn:
            conn.exec_driver_sql(COUNT_WRITES)
        client = redis.Redis.from_url(server.url)
        stack.callback(client.close)
        namespace = f"benchwb{secrets.token_hex(3)}"
        cache = Cache(client, namespace=namespace)
        wb = sessionmaker(wb_engine)
        cache.attach(wb)
        stack.callback(cache.detach)
        yield World(
            url=url,
            redis_url=server.url,
            client=client,
            cache=cache,
            namespace=namespace,
            wb_engine=wb_engine,
            plain_engine=plain_engine,
            worker_engine=worker_engine,
            wb=wb,
            plain=sessionmaker(plain_engine),
        )


def _worker(w: World, models: list[type], **kwargs: Any) -> FlushWorker:
    return FlushWorker(
        w.worker_engine,
        w.client,
        namespace=w.namespace,
        models=models,
        consumer=f"bench-{secrets.token_hex(3)}",
        batch_size=BATCH_SIZE,
        **kwargs,
    )


def _drain(worker: FlushWorker) -> int:
    total = 0
    while True:
        done = worker.run_once()
        total += done
        if not done:
            return total


# --------------------------------------------------------------------------- 1. commits


def _commit_batch(factory: sessionmaker[Session], model: type, count: int) -> float:
    """Seconds for ``count`` commits of one new row each."""
    started = time.perf_counter()
    for i in range(count):
        with factory() as s:
            s.add(model(path=f"/p/{i}", views=i))
            s.commit()
    return time.perf_counter() - started


def commits(w: World, sizes: Sizes) -> Row:
    """ORM commits per second: write-behind against plain, in alternating batches."""
    n = sizes.commits_per_batch
    _commit_batch(w.wb, BenchView, n // 5)  # warm both up: pools, compiled caches, scripts
    _commit_batch(w.plain, PlainView, n // 5)
    ours: list[float] = []
    plain: list[float] = []
    for batch in range(sizes.commit_batches):
        order = [(w.wb, BenchView, ours), (w.plain, PlainView, plain)]
        for factory, model, rates in order if batch % 2 == 0 else order[::-1]:
            rates.append(n / _commit_batch(factory, model, n))
    ours_rate, plain_rate = statistics.median(ours), statistics.median(plain)
    ratio = ours_rate / plain_rate
    # the queued rows are not part of the flush measure: drop them
    drainer = _worker(w, [BenchView])
    _drain(drainer)
    drainer.release()
    return Row(
        "ORM commits/s, one new row each (median of batches)",
        f"{ours_rate:,.0f} write-behind",
        f"{plain_rate:,.0f} plain ORM",
        f"{ratio:.1f}x",
        f"≥ {COMMITS_TARGET:g}x",
        "yes" if ratio >= COMMITS_TARGET else "NO",
    )


# --------------------------------------------------------------------------- 2. flush


def _rows(count: int) -> list[tuple[Any, ...]]:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [
        (
            uuid.uuid4(),
            f"/books/{i % 977}",
            i % 1000,
            None if i % 3 else f"note {i}",
            start + timedelta(microseconds=i * 1001),
        )
        for i in range(count)
    ]


def _queue(w: World, rows: list[tuple[Any, ...]]) -> None:
    """Queue ``rows`` as inserts, 500 per commit (not timed)."""
    for i in range(0, len(rows), 500):
        with w.wb() as s:
            s.add_all(
                BenchView(**dict(zip(COLUMNS, row, strict=True))) for row in rows[i : i + 500]
            )
            s.commit()


def _truncate(w: World, table: str) -> None:
    with w.wb_engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {table}")


def _flush_worker(w: World, rows: list[tuple[Any, ...]], *, profile: str | None = None) -> float:
    """Rows per second one worker flushes from a backlog of ``rows``."""
    _truncate(w, BenchView.__tablename__)
    worker = _worker(w, [BenchView])
    worker.run_once()  # take the leases first: worker start-up is not what is measured
    _queue(w, rows)
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    _drain(worker)
    elapsed = time.perf_counter() - started
    if profile:
        profiler.disable()
        profiler.dump_stats(profile)
    worker.release()
    with w.wb_engine.connect() as conn:
        landed = conn.scalar(select(func.count()).select_from(BenchView))
    if landed != len(rows):
        raise AssertionError(f"the worker landed {landed} of {len(rows)} rows")
    return len(rows) / elapsed


FLOORS = {
    "unnest": "raw psycopg unnest upsert",
    "executemany": "raw psycopg executemany upsert (pipeline)",
    "unnest-binary": "raw psycopg unnest upsert, binary params",
}
"""The floors: the form the target is judged on (unnest), and two for context."""

FLOOR_EXECUTEMANY = f"""
INSERT INTO {FLOOR_TABLE} (id, path, views, note, viewed_at) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET path = excluded.path, views = excluded.views,
    note = excluded.note, viewed_at = excluded.viewed_at
"""  # noqa: S608 - constant table names


def _flush_floor(w: World, rows: list[tuple[Any, ...]], form: str) -> float:
    """Rows per second of a raw psycopg upsert, ``BATCH_SIZE`` rows a transaction.

    ``form``: ``unnest`` (arrays, psycopg's default parameter format), ``unnest-binary``
    (the same with binary parameters, as the worker sends them), or ``executemany``
    (one statement per row, pipelined by psycopg).
    """
    _truncate(w, FLOOR_TABLE)
    conninfo = sa.make_url(w.url).set(drivername="postgresql").render_as_string(hide_password=False)
    statement = FLOOR_UPSERT.replace("%s", "%b") if form == "unnest-binary" else FLOOR_UPSERT
    with psycopg.connect(conninfo) as conn:
        columns = list(zip(*rows, strict=True))
        started = time.perf_counter()
        for i in range(0, len(rows), BATCH_SIZE):
            with conn.transaction():
                if form == "executemany":
                    with conn.cursor() as cursor:
                        cursor.executemany(FLOOR_EXECUTEMANY, rows[i : i + BATCH_SIZE])
                else:
                    conn.execute(statement, [list(c[i : i + BATCH_SIZE]) for c in columns])
        elapsed = time.perf_counter() - started
    return len(rows) / elapsed


def flush(w: World, sizes: Sizes, *, profile: str | None = None) -> list[Row]:
    """Worker rows/s against each floor, in alternating rounds; medians."""
    rows = _rows(sizes.backlog)
    for form in FLOORS:
        _flush_floor(w, rows[:1000], form)  # warm-up
    ours: list[float] = []
    floors: dict[str, list[float]] = {form: [] for form in FLOORS}
    for round_ in range(sizes.flush_rounds):
        forms = list(FLOORS) if round_ % 2 == 0 else list(FLOORS)[::-1]
        if round_ % 2:
            for form in forms:
                floors[form].append(_flush_floor(w, rows, form))
        ours.append(_flush_worker(w, rows, profile=profile if round_ == 0 else None))
        if not round_ % 2:
            for form in forms:
                floors[form].append(_flush_floor(w, rows, form))
    ours_rate = statistics.median(ours)
    out = []
    for form, label in FLOORS.items():
        floor_rate = statistics.median(floors[form])
        ratio = ours_rate / floor_rate
        judged = form == "unnest"
        out.append(
            Row(
                f"rows/s flushed, backlog of {sizes.backlog:,} inserts, "
                f"{BATCH_SIZE}/transaction{'' if judged else ' (context)'}",
                f"{ours_rate:,.0f} worker",
                f"{floor_rate:,.0f} {label}",
                f"{ratio:.2f}x",
                f"≥ {FLUSH_TARGET:g}x" if judged else "-",
                ("yes" if ratio >= FLUSH_TARGET else "NO") if judged else "-",
            )
        )
    return out


# --------------------------------------------------------------------------- 3. hot row


def _writes(w: World) -> int:
    with w.wb_engine.connect() as conn:
        return int(conn.scalar(text("SELECT n FROM bench_wb_writes")) or 0)


def _hot_updates(w: World, count: int, *, between: Callable[[], None] | None = None) -> None:
    for _ in range(count):
        with w.wb() as s:
            row = s.get(HotRow, 1)
            assert row is not None
            row.hits += 1
            s.commit()
        if between is not None:
            between()


def hot_row(w: World) -> list[Row]:
    """Row writes that 1,000 write-behind updates of one row become (trigger-counted)."""
    with w.wb_engine.begin() as conn:
        conn.execute(text("DELETE FROM bench_wb_writes"))
        conn.execute(text("INSERT INTO bench_wb_writes VALUES (0)"))
    with w.wb() as s:
        s.add(HotRow(id=1, hits=0))
        s.commit()
    worker = _worker(w, [HotRow])
    _drain(worker)
    results = []
    # a: the updates first, the worker afterwards (a backlog, as after a burst)
    before = _writes(w)
    _hot_updates(w, HOT_UPDATES)
    _drain(worker)
    after_burst = _writes(w) - before
    # b: a worker flushing while the updates are made (its own thread)
    stop = threading.Event()
    live = _worker(w, [HotRow], block_ms=20)
    worker.release()
    thread = threading.Thread(target=live.run, args=(stop,), daemon=True)
    before = _writes(w)
    thread.start()
    _hot_updates(w, HOT_UPDATES)
    deadline = time.monotonic() + 30
    while _pending(w):
        if time.monotonic() > deadline:
            raise AssertionError("the live worker never flushed the hot row")
        time.sleep(0.01)  # polling observable state (the queue), bounded by the deadline
    stop.set()
    thread.join(30)
    live_writes = _writes(w) - before
    with w.wb_engine.connect() as conn:
        hits = conn.scalar(text("SELECT hits FROM bench_wb_hot WHERE id = 1"))
    if hits != 2 * HOT_UPDATES:
        raise AssertionError(f"hot row holds {hits}, expected {2 * HOT_UPDATES}")
    results.append(
        Row(
            f"row writes for {HOT_UPDATES:,} updates of one row, worker after the burst",
            f"{after_burst:,}",
            f"{HOT_UPDATES:,} plain ORM",
            f"{after_burst / HOT_UPDATES:.3f}x",
            f"≤ {-(-HOT_UPDATES // BATCH_SIZE)} (one per batch)",
            "yes" if after_burst <= -(-HOT_UPDATES // BATCH_SIZE) else "NO",
        )
    )
    results.append(
        Row(
            f"row writes for {HOT_UPDATES:,} updates of one row, worker running",
            f"{live_writes:,}",
            f"{HOT_UPDATES:,} plain ORM",
            f"{live_writes / HOT_UPDATES:.3f}x",
            "-",
            "-",
        )
    )
    return results


def _pending(w: World) -> bool:
    return bool(list(w.client.scan_iter(match=f"sarc:{w.namespace}:*:wbp:*", count=1000)))


# --------------------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    lines = [
        "| measure | write-behind | baseline | ratio | target | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    lines += [
        f"| {r.measure} | {r.ours} | {r.baseline} | {r.ratio} | {r.target} | {r.met} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the three measures and print the table (exit 1 only when a measure crashes)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cases_write_behind")
    parser.add_argument("--smoke", action="store_true", help="small sizes: a quick check")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the first worker drain")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    with bring_up() as services, world(services.database_url) as w:
        print(
            f"postgres {redact(services.database_url)}, queue redis {w.redis_url} "
            "(appendonly yes, appendfsync everysec)",
            file=sys.stderr,
        )
        rows = [commits(w, sizes), *flush(w, sizes, profile=args.profile), *hot_row(w)]
    report = table(rows)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    # a missed target is a finding for the report, not a failure of the run
    return 0


if __name__ == "__main__":
    sys.exit(main())
