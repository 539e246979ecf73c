"""Failure cases: reads while Redis is down (the circuit breaker), and a hot key's expiry
under concurrent readers (stampede control).

**Outage.** A throwaway Redis server (:class:`devservices.RedisServer`, on
a loopback port of its own) serves two caches built from its URL; both are warmed (a
fill, then a hit) while it runs, then it is stopped. Three contenders alternate:

* the uncached ORM query;
* ours with the breaker open: ``breaker_threshold=3`` failures have opened it and
  ``breaker_reset=3600`` keeps it open, so reads go straight to the database;
* ours before the breaker opens, which is what each of the first ``breaker_threshold``
  reads of an outage pays: a refused connection, then the database. Its cache has a
  threshold no run reaches, so that every call is such a read.

A Redis that hangs instead of refusing would cost each of those first reads the socket
timeout; the report says so, the benchmark does not wait for it.

**Stampede.** ``plan.stampede_threads`` threads read one expensive FromCache query (the
join + aggregate of the hit case) whose entry lives :data:`TTL_S` seconds, each read in a
fresh session, with :data:`THINK_S` of other work between reads, under four
configurations: no stampede control, the fill lease alone, the lease with XFetch early
refresh (the defaults), and the lease with ``stale_ttl``. Each configuration reads its
own copy of the query (another label: another cache key and SQL text), and an engine
``before_cursor_execute`` listener counts the statements of each copy that reach
Postgres. The configurations take turns in slices, so that machine load lands on each
alike; every slice starts cold, all threads released at once.

A *refresh* is one expiry of the entry as the readers saw it. A read that sends the
query to the database is charged to the refresh that was current when the read began;
the first such read to return (its fill done) starts the next refresh. Reads that missed
the same expired entry therefore count against the same refresh, however late their own
query runs. "One fill per key per expiry" is database queries per refresh = 1.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.cases_reads import expensive_statement
from benchmarks.common import check_result, counter_probe, entities, orm_contender, snapshot
from benchmarks.harness import (
    TIMES,
    CaseResult,
    Comparison,
    RatioResult,
    Summary,
    Target,
    measure,
)
from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

# -- outage ----------------------------------------------------------------------------

OUTAGE_PRODUCT = 43  # read by no other case
OPEN_AFTER = 3  # breaker_threshold of the cache whose breaker opens
NEVER = 1 << 62  # a breaker_threshold no run reaches: every read tries Redis
HANG_TIMEOUT_S = 0.25  # Cache(url) sets socket_timeout and socket_connect_timeout to this

UNCACHED = "uncached ORM"
BREAKER_OPEN = "ours, Redis down, breaker open"
BREAKER_CLOSED = "ours, Redis down, breaker not yet open (refused connection)"


def _total(cache: Cache, counter: str) -> int:
    return int(cache.stats()["total"][counter])


def _attach_to_url(
    env: BenchEnv, stack: contextlib.ExitStack, url: str, namespace: str, threshold: int
) -> tuple[Cache, sessionmaker[Session]]:
    """A cache built from ``url``, attached to sessions on an engine of their own."""
    cache = Cache(url, namespace=namespace, breaker_threshold=threshold, breaker_reset=3600)
    stack.callback(cache.client.close)
    factory: sessionmaker[Session] = sessionmaker(env.new_engine())
    cache.attach(factory)
    stack.callback(cache.detach)
    return cache, factory


def _timed(factory: sessionmaker[Session], consume: Callable[[Session], object]) -> float:
    """One call in a fresh session, in microseconds (the session itself untimed)."""
    with factory() as session:
        started = time.perf_counter_ns()
        consume(session)
        return (time.perf_counter_ns() - started) / 1000


def outage(env: BenchEnv, plan: Plan) -> CaseResult:
    """Read latency with Redis down, breaker open and not yet open, vs the uncached query."""
    statement = select(Product).where(Product.id == OUTAGE_PRODUCT)
    plain, ours = entities(statement), entities(statement.options(FromCache()))
    with env.plain() as session:
        expected = snapshot(plain(session))
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(RedisServer(appendonly=False))
        opening, opening_sessions = _attach_to_url(
            env, stack, server.url, f"{env.namespace}down", OPEN_AFTER
        )
        refusing, refusing_sessions = _attach_to_url(
            env, stack, server.url, f"{env.namespace}refused", NEVER
        )
        for cache, factory in ((opening, opening_sessions), (refusing, refusing_sessions)):
            for _ in range(2):
                with factory() as session:
                    ours(session)
            if (_total(cache, "fills"), _total(cache, "hits")) != (1, 1):
                notes.append("warm-up: the cache did not fill then hit while Redis was up")
        server.stop()
        # the first reads of the outage: each fails once; the last of them opens the breaker
        first = [_timed(opening_sessions, ours) for _ in range(OPEN_AFTER)]
        if _total(opening, "errors") != OPEN_AFTER:
            notes.append(
                f"{_total(opening, 'errors')} Redis errors in the first {OPEN_AFTER} reads of "
                f"the outage, where one per read opens the breaker"
            )
        notes += check_result(
            env, BREAKER_OPEN, opening_sessions, ours, expected, expect_no_sql=False
        )
        notes += check_result(
            env, BREAKER_CLOSED, refusing_sessions, ours, expected, expect_no_sql=False
        )
        counts = plan.outage
        calls = counts.warmup + counts.iterations
        bypassed = counter_probe(lambda: _total(opening, "bypassed"))
        open_errors = counter_probe(lambda: _total(opening, "errors"))
        refused = counter_probe(lambda: _total(refusing, "errors"))
        result = measure(
            "outage",
            "outage: FromCache 1-row read with Redis stopped (circuit breaker)",
            [
                orm_contender(UNCACHED, env.plain, plain),
                orm_contender(BREAKER_OPEN, opening_sessions, ours),
                orm_contender(BREAKER_CLOSED, refusing_sessions, ours),
            ],
            counts,
            [
                Comparison(
                    row=BREAKER_OPEN,
                    numerator=BREAKER_OPEN,
                    denominator=UNCACHED,
                    label="ours ÷ uncached",
                    target=Target("<=", 1.1),
                    miss_note=(
                        "with the breaker open a FromCache read still finds the statement's "
                        "plan (a dictionary look-up on SQLAlchemy's cache key) before it asks "
                        "the breaker, which it does before keying the entry; the rest is the "
                        "cache's other session and engine listeners (transaction begin and "
                        "end, the write-behind checks, pool checkin), which run whether "
                        "Redis is up or not"
                    ),
                ),
                Comparison(
                    row=BREAKER_CLOSED,
                    numerator=BREAKER_CLOSED,
                    denominator=UNCACHED,
                    label="ours ÷ uncached",
                ),
            ],
        )
        if bypassed() != calls or open_errors():
            notes.append(
                f"breaker open: {bypassed()} of {calls} reads bypassed Redis and "
                f"{open_errors()} tried it (it should have stayed open)"
            )
        if refused() != calls:
            notes.append(f"breaker not yet open: {refused()} of {calls} reads tried Redis")
    result.notes += notes
    s = result.summaries
    base = s[UNCACHED].p50
    result.breakdown.append(
        f"breaker open: a read costs {s[BREAKER_OPEN].p50 - base:+.0f} µs against the uncached "
        f"query's {base:.0f} µs (medians). Before the breaker opens, each of the first "
        f"breaker_threshold={OPEN_AFTER} reads of an outage also pays a refused connection: "
        f"{s[BREAKER_CLOSED].p50 - base:+.0f} µs at the median (this outage's first "
        f"{OPEN_AFTER} reads took {', '.join(f'{v:.0f}' for v in first)} µs, first "
        "connection attempts included). A Redis that hangs instead of refusing (a frozen "
        "server process, a network that drops packets) would cost each of those "
        f"reads the socket timeout instead, {HANG_TIMEOUT_S:g} s for a Cache built from a URL "
        "(socket_timeout and socket_connect_timeout); not measured."
    )
    return result


# -- stampede --------------------------------------------------------------------------

TTL_S = 0.2  # the hot entry's TTL: many expiries per second
STALE_S = 1.0  # stale_ttl of the stale variant
THINK_S = 0.005  # each reader's other work between two reads (a request handler's)
_JOIN_S = 30.0  # how long a reader may take to notice the stop (lease_wait is 0.5 s)


@dataclass(frozen=True, slots=True)
class Variant:
    """One stampede configuration: its row name and FromCache options."""

    tag: str
    name: str
    options: dict[str, Any]


VARIANTS = (
    Variant("off", "no control: lease=False, xfetch_beta=0", {"lease": False, "xfetch_beta": 0}),
    Variant("lease", "lease, xfetch_beta=0", {"xfetch_beta": 0}),
    Variant("xfetch", "lease + XFetch (defaults, beta=1)", {}),
    Variant(
        "stale",
        f"lease + stale_ttl={STALE_S:g} s, xfetch_beta=0",
        {"stale_ttl": STALE_S, "xfetch_beta": 0},
    ),
)
NO_CONTROL = VARIANTS[0].name


class Tally:
    """The statements of one variant that reached Postgres, charged to refreshes.

    ``on_cursor`` runs in the reading thread (an engine listener), so a thread-local says
    whether the read in progress sent the query.
    """

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.queries = 0
        self.generation = 0
        self.by_generation: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    def on_cursor(self, statement: str) -> None:
        """Count ``statement`` if it is this variant's query."""
        if self.marker in statement:
            with self._lock:
                self.queries += 1
            self._local.queried = getattr(self._local, "queried", 0) + 1

    def begin_read(self) -> int:
        """The refresh current as a read begins."""
        self._local.queried = 0
        return self.generation

    def end_read(self, began: int) -> bool:
        """Charge the read's queries to the refresh it began in; its fill ends that refresh.

        True when the read sent the query (it refreshed the entry).
        """
        queried = int(getattr(self._local, "queried", 0))
        if queried:
            with self._lock:
                self.by_generation[began] += queried
                self.generation = max(self.generation, began + 1)
        return bool(queried)

    def new_slice(self) -> None:
        """A slice starts cold: a refresh of its own."""
        with self._lock:
            self.generation += 1


