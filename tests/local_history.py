"""Multi-process check of the local tier's guarantee, with faults (issue 14).

Several processes, each with a ``Cache(local=True)``, read and write a few hot rows. Each
row has a ``version`` that every write raises by one (under the row lock). After a write's
``commit()`` returns, its process sends ``(row, version)`` to every other process through a
pipe (a ``multiprocessing.Queue`` each); a process's receiving thread raises its *floor* of
that row. Every read notes the floor of the rows it reads before it starts, and fails the
run if it returns an older version: a read that started after it learnt of a commit is
causally after that commit, and docs/guarantees.md promises it the commit's data.

The reads are ``session.get`` (the local tier's fast path), a ``FromCache`` query by id and
a ``FromCache`` query of every row; the writes go through the ORM (``SELECT ... FOR
UPDATE``, increment, commit) and through Core (``engine.begin()``). Meanwhile the test
(tests/chaos/test_local_history.py) kills the invalidation connections, stops a process
with SIGSTOP and resumes it, and restarts Redis.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import multiprocessing
import os
import queue
import random
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, FromCache, Strategy

if TYPE_CHECKING:
    from collections.abc import Callable

STRATEGIES = ("cache_aside", "write_through")
_WRITE_SHARE = 0.08


class LocalHistoryBase(DeclarativeBase):
    """Declarative base of the local-tier history tables."""


class LocalHistoryRow(LocalHistoryBase):
    """A hot row: ``version`` counts its committed writes."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(nullable=False)
    payload: Mapped[str] = mapped_column(String(40), nullable=False)


@functools.cache
def local_history_model(strategy: str) -> type[LocalHistoryRow]:
    """The model of ``strategy``'s table, defined once per process (see history_checker)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; pick one of {STRATEGIES}")
    name = "LocalHistory" + "".join(part.title() for part in strategy.split("_"))
    namespace = {
        "__tablename__": f"sarc_local_history_{strategy}",
        "__cache__": CachePolicy(strategy=Strategy(strategy)),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"The hot rows of the local-tier history under {strategy}.",
    }
    return type(name, (LocalHistoryRow,), namespace)


def prepare_table(engine: sa.Engine, strategy: str, rows: int) -> None:
    """(Re)create ``strategy``'s table with ``rows`` rows at version 0."""
    model = local_history_model(strategy)
    model.__table__.drop(engine, checkfirst=True)  # type: ignore[attr-defined]
    model.__table__.create(engine)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(
            sa.insert(model), [{"id": i, "version": 0, "payload": "v0"} for i in range(rows)]
        )


@dataclass(frozen=True, slots=True)
class Config:
    """One run's settings, the same in every process."""

    database_url: str
    redis_urls: tuple[str, ...]  # per process: some reach Redis through a slow proxy
    namespace: str
    strategy: str
    rows: int
    lease: float
    seed: int
    # processes that only read: one the test stops with SIGSTOP must be among them, as a
    # writer stopped inside its transaction would hold its row lock and stall every other
    # writer (a test of Postgres, not of the cache)
    readers_only: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Shared:
    """What the processes share with the test: counters, events, the pipes.

    What a process touches while the run goes on takes no lock: a process stopped with
    SIGSTOP while it held one (a synchronized counter's, an Event's) stalled every other
    process at its next read of that counter or of the stop flag. Each process counts in
    its own slot, and the flag is a plain shared byte.
    """

    read_counts: Any  # multiprocessing.RawArray("q", processes): each process's own
    write_counts: Any
    halt: Any  # RawValue("b"): 1 once the processes are to stop
    ready: Any  # multiprocessing.Semaphore-like counter: Value("i")
    go: Any  # Event
    inboxes: list[Any]  # one Queue per process
    results: Any  # Queue

    def reads(self) -> int:
        """The reads every process counted so far."""
        return sum(self.read_counts)

    def writes(self) -> int:
        """The writes every process counted so far."""
        return sum(self.write_counts)


