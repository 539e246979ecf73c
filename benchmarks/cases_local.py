"""The local tier (``Cache(local=True)``): its hits, its memory, and what it costs writers.

Read cases (same conventions as :mod:`benchmarks.cases_reads`: alternating contenders, a
fresh session per call, results checked against the uncached query, hits checked to run no
SQL and, for the local tier, no Redis command either):

* a 1-row ``FromCache`` hit, a ``session.get`` hit and the 50-order + 200-line eager hit,
  each served by a local tier (a cache of its own, in a namespace of its own, attached to a
  sessionmaker of its own), against the uncached ORM, the dogpile recipe and our Redis tier
  (the benchmark's main cache, ``local=False``). The entry is made local the way an
  application makes it: a first read fills Redis, a second is a Redis hit the tier keeps.
  Contenders that time one part of the local hit alone (the entry key, building the
  objects from the kept entry, the tier's check that it may serve) split its median under
  "Where the time goes"; SQLAlchemy's execute pipeline on a canned result, which the hit
  no longer runs (it is served before it) and the recipe does, is timed beside them.

Memory (:func:`local_memory`): what a local entry really holds in the process (tracemalloc,
over many entries of one kind: what dropping them frees), beside what the store *counts*
for it (``estimated_size`` in ``sa_redis_cache/local/store.py``), so the estimate can be
judged.

Writers (:func:`local_commits`): four *holder* processes (``multiprocessing`` spawn), each
with ``Cache(local=True)`` on two namespaces, keep reading a category row and a query of
it, so they hold local entries and leases on ``categories``. A commit of that row is timed
with no process holding anything (the local tier off everywhere), with the four holders
under ``local_consistency="strict"`` (the commit waits for their acknowledgements), and
under ``"bounded"`` (it does not). The writers themselves run ``local=False``: they hold
nothing, so the holders are the only difference. Then, commit by commit, each holder notes
when it applied each of the commit's two invalidations of the table (the flush mark's,
which drops its entries, and the post-commit script's) and when its reads first gave the
new value, on a clock all processes share (``CLOCK_MONOTONIC``): how long after
``commit()`` returns a holder may still serve what the commit changed, strict and bounded.
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import queue
import secrets
import threading
import time
import traceback
import tracemalloc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.cases_reads import (
    FLOOR,
    GET_PRODUCT,
    PIPELINE,
    RECIPE,
    UNCACHED,
    graph_statement,
    one_row_statement,
)
from benchmarks.cases_writes import committer, new_name
from benchmarks.common import (
    Consume,
    canned_sessions,
    check_result,
    counter_probe,
    entities,
    expect_count,
    floor_contender,
    orm_contender,
    region_counter,
    snapshot,
)
from benchmarks.dogpile_recipe import RecipeFromCache
from benchmarks.harness import (
    TIMES,
    CaseResult,
    Comparison,
    Contender,
    Target,
    measure,
    percentile,
)
from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache, hydrate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan
    from sa_redis_cache.binds import Database
    from sa_redis_cache.local import LocalTier

LOCAL = "ours, local tier"
REDIS_TIER = "ours, Redis tier (local=False)"
KEY = "the entry key alone"
BUILD = "building the objects alone"
SERVING = "serving() alone (reads the invalidation socket)"

HOLDERS = 4
# how long a holder's reader waits between two rounds of reads: holders read often enough
# to hold their entries and leases, and leave the two cores mostly to the writer
HOLDER_PACE_S = 0.001
# the category rows the commit case writes, one per namespace, so that no namespace's
# writes change rows another namespace's entries hold (cases_writes uses 1 and 2)
NO_TIER_ROW, STRICT_ROW, BOUNDED_ROW = 4, 5, 6
_WAIT_S = 60.0  # a holder that has not answered by then is stuck: the case errors


def _now_ns() -> int:
    """A stamp that compares across processes: CLOCK_MONOTONIC is system-wide on Linux."""
    return time.monotonic_ns()


# -- a local tier of our own ----------------------------------------------------------------


@dataclass(slots=True)
class LocalSide:
    """A ``Cache(local=True)`` in a namespace of its own, attached to its own sessionmaker."""

    cache: Cache
    factory: sessionmaker[Session]
    tier: LocalTier
    database: Database

    def local_hits(self) -> int:
        """The cache's ``local_hits`` counter."""
        return int(self.cache.stats()["total"].get("local_hits", 0))

    def statement_key(self, statement: Any) -> str:
        """The entry key of a ``FromCache`` statement in this namespace."""
        key = self.cache.inspector.statement_key(statement, database=self.database)
        if key is None:
            raise RuntimeError("the statement is not cached")
        return key

    def keep(self, consume: Consume, key: str) -> None:
        """Read twice, as an application does: a fill, then a Redis hit the tier keeps."""
        for _ in range(2):
            with self.factory() as session:
                consume(session)
        if self.tier.store.get(key) is None:
            raise RuntimeError(f"the local tier did not keep {key} after a fill and a hit")


