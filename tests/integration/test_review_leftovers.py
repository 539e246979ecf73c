"""Leftover faults of earlier reviews, each checked against real Postgres and Redis.

* the flush worker retried for good a batch whose operation raised outside the database
  on every attempt, where a statement timeout is dead-lettered after ``timeout_attempts``;
* the engine listener's recogniser of textual writes missed statements that open with a
  comment, a parenthesis or a ``WITH``;
* ``session.refresh(obj)`` served cached relationships a plain session reads again.
"""

from __future__ import annotations

import gc
import json
import sys
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, FlushWorker, FromCache, schema
from sa_redis_cache.cli import cli
from tests.blog import MOVE_POST, Author, Post, blog_schema
from tests.wb_support import letters

if TYPE_CHECKING:
    from collections.abc import Iterator

pytest_plugins = ["tests.wb_fixtures"]


# --------------------------------------------------------------------------- worker errors


class _Picky(sa.types.TypeDecorator[str]):
    """A string column whose bind refuses one value in Python, on every attempt, while
    ``refusing`` is set (a validation in the type, a key the worker's process lacks)."""

    impl = sa.String
    cache_ok = True
    refusing = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if _Picky.refusing and value == "poison":
            raise ValueError("the picky type refuses 'poison'")
        return value


_PICKY: list[Any] = []
"""The model of :func:`picky` while its test runs (mapped then only: ``attach()`` of
another test's factory would take it, and refuse it on a Redis without AOF)."""


def picky_models() -> list[Any]:
    """The ``--model`` of the command line's ``dlq replay`` (this module, as imported)."""
    return list(_PICKY)