def run_processes(
    config: Config,
    during: Callable[[Shared, list[Any]], None],
    *,
    deadline: float = 120.0,
    start_method: str = "forkserver",
) -> list[dict[str, Any]]:
    """Run one worker process per URL of ``config``, call ``during(shared, processes)``
    once all are ready and released (it makes the faults and returns when the run has
    done enough), then stop them and return their results, each checked by
    :func:`assert_no_stale_read`.

    Example::

        results = run_processes(config, lambda shared, procs: until_reads(shared, 5000))
        assert_no_stale_read(results)
    """
    context: Any = multiprocessing.get_context(start_method)  # typeshed: BaseContext, no Process
    shared = Shared(
        read_counts=context.RawArray("q", len(config.redis_urls)),
        write_counts=context.RawArray("q", len(config.redis_urls)),
        halt=context.RawValue("b", 0),
        ready=context.Value("i", 0),
        go=context.Event(),
        inboxes=[context.Queue() for _ in config.redis_urls],
        results=context.Queue(),
    )
    dumps = Path(tempfile.mkdtemp(prefix="local-history-"))
    procs = [
        context.Process(target=worker, args=(config, i, shared, str(dumps)), daemon=True)
        for i in range(len(config.redis_urls))
    ]
    for proc in procs:
        proc.start()
    results: list[dict[str, Any]] = []
    stalled: AssertionError | None = None
    stacks = ""
    try:
        until(lambda: shared.ready.value == len(procs), "every process ready", deadline)
        shared.go.set()
        during(shared, procs)
    except AssertionError as exc:
        # a run that made no progress: say where each process was, or the failure is a guess
        stalled, stacks = exc, _stacks(procs, dumps)
    finally:
        shared.halt.value = 1
        results.extend(shared.results.get(timeout=deadline) for _ in procs)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    if stalled is not None:
        # a process that died stops the run's progress too: its traceback is the reason
        fatal = "\n".join(r["fatal"] for r in results if r["kind"] == "fatal")
        raise AssertionError(f"{stalled}\n{fatal}\n{stacks}") from stalled
    return results


def _stacks(procs: list[Any], dumps: Path, wait: float = 10.0) -> str:
    """Every live process's threads' stacks (faulthandler, on SIGUSR1), for a failure."""
    asked = []
    for index, proc in enumerate(procs):
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process dumps once resumed
                os.kill(proc.pid, signal.SIGUSR1)
                asked.append(index)
    ends = time.monotonic() + wait
    texts = []
    for index in asked:
        path = dumps / f"worker-{index}.txt"
        # faulthandler writes from its signal handler: read until the text stops growing
        seen = ""
        while time.monotonic() < ends:
            text = _read(path)
            if "File" in text and text == seen:
                break
            seen = text
            time.sleep(0.05)
        texts.append(f"--- worker {index} ---\n{seen or '(no dump)'}")
    return "\n".join(texts)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def until(condition: Callable[[], bool], what: str, deadline: float = 120.0) -> None:
    """Poll the run's counters (progress the processes make by themselves)."""
    ends = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < ends, f"the processes made no progress: {what}"
        time.sleep(0.02)


def assert_no_stale_read(results: list[dict[str, Any]]) -> None:
    """No process died and no read returned older data than an announced commit."""
    fatal = [r["fatal"] for r in results if r["kind"] == "fatal"]
    assert not fatal, "\n".join(fatal)
    violations = [v for r in results for v in r["violations"]]
    assert violations == [], "\n".join(violations[:20])


def worker(config: Config, index: int, shared: Shared, dumps: str) -> None:
    """A process of the run: reports ``{"worker", "kind": "done"|"fatal", ...}``; SIGUSR1
    writes its threads' stacks to ``<dumps>/worker-<index>.txt``."""
    dump = Path(dumps, f"worker-{index}.txt").open("w")  # noqa: SIM115 - open while it lives
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    try:
        payload = _Worker(config, index, shared).run()
    except BaseException:
        payload = {"worker": index, "kind": "fatal", "fatal": traceback.format_exc()}
    shared.results.put(payload)