@contextmanager
def local_side(
    env: BenchEnv, label: str, client: Any = None, **options: Any
) -> Iterator[LocalSide]:
    """A :class:`LocalSide`, detached (listener stopped) at the end.

    It shares the benchmark's Redis client (pool and parser) with every other contender,
    or uses ``client`` (a cluster's); its engine is alike too (:meth:`BenchEnv.new_engine`).
    """
    # a namespace never used before in this run: nothing of another case's is in it
    namespace = env.new_namespace(f"{label}{secrets.token_hex(3)}")
    redis_client = env.client if client is None else client
    cache = Cache(redis_client, namespace=namespace, default_ttl=600, local=True, **options)
    engine = env.new_engine()
    factory: sessionmaker[Session] = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = cache.inspector.local_tier
        if tier is None or not tier.wait_ready(10.0):
            raise RuntimeError("the local tier did not turn tracking on within 10 s")
        database = cache.inspector.database_of(engine)
        if database is None:
            raise RuntimeError("the cache does not know the benchmark database")
        yield LocalSide(cache, factory, tier, database)
    finally:
        cache.detach()


def redis_round_trips(client: redis.Redis, call: Callable[[], object]) -> int:
    """How many connections ``call`` took from ``client``'s pool in this thread.

    Every command and pipeline redis-py sends takes one; the local tier's own connections
    are outside the pool, and other threads' commands (the stats publishers) are not
    counted. Untimed: a check, not a measurement.
    """
    pool = client.connection_pool
    original = pool.get_connection
    me = threading.get_ident()
    taken = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal taken
        if threading.get_ident() == me:
            taken += 1
        return original(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]
    try:
        call()
    finally:
        del pool.get_connection  # the class's method again
    return taken


def _local_checks(
    env: BenchEnv, side: LocalSide, consume: Consume, expected: Any, key: str
) -> list[str]:
    """A local hit returns what the uncached query returns, runs no SQL, sends no Redis
    command, and is counted as a local hit."""
    notes = check_result(env, LOCAL, side.factory, consume, expected, expect_no_sql=True)
    hits = counter_probe(side.local_hits)

    def read() -> None:
        with side.factory() as session:
            consume(session)

    sent = redis_round_trips(env.client, read)
    if sent:
        notes.append(f"{LOCAL}: a local hit sent {sent} Redis command(s); it should send none")
    notes += expect_count("local hits", hits(), 1)
    if side.tier.store.get(key) is None:
        notes.append(f"{LOCAL}: the entry is no longer held locally")
    return notes


def _emptied(side: LocalSide) -> Callable[[], list[str]]:
    """Start watching the tier: returns a function giving a note if it was emptied since."""
    tier = side.tier
    start = tier.breaks + tier.lapses

    def notes() -> list[str]:
        emptied = tier.breaks + tier.lapses - start
        if not emptied:
            return []
        note = (
            f"{LOCAL}: the tier was emptied {emptied} time(s) while timed (its connection "
            "dropped or its lease lapsed; another client of the shared Redis server may "
            "have run SCRIPT FLUSH or CLIENT KILL): some calls were not local hits"
        )
        return [note]

    return notes


def _speedup(numerator: str, name: str, target: Target | None = None, note: str = "") -> Comparison:
    """``numerator ÷ local``: how many times faster the local hit is."""
    return Comparison(
        row=LOCAL,
        numerator=numerator,
        denominator=LOCAL,
        label=f"{name} ÷ local",
        target=target,
        miss_note=note,
    )


_QUERY_MISS = (
    "a local hit skips the Redis round trip, the decode and SQLAlchemy's execute pipeline "
    "(it is served before it), but still computes the statement's cache key and the entry "
    "digest, and builds the objects into the session; 'Where the time goes' splits the "
    "median into those parts"
)


def _query_breakdown(result: CaseResult, objects: int) -> str:
    s = result.summaries
    local, pipeline, key, build = (s[n].p50 for n in (LOCAL, PIPELINE, KEY, BUILD))
    serving = s[SERVING].p50
    rest = local - key - build - serving
    per_object = f" ({build / objects:.1f} µs per object)" if objects > 1 else ""
    return (
        f"local hit {local:.0f} µs ≈ {key:.0f} µs the entry key (the statement's cache key, "
        f"the digest of its bound values) + {build:.0f} µs building the objects into the "
        f"session{per_object} + {serving:.0f} µs the tier's check that it may serve (one "
        f"poll of the invalidation socket) + {rest:.0f} µs the rest (the fast path's checks, "
        "the session's bind and database, the transaction checks, the store look-up, the "
        "counters). No Redis round trip, no decode, and no SQLAlchemy execute pipeline: the "
        f"hit is served before it (the pipeline alone costs {pipeline:.0f} µs, the "
        "canned-result row, which the recipe pays); the Redis tier's hit costs "
        f"{s[REDIS_TIER].p50 - local:.0f} µs more. Building the objects alone is "
        f"{s[RECIPE].p50 / build:.1f}{TIMES} faster than the recipe and "
        f"{s[UNCACHED].p50 / build:.1f}{TIMES} faster than the uncached query here: no cache "
        "that builds the objects into the session can do better. Sums of medians: "
        "approximate."
    )