@dataclass(slots=True)
class Run:
    """What the readers of one variant did, over all its slices."""

    variant: Variant
    statement: Any
    expected: list[Any]
    tally: Tally
    latencies: list[int] = field(default_factory=list)
    refresh_latencies: list[int] = field(default_factory=list)  # reads that sent the query
    wrong: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass(frozen=True, slots=True)
class StampedeRow:
    """One variant's figures, for the report's stampede table."""

    name: str
    threads: int
    ttl_s: float
    think_s: float
    slices: int
    seconds: float
    reads: int
    db_queries: int
    refreshes: int
    fills: int
    lease_waits: int
    early_refreshes: int
    stale_served: int
    latency: Summary
    refresh_latency: Summary  # of the reads that sent the query and filled

    @property
    def reads_per_s(self) -> float:
        """Reads served per second of the run."""
        return self.reads / self.seconds if self.seconds else math.nan

    @property
    def queries_per_s(self) -> float:
        """Database queries per second of the run."""
        return self.db_queries / self.seconds if self.seconds else math.nan

    @property
    def queries_per_refresh(self) -> float:
        """Database queries per expiry of the entry: 1 is one fill per key per expiry."""
        return self.db_queries / self.refreshes if self.refreshes else math.nan


def _run_slice(factory: sessionmaker[Session], run: Run, threads: int, seconds: float) -> None:
    """``threads`` readers of ``run``'s statement for ``seconds``, released together.

    Every reader is stopped and joined before this returns, also when one fails; a
    reader's exception is raised here.
    """
    stop = threading.Event()
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []
    statement, expected, tally = run.statement, run.expected, run.tally
    latencies, refreshes, wrong = run.latencies, run.refresh_latencies, run.wrong
    clock = time.perf_counter_ns

    def read_loop() -> None:
        try:
            start.wait(_JOIN_S)
            while not stop.is_set():
                began = tally.begin_read()
                t0 = clock()
                with factory() as session:
                    got = session.execute(statement).all()
                took = clock() - t0
                latencies.append(took)
                if tally.end_read(began):
                    refreshes.append(took)
                if got != expected:
                    wrong.append(1)
                stop.wait(THINK_S)
        except BaseException as exc:  # handed to the main thread, which raises it
            errors.append(exc)
            stop.set()

    tally.new_slice()
    readers = [
        threading.Thread(target=read_loop, name=f"stampede-{run.variant.tag}-{i}", daemon=True)
        for i in range(threads)
    ]
    started = time.perf_counter()
    try:
        for reader in readers:
            reader.start()
        start.wait(_JOIN_S)
        started = time.perf_counter()
        stop.wait(seconds)
    finally:
        stop.set()
        start.abort()  # wakes readers still at the barrier if the start failed
        deadline = time.monotonic() + _JOIN_S
        for reader in readers:
            if reader.ident is not None:
                reader.join(max(0.0, deadline - time.monotonic()))
        run.elapsed_s += time.perf_counter() - started
    alive = [r.name for r in readers if r.is_alive()]
    if alive:
        raise RuntimeError(f"stampede readers still running after {_JOIN_S:g} s: {alive}")
    if errors:
        raise RuntimeError(f"a stampede reader failed: {errors[0]!r}") from errors[0]


