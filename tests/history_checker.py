"""Randomized history check of read-after-write across processes (docs/design.md, "Consistency",
issue 4).

Several worker processes, each with several threads, run random reads and writes on a small
hot set of rows of a table of their own for a bounded time. Every row carries a ``version``
that each write raises by one (under the row lock, so per row the versions are unique and
grow in commit order). Every read is logged with the versions it saw and its start and end
times; every write with its new version and the start and end of its ``commit()``. Then
:func:`check_history` applies guarantee 1 of docs/design.md, "Consistency": a read that *started*
after a
write's ``commit()`` *returned* must not see an older version of that row.

Reads: a ``FromCache`` query by id, a ``FromCache`` query of every row, ``session.get``
(the entity cache). Writes (:data:`WRITE_KINDS`): ORM (``SELECT ... FOR UPDATE``, increment,
commit), ORM bulk ``update()`` through the session, Core DML in ``engine.begin()``, Core DML
committed with ``Connection.commit()`` on a connection that is used afterwards, and ``text()``
DML through the session.

Times come from ``CLOCK_MONOTONIC`` on Linux, a system-wide clock that never jumps, so the
processes' stamps compare (``time.time_ns()`` elsewhere). Each worker process builds its own
engine, Redis client, ``Cache`` and sessionmaker; the processes are started with the
``forkserver`` method (``spawn`` by hand), report ready, are released together by one event,
and are always ended (joined, else terminated, else killed).

In the test suite: ``tests/integration/test_history.py``. By hand, longer::

    python -m tests.history_checker --seconds 60
    python -m tests.history_checker --strategy write_through --writes orm,bulk --seconds 30
"""

from __future__ import annotations

import argparse
import bisect
import functools
import multiprocessing
import queue
import random
import secrets
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy import String, event, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from sa_redis_cache import Cache, CachePolicy, FromCache, Strategy

STRATEGIES = ("cache_aside", "write_through")
READ_KINDS = ("get", "query", "list")
WRITE_KINDS = ("orm", "bulk", "core_begin", "core_commit", "text")
DEFAULT_WRITES = WRITE_KINDS
_READ_WEIGHTS = {"get": 30, "query": 25, "list": 15}
# The run alternates calm phases, where fills succeed and reads hit, with write storms,
# where reads race writes. Each storm is of two write kinds drawn from the run's seed and
# the phase's number, so that two paths race hard rather than five mildly. The phases
# follow the clock from the common start, so all workers share them.
_PHASE_NS = 40_000_000
_STORM_EVERY = 3  # one phase in this many is a storm
_STORM_KINDS = 2
_WRITE_SHARE = {"calm": 0.03, "storm": 0.4}  # of all operations


# --------------------------------------------------------------------------- clock


if sys.platform.startswith("linux"):

    def now_ns() -> int:
        """A time stamp in ns that compares across processes on this machine."""
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC)

else:  # pragma: no cover - the suite runs on Linux

    def now_ns() -> int:
        """A time stamp in ns that compares across processes on this machine."""
        return time.time_ns()


# --------------------------------------------------------------------------- models


class HistoryBase(DeclarativeBase):
    """Declarative base of the history tables (kept apart from the shop's)."""


class HistoryRow(HistoryBase):
    """A row of the hot set: ``version`` counts the committed writes of the row."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(nullable=False)
    payload: Mapped[str] = mapped_column(String(40), nullable=False)


@functools.cache
def history_model(strategy: str) -> type[HistoryRow]:
    """The model of ``strategy``'s table, defined on first use in each process.

    Defined lazily, not at import: ``python -m tests.history_checker`` makes each spawned
    child import this file twice (as ``__mp_main__`` and as ``tests.history_checker``), and
    a model defined at import would then be mapped twice. Workers call this before
    ``cache.attach``, and every process names the class alike, so the entries one process
    writes are read by the others.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; pick one of {STRATEGIES}")
    name = "HistoryRow" + "".join(part.title() for part in strategy.split("_"))
    namespace = {
        "__tablename__": f"sarc_history_{strategy}",
        "__cache__": CachePolicy(strategy=Strategy(strategy)),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"The hot rows of the history check under {strategy}.",
    }
    return type(name, (HistoryRow,), namespace)


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True, slots=True)
class Read:
    """One row as one read saw it. ``source`` is ``cache`` when no SQL ran for the read."""

    kind: str
    row: int
    version: int
    start: int
    end: int
    worker: str
    source: str

    def describe(self, origin: int) -> str:
        return (
            f"{self.kind} read by {self.worker} from the {self.source} saw version "
            f"{self.version}, ran [{_ms(self.start, origin)}, {_ms(self.end, origin)}]"
        )


