"""Review probes of write-behind durability: poison operations, database faults mid-batch,
a hung Redis, with the database (plain SQL) as the oracle.

What tests/chaos and tests/integration/test_dlq_replay.py already cover (SIGKILL between
commit and ack, a stopped Postgres, a CHECK violation's replay) is not repeated here.
Constraints a probe adds to the shared test table are dropped again by :func:`constraints`.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache.schema import dead_letters
from sa_redis_cache.worker import replay_dead_letters
from tests.wb_support import drain, queue, rows, update

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture
def constraints(worker_engine: sa.Engine) -> Iterator[list[str]]:
    """DDL a test adds to ``wb_page_views``: ``constraints.append(name)`` after adding one;
    each is dropped afterwards (the table is shared by the run)."""
    added: list[str] = []
    yield added
    with worker_engine.begin() as conn:
        conn.execute(text("DELETE FROM wb_page_views"))
        for name in added:
            conn.execute(text(f"ALTER TABLE wb_page_views DROP CONSTRAINT IF EXISTS {name}"))
        conn.execute(text("DROP TABLE IF EXISTS wb_review_parents"))


def letters(engine: sa.Engine, namespace: str) -> list[Any]:
    with engine.connect() as conn:
        stmt = select(dead_letters).where(dead_letters.c.namespace == namespace)
        return list(conn.execute(stmt.order_by(dead_letters.c.id)).all())


def ddl(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


# -- (3) poison operations -----------------------------------------------------------------


def test_a_deferred_constraint_poison_is_dead_lettered_not_retried_forever(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
    constraints: list[str],
) -> None:
    """A DEFERRABLE INITIALLY DEFERRED constraint fails at COMMIT, not at the statement:
    the bisection's savepoints all succeed, and the batch's commit failed again on every
    pass, so one poison row held its whole partition (and every later write) forever."""
    page_view, _ = models
    ddl(
        worker_engine,
        "ALTER TABLE wb_page_views ADD CONSTRAINT wb_review_path_unique UNIQUE (path) "
        "DEFERRABLE INITIALLY DEFERRED",
    )
    constraints.append("wb_review_path_unique")
    first = queue(factory, page_view, path="/same", views=1)
    worker = make_worker(max_backoff=0.05)
    drain(worker)
    second = queue(factory, page_view, path="/same", views=2)  # the poison
    other = queue(factory, page_view, path="/other", views=3)
    drain(worker, limit=10)
    assert rows(worker_engine, page_view) == {first: ("/same", 1), other: ("/other", 3)}
    [letter] = letters(worker_engine, namespace)
    assert letter.payload["id"] == second.hex
    assert "wb_review_path_unique" in letter.error
