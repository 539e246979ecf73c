"""Write-behind with one schema per tenant: queues, pending states and workers stay apart.

Two sessions that write the same primary key in two tenants' schemas (through
``schema_translate_map``) queue two different rows. Each must read its own queued state,
and a worker whose engine writes to one tenant's schema must drain that tenant's queue
only: applying the other's rows there would put them in the wrong tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import Cache, FlushWorker, schema
from tests.support import tenant_schemas
from tests.wb_support import drain, queue, rows

pytest_plugins = ["tests.wb_fixtures"]

TENANTS = ("wb_tenant_a", "wb_tenant_b")


@pytest.fixture
def tenant_engines(database_url: str, models: Any) -> Iterator[dict[str, sa.Engine]]:
    """An engine per tenant schema holding the write-behind table and the library's tables."""
    with tenant_schemas(database_url, TENANTS, models[0].metadata, schema.metadata) as engines:
        yield engines


def test_tenants_queue_apart_and_each_worker_drains_its_own(
    tenant_engines: dict[str, sa.Engine], client: redis.Redis, namespace: str, models: Any
) -> None:
    page_view, _ = models
    a, b = TENANTS
    cache = Cache(client, namespace=namespace)
    factories = {name: sessionmaker(e) for name, e in tenant_engines.items()}
    for factory in factories.values():
        cache.attach(factory)
    workers: list[FlushWorker] = []
    try:
        pk = uuid.uuid4()
        for name, factory in factories.items():
            queue(factory, page_view, id=pk, path=f"/{name}", views=1)

        def queued_path(name: str) -> str:
            with factories[name]() as s:
                view = s.get(page_view, pk)
                assert view is not None
                return str(view.path)

        assert {name: queued_path(name) for name in TENANTS} == {n: f"/{n}" for n in TENANTS}

        def worker(name: str) -> FlushWorker:
            made = FlushWorker(
                tenant_engines[name], client, namespace=namespace, models=[page_view]
            )
            workers.append(made)
            return made

        assert drain(worker(a)) == 1
        assert rows(tenant_engines[a], page_view) == {pk: (f"/{a}", 1)}
        assert rows(tenant_engines[b], page_view) == {}  # still queued, not in tenant a
        assert queued_path(b) == f"/{b}"
        assert drain(worker(b)) == 1
        assert rows(tenant_engines[b], page_view) == {pk: (f"/{b}", 1)}
        assert {name: queued_path(name) for name in TENANTS} == {n: f"/{n}" for n in TENANTS}
    finally:
        for made in workers:
            made.release()
        cache.detach()


def test_a_session_of_one_tenant_never_reads_the_others_queued_row(
    tenant_engines: dict[str, sa.Engine], client: redis.Redis, namespace: str, models: Any
) -> None:
    page_view, _ = models
    a, b = TENANTS
    cache = Cache(client, namespace=namespace)
    factories = {name: sessionmaker(e) for name, e in tenant_engines.items()}
    for factory in factories.values():
        cache.attach(factory)
    try:
        pk = queue(factories[a], page_view, path="/only-in-a", views=1)
        with factories[b]() as s:
            assert s.get(page_view, pk) is None
        with Session(tenant_engines[b]) as s:  # nor did anything reach tenant b's table
            assert s.get(page_view, pk) is None
    finally:
        cache.detach()