@dataclass(frozen=True, slots=True)
class Write:
    """One committed write of one row: its new version and its ``commit()`` call's span."""

    kind: str
    row: int
    version: int
    start: int
    end: int
    worker: str

    def describe(self, origin: int) -> str:
        return (
            f"{self.kind} write by {self.worker} to version {self.version}, commit() ran "
            f"[{_ms(self.start, origin)}, {_ms(self.end, origin)}]"
        )


def _ms(stamp: int, origin: int) -> str:
    return f"{(stamp - origin) / 1e6:+.3f} ms"


@dataclass(frozen=True, slots=True)
class Violation:
    """A read the history forbids.

    ``stale``: the read started after ``write``'s ``commit()`` returned and saw an older
    version (``write`` is the newest such write of the row; ``seen`` produced the version
    the read saw, None for the initial one). ``future``: the read ended before ``write``,
    the commit that produced the version it saw, had begun. ``unknown``: no write produced
    the version it saw.
    """

    kind: str
    read: Read
    write: Write | None
    seen: Write | None = None

    def describe(self, origin: int) -> str:
        head = f"row {self.read.row}: {self.kind}: {self.read.describe(origin)}"
        if self.write is None:
            return head + "; no write produced that version"
        if self.kind != "stale":
            return f"{head}, before its {self.write.describe(origin)}"
        gap = (self.read.start - self.write.end) / 1e6
        seen = "the seed" if self.seen is None else self.seen.describe(origin)
        return (
            f"{head}, but {self.write.describe(origin)} returned {gap:.3f} ms before the "
            f"read started; the version seen came from {seen}"
        )


def check_history(
    reads: Iterable[Read],
    writes: Iterable[Write],
    initial: dict[int, int],
    uncertain: Iterable[tuple[int, int]] = (),
) -> list[Violation]:
    """Every read the history forbids (empty when the history is consistent).

    ``initial`` is each row's version before the run; ``uncertain`` holds the (row, version)
    of writes whose ``commit()`` raised, which may or may not have committed: a read may
    see them, and they bound nothing.

    Example::

        >>> w = Write("orm", 1, 1, start=10, end=20, worker="p0t0")
        >>> r = Read("get", 1, 0, start=30, end=40, worker="p1t0", source="cache")
        >>> [v.kind for v in check_history([r], [w], {1: 0})]
        ['stale']
    """
    by_row: dict[int, list[Write]] = {}
    produced: dict[tuple[int, int], Write] = {}
    for w in writes:
        by_row.setdefault(w.row, []).append(w)
        produced[(w.row, w.version)] = w
    maybe = set(uncertain) | set(initial.items())
    # per row: writes by commit end, with the newest version among those ended so far
    ends: dict[int, list[int]] = {}
    newest: dict[int, list[Write]] = {}
    for row, row_writes in by_row.items():
        row_writes.sort(key=lambda w: w.end)
        ends[row] = [w.end for w in row_writes]
        best: list[Write] = []
        for w in row_writes:
            best.append(w if not best or w.version > best[-1].version else best[-1])
        newest[row] = best
    found: list[Violation] = []
    for r in reads:
        source = produced.get((r.row, r.version))
        if source is None and (r.row, r.version) not in maybe:
            found.append(Violation("unknown", r, None))
            continue
        if source is not None and r.end < source.start:
            found.append(Violation("future", r, source))
        done = bisect.bisect_left(ends.get(r.row, []), r.start)  # writes that ended before
        if done:
            latest = newest[r.row][done - 1]
            if latest.version > r.version:
                found.append(Violation("stale", r, latest, source))
    return found


# --------------------------------------------------------------------------- a run


