"""Test harness shared by every test folder.

Sections (add new fixtures to the section they belong to, or open a new one at the end):

1. Collection: tests under ``tests/integration`` and ``tests/chaos`` get their marker.
2. Services: Postgres and Redis from :func:`devservices.bring_up`, once per
   run. Unavailable services fail the run under ``CI=true`` and skip the tests elsewhere.
3. Postgres: a fresh database per run (dropped at the end) and an engine on it.
4. Redis: a client, and a unique cache namespace per test whose keys are deleted after it.
5. Redis Cluster: one real local cluster per run (``devservices.RedisCluster``), started
   on first use, for the cluster modes of ``in_mode`` (``--redis-mode``).

This run never flushes a Redis server: it may be shared with other users (docs/design.md, "Tests
and measurement").
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest
import redis
import sqlalchemy as sa

from devservices import Services, ServicesUnavailable, bring_up, redact
from devservices.cluster import RedisCluster
from devservices.scratch import scratch_database
from sa_redis_cache.redis_io import unlink_matching

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TESTS_DIR = Path(__file__).resolve().parent


def in_ci() -> bool:
    """True when ``CI`` says so: then a missing service fails the run instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the current test, or fail it under ``CI=true`` (CI never skips silently)."""
    if in_ci():
        pytest.fail(f"CI=true, so this is a failure, not a skip:\n{reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def unavailable() -> Callable[[str], NoReturn]:
    """:func:`skip_or_fail`, for tests that find a prerequisite missing (e.g. a binary)."""
    return skip_or_fail


# --------------------------------------------------------------------------- 1. collection

_MARKER_BY_FOLDER = {"integration": pytest.mark.integration, "chaos": pytest.mark.chaos}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-mode",
        choices=("single", "cluster", "all"),
        default="single",
        help=(
            "which Redis the in_mode scenarios run against: a single server (default; "
            "tests marked 'cluster' also run on a cluster), a Redis Cluster only, or both"
        ),
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(TESTS_DIR):
            marker = _MARKER_BY_FOLDER.get(path.relative_to(TESTS_DIR).parts[0])
            if marker is not None:
                item.add_marker(marker)


# --------------------------------------------------------------------------- 2. services

_SERVICES = pytest.StashKey[Services]()
_SHARED = pytest.StashKey[ExitStack]()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n``), the controlling process finds or
    starts the services once and its workers, started after this, inherit their URLs
    (``DATABASE_URL``, ``REDIS_URL``): two workers must not start two throwaway Postgres
    servers. Each worker still makes its own database and its own Redis namespaces."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    stack = ExitStack()
    try:
        found = stack.enter_context(bring_up())
    except ServicesUnavailable:
        return  # each worker reports it, skipping or failing its tests
    config.stash[_SERVICES] = found
    config.stash[_SHARED] = stack
    os.environ["DATABASE_URL"] = found.database_url
    os.environ["REDIS_URL"] = found.redis_url


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_SHARED, None)
    if shared is not None:
        shared.close()


@pytest.fixture(scope="session")
def services(pytestconfig: pytest.Config) -> Iterator[Services]:
    """Postgres and Redis for this run (env URLs, local servers, or throwaway ones)."""
    with ExitStack() as stack:
        try:
            found = stack.enter_context(bring_up())
        except ServicesUnavailable as exc:
            # pytest caches this outcome, so bring_up() is tried once per run, not per test.
            skip_or_fail(str(exc))
        pytestconfig.stash[_SERVICES] = found
        yield found


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    found = config.stash.get(_SERVICES, None)
    if found is not None:
        started = ", ".join(found.started) or "none"
        terminalreporter.write_line(
            f"services: postgres {redact(found.database_url)}, redis {redact(found.redis_url)}"
            f"; started for this run: {started}"
        )


# --------------------------------------------------------------------------- 3. postgres


@pytest.fixture(scope="session")
def database_url(services: Services) -> Iterator[str]:
    """SQLAlchemy URL (psycopg 3) of a database created for this run, dropped at its end."""
    name = f"sarc_test_{secrets.token_hex(6)}"
    # dropped WITH (FORCE): a connection leaked by a failed test must not keep it alive
    with scratch_database(services.database_url, name) as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine on this run's database."""
    eng = sa.create_engine(database_url)
    try:
        yield eng
    finally:
        eng.dispose()


# --------------------------------------------------------------------------- 4. redis


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    """URL of the Redis server for this run (shared: isolate keys with ``namespace``)."""
    return services.redis_url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain ``redis.Redis`` client (bytes replies) on this run's server."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """UNLINK every key of ``namespace`` (SCAN, never FLUSH*); return how many went."""
    # The namespace may sit right after the prefix (sarc:NS:...) or inside a cluster hash
    # tag (sarc:{NS:table}:...); it is random, so matching it anywhere is exact enough.
    return unlink_matching(client, f"sarc:*{namespace}*")


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A namespace unique to this test; its ``sarc:`` keys are deleted afterwards."""
    name = f"t{secrets.token_hex(5)}"
    yield name
    delete_namespace(redis_client, name)


# --------------------------------------------------------------------------- 5. redis cluster


@pytest.fixture(scope="session")
def redis_cluster(unavailable: Callable[[str], NoReturn]) -> Iterator[RedisCluster]:
    """A real Redis Cluster for this run: 3 primaries with one replica each, on free
    loopback ports (a test that fails a primary over leaves it ok, with other owners)."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed: the cluster modes need it")
    with RedisCluster(primaries=3, replicas=1, appendonly=False, node_timeout_ms=1000) as made:
        yield made