def _region(cache: Cache, tag: str) -> dict[str, int]:
    values = cache.stats()["regions"].get(f"stampede_{tag}", {})
    return {k: int(v) for k, v in values.items() if isinstance(v, int)}


def stampede(env: BenchEnv, plan: Plan) -> tuple[CaseResult, list[StampedeRow]]:
    """Database queries during a hot key's expiries, with and without stampede control."""
    threads, seconds, slices = plan.stampede_threads, plan.stampede_seconds, plan.stampede_slices
    runs: list[Run] = []
    for variant in VARIANTS:
        label = f"revenue_stampede_{variant.tag}"
        base = expensive_statement(label)
        with env.plain() as session:
            expected = list(session.execute(base).all())
        option = FromCache(ttl=TTL_S, region=f"stampede_{variant.tag}", **variant.options)
        runs.append(Run(variant, base.options(option), expected, Tally(f" AS {label}")))

    def on_cursor(
        _conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool
    ) -> None:
        for run in runs:
            run.tally.on_cursor(statement)

    client = redis.Redis.from_url(env.redis_url)
    cache = Cache(client, namespace=env.new_namespace("stampede"), default_ttl=600)
    # a connection per reader: the pool never limits how many queries reach Postgres
    engine = sa.create_engine(env.url, pool_size=threads, max_overflow=0)
    factory: sessionmaker[Session] = sessionmaker(engine)
    try:
        cache.attach(factory)
        sa.event.listen(engine, "before_cursor_execute", on_cursor)
        for slice_no in range(slices):
            turn = slice_no % len(runs)
            for run in runs[turn:] + runs[:turn]:
                _run_slice(factory, run, threads, seconds / slices)
    finally:
        if sa.event.contains(engine, "before_cursor_execute", on_cursor):
            sa.event.remove(engine, "before_cursor_execute", on_cursor)
        cache.detach()
        engine.dispose()
        client.close()
    return _stampede_result(cache, runs, plan)