@dataclass(frozen=True, slots=True)
class RunConfig:
    """What every worker process needs (picklable)."""

    database_url: str
    redis_url: str
    namespace: str
    strategy: str
    processes: int
    threads: int
    seconds: float
    rows: int
    writes: tuple[str, ...]
    bypass_writes: bool
    seed: int
    start_timeout: float
    # the table's keys in this slot group (Cache(slot_groups=...)); FromCache(spread=...)
    slot_group: str | None = None
    spread: bool = False


class HistoryError(RuntimeError):
    """The run itself failed (a worker crashed, hung or never started)."""


@dataclass
class HistoryRun:
    """The log of one run, the workers' cache counters, and the checker over them."""

    config: RunConfig
    initial: dict[int, int]
    reads: list[Read]
    writes: list[Write]
    uncertain: list[tuple[int, int]]
    errors: list[str]
    stats: list[dict[str, Any]]
    reads_by: Counter[tuple[str, str]]
    elapsed: float
    overhead: float
    origin: int
    _violations: list[Violation] | None = field(default=None, repr=False)

    def violations(self) -> list[Violation]:
        """What :func:`check_history` finds in this run (computed once)."""
        if self._violations is None:
            self._violations = check_history(self.reads, self.writes, self.initial, self.uncertain)
        return self._violations

    def counter(self, scope: str, name: str) -> int:
        """A cache counter summed over the worker processes; ``scope`` is e.g.
        ``total``, ``regions.default`` or ``models.<ModelName>``."""
        total = 0
        for snapshot in self.stats:
            node: Any = snapshot
            for part in scope.split("."):
                node = node.get(part, {}) if isinstance(node, dict) else {}
            total += int(node.get(name, 0)) if isinstance(node, dict) else 0
        return total

    def summary(self) -> str:
        """Counts of the run, one paragraph."""
        by = self.reads_by
        reads = ", ".join(
            f"{kind} {by[(kind, 'cache')]}/{by[(kind, 'cache')] + by[(kind, 'db')]}"
            for kind in READ_KINDS
        )
        writes = Counter(w.kind for w in self.writes)
        model = history_model(self.config.strategy).__name__
        return (
            f"{self.config.strategy}: {self.config.processes} processes x "
            f"{self.config.threads} threads, {self.elapsed:.2f} s (+{self.overhead:.2f} s to "
            f"start and stop them); reads served from the "
            f"cache/total: {reads}; writes: {dict(writes)} ({len(self.uncertain)} uncertain); "
            f"cache counters: hits {self.counter('total', 'hits')}, misses "
            f"{self.counter('total', 'misses')}, fills {self.counter('total', 'fills')}, "
            f"refused fills {self.counter('total', 'fill_refused')}, errors "
            f"{self.counter('total', 'errors')}; FromCache hits "
            f"{self.counter('regions.default', 'hits')}, {model} hits (entity and query) "
            f"{self.counter('models.' + model, 'hits')}; operation errors {len(self.errors)}"
        )

    def report(self, limit: int = 20) -> str:
        """The summary, then the violations (first ``limit``) and operation errors."""
        found = self.violations()
        lines = [self.summary(), f"{len(found)} violation(s); times relative to the start:"]
        lines += ["  " + v.describe(self.origin) for v in found[:limit]]
        if len(found) > limit:
            lines.append(f"  ... and {len(found) - limit} more")
        if self.errors:
            lines.append(f"{len(self.errors)} operation error(s), first ones:")
            lines += ["  " + e for e in self.errors[:5]]
        return "\n".join(lines)


def prepare_table(engine: sa.Engine, strategy: str, rows: int) -> dict[int, int]:
    """Create ``strategy``'s table if needed and reset its rows 1..rows to version 0."""
    table: sa.Table = history_model(strategy).__table__  # type: ignore[assignment]
    HistoryBase.metadata.create_all(engine, tables=[table])
    with engine.begin() as conn:
        conn.execute(sa.delete(table))
        conn.execute(
            sa.insert(table),
            [{"id": k, "version": 0, "payload": "seed"} for k in range(1, rows + 1)],
        )
    return dict.fromkeys(range(1, rows + 1), 0)


