"""``sa-redis-cache inspect`` of write-behind rows: the pending state it reports is what
``session.get()`` returns, before and after the worker flushes it.

In-process runs (click's runner) against a Redis with AOF and a Redis Cluster with AOF
(:mod:`tests.wb_fixtures`); the models are the running test's (:mod:`tests.wb_support`),
named by class through ``--models tests.wb_support``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import redis
import redis.cluster
from click.testing import CliRunner

from sa_redis_cache.cli import cli
from tests.wb_support import WB_SERVERS, drain, queue, remove, update, wb_server_url

if TYPE_CHECKING:
    import uuid

    from sqlalchemy.orm import Session, sessionmaker

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture(params=WB_SERVERS)
def wb_redis_url(request: pytest.FixtureRequest) -> str:
    return wb_server_url(request)


@pytest.fixture
def base(wb_redis_url: str, namespace: str) -> list[str]:
    return ["--redis-url", wb_redis_url, "--namespace", namespace, "--models", "tests.wb_support"]


def run(*args: str) -> str:
    """``sa-redis-cache ARGS``' output; a failure or a traceback fails the test."""
    # the shell's DATABASE_URL (python -m devservices sets one) would name another database
    result = CliRunner().invoke(cli, list(args), env={"DATABASE_URL": None}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def inspected(base: list[str], pk: uuid.UUID, *more: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        run(*base, "inspect", "PageView", str(pk), "--json", *more)
    )
    return document


def got(factory: sessionmaker[Session], model: Any, pk: uuid.UUID) -> Any:
    with factory() as s:
        obj = s.get(model, pk)
        return None if obj is None else obj.path


def test_inspect_reports_the_queued_state_session_get_returns(
    base: list[str],
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    client: redis.Redis,
    database_url: str,
) -> None:
    page_view, _ = models
    pk = queue(factory, page_view, path="/v1")
    update(factory, page_view, pk, path="/v2")
    document = inspected(base, pk)
    assert document["state"] == "pending"
    assert "returns the queued row" in document["detail"]
    assert document["pending"]["op"] == "upsert"
    assert document["pending"]["row"]["path"] == "/v2" == got(factory, page_view, pk)
    assert document["row"]["path"] == "/v2"  # the enqueue wrote the entity entry too
    human = run(*base, "inspect", "PageView", str(pk))
    assert "pending: a write-behind write is queued" in human
    assert "Queued row (write-behind)" in human
    assert "'/v2'" in human

    # the entity entry gone: session.get() still returns the queued row, as inspect says
    run(*base, "invalidate", "PageView", str(pk), "--yes")
    document = inspected(base, pk)
    assert document["entry_state"] == "absent"
    assert document["state"] == "pending"
    assert document["pending"]["row"]["path"] == "/v2" == got(factory, page_view, pk)
    # named by its database, the pending key is computed rather than found
    by_url = inspected(base, pk, "--bind-url", database_url)
    assert by_url["pending"]["key"] == document["pending"]["key"]
    assert by_url["state"] == "pending"

    remove(factory, page_view, pk)
    document = inspected(base, pk)
    assert document["state"] == "pending"
    assert document["pending"]["op"] == "delete"
    assert document["pending"]["row"] is None
    assert "session.get() returns None" in document["detail"]
    assert got(factory, page_view, pk) is None

    drain(make_worker())
    document = inspected(base, pk)
    assert document["pending"] is None  # none left to find
    assert document["state"] == document["entry_state"] == "absent"
    assert got(factory, page_view, pk) is None
    by_url = inspected(base, pk, "--bind-url", database_url)
    assert by_url["pending"]["op"] is None
    assert "no queued write" in by_url["pending"]["detail"]

    # a pending key that holds no queued state: reads skip it, and inspect says so
    client.set(by_url["pending"]["key"], b"planted")
    document = inspected(base, pk)
    assert document["pending"]["op"] is None
    assert "session.get() skips it" in document["pending"]["detail"]
    assert document["state"] == document["entry_state"] != "pending"
    assert got(factory, page_view, pk) is None


def test_inspect_finds_the_entries_and_pending_states_in_one_walk(
    base: list[str],
    factory: sessionmaker[Session],
    models: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a database URL, a write-behind row's entity entries and pending states are
    found by pattern: in one walk of the keyspace, since ``MATCH`` filters only after the
    server has walked every key (on a cluster, every primary's)."""
    page_view, _ = models
    pk = queue(factory, page_view, path="/v1")
    walks: list[str] = []
    for cls in (redis.Redis, redis.cluster.RedisCluster):
        scan_iter = cls.scan_iter

        def counted(self: Any, *args: Any, scan_iter: Any = scan_iter, **kwargs: Any) -> Any:
            if str(kwargs.get("match", "")).startswith(f"sarc:{namespace}:"):
                walks.append(kwargs["match"])
            return scan_iter(self, *args, **kwargs)

        monkeypatch.setattr(cls, "scan_iter", counted)
    document = inspected(base, pk)
    assert document["state"] == "pending"
    assert document["row"]["path"] == "/v1"
    assert len(walks) == 1, walks