def _local_query_case(
    env: BenchEnv,
    plan: Plan,
    *,
    slug: str,
    title: str,
    statement: Any,
    heavy: bool,
    objects: int,
    recipe_target: float,
    miss_note: str = _QUERY_MISS,
    uncached_target: float | None,
) -> CaseResult:
    cached_stmt = statement.options(FromCache())
    plain, ours, recipe = (
        entities(statement),
        entities(cached_stmt),
        entities(statement.options(RecipeFromCache())),
    )
    with env.plain() as session:
        loaded = plain(session)
        expected = snapshot(loaded)
    assert isinstance(loaded, list)
    column_keys = [d["name"] for d in statement.column_descriptions]
    with env.cached() as session:
        ours(session)  # fills the Redis tier (or hits, if an earlier case filled it)
    with env.recipe_sessions() as session:
        recipe(session)
    redis_engine = env.cached.kw["bind"]
    redis_db = env.cache.inspector.database_of(redis_engine)
    assert redis_db is not None
    redis_key = env.cache.inspector.statement_key(cached_stmt, database=redis_db)
    assert redis_key is not None
    notes = check_result(env, REDIS_TIER, env.cached, ours, expected, expect_no_sql=True)
    notes += check_result(env, RECIPE, env.recipe_sessions, recipe, expected, expect_no_sql=True)
    with local_side(env, slug) as side:
        key = side.statement_key(cached_stmt)
        side.keep(ours, key)
        notes += _local_checks(env, side, ours, expected, key)
        entry = side.tier.store.get(key)
        shape_plan = side.cache.inspector.statement_plan(cached_stmt)
        assert entry is not None
        assert shape_plan is not None
        prepared, shape = entry.value, shape_plan.shape
        inspector, database, tier = side.cache.inspector, side.database, side.tier

        def build(session: Session) -> object:
            return hydrate.build(session, prepared, shape, shared=True).scalars().all()

        def entry_key(_: object) -> object:
            return inspector.statement_key(cached_stmt, database=database)

        def serving(_: object) -> object:
            return tier.serving()

        counts = plan.heavy if heavy else plan.cheap
        comparisons = [
            _speedup(
                UNCACHED,
                "uncached",
                None if uncached_target is None else Target(">=", uncached_target),
                miss_note,
            ),
            _speedup(RECIPE, "recipe", Target(">=", recipe_target), miss_note),
            _speedup(REDIS_TIER, "Redis tier"),
        ]
        local_hits = counter_probe(side.local_hits)
        redis_hits = counter_probe(lambda: region_counter(env, "hits"))
        emptied = _emptied(side)
        result = measure(
            slug,
            title,
            [
                orm_contender(UNCACHED, env.plain, plain),
                floor_contender(env.client, redis_key, FLOOR),
                orm_contender(RECIPE, env.recipe_sessions, recipe),
                orm_contender(REDIS_TIER, env.cached, ours),
                orm_contender(LOCAL, side.factory, ours),
                orm_contender(
                    PIPELINE,
                    canned_sessions(env.engine, loaded, column_keys, scalars=True),
                    plain,
                ),
                Contender(KEY, call=entry_key),
                orm_contender(BUILD, side.factory, build),
                Contender(SERVING, call=serving),
            ],
            counts,
            comparisons,
        )
        total = counts.warmup + counts.iterations
        result.notes += notes + expect_count("local hits", local_hits(), total)
        result.notes += expect_count("Redis-tier hits", redis_hits(), total) + emptied()
    result.breakdown.append(_query_breakdown(result, objects))
    return result


def local_hit_one_row(env: BenchEnv, plan: Plan) -> CaseResult:
    """FromCache 1-row hit served by the local tier."""
    return _local_query_case(
        env,
        plan,
        slug="local_hit_1row",
        title="local tier: FromCache hit, 1 row",
        statement=one_row_statement(),
        heavy=False,
        objects=1,
        recipe_target=4.0,
        uncached_target=8.0,
    )


def local_hit_graph(env: BenchEnv, plan: Plan) -> CaseResult:
    """FromCache hit of 50 orders + 200 selectinload lines served by the local tier."""
    return _local_query_case(
        env,
        plan,
        slug="local_hit_50rows",
        title="local tier: FromCache hit, 50 orders + 200 selectinload lines",
        statement=graph_statement(),
        heavy=True,
        objects=250,
        recipe_target=5.0,
        uncached_target=None,
        miss_note=(
            "building the 250 objects into the session (the 'building the objects alone' "
            "row) is most of a local hit, and the Redis tier pays it too; 'Where the time "
            "goes' gives the cost per object and splits the rest. Only a cheaper build per "
            "object can close most of the gap"
        ),
    )