def run_history(
    database_url: str,
    redis_url: str,
    namespace: str,
    *,
    strategy: str,
    processes: int = 2,
    threads: int = 3,
    seconds: float = 3.0,
    rows: int = 5,
    writes: Sequence[str] = DEFAULT_WRITES,
    bypass_writes: bool = False,
    seed: int | None = None,
    start_timeout: float = 30.0,
    start_method: str = "forkserver",
    slot_group: str | None = None,
    spread: bool = False,
) -> HistoryRun:
    """Run the workers for ``seconds`` and return their merged log.

    ``writes`` are the write kinds to draw from (:data:`WRITE_KINDS`). ``bypass_writes``
    makes the workers write through an engine and sessionmaker the cache is not attached
    to (the checker's own test: that must produce stale reads). ``slot_group`` puts the
    table in that slot group; ``spread`` spreads the query entries by their digest. Raises
    :class:`HistoryError` when a worker crashes, hangs or never starts; every worker
    process is ended before this returns.
    """
    unknown = set(writes) - set(WRITE_KINDS)
    if unknown or not writes:
        raise ValueError(f"writes={writes!r}; choose among {WRITE_KINDS}")
    config = RunConfig(
        database_url=database_url,
        redis_url=redis_url,
        namespace=namespace,
        strategy=strategy,
        processes=processes,
        threads=threads,
        seconds=seconds,
        rows=rows,
        writes=tuple(writes),
        bypass_writes=bypass_writes,
        seed=secrets.randbits(32) if seed is None else seed,
        start_timeout=start_timeout,
        slot_group=slot_group,
        spread=spread,
    )
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        initial = prepare_table(engine, strategy, rows)
    finally:
        engine.dispose()
    ctx: Any = multiprocessing.get_context(start_method)  # typeshed: BaseContext, no Process
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["tests.history_checker"])
    go, cancelled = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker_process,
            args=(config, i, go, cancelled, results),
            name=f"history-worker-{i}",
            daemon=True,
        )
        for i in range(processes)
    ]
    launched = time.monotonic()
    try:
        for proc in procs:
            proc.start()
        ready, failed = _gather(results, procs, "ready", launched + start_timeout)
        if len(ready) < processes:
            cancelled.set()
            go.set()  # the ready ones exit at once
            raise HistoryError("the workers did not all start:\n" + _failures(failed, procs))
        origin = now_ns()
        began = time.monotonic()
        go.set()
        done, failed = _gather(results, procs, "done", began + seconds + 30)
        elapsed = time.monotonic() - began
    finally:
        _end(procs)
        results.close()
        results.cancel_join_thread()
    overhead = time.monotonic() - launched - seconds
    if len(done) < processes:
        raise HistoryError("a worker failed:\n" + _failures(failed, procs))
    payloads = list(done.values())
    return HistoryRun(
        config=config,
        initial=initial,
        reads=[Read(*r) for p in payloads for r in p["reads"]],
        writes=[Write(*w) for p in payloads for w in p["writes"]],
        uncertain=[(u[0], u[1]) for p in payloads for u in p["uncertain"]],
        errors=[e for p in payloads for e in p["errors"]],
        reads_by=_sum_counts(c for p in payloads for c in p["counts"]),
        stats=[p["stats"] for p in payloads],
        elapsed=elapsed,
        overhead=overhead,
        origin=origin,
    )


def _sum_counts(counts: Iterable[Sequence[Any]]) -> Counter[tuple[str, str]]:
    total: Counter[tuple[str, str]] = Counter()
    for kind, source, n in counts:
        total[(kind, source)] += n
    return total