@pytest.fixture
def picky(
    engine: sa.Engine, database_url: str, client: redis.Redis, namespace: str
) -> Iterator[tuple[sessionmaker[Session], sa.Engine, Any]]:
    """An attached factory of a write-behind model with a :class:`_Picky` column (empty
    table), the worker's engine, and the model."""

    class Base(DeclarativeBase):
        pass

    class PickyNote(Base):
        __tablename__ = "wb_leftover_notes"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=1)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        body: Mapped[str] = mapped_column(_Picky(100))

    schema.upgrade(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache = Cache(client, namespace=namespace)
    made = sessionmaker(engine)
    cache.attach(made)
    worker_engine = sa.create_engine(database_url)
    _PICKY.append(PickyNote)
    try:
        yield made, worker_engine, PickyNote
    finally:
        _PICKY.clear()
        _Picky.refusing = True
        cache.detach()
        worker_engine.dispose()
        Base.metadata.drop_all(engine)
        Base.registry.dispose()
        del PickyNote, Base
        gc.collect()


def test_an_operation_that_raises_outside_the_database_every_time_is_dead_lettered(
    picky: tuple[sessionmaker[Session], sa.Engine, Any],
    client: redis.Redis,
    namespace: str,
    wb_redis_url: str,
    database_url: str,
) -> None:
    """A value the column type's bind refuses in Python (every time, not a database error)
    held its partition for good: the batch was retried with backoff on every pass, the
    rows queued after it never reached the database, and nothing told the operator which
    row. A statement timeout is counted per operation and dead-lettered at the
    ``timeout_attempts``-th attempt; such an error now follows the same count, and the
    letter carries the error's text, is listed by ``dlq list`` and replays once the cause
    is gone."""
    made, worker_engine, PickyNote = picky  # noqa: N806
    with made() as s:
        s.add(PickyNote(body="before"))
        s.commit()
    with made() as s:
        poison = PickyNote(body="poison")
        s.add(poison)
        s.commit()
        poison_id = poison.id
    with made() as s:
        s.add_all(PickyNote(body=f"after {i}") for i in range(3))
        s.commit()
    worker = FlushWorker(
        worker_engine,
        client,
        namespace=namespace,
        models=[PickyNote],
        max_backoff=0,  # retried at once: the test counts passes, not seconds
        timeout_attempts=3,
    )
    try:
        for _ in range(40):  # bounded: retried for good, this loop ran out
            worker.run_once()
            if not worker.stats(database=False).length:
                break
        with worker_engine.connect() as conn:
            bodies = set(conn.execute(text("SELECT body FROM wb_leftover_notes")).scalars())
        assert bodies == {"before", "after 0", "after 1", "after 2"}
        [letter] = letters(worker_engine, namespace)
        assert letter.op == "upsert"
        assert "ValueError: the picky type refuses 'poison'" in letter.error
        assert "3 times in a row" in letter.error
        assert worker.dead_letters == 1
    finally:
        worker.release()

    base = ["--redis-url", wb_redis_url, "--namespace", namespace, "--database-url", database_url]
    runner = CliRunner()
    listed = runner.invoke(cli, [*base, "dlq", "list", "--json"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    [shown] = json.loads(listed.stdout)
    assert shown["id"] == letter.id
    assert "the picky type refuses 'poison'" in shown["error"]

    _Picky.refusing = False  # the cause is fixed: the letter replays
    model = f"{__name__}:picky_models"
    assert sys.modules[__name__].picky_models is picky_models
    replay = [*base, "dlq", "replay", "--model", model, "--yes"]
    done = runner.invoke(cli, replay, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert f"replayed    {letter.id}" in done.stdout
    with worker_engine.connect() as conn:
        found = conn.execute(
            text("SELECT body FROM wb_leftover_notes WHERE id = :id"), {"id": poison_id}
        ).scalar_one()
    assert found == "poison"


# --------------------------------------------------------------------------- textual writes


@pytest.fixture
def blog(shop_engine: sa.Engine) -> Iterator[sa.Engine]:
    with blog_schema(shop_engine) as engine:
        yield engine


@pytest.fixture
def app(blog: sa.Engine, cache: Cache) -> Iterator[sessionmaker[Session]]:
    """The application's factory, every select cached, and its engine attached."""
    factory = sessionmaker(blog)
    cache.attach(factory, cache_queries=FromCache(ttl=60))
    cache.attach(blog)
    yield factory
    cache.detach()


def snapshot(session: Session) -> dict[str, Any]:
    """What an application reads: rows by key, lazy collections of both kinds, queries."""
    out: dict[str, Any] = {}
    for aid in (1, 2):
        author = session.get(Author, aid)
        out[f"author{aid}"] = author and author.name
        out[f"author{aid}.posts"] = author and [(p.id, p.title) for p in author.posts]
    for pid in (1, 2, 3):
        post = session.get(Post, pid)
        out[f"post{pid}"] = post and (post.title, post.author_id)
        out[f"post{pid}.tags"] = post and [t.id for t in post.tags]
    out["posts"] = [(p.id, p.title, p.author_id) for p in session.scalars(select(Post))]
    return out


def agrees_after(factory: sessionmaker[Session], engine: sa.Engine, sql: str) -> None:
    """Warm the cache, run ``sql`` through the attached engine, and compare the cached
    reads with a plain session's."""
    for _ in range(3):  # a miss, a fill, then hits
        with factory() as s:
            snapshot(s)
    with engine.begin() as conn:
        conn.execute(text(sql))
    with factory() as s:
        cached = snapshot(s)
    with Session(engine) as plain:
        assert cached == snapshot(plain)


@pytest.mark.parametrize(
    "sql",
    [
        f"-- move a post\n{MOVE_POST}",
        f"/* move a post */ {MOVE_POST}",
        f"/* a /* nested */ comment */\n  {MOVE_POST.lower()}",
        f"/* in a block */ DO $$ BEGIN {MOVE_POST}; END $$",
        f"-- prepared\nPREPARE blog_move AS SELECT 1; /* then */ {MOVE_POST}",
        f"SELECT 1; {MOVE_POST}",
    ],
    ids=["line-comment", "block-comment", "nested-comment", "do-block", "prepare", "second"],
)
def test_a_procedure_call_after_a_comment_retires_what_it_may_have_written(
    app: sessionmaker[Session], blog: sa.Engine, sql: str
) -> None:
    """A bare ``CALL`` retires every cached table (what it writes is in the database, not
    in the statement); one opened by a comment (``-- note`` or ``/* x */``, as query
    tags and ORMs' comments put there), or following another statement in the same text,
    retired nothing: the rows and collections the procedure wrote were served as before."""
    agrees_after(app, blog, sql)
