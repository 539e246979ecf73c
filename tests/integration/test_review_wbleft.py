"""Review probes of write-behind leftovers, with the database (plain SQL, plain SQLAlchemy
sessions on an engine the cache never saw) as the oracle:

* a batch that always exceeds Postgres' ``statement_timeout`` (SQLSTATE 57014);
* a NUL character inside a JSON/JSONB value, refused at the flush as in a text column;
* a failed enqueue restores the session's objects as SQLAlchemy's rollback does;
* a new object whose primary key the table already holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import FlushWorker
from sa_redis_cache.protocol import partition_of, pk_text
from sa_redis_cache.worker import replay_dead_letters
from tests.wb_chaos import wait_for
from tests.wb_support import PARTITIONS, letters, queue, rows

pytest_plugins = ["tests.wb_fixtures"]


def ddl(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def one_partition_keys(count: int) -> list[uuid.UUID]:
    """``count`` ids of one partition of ``wb_page_views``."""
    found: dict[int, list[uuid.UUID]] = {}
    while True:
        key = uuid.uuid4()
        group = found.setdefault(partition_of(pk_text([key]), PARTITIONS), [])
        group.append(key)
        if len(group) == count:
            return group


# -- 1. a batch that always exceeds statement_timeout --------------------------------------

TIMEOUT_MS = 300
FITS = 2
"""Rows one INSERT may write before the trigger below makes it outlast the timeout."""


@pytest.fixture
def slow_inserts(worker_engine: sa.Engine) -> Iterator[None]:
    """A trigger on ``wb_page_views`` that makes an INSERT statement of more than
    :data:`FITS` rows, or of a row whose path is ``/slow``, sleep until the worker's
    ``statement_timeout`` cancels it: a real SQLSTATE 57014, whatever the machine's load."""
    ddl(
        worker_engine,
        "CREATE OR REPLACE FUNCTION wb_review_rows_reset() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN PERFORM set_config('wb_review.rows', '0', true); RETURN NULL; END $$",
        "CREATE OR REPLACE FUNCTION wb_review_rows_slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ DECLARE n int := coalesce(nullif(current_setting('wb_review.rows', true), ''), "
        "'0')::int + 1; BEGIN PERFORM set_config('wb_review.rows', n::text, true); "
        f"IF n > {FITS} OR NEW.path = '/slow' THEN PERFORM pg_sleep(60); END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER wb_review_rows_reset BEFORE INSERT ON wb_page_views "
        "FOR EACH STATEMENT EXECUTE FUNCTION wb_review_rows_reset()",
        "CREATE TRIGGER wb_review_rows_slow BEFORE INSERT ON wb_page_views "
        "FOR EACH ROW EXECUTE FUNCTION wb_review_rows_slow()",
    )
    yield
    drop_slow_inserts(worker_engine)


def drop_slow_inserts(engine: sa.Engine) -> None:
    ddl(
        engine,
        "DROP TRIGGER IF EXISTS wb_review_rows_slow ON wb_page_views",
        "DROP TRIGGER IF EXISTS wb_review_rows_reset ON wb_page_views",
        "DROP FUNCTION IF EXISTS wb_review_rows_slow()",
        "DROP FUNCTION IF EXISTS wb_review_rows_reset()",
    )


def test_a_batch_over_the_statement_timeout_shrinks_and_a_slow_operation_is_dead_lettered(
    factory: sessionmaker[Session],
    models: Any,
    client: redis.Redis,
    namespace: str,
    database_url: str,
    worker_engine: sa.Engine,
    slow_inserts: None,
) -> None:
    """Eight inserts of one partition, one of them (``/slow``) slower alone than the
    worker's ``statement_timeout``, and no INSERT of more than two rows fits in it. The
    worker retried the whole batch at the same size forever: nothing ever landed. It must
    halve the batch down to what fits, apply every other row (those behind the slow one
    included), dead-letter the slow one after ``timeout_attempts`` timeouts alone, and
    that letter replays once the cause is gone."""
    page_view, _ = models
    keys = one_partition_keys(8)
    for i, key in enumerate(keys):
        queue(factory, page_view, id=key, path="/slow" if i == 3 else f"/p{i}", views=i)
    engine = sa.create_engine(
        database_url, connect_args={"options": f"-c statement_timeout={TIMEOUT_MS}"}
    )
    worker = FlushWorker(engine, client, namespace=namespace, models=[page_view], max_backoff=0.05)
    try:
        wait_for(
            lambda: worker.run_once() == 0 and worker.stats(database=False).length == 0,
            "the partition to drain",
            timeout=60,
        )
    finally:
        worker.release()
        engine.dispose()
    expected = {key: (f"/p{i}", i) for i, key in enumerate(keys) if i != 3}
    assert rows(worker_engine, page_view) == expected
    [letter] = letters(worker_engine, namespace)
    assert letter.payload["id"] == keys[3].hex
    assert "statement timeout" in letter.error
    assert "timed out alone 5 times" in letter.error
    assert worker.dead_letters == 1

    drop_slow_inserts(worker_engine)
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert result.replayed == [letter.id]
    assert rows(worker_engine, page_view) == {**expected, keys[3]: ("/slow", 3)}
