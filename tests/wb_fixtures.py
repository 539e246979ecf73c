"""Fixtures of the write-behind worker tests: ``pytest_plugins = ["tests.wb_fixtures"]``.

Loaded as a plugin (never imported by name, so that pytest can rewrite its asserts):
a Redis with AOF for the module, the test models with empty tables, a cache-attached
sessionmaker, an engine of the worker's own, and a factory of flush workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisServer
from sa_redis_cache import Cache, FlushWorker, schema
from tests.wb_support import private_models


@pytest.fixture(scope="module")
def aof_redis() -> Iterator[RedisServer]:
    """A Redis started for the module, with AOF ``always`` (``attach()`` demands AOF)."""
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


@pytest.fixture
def models(engine: sa.Engine) -> Iterator[tuple[Any, Any]]:
    """``(PageView, StockLevel)`` with empty tables, and the library's tables migrated."""
    schema.upgrade(engine)
    with private_models() as found:
        found[0].metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(found[0].__table__.delete())
        yield found


@pytest.fixture
def client(aof_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of :func:`aof_redis`."""
    made = redis.Redis.from_url(aof_redis.url)
    yield made
    made.close()


@pytest.fixture
def factory(
    engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker attached to a cache in this test's namespace."""
    cache = Cache(client, namespace=namespace)
    made = sessionmaker(engine)
    cache.attach(made)
    yield made
    cache.detach()


@pytest.fixture
def worker_engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine of the worker's own, as a worker process would have."""
    made = sa.create_engine(database_url)
    yield made
    made.dispose()


@pytest.fixture
def make_worker(
    worker_engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> Iterator[Any]:
    """``make_worker(consumer="w1", **kwargs)``: a FlushWorker of PageView, released after."""
    made: list[FlushWorker] = []

    def make(consumer: str = "w1", **kwargs: Any) -> FlushWorker:
        worker = FlushWorker(
            worker_engine,
            client,
            namespace=namespace,
            models=[models[0]],
            consumer=consumer,
            **kwargs,
        )
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.release()
