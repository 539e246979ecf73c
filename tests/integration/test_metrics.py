"""The Prometheus exporter: scraped during a workload, its counters move."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.devservices import free_port
from sa_redis_cache.metrics import CacheCollector


@pytest.fixture
def scrape(cache: Cache) -> Iterator[str]:
    registry = CollectorRegistry()
    registry.register(CacheCollector(cache))  # type: ignore[arg-type]
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
