"""Fixtures for the integration tests: the example shop, a cache on it, and a SQL counter.

``in_mode`` runs one scenario with a ``Session`` and with an ``AsyncSession``
(:mod:`tests.modes`); a module whose scenarios need another Redis server overrides
``mode_redis_url``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Base, Product, seed
from sa_redis_cache import Cache
from sa_redis_cache.redis_io import client_from_url
from tests.modes import CLUSTER_MODES, MODES, Runner
from tests.seams import RedisTap
from tests.support import SQLCounter, TierWorld, Two, tier_world

if TYPE_CHECKING:
    from collections.abc import Iterator
from decimal import Decimal


@pytest.fixture(autouse=True)
def no_cache_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A cache left attached to the shared engine would act in every later test."""
    if "shop_engine" not in request.fixturenames:
        yield
        return
    engine: sa.Engine = request.getfixturevalue("shop_engine")
    before = len(engine.dispatch.after_cursor_execute)
    yield
    leaked = len(engine.dispatch.after_cursor_execute) - before
    assert leaked <= 0, f"{leaked} engine listener(s) left on shop_engine: detach the cache"


@pytest.fixture(scope="session")
def shop_engine(engine: sa.Engine) -> sa.Engine:
    """The run's database with the shop schema and seed data (shared: restore what you change)."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(session, products=120, customers=30, orders=60)
    return engine


@pytest.fixture
def redis_tap() -> RedisTap:
    """A tap on the Redis transport: its listeners see every round trip of the clients it
    makes (:class:`tests.seams.RedisTap`)."""
    return RedisTap()


@pytest.fixture
def cache_client(redis_url: str, request: pytest.FixtureRequest) -> redis.Redis:
    """The Redis client of ``cache`` (a module may override this fixture). Tapped by
    ``redis_tap`` in a module that sets ``TAPS_CACHE = True``: its tests see the cache's
    round trips."""
    if getattr(request.module, "TAPS_CACHE", False):
        tap: RedisTap = request.getfixturevalue("redis_tap")
        return tap.client(redis_url)
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def cache(cache_client: redis.Redis, namespace: str) -> Iterator[Cache]:
    """A cache in this test's own namespace."""
    client = cache_client
    cache = Cache(client, namespace=namespace, default_ttl=300)
    yield cache
    # the shared engine would otherwise keep every test's listeners (one Redis round
    # trip per cache on each Core statement) and recreate keys of deleted namespaces
    cache.detach()
    client.close()


@pytest.fixture
def fresh_cache(redis_url: str, namespace: str) -> Iterator[Cache]:
    """A cache of this test's namespace that nothing is attached to yet."""
    client = redis.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace)
    yield cache
    cache.detach()
    client.close()


@pytest.fixture(params=["redis", "local"])
def tiered(
    request: pytest.FixtureRequest, database_url: str, redis_url: str, namespace: str
) -> Iterator[TierWorld]:
    """A :class:`~tests.support.TierWorld` whose hits come from the Redis tier, or from the
    local tier (``Cache(local=True)``); a test runs with each."""
    with tier_world(request.param, database_url, redis_url, namespace) as made:
        yield made


@pytest.fixture
def two(shop_engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Two]:
    """A writer's and a reader's cache on this test's namespace (:class:`tests.support.Two`)."""
    caches = Two(shop_engine, redis_url, namespace)
    yield caches
    caches.close()


@pytest.fixture
def category(shop_engine: sa.Engine) -> Iterator[int]:
    """Category 3, its name restored afterwards (the shop's rows are shared)."""
    with shop_engine.connect() as connection:
        before = connection.scalar(sa.text("SELECT name FROM categories WHERE id = 3"))
    yield 3
    with shop_engine.begin() as connection:
        connection.execute(sa.text("UPDATE categories SET name = :n WHERE id = 3"), {"n": before})


@pytest.fixture
def product(shop_engine: sa.Engine) -> Iterator[int]:
    """A product of the test's own (category 1, price 1.00), deleted afterwards."""
    with Session(shop_engine) as s:
        p = Product(category_id=1, name="scratch", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        pid = p.id
    yield pid
    with Session(shop_engine) as s:
        s.execute(sa.delete(Product).where(Product.id == pid))
        s.commit()


@pytest.fixture
def session_factory(shop_engine: sa.Engine, cache: Cache) -> sessionmaker[Session]:
    """A sessionmaker on the shop, attached to ``cache``."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    return factory


@pytest.fixture
def sql(shop_engine: sa.Engine) -> Iterator[SQLCounter]:
    """Counts the statements that reach Postgres."""
    counter = SQLCounter()
    sa.event.listen(shop_engine, "before_cursor_execute", counter)
    yield counter
    sa.event.remove(shop_engine, "before_cursor_execute", counter)


@pytest.fixture
def mode_redis_url(redis_url: str) -> str:
    """The Redis server of ``in_mode``'s caches (a module may override this fixture)."""
    return redis_url


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``in_mode``'s modes: a single server always (unless ``--redis-mode=cluster``), a
    Redis Cluster with ``--redis-mode=cluster`` or ``all``, and for tests marked
    ``cluster`` in every run (the subset CI runs on a cluster each time)."""
    if "in_mode" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--redis-mode")
    modes: tuple[str, ...] = () if chosen == "cluster" else MODES
    # a module with a server of its own (ACL, TLS, AOF) runs its scenarios there only,
    # unless it names a cluster of its own too (write-behind's, with AOF)
    own_server = hasattr(metafunc.module, "mode_redis_url") and not hasattr(
        metafunc.module, "mode_cluster_url"
    )
    marked = metafunc.definition.get_closest_marker("cluster") is not None
    if not own_server and (chosen != "single" or marked):
        modes += CLUSTER_MODES
    if not modes:
        modes = MODES
    metafunc.parametrize("in_mode", modes, indirect=True)


@pytest.fixture
def in_mode(
    request: pytest.FixtureRequest,
    database_url: str,
    mode_redis_url: str,
    namespace: str,
    shop_engine: sa.Engine,
) -> Runner:
    """Runs a scenario with a ``Session`` (sync) or an ``AsyncSession`` (async), on a
    single server or (``cluster-sync``, ``cluster-async``) on the run's Redis Cluster."""
    mode: str = request.param
    url = mode_redis_url
    if mode in CLUSTER_MODES:
        url = request.getfixturevalue("mode_cluster_url")
    return Runner(mode, database_url, url, namespace)


@pytest.fixture
def mode_cluster_url(request: pytest.FixtureRequest) -> str:
    """The Redis Cluster of ``in_mode``'s cluster modes: the run's (a module may override
    this fixture with a cluster of its own, e.g. with AOF)."""
    url: str = request.getfixturevalue("redis_cluster").url
    return url


@pytest.fixture
def mode_redis_client(in_mode: Runner) -> Iterator[redis.Redis]:
    """A client of the Redis ``in_mode`` runs against (a cluster client in a cluster mode;
    typed as ``redis.Redis``, whose key commands it shares)."""
    client = client_from_url(in_mode.redis_url)
    try:
        yield client  # type: ignore[misc]
    finally:
        client.close()
