"""Dead-letter replay: a poison row lands once its cause is fixed, never over a newer write.

The poison row violates ``wb_views_not_negative`` (``views >= 0``) of the test table; a
test "fixes the cause" by dropping that CHECK, and puts it back afterwards (the table is
shared by the run). ``dlq replay`` runs in-process with click's runner, on the models of
the running test (``--model tests.wb_support:active_models``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from devservices import free_port
from sa_redis_cache import FlushWorker
from sa_redis_cache.cli import cli
from sa_redis_cache.protocol import partition_of, pk_text
from sa_redis_cache.worker import replay_dead_letters
from tests.wb_support import (
    CHECK,
    WB_SERVERS,
    drain,
    letters,
    queue,
    reset_page_views,
    rows,
    update,
    wb_server_url,
)

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture(params=WB_SERVERS)
def wb_redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a Redis server and on a Redis Cluster, both with AOF."""
    return wb_server_url(request)


MODELS = "tests.wb_support:active_models"


@pytest.fixture
def fix_cause(worker_engine: sa.Engine) -> Iterator[Any]:
    """``fix_cause()`` drops the CHECK the poison rows violate; it comes back afterwards."""

    def fix() -> None:
        with worker_engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE wb_page_views DROP CONSTRAINT {CHECK}"))

    yield fix
    with worker_engine.begin() as conn:
        reset_page_views(conn)


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)


@pytest.fixture
def base(wb_redis_url: str, namespace: str, database_url: str) -> list[str]:
    """Global options for the in-process command line."""
    return ["--redis-url", wb_redis_url, "--namespace", namespace, "--database-url", database_url]


def test_a_poison_row_is_replayed_once_its_cause_is_fixed(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    fix_cause: Any,
) -> None:
    page_view, _ = models
    good = queue(factory, page_view, path="/ok", views=1)
    poison = queue(factory, page_view, path="/poison", views=-1)
    drain(make_worker())
    assert set(rows(worker_engine, page_view)) == {good}
    [letter] = letters(worker_engine, namespace)
    with factory() as s:
        s.get(page_view, poison)  # the cache now says "no such row" (a negative entry)

    # the cause is not fixed yet: it fails again and stays, with the new error
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert result.replayed == []
    assert set(result.failed) == {letter.id}
    assert CHECK in result.failed[letter.id]
    [again] = letters(worker_engine, namespace)
    assert again.replayed_at is None
    assert again.attempts == 2

    fix_cause()
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert result.ok
    assert result.replayed == [letter.id]
    assert rows(worker_engine, page_view) == {good: ("/ok", 1), poison: ("/poison", -1)}
    [done] = letters(worker_engine, namespace)
    assert done.replayed_at is not None
    with factory() as s:  # the negative entry was invalidated
        found = s.get(page_view, poison)
        assert found is not None
        assert found.views == -1

    # a second replay does nothing
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert (result.replayed, result.failed, result.superseded) == ([], {}, {})
    assert letters(worker_engine, namespace)[0].replayed_at == done.replayed_at


def test_a_dead_letter_never_overwrites_a_newer_write(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    fix_cause: Any,
) -> None:
    page_view, _ = models
    worker = make_worker()
    kept = queue(factory, page_view, path="/kept", views=1)
    twice = queue(factory, page_view, path="/twice", views=1)
    drain(worker)
    update(factory, page_view, kept, views=-5)  # poison
    update(factory, page_view, twice, views=-6)  # poison
    drain(worker)
    first, second = letters(worker_engine, namespace)
    assert first.replayed_at is None
    assert second.replayed_at is None
    # a newer, valid write of `kept` lands: the worker marks its older letter superseded
    update(factory, page_view, kept, views=7)
    # a newer poison write of `twice`: the newest letter is the one that counts
    update(factory, page_view, twice, views=-8)
    drain(worker)
    assert worker.superseded == 2
    by_id = {letter.id: letter for letter in letters(worker_engine, namespace)}
    assert by_id[first.id].replayed_at is not None
    assert by_id[first.id].error.startswith("superseded by entry ")
    assert CHECK in by_id[first.id].error  # the original cause is kept after the note
    assert by_id[second.id].replayed_at is not None
    newest = max(by_id)
    assert by_id[newest].replayed_at is None

    fix_cause()
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert result.replayed == [newest]
    assert rows(worker_engine, page_view) == {kept: ("/kept", 7), twice: ("/twice", -8)}
    # asked for by id, the superseded one is explained and left alone
    result = replay_dead_letters(worker_engine, client, namespace, [page_view], ids=[first.id])
    assert result.replayed == []
    assert result.skipped[first.id].startswith("already resolved: superseded by entry ")
    assert rows(worker_engine, page_view)[kept] == ("/kept", 7)


