"""Fixtures of the write-behind worker tests: ``pytest_plugins = ["tests.wb_fixtures"]``.

Loaded as a plugin (never imported by name, so that pytest can rewrite its asserts):
a Redis with AOF for the module (and a Redis Cluster with AOF, started when a test asks
for it), the test models with empty tables, a cache-attached sessionmaker, an engine of
the worker's own, and a factory of flush workers. A module runs its tests on both the
server and the cluster by overriding ``wb_redis_url`` (:func:`tests.wb_support.wb_server_url`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisCluster, RedisServer
from sa_redis_cache import Cache, FlushWorker, schema
from sa_redis_cache.redis_io import client_from_url
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


@pytest.fixture(scope="module")
def aof_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster started for the module, AOF on (3 primaries, a replica each)."""
    with RedisCluster(primaries=3, replicas=1, appendonly=True, node_timeout_ms=1000) as made:
        yield made


@pytest.fixture
def wb_redis_url(aof_redis: RedisServer) -> str:
    """The Redis the tests queue in: :func:`aof_redis` (a module may override this)."""
    return aof_redis.url


@pytest.fixture
def client(wb_redis_url: str) -> Iterator[redis.Redis]:
    """A client of :func:`wb_redis_url` (a cluster client on a cluster; typed as
    ``redis.Redis``, whose key commands it shares)."""
    made = client_from_url(wb_redis_url)
    yield made  # type: ignore[misc]
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