class _Worker:
    def __init__(self, config: Config, index: int, shared: Shared) -> None:
        self.config = config
        self.index = index
        self.shared = shared
        self.model = local_history_model(config.strategy)
        self.engine = sa.create_engine(config.database_url, pool_size=3)
        self.cache = Cache(
            config.redis_urls[index],
            namespace=config.namespace,
            local=True,
            local_lease=config.lease,
            stats_publish_interval=0,
        )
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.factory)
        self.floor = [0] * config.rows
        self.floor_lock = threading.Lock()
        self.random = random.Random(config.seed * 1000 + index)
        self.violations: list[str] = []
        self.counts = {"reads": 0, "writes": 0}

    def run(self) -> dict[str, Any]:
        tier = self.cache.inspector.local_tier
        assert tier is not None
        if not tier.wait_ready(30):
            raise RuntimeError("the local tier never got ready")
        with self.shared.ready.get_lock():
            self.shared.ready.value += 1
        receiver = threading.Thread(target=self._receive, daemon=True)
        receiver.start()
        if not self.shared.go.wait(60):
            raise RuntimeError("never released")
        try:
            writes = self.index not in self.config.readers_only
            while not self.shared.halt.value:
                if writes and self.random.random() < _WRITE_SHARE:
                    self._write()
                else:
                    self._read()
        finally:
            stats = self.cache.stats()
            self.cache.detach()
            self.engine.dispose()
        return {
            "worker": self.index,
            "kind": "done",
            "violations": self.violations,
            "reads": self.counts["reads"],
            "writes": self.counts["writes"],
            "local_hits": stats["total"]["local_hits"],
            "fence_waits": stats["total"]["fence_waits"],
            "breaks": tier.breaks,
            "lapses": tier.lapses,
        }

    def _receive(self) -> None:
        inbox = self.shared.inboxes[self.index]
        while True:
            try:
                row, version = inbox.get(timeout=0.5)
            except queue.Empty:
                if self.shared.halt.value:
                    return
                continue
            with self.floor_lock:
                self.floor[row] = max(self.floor[row], version)

    # -- writes ------------------------------------------------------------------------------

    def _write(self) -> None:
        row = self.random.randrange(self.config.rows)
        model = self.model
        if self.random.random() < 0.5:
            with self.factory() as s:
                obj = s.get(model, row, with_for_update=True)
                assert obj is not None
                obj.version += 1
                obj.payload = f"v{obj.version}"
                version = obj.version
                s.commit()
        else:
            with self.engine.begin() as conn:
                version = conn.execute(
                    update(model)
                    .where(model.id == row)
                    .values(version=model.version + 1, payload="core")
                    .returning(model.version)
                ).scalar_one()
        # commit() has returned: tell everyone
        with self.floor_lock:
            self.floor[row] = max(self.floor[row], version)
        for i, inbox in enumerate(self.shared.inboxes):
            if i != self.index:
                inbox.put((row, version))
        self.counts["writes"] += 1
        self.shared.write_counts[self.index] += 1

    # -- reads -------------------------------------------------------------------------------

    def _read(self) -> None:
        model = self.model
        kind = self.random.choice(("get", "get", "query", "list"))
        with self.floor_lock:
            floor = list(self.floor)
        with self.factory() as s:
            if kind == "get":
                row = self.random.randrange(self.config.rows)
                obj = s.get(model, row)
                assert obj is not None
                seen = {row: obj.version}
            elif kind == "query":
                row = self.random.randrange(self.config.rows)
                stmt = select(model).where(model.id == row).options(FromCache())
                seen = {row: s.scalars(stmt).one().version}
            else:
                stmt = select(model).order_by(model.id).options(FromCache())
                seen = {o.id: o.version for o in s.scalars(stmt)}
        for row, version in seen.items():
            if version < floor[row]:
                self.violations.append(
                    f"worker {self.index} {kind}: row {row} at version {version}, "
                    f"but version {floor[row]} had been committed and announced"
                )
        self.counts["reads"] += 1
        if self.counts["reads"] % 50 == 0:
            self.shared.read_counts[self.index] += 50