def test_an_older_undecodable_entry_is_superseded_by_a_newer_one_of_its_batch(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    page_view, _ = models
    pk = uuid.uuid4()
    partitions = FlushWorker(
        worker_engine, client, namespace=namespace, models=[page_view]
    ).partitions
    info_hash = partitions[0].info.schema_hash
    text_pk = pk_text([pk])
    stream = partitions[partition_of(text_pk, 4)].stream
    # an entry the worker cannot decode, then a good write of the same row, in one batch
    client.xadd(stream, {"o": "u", "k": text_pk, "h": info_hash, "d": b"[not json"})
    queue(factory, page_view, id=pk, path="/newer", views=3)
    drain(make_worker())
    [letter] = letters(worker_engine, namespace)
    assert letter.error.startswith("superseded by entry ")
    assert "undecodable stream entry" in letter.error
    assert letter.replayed_at is not None
    assert rows(worker_engine, page_view) == {pk: ("/newer", 3)}


def test_replay_needs_redis_and_changes_nothing_without_it(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
    fix_cause: Any,
) -> None:
    page_view, _ = models
    poison = queue(factory, page_view, path="/poison", views=-1)
    drain(make_worker())
    fix_cause()
    down = redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    result = replay_dead_letters(worker_engine, down, namespace, [page_view])
    [letter] = letters(worker_engine, namespace)
    assert "Redis failed" in result.failed[letter.id]
    assert letter.replayed_at is None
    assert letter.attempts == 1
    assert poison not in rows(worker_engine, page_view)


# --------------------------------------------------------------------------- command line


def test_dlq_replay_command(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
    base: list[str],
    fix_cause: Any,
) -> None:
    page_view, _ = models
    poison = queue(factory, page_view, path="/poison", views=-1)
    drain(make_worker())
    [letter] = letters(worker_engine, namespace)
    replay = [*base, "dlq", "replay", "--model", MODELS]

    refused = run(*replay, stdin="n\n")
    assert refused.exit_code == 1
    assert "Replay 1 dead letter(s)" in refused.stderr
    assert "not confirmed: nothing was replayed" in refused.stderr

    failed = run(*replay, "--yes")  # the cause is still there
    assert failed.exit_code == 1, failed.output
    assert f"failed      {letter.id}: " in failed.stdout
    assert CHECK in failed.stdout

    fix_cause()
    done = run(*replay, "--id", str(letter.id), stdin="y\n")
    assert done.exit_code == 0, done.output
    assert f"replayed    {letter.id}" in done.stdout
    assert "1 replayed, 0 superseded, 0 failed (left open), 0 skipped" in done.stdout
    assert rows(worker_engine, page_view)[poison] == ("/poison", -1)

    again = run(*replay, "--yes")
    assert again.exit_code == 0, again.output
    assert f"no open dead letters to replay in namespace '{namespace}'" in again.stdout
    as_json = run(*replay, "--yes", "--json", "--id", str(letter.id))
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["replayed"] == []


def test_dlq_replay_usage_errors(base: list[str], models: Any) -> None:
    unknown_table = run(*base, "dlq", "replay", "--model", MODELS, "--table", "nope", "--yes")
    assert unknown_table.exit_code == 2
    assert "no write-behind model given for table 'nope'" in unknown_table.stderr
    no_model = run(*base, "--models", "examples.shop", "dlq", "replay", "--yes")
    assert no_model.exit_code == 2
    assert "pass --model module:Class" in no_model.stderr
    not_write_behind = run(*base, "dlq", "replay", "--model", "examples.shop:Product")
    assert not_write_behind.exit_code == 2
    assert "strategy='write_behind'" in not_write_behind.stderr
    bad_id = run(*base, "dlq", "replay", "--model", MODELS, "--id", "x")
    assert bad_id.exit_code == 2