def local_get(env: BenchEnv, plan: Plan) -> CaseResult:
    """``session.get`` served by the local tier's fast path (no execute pipeline)."""

    def get(session: Session) -> object:
        return session.get(Product, GET_PRODUCT)

    def recipe_get(session: Session) -> object:
        return session.get(Product, GET_PRODUCT, options=[RecipeFromCache()])

    with env.plain() as session:
        product = get(session)
        expected = snapshot(product)
    with env.cached() as session:
        get(session)
    with env.recipe_sessions() as session:
        recipe_get(session)
    notes = check_result(env, REDIS_TIER, env.cached, get, expected, expect_no_sql=True)
    notes += check_result(
        env, RECIPE, env.recipe_sessions, recipe_get, expected, expect_no_sql=True
    )
    with local_side(env, "local_get") as side:
        if side.factory.class_.get is Session.get:
            notes.append(f"{LOCAL}: the session.get fast path is not installed")
        key = side.cache.inspector.row_key(Product, (GET_PRODUCT,), database=side.database)
        side.keep(get, key)
        notes += _local_checks(env, side, get, expected, key)
        entry = side.tier.store.get(key)
        assert entry is not None
        prepared, info, tier = entry.value, side.cache.inspector.model(Product), side.tier

        def build(session: Session) -> object:
            return hydrate.build_entity(session, info, prepared, shared=True)

        def serving(_: object) -> object:
            return tier.serving()

        counts = plan.cheap
        local_hits = counter_probe(side.local_hits)
        emptied = _emptied(side)
        result = measure(
            "local_get",
            "local tier: session.get hit, fresh session per call",
            [
                orm_contender(UNCACHED, env.plain, get),
                orm_contender(RECIPE, env.recipe_sessions, recipe_get),
                orm_contender(REDIS_TIER, env.cached, get),
                orm_contender(LOCAL, side.factory, get),
                orm_contender(
                    PIPELINE, canned_sessions(env.engine, [product], ["Product"], scalars=True), get
                ),
                orm_contender(BUILD, side.factory, build),
                Contender(SERVING, call=serving),
            ],
            counts,
            [
                _speedup(
                    UNCACHED,
                    "uncached",
                    Target(">=", 10.0),
                    "the fast path runs no execute pipeline: what is left is building the "
                    "object and the checks before it ('Where the time goes')",
                ),
                _speedup(RECIPE, "recipe"),
                _speedup(REDIS_TIER, "Redis tier"),
            ],
        )
        result.notes += notes + expect_count(
            "local hits", local_hits(), counts.warmup + counts.iterations
        )
        result.notes += emptied()
    s = result.summaries
    local, build_us, serve_us = s[LOCAL].p50, s[BUILD].p50, s[SERVING].p50
    result.breakdown.append(
        f"local get {local:.1f} µs ≈ {build_us:.1f} µs building the object into the session "
        f"+ {serve_us:.1f} µs the tier's check that it may serve (one poll of the "
        f"invalidation socket) + {local - build_us - serve_us:.1f} µs the rest (the fast "
        "path's checks: identity map, autoflush, transaction; session.get_bind; the entity "
        "key; the store look-up; the counters). It runs no SQLAlchemy execute pipeline, "
        f"which alone costs {s[PIPELINE].p50:.0f} µs (the canned-result row); neither does "
        "the Redis tier's get, which pays the MGET and the decode instead. Sums of medians: "
        "approximate."
    )
    return result


LOCAL_CASES: list[tuple[str, Callable[[BenchEnv, Plan], CaseResult]]] = [
    ("local_hit_1row", local_hit_one_row),
    ("local_get", local_get),
    ("local_hit_50rows", local_hit_graph),
]


# -- memory per entry -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalMemoryRow:
    """Memory of the local entries of one kind, per entry."""

    title: str
    entries: int
    stored_bytes: float  # the Redis entry (STRLEN), from which the local one was decoded
    held_bytes: float  # freed when the entries are dropped (tracemalloc)
    bookkeeping_bytes: float  # further freed by emptying the store: counter mirror, memo
    counted_bytes: float  # what the store counts (estimated_size)

    @property
    def ratio(self) -> float:
        """counted ÷ held: above 1 the estimate overcounts, below 1 it undercounts."""
        return self.counted_bytes / self.held_bytes if self.held_bytes > 0 else math.nan


# Allocations made under the read path (which decodes, builds and keeps local entries),
# leaving out what redis-py's pooled connections and the counters keep of their own: other
# threads (the tier's listener, the stats publisher) allocate meanwhile, and would
# otherwise add a few hundred bytes of noise per entry. tracemalloc.Filter does the same
# but matches every frame with fnmatch, which takes seconds per snapshot.
_READ_PATH = ("/sa_redis_cache/reads/", "/sa_redis_cache/sessions.py")
_NOT_ENTRIES = ("/redis/", "/sa_redis_cache/stats.py", "/sa_redis_cache/counters.py")
# deep enough to reach a read-path frame from any allocation it makes (the figures are the
# same with 60), and no deeper: every allocation records its frames while traced
_FRAMES = 12
_ATTEMPTS = 3


