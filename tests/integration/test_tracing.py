"""OpenTelemetry spans around cache calls, seen through the SDK's in-memory exporter.

The provider is given to :func:`sa_redis_cache.tracing.use_tracer_provider` for each test
and taken back after it: the global OpenTelemetry provider can be set once per process,
so the run never sets it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache
from sa_redis_cache.stats import Stats
from sa_redis_cache.tracing import Measurement, active_tracer, use_tracer_provider

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    yield exporter
    use_tracer_provider(None)
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_fill_and_the_invalidations_are_traced(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    spans: InMemorySpanExporter,
) -> None:
    with session_factory() as s:
        s.get(Product, product)  # a miss: the entity entry is filled
    (fill,) = named(spans, "sa_redis_cache.fill")
    assert attributes(fill) == {
        "db.system": "redis",
        "sa_redis_cache.namespace": cache.namespace,
        "sa_redis_cache.operation": "fill",
        "sa_redis_cache.scope": "model:Product",
        "sa_redis_cache.outcome": "stored",
    }
    with session_factory() as s:
        row = s.get(Product, product)
        assert row is not None
        row.price = Decimal("2.00")
        s.commit()  # the commit-time invalidation (write-through for Product)
    cache.invalidate(Product, product)
    commit, explicit = named(spans, "sa_redis_cache.invalidate")
    assert attributes(commit)["sa_redis_cache.scope"] == "model:Product"
    assert attributes(commit)["sa_redis_cache.outcome"] == "delivered"
    assert attributes(explicit)["sa_redis_cache.scope"] == "model:Product"
    assert commit.status.status_code is StatusCode.UNSET
    assert commit.end_time is not None
    assert explicit.start_time is not None
    assert commit.end_time <= explicit.start_time


def test_a_failed_call_is_an_error_span_with_its_exception(spans: InMemorySpanExporter) -> None:
    stats = Stats()
    with pytest.raises(ConnectionError), Measurement(stats, None, "invalidate", (), "ns"):
        raise ConnectionError("redis went away")
    (span,) = named(spans, "sa_redis_cache.invalidate")
    assert span.status.status_code is StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    assert attributes(span)["sa_redis_cache.outcome"] == "error"
    assert "sa_redis_cache.scope" not in attributes(span)
    assert stats.snapshot()["latency"]["total"]["invalidate"]["count"] == 1


def test_a_write_behind_commit_is_traced(
    factory: sessionmaker[Session], models: Any, spans: InMemorySpanExporter
) -> None:
    page_view, _ = models
    with factory() as s:
        s.add_all([page_view(path="/a"), page_view(path="/b")])
        s.commit()
    (enqueue,) = named(spans, "sa_redis_cache.write_behind_enqueue")
    assert attributes(enqueue)["sa_redis_cache.scope"] == "model:" + page_view.__name__
    assert enqueue.status.status_code is StatusCode.UNSET


def test_no_span_is_made_without_a_tracer_provider() -> None:
    # the API's default provider only hands out spans that record nothing: none are made
    assert active_tracer(time.perf_counter()) is None
