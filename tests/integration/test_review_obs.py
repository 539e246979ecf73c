"""Review of observability against what really happened (the oracle is the test itself).

``cache.stats()`` counters, the latency histograms, the published cross-process counters
(:mod:`sa_redis_cache.stats_publisher`) and the Prometheus collector are checked against
what the test did and observed: the SQL statements that reached Postgres (an engine event
listener) and the Redis round trips (:class:`tests.seams.RedisTap`), in the sync and the
``AsyncSession`` modes, through ``FromCache`` and ``session.get``, with two caches of one
namespace publishing into the same hashes, across ``detach()`` and ``attach()`` again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.errors import NotOnDiskError
from sa_redis_cache.metrics import CacheCollector
from sa_redis_cache.strategies.write_behind import session as wb_session
from tests.integration.test_tracing import spans
from tests.integration.test_write_behind_durable import reading, waitaof_binary
from tests.seams import RedisTap
from tests.support import SQLCounter
from tests.wb_support import drain, rows
from tests.wb_support import queue as wb_queue
from tests.wb_support import update as wb_update

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.modes import Db, Runner

pytest_plugins = ["tests.wb_fixtures"]

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "sa_redis_cache")

__all__ = ["reading", "spans", "waitaof_binary"]  # fixtures of other test modules, used here


def published(client: redis.Redis, cache: Cache, scope: str) -> dict[str, int]:
    raw = client.hgetall(cache.keys.stats_key(scope))
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}


def nonzero(values: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in values.items() if type(v) is int and v}


def test_read_counters_and_histograms_equal_what_reached_postgres(in_mode: Runner) -> None:
    """Two FromCache reads and two session.get of one row each: one miss then one hit."""

    def scenario(db: Db) -> dict[str, Any]:
        db.cache._core.counters.reset()
        db.sql.reset()
        seen = []
        for _ in range(2):
            with db.session() as s:
                stmt = select(Category).where(Category.id == 2).options(FromCache())
                s.scalars(stmt)
            seen.append(db.sql.count)
            with db.session() as s:
                s.get(Product, 7)
            seen.append(db.sql.count)
        stats = db.cache.stats()
        stats["sql"] = seen
        return stats

    stats, _ = in_mode(scenario)
    # the oracle: the first read of each went to Postgres, the second did not
    assert stats["sql"] == [1, 2, 2, 2]
    assert nonzero(stats["total"]) == {"hits": 2, "misses": 2, "fills": 2}
    assert nonzero(stats["regions"]["default"]) == {"hits": 1, "misses": 1, "fills": 1}
    assert nonzero(stats["models"]["Category"]) == {"hits": 1, "misses": 1, "fills": 1}
    assert nonzero(stats["models"]["Product"]) == {"hits": 1, "misses": 1, "fills": 1}
    latency = stats["latency"]["total"]
    assert {op: h["count"] for op, h in latency.items()} == {"hit": 2, "miss": 2, "fill": 2}


def test_an_entity_read_of_a_table_the_transaction_wrote_counts_as_bypassed(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter, product: int
) -> None:
    """configuration.md: ``bypassed`` counts "lookups that did not ask Redis: ... a table
    the transaction wrote". A FromCache read counts it; session.get must too."""
    with session_factory() as s:
        s.execute(update(Product).where(Product.id == product).values(name="renamed"))
        before = cache.stats()
        sql.reset()
        s.scalars(select(Product).where(Product.id == 7).options(FromCache())).all()
        s.get(Product, 8)
        assert sql.count == 2  # both went to Postgres
        s.rollback()
    after = cache.stats()
    gained = after["total"]["bypassed"] - before["total"]["bypassed"]
    looked = (after["total"]["hits"] + after["total"]["misses"]) - (
        before["total"]["hits"] + before["total"]["misses"]
    )
    assert looked == 0
    assert gained == 2
    assert after["models"].get("Product", {}).get("bypassed", 0) == 1


def test_a_database_error_during_a_miss_is_timed_as_a_miss_not_a_redis_error(
    session_factory: sessionmaker[Session], cache: Cache
) -> None:
    """The ``error`` histogram is "a lookup whose Redis call failed" (configuration.md):
    Redis answered here, Postgres refused the statement."""
    with session_factory() as s:
        stmt = (
            select(Category)
            .where(Category.id == sa.cast(sa.literal("not a number"), sa.Integer))
            .options(FromCache())
        )
        with pytest.raises(sa.exc.DataError):
            s.scalars(stmt).all()
    stats = cache.stats()
    assert stats["total"]["errors"] == 0
    assert stats["total"]["misses"] == 1
    assert set(stats["latency"]["total"]) == {"miss"}