def _read_path_bytes() -> int:
    gc.collect()
    kinds: dict[str, int] = {}  # file name -> 1 read path, -1 excluded, 0 neither

    def kind(filename: str) -> int:
        found = kinds.get(filename)
        if found is None:
            path = filename.replace("\\", "/")
            found = (
                -1
                if any(p in path for p in _NOT_ENTRIES)
                else 1
                if any(p in path for p in _READ_PATH)
                else 0
            )
            kinds[filename] = found
        return found

    total = 0
    for trace in tracemalloc.take_snapshot().traces:
        under_reads = False
        for frame in trace.traceback:
            found = kind(frame.filename)
            if found < 0:
                break
            under_reads = under_reads or found > 0
        else:
            if under_reads:
                total += trace.size
    return total


def _memory_row(env: BenchEnv, label: str, title: str, reads: Sequence[Consume]) -> LocalMemoryRow:
    """Keep one local entry per read of ``reads``; measure what they hold.

    Traced from after the fills (so the Redis fills' own allocations are not charged)
    through the reads that keep the entries. Dropping the entries alone frees what they
    hold; emptying the store then frees the bookkeeping (the mirror of the counters the
    entries are valid under, and the memo of recently invalidated keys, which this
    process's own fills fed through the invalidations Redis pushes to it). A tier that was
    emptied meanwhile (its connection dropped: the Redis server is shared) is measured
    again, with a fresh cache.
    """
    for _ in range(_ATTEMPTS):
        row = _memory_attempt(env, label, title, reads)
        if row is not None:
            return row
    raise RuntimeError(f"{title}: the local tier was emptied in each of {_ATTEMPTS} attempts")


def _memory_attempt(
    env: BenchEnv, label: str, title: str, reads: Sequence[Consume]
) -> LocalMemoryRow | None:
    with local_side(env, label) as side:
        tier, store = side.tier, side.tier.store
        for consume in reads:  # fills
            with side.factory() as session:
                consume(session)
        # the fills' own invalidations (Redis pushes this process's writes back to it)
        # are applied now, not in the middle of the traced reads
        tier.drain()
        gc.collect()
        breaks = tier.breaks + tier.lapses
        tracemalloc.start(_FRAMES)
        try:
            for consume in reads:  # Redis hits, kept
                with side.factory() as session:
                    consume(session)
            full = _read_path_bytes()
            entries, counted = len(store), store.bytes
            # the store has no public way to drop entries and keep its bookkeeping; the
            # benchmark reaches in to tell the two apart
            keys = list(store._entries)
            for key in keys:
                store._drop(key)
            dropped = _read_path_bytes()
            store.clear()
            cleared = _read_path_bytes()
        finally:
            tracemalloc.stop()
        if tier.breaks + tier.lapses != breaks:
            return None
        if entries != len(reads):
            raise RuntimeError(f"{title}: {entries} entries kept of {len(reads)} reads")
        pipe = env.client.pipeline(transaction=False)
        for key in keys:
            pipe.strlen(key)
        stored = sum(int(n) for n in pipe.execute())
        return LocalMemoryRow(
            title=title,
            entries=entries,
            stored_bytes=stored / entries,
            held_bytes=(full - dropped) / entries,
            bookkeeping_bytes=(dropped - cleared) / entries,
            counted_bytes=counted / entries,
        )


def local_memory(env: BenchEnv, plan: Plan) -> list[LocalMemoryRow]:
    """Resident and counted bytes per local entry: 1-row entity, 1-row query, the graph."""
    rows_n, graphs_n = plan.local_memory_entries
    ids = range(1, rows_n + 1)

    def getter(ident: int) -> Consume:
        return lambda session: session.get(Product, ident)

    def one_row(ident: int) -> Consume:
        return entities(sa.select(Product).where(Product.id == ident).options(FromCache()))

    def graph(offset: int) -> Consume:
        return entities(graph_statement().offset(offset).options(FromCache()))

    return [
        _memory_row(env, "mem_get", "1-row entity (session.get)", [getter(i) for i in ids]),
        _memory_row(env, "mem_query", "1-row query (FromCache)", [one_row(i) for i in ids]),
        _memory_row(
            env,
            "mem_graph",
            "50 orders + 200 lines (FromCache)",
            [graph(k) for k in range(graphs_n)],
        ),
    ]


# -- holders in other processes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Watch:
    """What a holder reads in one namespace: one category row, by get and by query."""

    namespace: str
    consistency: str
    category: int


@dataclass(slots=True)
class _HolderSide:
    watch: Watch
    cache: Cache
    factory: sessionmaker[Session]
    tier: LocalTier
    statement: Any
    keys: tuple[str, str]
    armed: bool = False
    reported: str | None = None
    # per value read while armed: [first read's start, last read's start, first read's end]
    seen: dict[str, list[int]] = field(default_factory=dict)