def _gather(
    results: Any, procs: list[Any], kind: str, deadline: float
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The workers' messages of ``kind``, and their failures, by worker.

    Waits until every worker has sent one or the other, or has exited without a word,
    or ``deadline`` has passed.
    """
    got: dict[int, dict[str, Any]] = {}
    failed: dict[int, str] = {}
    seen_exited = False
    while len(got) + len(failed) < len(procs):
        try:
            message = results.get(timeout=0.2)
        except queue.Empty:
            waiting = [i for i in range(len(procs)) if i not in got and i not in failed]
            exited = not any(procs[i].is_alive() for i in waiting)
            if time.monotonic() > deadline:
                failed.update(dict.fromkeys(waiting, f"no {kind!r} message in time"))
            elif exited and seen_exited:  # a last message would have come by now
                failed.update(dict.fromkeys(waiting, "exited without a word"))
            seen_exited = exited
            continue
        if message["kind"] == "fatal":
            failed[message["worker"]] = message["fatal"]
        elif message["kind"] == kind:
            got[message["worker"]] = message
    return got, failed


def _end(procs: list[Any]) -> None:
    """Join each worker briefly; terminate, then kill, those still running."""
    for proc in procs:
        if proc.pid is None:
            continue
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _failures(failed: dict[int, str], procs: list[Any]) -> str:
    parts = [
        f"worker {i} (exit code {procs[i].exitcode}):\n{text}" for i, text in sorted(failed.items())
    ]
    return "\n".join(parts) or "no details"


# --------------------------------------------------------------------------- workers


def _worker_process(config: RunConfig, index: int, go: Any, cancelled: Any, results: Any) -> None:
    """Entry point of a worker process: its messages go to ``results``.

    It reports ``ready`` once set up, runs when ``go`` is set (unless ``cancelled`` is),
    and sends its log (``done``) or its traceback (``fatal``).
    """
    try:
        payload = _run_worker(config, index, go, cancelled, results)
    except BaseException:
        payload = {"worker": index, "kind": "fatal", "fatal": traceback.format_exc()}
    results.put(payload)


class _Worker:
    """One process's engine, cache and sessions, shared by its threads."""

    def __init__(self, config: RunConfig, index: int) -> None:
        self.config = config
        self.index = index
        self.model = history_model(config.strategy)
        self.table: sa.Table = self.model.__table__  # type: ignore[assignment]
        self.engine = sa.create_engine(
            config.database_url,
            pool_size=config.threads + 1,
            max_overflow=config.threads,
            pool_timeout=10,
            connect_args={"options": "-c statement_timeout=10000 -c lock_timeout=10000"},
        )
        groups = None if config.slot_group is None else {config.slot_group: [self.table.fullname]}
        self.cache = Cache(config.redis_url, namespace=config.namespace, slot_groups=groups)
        self.option = FromCache(spread=config.spread)
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.factory)
        # the checker's own test: writes the cache never hears of, on an engine of their
        # own (an attached factory's engine reports Core DML, whatever session runs it)
        self.write_engine = self.engine
        self.write_factory = self.factory
        if config.bypass_writes:
            self.write_engine = sa.create_engine(config.database_url, poolclass=NullPool)
            self.write_factory = sessionmaker(self.write_engine)
        self.local = threading.local()
        event.listen(self.engine, "before_cursor_execute", self._count_sql)
        self.started = self.deadline = 0
        self.go = threading.Event()
        self._weights: dict[int, list[float]] = {}

    def weights(self, phase: int) -> list[float]:
        """The weights of the reads (READ_KINDS order), then the writes, in ``phase``."""
        found = self._weights.get(phase)
        if found is None:
            kinds = self.config.writes
            share = _WRITE_SHARE["calm"]
            if phase % _STORM_EVERY == _STORM_EVERY - 1:
                share = _WRITE_SHARE["storm"]
                draw = random.Random(f"{self.config.seed}:{phase}")
                kinds = tuple(draw.sample(kinds, min(_STORM_KINDS, len(kinds))))
            reads = [float(_READ_WEIGHTS[k]) for k in READ_KINDS]
            each = sum(reads) * share / (1 - share) / len(kinds)
            found = reads + [each if k in kinds else 0.0 for k in self.config.writes]
            self._weights[phase] = found
        return found

    def _count_sql(self, *args: Any) -> None:
        self.local.sql = getattr(self.local, "sql", 0) + 1

    def sql_count(self) -> int:
        return int(getattr(self.local, "sql", 0))

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._count_sql)
        self.engine.dispose()
        self.write_engine.dispose()
        self.cache.client.close()