def test_two_caches_publishing_into_one_namespace_add_up_across_detach_and_attach(
    shop_engine: sa.Engine, redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    caches = [
        Cache(redis.Redis.from_url(redis_url), namespace=namespace, stats_publish_interval=3600)
        for _ in range(2)
    ]
    factories = [sessionmaker(shop_engine) for _ in caches]
    try:
        for cache, factory in zip(caches, factories, strict=True):
            cache.attach(factory)
        for _ in range(3):
            for cache, factory in zip(caches, factories, strict=True):
                with factory() as s:
                    s.get(Product, 11)
                    s.scalars(select(Category).where(Category.id == 1).options(FromCache()))
                assert cache._publisher.publish_now()
            # detach then attach again the first one; the second stays attached
            caches[0].detach()
            caches[0].attach(factories[0])
    finally:
        for cache in caches:
            cache.detach()
    for scope_, pick in (("total", "total"), ("model:Product", ("models", "Product"))):
        expected: dict[str, int] = {}
        for cache in caches:
            stats = cache.stats()
            values = stats["total"] if pick == "total" else stats[pick[0]][pick[1]]
            for k, v in nonzero(values).items():
                expected[k] = expected.get(k, 0) + v
        assert published(redis_client, caches[0], scope_) == expected, scope_
    # what an operator reads: `sa-redis-cache stats --json`, its totals those of the caches
    shown = subprocess.run(
        [*CLI, "--redis-url", redis_url, "--namespace", namespace, "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counters = json.loads(shown.stdout)["counters"]
    for counter in ("hits", "misses", "fills"):
        assert counters["total"][counter] == sum(c.stats()["total"][counter] for c in caches)
        assert counters["models"]["Product"][counter] == sum(
            c.stats()["models"]["Product"][counter] for c in caches
        )
    for cache in caches:
        cache.client.close()


def per_read_oracle(
    reads: list[Callable[[], None]], sql: SQLCounter, tap: RedisTap
) -> dict[str, int]:
    """Run each read and classify it by what it did: Postgres (a miss), Redis only (a
    Redis hit) or neither (a local hit). Round trips of other threads (the local tier's
    listener) are not the read's."""
    me = threading.get_ident()
    trips: list[Any] = []

    def mine(trip: Any) -> None:
        if threading.get_ident() == me:
            trips.append(trip)

    tap.listen(mine)
    out = {"misses": 0, "redis_hits": 0, "local_hits": 0}
    try:
        for read in reads:
            sql.reset()
            trips.clear()
            read()
            if sql.count:
                out["misses"] += 1
            elif trips:
                out["redis_hits"] += 1
            else:
                out["local_hits"] += 1
    finally:
        tap.remove(mine)
    return out


@pytest.mark.parametrize("local", [False, True])
def test_hits_and_local_hits_equal_the_reads_that_asked_neither_postgres_nor_redis(
    local: bool,
    shop_engine: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    redis_tap: RedisTap,
) -> None:
    engine = sa.create_engine(database_url)  # the shop's database, on an engine of its own
    sql = SQLCounter()
    sa.event.listen(engine, "before_cursor_execute", sql)
    client = redis_tap.client(redis_url)
    cache = Cache(client, namespace=namespace, local=local, stats_publish_interval=0)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        if local:
            tier = cache.inspector.local_tier
            assert tier is not None
            assert tier.wait_ready(10.0)

        def query() -> None:
            with factory() as s:
                s.scalars(select(Category).where(Category.id == 2).options(FromCache())).all()

        def get() -> None:
            with factory() as s:
                s.get(Product, 7)

        before = cache.stats()["total"]
        oracle = per_read_oracle([query, get] * 4, sql, redis_tap)
        after = cache.stats()["total"]
    finally:
        cache.detach()
        client.close()
        engine.dispose()
    gained = {k: after[k] - before[k] for k in ("hits", "misses", "local_hits", "fills")}
    assert gained == {
        "hits": oracle["redis_hits"] + oracle["local_hits"],
        "misses": oracle["misses"],
        "local_hits": oracle["local_hits"],
        "fills": oracle["misses"],
    }, oracle
    assert oracle["misses"] == 2
    assert (oracle["local_hits"] > 0) is local


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False) as server:
        yield server


def test_with_redis_down_every_lookup_is_an_error_or_bypassed_once(
    shop_engine: sa.Engine, own_redis: RedisServer, sql: SQLCounter
) -> None:
    """Each lookup read Postgres once; the counters say why: the first failed in Redis
    (``errors``, timed as ``error``), the breaker opened, the rest ``bypassed``."""
    cache = Cache(
        own_redis.url,
        namespace="obs",
        breaker_threshold=1,
        breaker_reset=3600,
        stats_publish_interval=0,
    )
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        own_redis.stop()
        sql.reset()
        for _ in range(3):
            with factory() as s:
                s.scalars(select(Category).where(Category.id == 2).options(FromCache())).all()
            with factory() as s:
                s.get(Product, 7)
        assert sql.count == 6
        stats = cache.stats()
    finally:
        cache.detach()
    total = stats["total"]
    assert total["hits"] == total["misses"] == total["fills"] == 0
    assert total["errors"] == 1
    assert total["bypassed"] == 5
    assert stats["regions"]["default"]["errors"] == 1
    assert stats["regions"]["default"]["bypassed"] == 2
    assert stats["models"]["Product"]["bypassed"] == 3
    assert {op: h["count"] for op, h in stats["latency"]["total"].items()} == {"error": 1}
    assert cache.inspector.breaker_openings() == 1


def test_a_commit_queued_but_not_confirmed_on_disk_counts_as_queued(
    waitaof_binary: str,
    reading: Any,
    engine: sa.Engine,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``NotOnDiskError`` says the writes are queued and will be flushed: ``queued`` must
    equal what the streams hold (the oracle: ``XLEN``)."""
    monkeypatch.setattr(wb_session, "DURABLE_WAIT_S", 0.3)
    with RedisServer(appendfsync="everysec", binary=waitaof_binary) as server:
        client = redis.Redis.from_url(server.url)
        cache = Cache(server.url, namespace=namespace, stats_publish_interval=0)
        factory = sessionmaker(engine)
        cache.attach(factory)
        try:
            with factory() as s:
                s.add(reading(sensor="t1", value=1))
                s.commit()
            client.config_set("appendfsync", "no")  # never confirmed from here on
            with factory() as s:
                s.add(reading(sensor="t2", value=2))
                with pytest.raises(NotOnDiskError):
                    s.commit()
            streams = sum(int(client.xlen(k)) for k in client.scan_iter(match="sarc:*:wb:*"))
            stats = cache.stats()
        finally:
            cache.detach()
            client.close()
    assert streams == 2
    assert stats["total"]["queued"] == streams
    assert stats["models"]["Reading"]["queued"] == streams
    assert stats["total"]["errors"] == 1


def test_metric_labels_name_models_regions_and_functions_never_statements_or_keys(
    session_factory: sessionmaker[Session], cache: Cache
) -> None:
    """Reads of many rows, statements and function arguments add no series: a label value
    is a model, a region or a function's prefix, whatever the reads' parameters."""

    @cache.cached("square", ttl=60)
    def square(n: int) -> int:
        return n * n

    def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        registry = CollectorRegistry()
        registry.register(CacheCollector(cache))
        return {
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in registry.collect()
            for sample in family.samples
        }

    def workload(ids: range) -> None:
        with session_factory() as s:
            for i in ids:
                s.get(Product, i)
                s.scalars(
                    select(Product).where(Product.price > i).limit(2).options(FromCache())
                ).all()
                by_id = select(Category).where(Category.id == i % 5 + 1)
                s.scalars(by_id.options(FromCache(region="cat"))).all()
                square(i)

    workload(range(1, 12))
    first = series()
    workload(range(12, 50))
    second = series()
    assert second == first
    scopes = {dict(labels).get("scope") for _, labels in second} - {None}  # gauges
    assert scopes == {"", "Product", "Category", "default", "cat", "square"}, scopes
    kinds = {dict(labels).get("kind") for _, labels in second}
    assert kinds == {"total", "model", "region", "function", None}, kinds
    operations = {dict(labels).get("operation") for _, labels in second} - {None}
    assert operations <= {"hit", "miss", "error", "fill", "invalidate", "write_behind_enqueue"}


@pytest.mark.parametrize("first", ["get", "query"])
def test_with_redis_down_each_mode_counts_each_lookup_once(
    in_mode: Runner, own_redis: RedisServer, first: str
) -> None:
    """The first lookup fails in Redis (``errors``, timed as ``error``: a read served
    before SQLAlchemy's pipeline, its entry a hit the last time); the breaker opens and the
    rest are ``bypassed``. Every lookup reads Postgres once, in both modes."""
    runner = dataclasses.replace(
        in_mode,
        redis_url=own_redis.url,
        cache_kwargs={"breaker_threshold": 1, "breaker_reset": 3600, "stats_publish_interval": 0},
    )

    def get(db: Db) -> None:
        with db.session() as s:
            s.get(Product, 7)

    def query(db: Db) -> None:
        with db.session() as s:
            s.scalars(select(Category).where(Category.id == 2).options(FromCache()))

    reads = [get, query] if first == "get" else [query, get]

    def scenario(db: Db) -> dict[str, Any]:
        for read in reads * 2:  # a miss, then a hit: the next look is a direct read's
            read(db)
        own_redis.stop()
        db.cache._core.counters.reset()
        db.sql.reset()
        for read in reads * 2:
            read(db)
        stats = db.cache.stats()
        stats["sql"] = db.sql.count
        return stats

    try:
        stats, _ = runner(scenario)
    finally:
        own_redis.start()
    assert stats["sql"] == 4
    failed, other = ("models", "Product"), ("regions", "default")
    if first == "query":
        failed, other = other, failed
    assert nonzero(stats[failed[0]][failed[1]]) == {"errors": 1, "bypassed": 1}
    assert nonzero(stats[other[0]][other[1]]) == {"bypassed": 2}
    assert nonzero(stats["total"]) == {"errors": 1, "bypassed": 3}
    assert {op: h["count"] for op, h in stats["latency"]["total"].items()} == {"error": 1}


def test_spans_and_histograms_agree_call_for_call(
    session_factory: sessionmaker[Session], cache: Cache, spans: InMemorySpanExporter
) -> None:
    """One span per timed call, its outcome the histogram's (a read's) or the counter's
    (a fill's): a miss and its fill, a hit, and a miss whose statement Postgres refused."""
    with session_factory() as s:
        for _ in range(2):
            s.scalars(select(Category).where(Category.id == 4).options(FromCache())).all()
            s.expunge_all()
        bad = select(Category).where(Category.id == sa.cast(sa.literal("x"), sa.Integer))
        with pytest.raises(sa.exc.DataError):
            s.scalars(bad.options(FromCache())).all()
    got = [
        (
            span.name,
            (span.attributes or {}).get("sa_redis_cache.outcome"),
            span.status.status_code is StatusCode.ERROR,
        )
        for span in spans.get_finished_spans()
    ]
    assert got == [
        ("sa_redis_cache.fill", "stored", False),
        ("sa_redis_cache.read", "miss", False),
        ("sa_redis_cache.read", "hit", False),
        ("sa_redis_cache.read", "miss", True),
    ]
    stats = cache.stats()
    latency = {op: h["count"] for op, h in stats["latency"]["regions"]["default"].items()}
    assert latency == {"miss": 2, "hit": 1, "fill": 1}
    assert nonzero(stats["regions"]["default"]) == {"misses": 2, "hits": 1, "fills": 1}


def test_worker_counters_equal_the_streams_and_the_database(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    client: redis.Redis,
    worker_engine: sa.Engine,
) -> None:
    """The worker's stats against the oracle: what was queued (the cache's ``queued``,
    ``XLEN``) and what the database holds afterwards."""
    page_view, _ = models
    ids = [wb_queue(factory, page_view, path=f"/o/{i}", views=i) for i in range(3)]
    wb_update(factory, page_view, ids[0], views=100)
    wb_update(factory, page_view, ids[0], views=101)
    worker = make_worker()
    queued = worker.stats()
    assert (queued.length, queued.pending, queued.rows_applied, queued.entries) == (5, 0, 0, 0)
    drain(worker)
    after = worker.stats()
    assert rows(worker_engine, page_view)[ids[0]] == ("/o/0", 101)
    assert len(rows(worker_engine, page_view)) == 3
    assert (after.length, after.pending, after.lag_seconds) == (0, 0, 0.0)
    assert after.entries == 5
    assert after.rows_applied == 3  # the rows written: a row's updates coalesce in a batch
    assert after.errors == after.dead_letters == after.fenced == 0
    assert after.batches >= 1


FORKS = """
import os, sys
from sqlalchemy.orm import sessionmaker
from sa_redis_cache import Cache
cache = Cache(sys.argv[1], namespace=sys.argv[2], stats_publish_interval=3600)
counters = cache._core.counters
counters.incr("function:profile", "hits", 4)  # counted before the fork, never published
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        cache.attach(sessionmaker())  # a post-fork hook attaches in each child
        counters.incr("function:profile", "hits")
        cache.detach()  # its last publish
        os._exit(0)
    children.append(pid)
for pid in children:
    assert os.waitpid(pid, 0)[1] == 0
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_children_forked_from_a_process_that_does_not_publish_publish_only_their_own(
    redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    """configuration.md: a forked child "publishes only what the child counts". A parent
    that never attached (or had detached) publishes nothing, and must not have its counts
    published once per child either. Run as a process of its own: it forks."""
    subprocess.run(
        [sys.executable, "-c", FORKS, redis_url, namespace],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=True,
    )
    cache = Cache(redis_client, namespace=namespace, stats_publish_interval=0)
    assert published(redis_client, cache, "function:profile") == {"hits": 2}
    assert published(redis_client, cache, "total") == {"hits": 2}


def test_invalidations_count_each_explicit_call_and_the_retirement_after_reattach(
    shop_engine: sa.Engine, cache: Cache
) -> None:
    """configuration.md's ``invalidations`` row, call for call."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    cache.invalidate(Product, 7)
    cache.invalidate_model(Category)
    cache.invalidate_query(select(Category).where(Category.id == 1))
    cache.invalidate_table("categories")
    cache.invalidate_region("default")
    cache.clear()
    cache.detach()
    cache.attach(factory)  # retires what went unseen while detached
    stats = cache.stats()
    assert stats["total"]["invalidations"] == 7
    assert stats["models"]["Product"]["invalidations"] == 1
    assert stats["models"]["Category"]["invalidations"] == 1
    assert stats["latency"]["total"]["invalidate"]["count"] == 7


def _rule(row_start: str) -> tuple[str, str, float]:
    """The metric, comparison and threshold operations.md suggests in the row that
    starts with ``row_start`` (``| <condition> | `metric` | `op number` ...``)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith(row_start))
    metric = row.split("|")[2].strip().strip("`")
    found = re.match(r"\s*`(==|>=|>)\s*([0-9.]+)`", row.split("|")[3])
    assert found is not None, row
    return metric, found.group(1), float(found.group(2))


def test_the_suggested_redis_unreachable_alert_holds_while_redis_stays_down(
    shop_engine: sa.Engine, own_redis: RedisServer
) -> None:
    """operations.md suggests an alert on ``sarc_breaker_open``. While Redis stays down
    the breaker is open for ``breaker_reset`` seconds after each failed call, then
    half-open (0.5) until the next call probes: a rule on ``== 1`` sees a sustained
    outage only in those seconds and never fires "for 1 minute". Here ``breaker_reset=0``
    shows at once what a scrape sees ``breaker_reset`` (2 s by default) after a failure."""
    cache = Cache(own_redis.url, namespace="obs", breaker_threshold=1, breaker_reset=0)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        own_redis.stop()
        with factory() as s:
            s.get(Product, 7)  # fails: the breaker opens
        registry = CollectorRegistry()
        registry.register(CacheCollector(cache))
        metric, op, threshold = _rule("| Redis unreachable from the app |")
        value = registry.get_sample_value(metric, {"namespace": "obs"})
        assert value == 0.5  # half-open: its probe is due, Redis is still down
        holds = {"==": value == threshold, ">=": value >= threshold, ">": value > threshold}
        assert holds[op], f"the suggested rule `{metric} {op} {threshold:g}` misses the outage"
    finally:
        cache.detach()


def test_every_redis_failure_the_breaker_counts_is_counted_in_errors(
    shop_engine: sa.Engine, own_redis: RedisServer, sql: SQLCounter
) -> None:
    """operations.md: ``sarc_errors_total`` shows the failures "the breaker opens after
    ``breaker_threshold`` in a row" of. A REPEATABLE READ transaction pins the versions
    at its start: that call failing opened the breaker, and must count."""
    cache = Cache(
        own_redis.url,
        namespace="obs",
        breaker_threshold=1,
        breaker_reset=3600,
        stats_publish_interval=0,
    )
    factory = sessionmaker(shop_engine.execution_options(isolation_level="REPEATABLE READ"))
    cache.attach(factory)
    try:
        own_redis.stop()
        sql.reset()
        with factory() as s:
            s.get(Product, 7)
        stats = cache.stats()
        opened = cache.inspector.breaker_openings()
    finally:
        cache.detach()
    assert opened == 1
    assert stats["total"]["errors"] == 1
    assert stats["total"]["bypassed"] == 1
    assert sql.count == 2  # the snapshot's SELECT 1, then the row