class _Holder:
    """One holder process: reads its rows in a thread, answers commands on a pipe."""

    def __init__(self, index: int, database_url: str, redis_url: str, events: Any) -> None:
        self.index = index
        self.events = events
        self.engine = sa.create_engine(database_url, pool_size=2)
        self.redis_url = redis_url
        self.sides: list[_HolderSide] = []
        self.stop = threading.Event()
        self.ready = False

    def add(self, watch: Watch) -> None:
        cache = Cache(
            redis.Redis.from_url(self.redis_url),
            namespace=watch.namespace,
            default_ttl=600,
            local=True,
            local_consistency=cast("Any", watch.consistency),
        )
        factory: sessionmaker[Session] = sessionmaker(self.engine)
        cache.attach(factory)
        tier = cache.inspector.local_tier
        if tier is None or not tier.wait_ready(10.0):
            raise RuntimeError("the local tier did not turn tracking on within 10 s")
        database = cache.inspector.database_of(self.engine)
        assert database is not None
        statement = sa.select(Category).where(Category.id == watch.category).options(FromCache())
        query_key = cache.inspector.statement_key(statement, database=database)
        assert query_key is not None
        entity_key = cache.inspector.row_key(Category, (watch.category,), database=database)
        side = _HolderSide(watch, cache, factory, tier, statement, (entity_key, query_key))
        self._spy(side, cache.inspector.keys.version_key(cache.inspector.model(Category).table))
        self.sides.append(side)

    def _spy(self, side: _HolderSide, version_key: str) -> None:
        """Note when this process applies an invalidation of the table's version.

        That is the moment every local entry of the table stops being served here,
        whichever thread read the invalidation (the listener, or a reader draining the
        socket before it serves).
        """
        store = side.tier.store
        apply = store.invalidate
        wanted = version_key.encode()
        index, position, events = self.index, len(self.sides), self.events

        def invalidate(keys: Any) -> None:
            apply(keys)
            if side.armed and wanted in keys:
                events.put(("drop", index, position, _now_ns()))

        store.invalidate = invalidate  # type: ignore[method-assign]

    def read_loop(self) -> None:
        try:
            while not self.stop.is_set():
                for position, side in enumerate(self.sides):
                    self._read(position, side)
                if not self.ready and all(s.reported for s in self.sides):
                    self.ready = True
                    self.events.put(("ready", self.index, 0, 0))
                self.stop.wait(HOLDER_PACE_S)
        except Exception:
            self.events.put(("error", self.index, 0, traceback.format_exc()))

    def _read(self, position: int, side: _HolderSide) -> None:
        started = _now_ns()
        with side.factory() as session:
            row = session.get(Category, side.watch.category)
            assert row is not None
            name = row.name
        # a session of its own: a query whose row the session already holds is not filled
        # (the object in the identity map may differ from the database)
        with side.factory() as session:
            session.scalars(side.statement).all()
        ended = _now_ns()
        if side.armed:
            seen = side.seen.get(name)
            if seen is None:
                side.seen[name] = [started, started, ended]
            else:
                seen[1] = started
        if name != side.reported:
            store = side.tier.store
            if all(store.get(key) is not None for key in side.keys):
                side.reported = name
                if side.armed:
                    self.events.put(("held", self.index, position, name))

    def gauges(self) -> list[dict[str, Any]]:
        out = []
        for side in self.sides:
            stats = side.cache.stats()
            out.append({**stats["local"], "local_hits": stats["total"].get("local_hits", 0)})
        return out

    def serve(self, commands: Connection) -> None:
        reader = threading.Thread(target=self.read_loop, name="holder-reads", daemon=True)
        reader.start()
        try:
            while True:
                command, position = commands.recv()
                if command == "stop":
                    break
                side = self.sides[position]
                if command == "arm":
                    side.seen = {}
                    # armed before the report is reset: the reading thread, between its
                    # check of `reported` and its check of `armed`, could otherwise take
                    # the reset, find the side unarmed and never report this value
                    # (the commit case then waited its 60 s and failed, 1 run in ~20)
                    side.armed = True
                    side.reported = None
                    commands.send("armed")
                elif command == "disarm":
                    side.armed = False
                    commands.send(side.seen)
        finally:
            self.stop.set()
            reader.join(10)
            gauges = self.gauges()
            for side in self.sides:
                side.cache.detach()
            self.engine.dispose()
            commands.send(gauges)


def holder_main(
    index: int,
    database_url: str,
    redis_url: str,
    watches: Sequence[Watch],
    commands: Connection,
    events: Any,
) -> None:
    """A holder process's entry point (spawned by :class:`Holders`)."""
    try:
        holder = _Holder(index, database_url, redis_url, events)
        for watch in watches:
            holder.add(watch)
    except Exception:
        events.put(("error", index, 0, traceback.format_exc()))
        return
    holder.serve(commands)


class HolderError(RuntimeError):
    """A holder process failed or stopped answering."""