def _stampede_result(
    cache: Cache, runs: Sequence[Run], plan: Plan
) -> tuple[CaseResult, list[StampedeRow]]:
    threads, seconds = plan.stampede_threads, plan.stampede_seconds
    result = CaseResult(
        slug="stampede",
        title=(
            f"stampede: {threads} threads reading one hot key, ttl={TTL_S:g} s, "
            f"{seconds:g} s per variant (latency of the reads)"
        ),
    )
    rows: list[StampedeRow] = []
    for run in runs:
        stats = _region(cache, run.variant.tag)
        row = StampedeRow(
            name=run.variant.name,
            threads=threads,
            ttl_s=TTL_S,
            think_s=THINK_S,
            slices=plan.stampede_slices,
            seconds=run.elapsed_s,
            reads=len(run.latencies),
            db_queries=run.tally.queries,
            refreshes=len(run.tally.by_generation),
            fills=stats.get("fills", 0),
            lease_waits=stats.get("lease_waits", 0),
            early_refreshes=stats.get("early_refreshes", 0),
            stale_served=stats.get("stale_served", 0),
            latency=Summary.of(run.latencies),
            refresh_latency=Summary.of(run.refresh_latencies),
        )
        rows.append(row)
        result.summaries[row.name] = row.latency
        result.samples[row.name] = run.latencies
        if run.wrong:
            result.notes.append(f"{row.name}: {len(run.wrong)} reads returned wrong rows")
        if stats.get("errors", 0):
            result.notes.append(f"{row.name}: {stats['errors']} Redis errors during the run")
    off = rows[0]
    for row in rows:
        controlled = row.name != NO_CONTROL
        per_refresh = Comparison(
            row=row.name,
            numerator="database queries",
            denominator="refreshes",
            label="database queries per refresh",
            target=Target("<=", 1.0, unit="") if controlled else None,
            miss_note=(
                "more than one caller read the database for one expiry. A refresh's lease "
                "request looks at the entry again (refresh_lease.lua), so a stale look no "
                "longer repeats a refresh, and XFetch leaves an entry younger than its "
                "read (delta) alone, so a fresh entry is not refreshed again before its "
                "refresher has returned; a lease waiter that gives up after lease_wait "
                "also reads"
            ),
            unit="",
        )
        result.ratios.append(RatioResult(per_refresh, row.queries_per_refresh, math.nan, math.nan))
        if controlled:
            fewer = Comparison(
                row=row.name,
                numerator=NO_CONTROL,
                denominator=row.name,
                label="DB queries/s: no control ÷ this",
            )
            ratio = off.queries_per_s / row.queries_per_s if row.queries_per_s else math.nan
            result.ratios.append(RatioResult(fewer, ratio, math.nan, math.nan))
    result.breakdown += _stampede_lines(rows)
    return result, rows