class _Thread:
    """The log and the operations of one worker thread."""

    def __init__(self, worker: _Worker, name: str, seed: int) -> None:
        self.w = worker
        self.name = name
        self.rng = random.Random(seed)
        self.reads: list[tuple[Any, ...]] = []
        self.writes: list[tuple[Any, ...]] = []
        self.uncertain: list[tuple[int, int]] = []
        self.errors: list[str] = []
        reads: dict[str, Callable[[], None]] = {
            "get": self.read_get,
            "query": self.read_query,
            "list": self.read_list,
        }
        writes: dict[str, Callable[[int], None]] = {
            "orm": self.write_orm,
            "bulk": self.write_bulk,
            "core_begin": self.write_core_begin,
            "core_commit": self.write_core_commit,
            "text": self.write_text,
        }
        self.ops: list[tuple[str, Callable[[], None]]] = list(reads.items())
        self.ops += [(k, functools.partial(self.write, writes[k])) for k in worker.config.writes]
        self.counts: Counter[tuple[str, str]] = Counter()

    def run(self) -> None:
        w = self.w
        if not w.go.wait(w.config.start_timeout + 5):
            self.errors.append(f"{self.name}: never started")
            return
        while (now := now_ns()) < w.deadline:
            weights = w.weights((now - w.started) // _PHASE_NS)
            name, op = self.rng.choices(self.ops, weights)[0]
            try:
                op()
            except Exception as exc:
                self.counts[(name, "error")] += 1
                if len(self.errors) < 50:
                    self.errors.append(f"{self.name}: {name}: {exc!r}")

    def write(self, fn: Callable[[int], None]) -> None:
        fn(self.row())

    def row(self) -> int:
        return self.rng.randint(1, self.w.config.rows)

    # -- reads ----------------------------------------------------------------------------

    def _log_read(self, kind: str, seen: list[tuple[int, int]], start: int, sql: int) -> None:
        end = now_ns()
        source = "cache" if self.w.sql_count() == sql else "db"
        self.counts[(kind, source)] += 1
        self.reads.extend((kind, k, v, start, end, self.name, source) for k, v in seen)

    def read_get(self) -> None:
        k, model = self.row(), self.w.model
        sql, start = self.w.sql_count(), now_ns()
        with self.w.factory() as s:
            got = s.get(model, k)
            assert got is not None, f"row {k} is missing"
            self._log_read("get", [(k, got.version)], start, sql)

    def read_query(self) -> None:
        k, model = self.row(), self.w.model
        sql, start = self.w.sql_count(), now_ns()
        with self.w.factory() as s:
            got = s.scalars(select(model).where(model.id == k).options(self.w.option)).one()
            self._log_read("query", [(k, got.version)], start, sql)

    def read_list(self) -> None:
        model = self.w.model
        sql, start = self.w.sql_count(), now_ns()
        with self.w.factory() as s:
            rows = s.scalars(select(model).order_by(model.id).options(self.w.option)).all()
            assert len(rows) == self.w.config.rows, f"the list read {len(rows)} rows"
            self._log_read("list", [(r.id, r.version) for r in rows], start, sql)

    # -- writes ---------------------------------------------------------------------------

    def _committed(self, kind: str, k: int, version: int, commit: Callable[[], None]) -> None:
        """Run ``commit`` and log the write with the span of the call."""
        start = now_ns()
        try:
            commit()
        except BaseException:
            self.uncertain.append((k, version))
            raise
        self.writes.append((kind, k, version, start, now_ns(), self.name))

    def _payload(self, version: int) -> str:
        return f"v{version}-{self.name}"

    def write_orm(self, k: int) -> None:
        model = self.w.model
        with self.w.write_factory() as s:
            obj = s.scalars(select(model).where(model.id == k).with_for_update()).one()
            obj.version += 1
            obj.payload = self._payload(obj.version)
            self._committed("orm", k, obj.version, s.commit)

    def write_bulk(self, k: int) -> None:
        model = self.w.model
        with self.w.write_factory() as s:
            stmt = (
                update(model)
                .where(model.id == k)
                .values(version=model.version + 1, payload="bulk")
                .returning(model.version)
            )
            version = s.execute(stmt).scalar_one()
            self._committed("bulk", k, version, s.commit)

    def _core_update(self, k: int) -> Any:
        table = self.w.table
        return (
            update(table)
            .where(table.c.id == k)
            .values(version=table.c.version + 1, payload="core")
            .returning(table.c.version)
        )

    def write_core_begin(self, k: int) -> None:
        """``with engine.begin()``: its commit is done when the block has been left."""
        version, start = -1, 0
        try:
            with self.w.write_engine.begin() as conn:
                version = conn.execute(self._core_update(k)).scalar_one()
                start = now_ns()
        except BaseException:
            if start:
                self.uncertain.append((k, version))
            raise
        self.writes.append(("core_begin", k, version, start, now_ns(), self.name))

    def write_core_commit(self, k: int) -> None:
        """Commit-as-you-go: the connection is used again after ``commit()`` returned."""
        with self.w.write_engine.connect() as conn:
            version = conn.execute(self._core_update(k)).scalar_one()
            self._committed("core_commit", k, version, conn.commit)
            conn.execute(select(sa.literal(1))).all()
            conn.commit()

    def write_text(self, k: int) -> None:
        table = self.w.table.name
        sql = text(
            f"UPDATE {table} SET version = version + 1, payload = 'text' "  # noqa: S608
            "WHERE id = :k RETURNING version"
        )
        with self.w.write_factory() as s:
            version = s.execute(sql, {"k": k}).scalar_one()
            self._committed("text", k, version, s.commit)


def _run_worker(
    config: RunConfig, index: int, go: Any, cancelled: Any, results: Any
) -> dict[str, Any]:
    worker = _Worker(config, index)
    try:
        runners = [
            _Thread(worker, f"p{index}t{t}", config.seed * 1000 + index * 100 + t)
            for t in range(config.threads)
        ]
        threads = [threading.Thread(target=r.run, name=r.name, daemon=True) for r in runners]
        for th in threads:
            th.start()
        results.put({"worker": index, "kind": "ready"})
        if not go.wait(config.start_timeout + 10) or cancelled.is_set():
            worker.go.set()  # with the deadline at 0: the threads stop at once
            raise HistoryError("cancelled before the start")
        worker.started = now_ns()
        worker.deadline = worker.started + int(config.seconds * 1e9)
        worker.go.set()
        errors: list[str] = []
        for th in threads:
            th.join(timeout=config.seconds + 20)
            if th.is_alive():
                errors.append(f"{th.name}: still running {config.seconds + 20:.0f} s after start")
        stats = worker.cache.stats()
    finally:
        worker.close()
    return {
        "worker": index,
        "kind": "done",
        "reads": [r for t in runners for r in t.reads],
        "writes": [w for t in runners for w in t.writes],
        "uncertain": [u for t in runners for u in t.uncertain],
        "errors": errors + [e for t in runners for e in t.errors],
        "counts": [(*key, n) for t in runners for key, n in t.counts.items()],
        "stats": stats,
    }


# --------------------------------------------------------------------------- by hand


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """UNLINK every key of ``namespace`` (SCAN, never FLUSH*); return how many went."""
    keys = list(client.scan_iter(match=f"sarc:*{namespace}*", count=1000))
    for i in range(0, len(keys), 500):
        client.unlink(*keys[i : i + 500])
    return len(keys)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.history_checker``: a longer run on a throwaway database."""
    from devservices import bring_up

    parser = argparse.ArgumentParser(prog="python -m tests.history_checker")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--strategy", choices=[*STRATEGIES, "both"], default="both")
    parser.add_argument("--writes", default=",".join(DEFAULT_WRITES), help=str(WRITE_KINDS))
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    strategies = STRATEGIES if args.strategy == "both" else (args.strategy,)
    failed = False
    with bring_up() as services:
        server_url = sa.make_url(services.database_url)
        name = f"sarc_history_{secrets.token_hex(6)}"
        admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        client = redis.Redis.from_url(services.redis_url)
        try:
            url = server_url.set(database=name).render_as_string(hide_password=False)
            for strategy in strategies:
                namespace = f"h{secrets.token_hex(5)}"
                try:
                    run = run_history(
                        url,
                        services.redis_url,
                        namespace,
                        strategy=strategy,
                        processes=args.processes,
                        threads=args.threads,
                        seconds=args.seconds,
                        rows=args.rows,
                        writes=args.writes.split(","),
                        seed=args.seed,
                        # a forkserver preloading this module would warn, in each child,
                        # when multiprocessing runs this (main) module again by name
                        start_method="spawn",
                    )
                finally:
                    delete_namespace(client, namespace)
                print(run.report(), f"(seed {run.config.seed})", flush=True)
                failed = failed or bool(run.violations() or run.errors)
        finally:
            client.close()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return 1 if failed else 0


if __name__ == "__main__":
    # run the importable module's main, so that the workers (spawned by name from
    # tests.history_checker) and this process use the same classes
    from tests.history_checker import main as _main

    sys.exit(_main())
