"""Leftover faults of earlier reviews, each checked against real Postgres and Redis.

* the flush worker retried for good a batch whose operation raised outside the database
  on every attempt, where a statement timeout is dead-lettered after ``timeout_attempts``;
* the engine listener's recogniser of textual writes missed a ``CALL``, ``DO`` or
  ``EXECUTE`` opened by a comment or following another statement in the same text;
* a write-behind JSON column's SQL NULL reached the database as JSON ``null``;
* after ``session.refresh(obj)``, a lazy relationship it expired was served from the cache
  where a plain session reads it from the database.
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
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, FlushWorker, FromCache, schema
from sa_redis_cache.cli import cli
from sa_redis_cache.schema import dead_letters
from sa_redis_cache.worker import replay_dead_letters
from tests.blog import MOVE_POST, Author, Post
from tests.integration.test_review_apps import (  # noqa: F401 - fixtures, shared
    agrees_after,
    app,
    blog,
)
from tests.wb_support import letters

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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
    app: sessionmaker[Session],  # noqa: F811 - the fixture imported above
    blog: sa.Engine,  # noqa: F811 - the fixture imported above
    sql: str,
) -> None:
    """A bare ``CALL`` retires every cached table (what it writes is in the database, not
    in the statement); one opened by a comment (``-- note`` or ``/* x */``, as query
    tags and ORMs' comments put there), or following another statement in the same text,
    retired nothing: the rows and collections the procedure wrote were served as before."""

    def write() -> None:
        with blog.begin() as conn:
            conn.execute(text(sql))

    agrees_after(app, blog, write)


# --------------------------------------------------------------------------- JSON nulls

JSON_COLUMNS = ("doc", "raw", "nulled", "given", "given_nulled")


@pytest.fixture
def json_docs(
    engine: sa.Engine, database_url: str, client: redis.Redis, namespace: str
) -> Iterator[tuple[sessionmaker[Session], Any, Callable[[], None]]]:
    """A write-behind model with JSON columns of every kind that decides what a None is
    (JSONB and JSON, ``none_as_null``, a Python default), an attached factory, and a
    ``drain()`` of its worker."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "wb_leftover_docs"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=2)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
        note: Mapped[str | None]
        doc: Mapped[Any] = mapped_column(JSONB, nullable=True)
        raw: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
        nulled: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
        given: Mapped[Any] = mapped_column(JSONB, nullable=True, default=lambda: {"d": 1})
        given_nulled: Mapped[Any] = mapped_column(
            JSONB(none_as_null=True), nullable=True, default=lambda: {"d": 2}
        )

    schema.upgrade(engine)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache = Cache(client, namespace=namespace)
    made = sessionmaker(engine)
    cache.attach(made)
    worker_engine = sa.create_engine(database_url)
    worker = FlushWorker(worker_engine, client, namespace=namespace, models=[Doc])

    def drain() -> None:
        for _ in range(20):
            if not worker.run_once():
                assert worker.dead_letters == 0
                return
        raise AssertionError("the worker never ran dry")

    try:
        yield made, Doc, drain
    finally:
        worker.release()
        cache.detach()
        worker_engine.dispose()
        Base.metadata.drop_all(engine)
        Base.registry.dispose()
        del Doc, Base
        gc.collect()


def _stored(engine: sa.Engine, pk: uuid.UUID) -> list[tuple[bool, str | None]]:
    """Each JSON column of row ``pk`` as the database holds it: SQL NULL, and its text
    (``null`` for JSON null)."""
    columns = ", ".join(f"{c} IS NULL, {c}::text" for c in JSON_COLUMNS)
    with engine.connect() as conn:
        row = conn.execute(
            text(f"SELECT {columns} FROM wb_leftover_docs WHERE id = :id"),  # noqa: S608
            {"id": pk},
        ).one()
    return [(row[i], row[i + 1]) for i in range(0, len(row), 2)]


NONES = dict.fromkeys(JSON_COLUMNS)
DOCS = {c: {"c": c} for c in JSON_COLUMNS}


def _seed(session: Session, model: Any, pk: uuid.UUID, **values: Any) -> None:
    session.add(model(id=pk, **values))
    session.commit()


def _change(session: Session, model: Any, pk: uuid.UUID, **values: Any) -> None:
    obj = session.get(model, pk)
    assert obj is not None
    for key, value in values.items():
        setattr(obj, key, value)
    session.commit()


def _scenarios(model: Any) -> dict[str, list[tuple[str, Callable[[Session, uuid.UUID], None]]]]:
    """Per scenario, its commits in order: ``("db", step)`` runs on the database before the
    cache sees the row (a plain session), ``("wb", step)`` is a write-behind commit, and
    ``("drain", _)`` lets the worker apply what is queued (its absence: one batch)."""

    def seed(**values: Any) -> Callable[[Session, uuid.UUID], None]:
        return lambda s, pk: _seed(s, model, pk, **values)

    def change(**values: Any) -> Callable[[Session, uuid.UUID], None]:
        return lambda s, pk: _change(s, model, pk, **values)

    def twice_in_one_transaction(**values: Any) -> Callable[[Session, uuid.UUID], None]:
        def run(s: Session, pk: uuid.UUID) -> None:
            obj = model(id=pk, **values)
            s.add(obj)
            s.flush()
            obj.note = "again"
            s.commit()

        return run

    def delete(s: Session, pk: uuid.UUID) -> None:
        obj = s.get(model, pk)
        assert obj is not None
        s.delete(obj)
        s.commit()

    def row_switch(s: Session, pk: uuid.UUID) -> None:
        obj = s.get(model, pk)
        assert obj is not None
        s.delete(obj)
        s.add(model(id=pk, note="switched"))
        s.commit()

    none: Callable[[Session, uuid.UUID], None] = lambda s, pk: None  # noqa: E731
    return {
        "insert unset": [("wb", seed(note="n"))],
        "insert None": [("wb", seed(note="n", **NONES))],
        "insert documents": [("wb", seed(note="n", **DOCS))],
        "update other, SQL NULLs": [("db", seed(note="n")), ("wb", change(note="u"))],
        "update other, JSON nulls": [("db", seed(note="n", **NONES)), ("wb", change(note="u"))],
        "update to None": [("db", seed(note="n", **DOCS)), ("wb", change(**NONES))],
        "insert unset, update, one batch": [("wb", seed(note="n")), ("wb", change(note="u"))],
        "insert None, update, one batch": [
            ("wb", seed(note="n", **NONES)),
            ("wb", change(note="u")),
        ],
        "insert unset, update, two batches": [
            ("wb", seed(note="n")),
            ("drain", none),
            ("wb", change(note="u")),
        ],
        "insert None, update, two batches": [
            ("wb", seed(note="n", **NONES)),
            ("drain", none),
            ("wb", change(note="u")),
        ],
        "insert unset, update, one transaction": [("wb", twice_in_one_transaction())],
        "insert None, update, one transaction": [("wb", twice_in_one_transaction(**NONES))],
        "delete, insert unset, one batch": [
            ("db", seed(note="n", **DOCS)),
            ("wb", delete),
            ("wb", seed(note="again")),
        ],
        "row switch over documents": [("db", seed(note="n", **DOCS)), ("wb", row_switch)],
        "row switch over SQL NULLs": [("db", seed(note="n")), ("wb", row_switch)],
        "row switch over JSON nulls": [("db", seed(note="n", **NONES)), ("wb", row_switch)],
    }


def test_json_nulls_reach_the_database_as_a_plain_session_writes_them(
    engine: sa.Engine,
    json_docs: tuple[sessionmaker[Session], Any, Callable[[], None]],
) -> None:
    """Reads return None for SQL NULL and JSON null alike, and a queued row held None for
    both: the worker wrote JSON null for every None of a JSON column, where SQLAlchemy's
    INSERT leaves an unset column out (SQL NULL, or its default) and its UPDATE leaves an
    unchanged one as the row has it. ``WHERE doc IS NULL`` found other rows. Each scenario
    runs through write-behind and through a plain session, on rows of their own; every
    JSON column must end as the plain session left it."""
    made, model, drain = json_docs
    differences = {}
    for name, steps in _scenarios(model).items():
        queued, plain = uuid.uuid4(), uuid.uuid4()
        for where, step in steps:
            if where == "drain":
                drain()
                continue
            with Session(engine) as s:
                step(s, plain)
            with made() if where == "wb" else Session(engine) as s:
                step(s, queued)
        drain()
        found, expected = _stored(engine, queued), _stored(engine, plain)
        if found != expected:
            pairs = zip(found, expected, strict=True)
            differences[name] = dict(zip(JSON_COLUMNS, pairs, strict=True))
    assert differences == {}


def test_a_replayed_dead_letter_keeps_its_sql_nulls(
    engine: sa.Engine,
    json_docs: tuple[sessionmaker[Session], Any, Callable[[], None]],
    client: redis.Redis,
    namespace: str,
) -> None:
    """A dead letter's row held None for every JSON None: its replay (``executemany``,
    the worker's path for a row refused alone) wrote JSON null where the operation meant
    SQL NULL, or the row's own value. The letter keeps the operation's ``$nulls``."""
    made, model, _ = json_docs
    kept = uuid.uuid4()
    with Session(engine) as s:  # a row whose JSON columns are SQL NULL, as the oracle
        s.add(model(id=kept, note="n"))
        s.commit()
    with engine.begin() as conn:
        conn.execute(text("UPDATE wb_leftover_docs SET given = NULL, given_nulled = NULL"))
        conn.execute(
            text("ALTER TABLE wb_leftover_docs ADD CONSTRAINT no_poison CHECK (note <> 'poison')")
        )
    fresh = uuid.uuid4()
    with made() as s:
        s.add(model(id=fresh, note="poison"))  # unset: SQL NULL
        s.commit()
    with made() as s:
        _change(s, model, kept, note="poison")  # unchanged: kept as SQL NULL
    worker = FlushWorker(engine, client, namespace=namespace, models=[model])
    try:
        while worker.run_once():
            pass
    finally:
        worker.release()
    assert len(letters(engine, namespace)) == 2
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE wb_leftover_docs DROP CONSTRAINT no_poison"))
    result = replay_dead_letters(engine, client, namespace, [model])
    assert len(result.replayed) == 2, result
    assert _stored(engine, fresh)[:3] == [(True, None)] * 3
    assert _stored(engine, kept) == [(True, None)] * 5


def test_a_letter_an_earlier_worker_wrote_for_an_entry_naming_nulls_replays(
    engine: sa.Engine,
    json_docs: tuple[sessionmaker[Session], Any, Callable[[], None]],
    client: redis.Redis,
    namespace: str,
) -> None:
    """A worker of the earlier release cannot read an entry with the fifth element that
    names SQL NULLs: it dead-letters it as ``not a write-behind operation``, the whole
    entry under ``$row`` and an empty ``$schema``. Such a letter (made here as that
    worker's ``_dead_row`` made it) was refused by every replay as queued by another
    version; it now replays as the entry it holds."""
    made, model, _ = json_docs
    pk = uuid.uuid4()
    with made() as s:
        s.add(model(id=pk, note="queued"))  # JSON columns unset: the entry names them
        s.commit()
    streams: list[Any] = [
        (key, client.xrange(key))
        for key in client.scan_iter(f"sarc:{namespace}:*wb_leftover_docs*")
        if client.type(key) in (b"stream", "stream") and client.xlen(key)
    ]
    [(stream, [(entry_id, fields)])] = streams
    wrapped = json.loads(fields[b"e"])
    assert len(wrapped) == 5
    with engine.begin() as conn:
        conn.execute(
            sa.insert(dead_letters).values(
                namespace=namespace,
                table_name="wb_leftover_docs",
                stream=stream.decode(),
                entry_id=entry_id.decode(),
                op=None,
                pk=None,
                payload={"$schema": "", "$row": wrapped, "$key": ""},
                error=f"not a write-behind operation: {fields!r}",
            )
        )
    result = replay_dead_letters(engine, client, namespace, [model])
    assert len(result.replayed) == 1, result
    assert _stored(engine, pk)[:3] == [(True, None)] * 3


# --------------------------------------------------------------------------- refresh


def _collections(post: Any, author: Any, other: Any) -> dict[str, Any]:
    """Post 1's tags (many-to-many), author 1's posts (one-to-many), post 2's author."""
    return {
        "post1.tags": [t.id for t in post.tags],
        "author1.posts": [p.id for p in author.posts],
        "post2.author": other.author.id,
    }


def _read(session: Session, *, refresh: bool = False) -> dict[str, Any]:
    """:func:`_collections` of objects held for the session's length; with ``refresh``,
    read again after ``session.refresh(obj)``, no attribute names, of each of them."""
    held = [session.get(Post, 1), session.get(Author, 1), session.get(Post, 2)]
    found = _collections(*held)
    if refresh:
        for obj in held:
            session.refresh(obj)
        found = _collections(*held)
    return found


@pytest.mark.parametrize("tier", ["redis", "local"])
def test_a_refresh_reads_the_relationships_it_expired_from_the_database(
    blog: sa.Engine,  # noqa: F811 - the fixture imported above
    database_url: str,
    redis_url: str,
    namespace: str,
    tier: str,
) -> None:
    """``session.refresh(obj)`` expires every attribute of the object, its loaded
    relationships included; a plain session reads a lazy one from the database at its
    next access. The cache served it from its entry (the lazy load carries nothing of the
    refresh): after another program's write, the refreshed object showed the collections
    the cache held. ``refresh(obj, ["tags"])`` was fixed before; this is the form without
    names. Eager relationships (``selectin``, ``joined``) are loaded by the refresh itself
    and were read from the database already."""
    engine = sa.create_engine(database_url)
    cache = Cache(redis_url, namespace=namespace, local=tier == "local", local_lease=5.0)
    factory = sessionmaker(engine)
    cache.attach(factory, cache_queries=FromCache(ttl=60))
    cache.attach(engine)
    try:
        if tier == "local":
            local = cache.inspector.local_tier
            assert local is not None
            assert local.wait_ready(10)
        for _ in range(3):  # a miss, a fill, then hits
            with factory() as s:
                _read(s)
        other = sa.create_engine(database_url)  # another program's write: no cache told
        try:
            with other.begin() as conn:
                conn.execute(text("DELETE FROM blog_post_tags WHERE post_id = 1 AND tag_id = 1"))
                conn.execute(text("UPDATE blog_posts SET author_id = 2 WHERE id = 2"))
        finally:
            other.dispose()
        with factory() as s:
            cached = _read(s, refresh=True)
        with Session(blog) as plain:
            assert cached == _read(plain, refresh=True)
    finally:
        cache.detach()
        cache.client.close()
        engine.dispose()