def _stampede_lines(rows: Sequence[StampedeRow]) -> list[str]:
    """What the stampede figures say, from the figures."""
    off, lease, xfetch, stale = rows
    lines = [
        (
            f"without control each expiry sent {off.queries_per_refresh:.1f} queries to "
            f"Postgres ({off.queries_per_s:.1f}/s, {off.threads} readers); with the lease "
            f"alone {lease.queries_per_refresh:.2f} ({lease.queries_per_s:.1f}/s). Reads "
            "served, fills and the library's counters per variant are in the 'Stampede' table."
        )
    ]
    took_s = xfetch.refresh_latency.p50 / 1e6
    hits_in_refresh = xfetch.reads_per_s * took_s
    if lease.refreshes and xfetch.refreshes and hits_in_refresh > 1:
        lead_s = took_s * math.log(hits_in_refresh)
        lines.append(
            f"XFetch refreshed {xfetch.refreshes / xfetch.seconds:.1f} times a second against "
            f"{lease.refreshes / lease.seconds:.1f} for the lease alone. Every hit draws its "
            "own early refresh, so with h hits a second and a refresh taking d, the first "
            f"one comes about d {TIMES} ln(h {TIMES} d) before expiry (beta=1): here "
            f"{took_s * 1000:.0f} ms (median refreshing read) {TIMES} ln({hits_in_refresh:.0f}) "
            f"≈ {lead_s * 1000:.0f} ms, {lead_s / TTL_S:.0%} of a {TTL_S:g} s entry's life. "
            "An entry younger than d is never refreshed early, so when that lead exceeds "
            "the entry's life XFetch refreshes about once per d, one read each. With a TTL "
            "of minutes the same lead is a negligible part of the life."
        )
    if any(r.early_refreshes or r.stale_served for r in (off, lease)):
        lines.append(
            "'early refreshes' and 'stale served' are not zero even without XFetch or "
            "stale_ttl: an entry's logical expiry is stamped in Python before the fill "
            "script sets its Redis expiry, and in the gap between them a hit finds the "
            "entry due: it takes the fill lease (counted as an early refresh, even with "
            "lease=False) or serves the entry past its TTL (counted as stale)."
        )
    if stale.stale_served:
        lines.append(
            f"with stale_ttl, {stale.stale_served:,} reads were served the expired value while "
            f"one caller refreshed it, and {stale.lease_waits:,} waited (the cold start of "
            "each slice, when there is no value to serve)."
        )
    return lines
