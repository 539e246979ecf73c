"""The Prometheus exporter and ``cache.stats()``: during a workload, counters and latency
histograms move."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from devservices import free_port
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.metrics import CacheCollector
from sa_redis_cache.stats import BUCKETS, COUNTERS


@pytest.fixture
def scrape(cache: Cache) -> Iterator[str]:
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(10)


def value(text: str, name: str, **labels: str) -> float:
    """The sample of ``name`` whose labels include ``labels``."""
    for line in text.splitlines():
        found = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if found is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(found.group(2))
    raise AssertionError(f"{name} {labels} not in the scrape")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback only
        return str(response.read().decode())


def test_counters_move_during_a_workload(
    session_factory: sessionmaker[Session], scrape: str, cache: Cache
) -> None:
    stmt = select(Product).where(Product.id < 5).options(FromCache(region="catalogue"))
    with session_factory() as s:
        s.scalars(stmt).all()
    before = get(scrape)
    for _ in range(5):
        with session_factory() as s:
            s.scalars(stmt).all()
            s.get(Product, 1)
    after = get(scrape)
    region = {"kind": "region", "scope": "catalogue"}
    assert (
        value(after, "sarc_hits_total", **region) == value(before, "sarc_hits_total", **region) + 5
    )
    assert value(after, "sarc_misses_total", **region) == 1
    assert value(after, "sarc_hits_total", kind="model", scope="Product") >= 9
    assert value(after, "sarc_breaker_open", namespace=cache.namespace) == 0
    assert value(after, "sarc_undelivered_tables", namespace=cache.namespace) == 0


def counts(cache: Cache, group: str, name: str | None = None) -> dict[str, int]:
    """How many calls of each operation the latency histograms of one scope hold."""
    latency = cache.stats()["latency"][group]
    scope = latency if name is None else latency.get(name, {})
    return {operation: summary["count"] for operation, summary in scope.items()}


def test_latency_histograms_count_fills_and_invalidations(
    session_factory: sessionmaker[Session], cache: Cache, product: int
) -> None:
    # the product fixture's insert went through the instrumented engine: one invalidation
    before = counts(cache, "models", "Product")
    with session_factory() as s:
        s.get(Product, product)  # a miss: filled
    with session_factory() as s:
        row = s.get(Product, product)
        assert row is not None
        row.price = Decimal("2.00")
        s.commit()  # the commit's invalidation
    cache.invalidate_model(Product)
    latency = cache.stats()["latency"]
    fill = latency["models"]["Product"]["fill"]
    assert fill["count"] == 1
    assert fill["sum"] > 0
    assert fill["p50"] is not None
    assert fill["p50"] <= fill["p95"] <= fill["p99"]
    assert counts(cache, "models", "Product") == {
        "miss": before.get("miss", 0) + 1,  # the first get, its fill inside it
        "hit": before.get("hit", 0) + 1,  # the second get
        "fill": before.get("fill", 0) + 1,
        "invalidate": before.get("invalidate", 0) + 2,
    }
    assert counts(cache, "total")["fill"] == before.get("fill", 0) + 1


def test_reads_are_timed_under_their_outcome(
    session_factory: sessionmaker[Session], cache: Cache
) -> None:
    stmt = select(Product).where(Product.category_id == 2).options(FromCache(region="pages"))
    for _ in range(3):
        with session_factory() as s:
            s.scalars(stmt).all()  # a miss, then two hits

    @cache.cached("square", ttl=60)
    def square(x: int) -> int:
        return x * x

    assert [square(3), square(3)] == [9, 9]  # a miss, then a hit
    latency = cache.stats()["latency"]
    region = latency["regions"]["pages"]
    assert (region["miss"]["count"], region["hit"]["count"]) == (1, 2)
    assert region["hit"]["p50"] <= region["miss"]["p99"]
    function = latency["functions"]["square"]
    assert (function["miss"]["count"], function["hit"]["count"]) == (1, 1)
    assert function["fill"]["count"] == 1  # the miss's SET, timed on its own


def test_an_async_cached_functions_fill_is_timed(redis_url: str, namespace: str) -> None:
    cache = Cache(redis_url, namespace=namespace)  # a URL: it makes its asyncio client too

    @cache.cached("acube", ttl=60)
    async def cube(x: int) -> int:
        return x * x * x

    async def twice() -> list[int]:
        try:
            return [await cube(2), await cube(2)]
        finally:
            await cache.aclose()

    assert asyncio.run(twice()) == [8, 8]
    function = cache.stats()["latency"]["functions"]["acube"]
    assert (function["miss"]["count"], function["hit"]["count"], function["fill"]["count"]) == (
        1,
        1,
        1,
    )


def buckets(text: str, **labels: str) -> list[tuple[float, float]]:
    """``(le, cumulative count)`` of ``sarc_latency_seconds`` with ``labels``, in order."""
    out = []
    for line in text.splitlines():
        found = re.match(r"^sarc_latency_seconds_bucket\{(.*)\} (\S+)$", line)
        if found is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            out.append((float(have["le"]), float(found.group(2))))
    return out


def test_latency_histograms_are_scraped(
    session_factory: sessionmaker[Session], scrape: str, cache: Cache, product: int
) -> None:
    fill = {"kind": "model", "scope": "Product", "operation": "fill"}
    with session_factory() as s:
        s.get(Product, product)
    before = get(scrape)
    cache.invalidate(Product, product)
    with session_factory() as s:
        s.get(Product, product)  # filled again
    after = get(scrape)
    assert "# TYPE sarc_latency_seconds histogram" in after
    for text, count in ((before, 1), (after, 2)):
        found = buckets(text, **fill)
        assert len(found) == len(BUCKETS) + 1
        assert [le for le, _ in found] == [*BUCKETS, float("inf")]
        assert [n for _, n in found] == sorted(n for _, n in found)  # cumulative
        assert found[-1][1] == count
        assert value(text, "sarc_latency_seconds_count", **fill) == count
        assert value(text, "sarc_latency_seconds_sum", **fill) > 0
    invalidate = {"kind": "model", "scope": "Product", "operation": "invalidate"}
    # the product fixture's insert was invalidated too, through the instrumented engine
    invalidated = value(before, "sarc_latency_seconds_count", **invalidate)
    assert value(after, "sarc_latency_seconds_count", **invalidate) == invalidated + 1
    assert value(after, "sarc_latency_seconds_count", kind="total", operation="fill") == 2


def test_every_counter_reaches_prometheus(cache: Cache) -> None:
    """Every counter the library counts is scraped: ``queued`` and ``pending_hits`` were
    counted but never published, for want of a place in the list the collector reads."""
    for counter in COUNTERS:
        cache._core.counters.incr("model:Probe", counter)
    text = generate_latest(_registry_of(cache)).decode()
    for counter in COUNTERS:
        assert value(text, f"sarc_{counter}_total", kind="model", scope="Probe") == 1, counter
    assert {"queued", "pending_hits"} <= set(COUNTERS)


def _registry_of(cache: Cache) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))
    return registry