class Holders:
    """The holder processes of the commit case, started and always ended together."""

    def __init__(self, env: BenchEnv, watches: Sequence[Watch], count: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # the parent runs threads: no fork
        self.events: Any = ctx.Queue()
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        self.final: list[list[dict[str, Any]]] = []
        url = env.url.render_as_string(hide_password=False)
        for index in range(count):
            mine, theirs = ctx.Pipe()
            process = ctx.Process(
                target=holder_main,
                args=(index, url, env.redis_url, list(watches), theirs, self.events),
                name=f"bench-holder-{index}",
                daemon=True,
            )
            process.start()
            self.pipes.append(mine)
            self.processes.append(process)

    def next_event(self, deadline: float) -> tuple[str, int, int, Any]:
        """The next event from any holder; raises on a holder's error or at ``deadline``."""
        try:
            kind, index, position, value = self.events.get(
                timeout=max(0.0, deadline - time.monotonic())
            )
        except queue.Empty:
            raise HolderError("the holder processes stopped answering") from None
        if kind == "error":
            raise HolderError(f"holder {index} failed:\n{value}")
        return kind, index, position, value

    def wait_ready(self) -> None:
        """Until every holder holds its entries in every namespace."""
        ready: set[int] = set()
        deadline = time.monotonic() + _WAIT_S * 2  # spawning imports everything again
        while len(ready) < len(self.processes):
            kind, index, _, _ = self.next_event(deadline)
            if kind == "ready":
                ready.add(index)

    def ask(self, command: str, position: int) -> list[Any]:
        """Send a command to every holder; their answers, in holder order."""
        for pipe in self.pipes:
            pipe.send((command, position))
        answers = []
        for index, pipe in enumerate(self.pipes):
            if not pipe.poll(_WAIT_S):
                raise HolderError(f"holder {index} did not answer {command!r}")
            answers.append(pipe.recv())
        return answers

    def close(self) -> None:
        """Stop every holder (their last gauges land in :attr:`final`), then end them."""
        for index, pipe in enumerate(self.pipes):
            with contextlib.suppress(OSError, EOFError):
                pipe.send(("stop", 0))
                if pipe.poll(_WAIT_S):
                    self.final.append(pipe.recv())
                else:
                    print(f"bench: holder {index} did not stop", flush=True)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self.events.close()


# -- the commit path -------------------------------------------------------------------------


NO_TIER = "commit, no local tier anywhere"
STRICT = f"commit, strict, {HOLDERS} holders"
BOUNDED = f"commit, bounded, {HOLDERS} holders"


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and max of ``values`` (NaN when empty)."""
    return percentile(values, 50), percentile(values, 99), max(values, default=math.nan)


@dataclass(frozen=True, slots=True)
class BoundRow:
    """When the holders applied each commit's invalidations, relative to ``commit()``
    returning in the writer (µs; negative: before it returned).

    A commit bumps its table's version twice: at flush, before the database commit (the
    holders then drop their entries of the table, and none can be kept again until the
    commit is done: fills are refused meanwhile), and after the database commit (what a
    strict commit waits for the holders to have applied).
    """

    consistency: str
    commits: int
    holders: int
    dropped: tuple[float, float, float]  # flush-time invalidation applied: p50, p99, max
    committed: tuple[float, float, float]  # commit-time invalidation applied: p50, p99, max
    committed_after: float  # share of (commit, holder) pairs applied after the return
    stale_reads: int  # (commit, holder) pairs with a read that started after the return
    # and returned the value from before the commit
    stale_max_us: float  # how long after the return the latest such read started
    visible: tuple[float, float, float]  # the holder's first read of the new value ended


@dataclass(slots=True)
class _Writer:
    cache: Cache
    factory: sessionmaker[Session]
    row: int


def _writer(env: BenchEnv, namespace: str, row: int, **options: Any) -> _Writer:
    """A ``local=False`` cache in ``namespace`` attached to a sessionmaker of its own."""
    cache = Cache(env.client, namespace=namespace, default_ttl=600, **options)
    factory: sessionmaker[Session] = sessionmaker(env.new_engine())
    cache.attach(factory)
    return _Writer(cache, factory, row)


def _total(cache: Cache, counter: str) -> int:
    return int(cache.stats()["total"].get(counter, 0))


_BUMPS = 2  # version bumps per commit: the flush mark and the post-commit script


def _bound(
    holders: Holders, position: int, writer: _Writer, consistency: str, commits: int
) -> tuple[BoundRow, list[str]]:
    """Commit ``commits`` times; each holder notes when it applied each invalidation."""
    holders.ask("arm", position)
    with writer.factory() as session:
        row = session.get(Category, writer.row)
        assert row is not None
        current = row.name
    count = len(holders.processes)
    returned: list[int] = []
    dropped: list[float] = []
    committed: list[float] = []
    names: list[str] = []
    extra = 0
    for i in range(commits):
        # every holder holds the current value again (entity and query) before each commit
        deadline = time.monotonic() + _WAIT_S
        held: set[int] = set()
        while len(held) < count:
            kind, index, at, value = holders.next_event(deadline)
            if at == position and kind == "held" and value == current:
                held.add(index)
            elif at == position and kind == "drop":
                extra += 1  # an invalidation of the version that no commit caused
        name = f"category-{writer.row}-{consistency}-{i}"
        with writer.factory() as session:
            session.connection()
            row = session.get(Category, writer.row)
            assert row is not None
            row.name = name
            session.commit()
            done = _now_ns()
        applied: dict[int, list[int]] = {index: [] for index in range(count)}
        while any(len(times) < _BUMPS for times in applied.values()):
            kind, index, at, value = holders.next_event(deadline)
            if at == position and kind == "drop":
                applied[index].append(int(value))
        for first, second in applied.values():
            dropped.append((first - done) / 1000)
            committed.append((second - done) / 1000)
        returned.append(done)
        names.append(current)
        current = name
    names.append(current)
    seen_by_holder: list[dict[str, list[int]]] = holders.ask("disarm", position)
    stale: list[float] = []
    visible: list[float] = []
    for seen in seen_by_holder:
        for i, done in enumerate(returned):
            old, new = seen.get(names[i]), seen.get(names[i + 1])
            if old is not None and old[1] > done:
                stale.append((old[1] - done) / 1000)
            if new is not None:
                visible.append((new[2] - done) / 1000)
    notes: list[str] = []
    if extra:
        notes.append(
            f"{consistency}: {extra} invalidation(s) of the version that no commit caused; "
            "the holders' times may be matched to the wrong commit"
        )
    if consistency == "strict" and (stale or max(committed) > 0):
        notes.append(
            "strict: a holder applied a commit's invalidation, or served the value from "
            "before it, after commit() returned: the guarantee did not hold (a bug of the "
            "library, unless a holder's lease lapsed: see the holders' notes)"
        )
    row_ = BoundRow(
        consistency=consistency,
        commits=commits,
        holders=count,
        dropped=_stats(dropped),
        committed=_stats(committed),
        committed_after=sum(c > 0 for c in committed) / len(committed),
        stale_reads=len(stale),
        stale_max_us=max(stale, default=math.nan),
        visible=_stats(visible),
    )
    return row_, notes


def local_commits(env: BenchEnv, plan: Plan) -> tuple[CaseResult, list[BoundRow]]:
    """The commit-path cost of the local tier, and the bound of ``bounded`` (module doc)."""
    no_tier = _writer(env, env.new_namespace("wnone"), NO_TIER_ROW)
    strict_ns, bounded_ns = env.new_namespace("wstrict"), env.new_namespace("wbounded")
    strict = _writer(env, strict_ns, STRICT_ROW)
    bounded = _writer(env, bounded_ns, BOUNDED_ROW, local_consistency="bounded")
    watches = [Watch(strict_ns, "strict", STRICT_ROW), Watch(bounded_ns, "bounded", BOUNDED_ROW)]
    holders = Holders(env, watches, HOLDERS)
    try:
        holders.wait_ready()
        waits = counter_probe(lambda: _total(strict.cache, "fence_waits"))
        timeouts = counter_probe(
            lambda: sum(_total(w.cache, "fence_timeouts") for w in (strict, bounded))
        )
        bounded_waits = counter_probe(lambda: _total(bounded.cache, "fence_waits"))
        counts = plan.commits
        result = measure(
            "local_commit",
            f"local tier: commit of a row {HOLDERS} other processes hold locally",
            [
                committer(NO_TIER, no_tier.factory, Category, NO_TIER_ROW, new_name),
                committer(STRICT, strict.factory, Category, STRICT_ROW, new_name),
                committer(BOUNDED, bounded.factory, Category, BOUNDED_ROW, new_name),
            ],
            counts,
            [
                Comparison(STRICT, STRICT, NO_TIER, "strict ÷ no tier"),
                Comparison(BOUNDED, BOUNDED, NO_TIER, "bounded ÷ no tier"),
            ],
        )
        total = counts.warmup + counts.iterations
        # each strict commit found the holders' leases and waited for their acks
        result.notes += expect_count("strict fence waits", waits(), total)
        result.notes += expect_count("bounded fence waits", bounded_waits(), 0)
        result.notes += expect_count("fence timeouts", timeouts(), 0)
        bounds: list[BoundRow] = []
        for position, (writer, consistency) in enumerate(
            [(strict, "strict"), (bounded, "bounded")]
        ):
            row, notes = _bound(holders, position, writer, consistency, plan.local_bound_commits)
            bounds.append(row)
            result.notes += notes
    finally:
        holders.close()
        for writer in (no_tier, strict, bounded):
            writer.cache.detach()
    for index, gauges in enumerate(holders.final):
        for gauge in gauges:
            if gauge["lapses"] or gauge["reconnects"]:
                result.notes.append(
                    f"holder {index} ({gauge['consistency']}): {gauge['lapses']} lease "
                    f"lapse(s), {gauge['reconnects']} reconnect(s): it held less than meant"
                )
            if not gauge["local_hits"]:
                result.notes.append(f"holder {index}: no local hit, it held nothing")
    s = result.summaries
    none = s[NO_TIER].p50
    result.breakdown.append(
        f"a strict commit waits {s[STRICT].p50 - none:.0f} µs longer than with no local "
        f"tier anywhere: the fence script in the commit's round trip, then the BLPOP until "
        f"all {HOLDERS} holders' listener threads have read the invalidation and pushed "
        f"their acknowledgement. A bounded commit differs by {s[BOUNDED].p50 - none:.0f} µs "
        "(it sends no fence and waits for nobody). The writers hold nothing locally; the "
        f"holders re-read their row every {HOLDER_PACE_S * 1000:g} ms. Medians: approximate."
    )
    return result, bounds
