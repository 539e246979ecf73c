"""Review probes of write-behind leftovers, with the database (plain SQL, plain SQLAlchemy
sessions on an engine the cache never saw) as the oracle:

* a batch that always exceeds Postgres' ``statement_timeout`` (SQLSTATE 57014);
* a NUL character inside a JSON/JSONB value, refused at the flush as in a text column;
* a failed enqueue restores the session's objects as SQLAlchemy's rollback does;
* a new object whose primary key the table already holds.
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import inspect, select, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from devservices import RedisServer
from sa_redis_cache import CachePolicy, ConfigurationError, FlushWorker, schema
from sa_redis_cache.errors import CacheUnavailableError
from sa_redis_cache.worker import replay_dead_letters
from tests.modes import SyncFacade
from tests.wb_chaos import wait_for
from tests.wb_support import drain, letters, queue, rows, same_partition_keys

if TYPE_CHECKING:
    from tests.modes import Runner

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, models, factory, client, worker_engine


def ddl(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


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
    keys = same_partition_keys(8)
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
    assert "timed out alone 5 times in a row" in letter.error
    assert worker.dead_letters == 1

    drop_slow_inserts(worker_engine)
    result = replay_dead_letters(worker_engine, client, namespace, [page_view])
    assert result.replayed == [letter.id]
    assert rows(worker_engine, page_view) == {**expected, keys[3]: ("/slow", 3)}


def test_a_timeout_waiting_for_the_offset_row_dead_letters_nothing(
    factory: sessionmaker[Session],
    models: Any,
    client: redis.Redis,
    namespace: str,
    database_url: str,
    worker_engine: sa.Engine,
) -> None:
    """A dead-letter replay holds the partition's offset row for as long as it runs: the
    worker's batch times out waiting for it, alone, again and again. That is no fault of
    the operation, which must not be dead-lettered: the last attempt locks the offset row
    before it writes, and it is the lock wait that times out. Once the lock is released
    the operation lands."""
    page_view, _ = models
    engine = sa.create_engine(
        database_url, connect_args={"options": f"-c statement_timeout={TIMEOUT_MS}"}
    )
    worker = FlushWorker(
        engine,
        client,
        namespace=namespace,
        models=[page_view],
        max_backoff=0.05,
        timeout_attempts=2,
    )
    try:
        worker.run_once()  # takes every partition and its fencing token
        key = queue(factory, page_view, path="/waits", views=1)
        with worker_engine.connect() as replay:
            replay.execute(
                text("SELECT stream FROM sarc_wb_offsets WHERE stream LIKE :p FOR UPDATE"),
                {"p": f"sarc:{namespace}:%"},
            )
            wait_for(lambda: worker.run_once() >= 0 and worker.errors >= 6, "timeouts")
            replay.rollback()
        wait_for(
            lambda: worker.run_once() == 0 and worker.stats(database=False).length == 0,
            "the partition to drain",
        )
    finally:
        worker.release()
        engine.dispose()
    assert rows(worker_engine, page_view) == {key: ("/waits", 1)}
    assert letters(worker_engine, namespace) == []
    assert worker.dead_letters == 0


def test_timeout_attempts_below_one_is_refused_naming_it(make_worker: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"timeout_attempts=0 must be at least 1"):
        make_worker(timeout_attempts=0)


# -- shared: a plain SQLAlchemy oracle, sync and async sessions -----------------------------


@pytest.fixture
def mode_redis_url(aof_redis: RedisServer) -> str:
    """``in_mode``'s caches use the AOF server: ``attach()`` demands it for these models."""
    return aof_redis.url


def state_of(obj: Any) -> tuple[str, bool]:
    """The object's state as ``inspect()`` tells it, and whether it has expired attributes."""
    found = inspect(obj)
    for name in ("transient", "pending", "persistent", "deleted", "detached"):
        if getattr(found, name):
            return name, bool(found.expired_attributes)
    raise AssertionError("no state")


@contextmanager
def plain_session(engine: sa.Engine) -> Iterator[SyncFacade]:
    """A session no cache is attached to."""
    with Session(engine) as s:
        yield SyncFacade(s)


# -- 2. a NUL character in a JSONB value -----------------------------------------------------


def doc_model(cached: bool) -> tuple[type[DeclarativeBase], Any]:
    """``(Base, Doc)``: a JSONB, a JSON and a text-array column; write-behind with
    ``cached``, else a plain table of the same shape (the oracle)."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "wb_review_docs" if cached else "wb_review_plain_docs"
        if cached:
            __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=2)
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        meta: Mapped[Any] = mapped_column(JSONB, nullable=True)
        raw: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
        tags: Mapped[list[str] | None] = mapped_column(ARRAY(sa.String(20)))

    return Base, Doc


@pytest.fixture
def docs(engine: sa.Engine) -> Iterator[tuple[Any, Any]]:
    """``(cached Doc, plain Doc)`` with empty tables; the cached one's registry disposed
    of afterwards (``attach()`` elsewhere in the run must not meet it)."""
    schema.upgrade(engine)
    made = [doc_model(cached) for cached in (True, False)]
    for base, model in made:
        base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(model.__table__.delete())
    yield made[0][1], made[1][1]
    for base, _ in made:
        base.registry.dispose()
    del made
    gc.collect()


NUL_VALUES: dict[str, dict[str, Any]] = {
    "a string in a jsonb document": {"meta": {"note": "a\x00b"}},
    "a key of a jsonb document": {"meta": {"a\x00": 1}},
    "a jsonb string": {"meta": "\x00"},
    "an element of a text array": {"tags": ["ok", "a\x00b"]},
}


@pytest.mark.parametrize("where", list(NUL_VALUES))
def test_a_nul_in_a_jsonb_value_is_refused_at_the_commit_and_nothing_is_queued(
    where: str,
    in_mode: Runner,
    docs: tuple[Any, Any],
    engine: sa.Engine,
    namespace: str,
) -> None:
    """Postgres' jsonb refuses ``\\u0000`` (and text arrays a NUL): plain SQLAlchemy's
    INSERT fails at the flush. Write-behind refused a NUL in a text column at capture but
    queued one inside a JSONB value, which the worker could only dead-letter. It must be
    refused at the commit, naming the column and the cause, with nothing queued; a JSON
    (``json``) column keeps the escape, in both, and its row lands."""
    cached, plain = docs
    values = NUL_VALUES[where]

    def script(session: Callable[[], Any], doc: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            refused = doc(id=1, **values)
            s.add(refused)
            try:
                s.commit()
            except (sa.exc.DBAPIError, ConfigurationError) as exc:
                out.append(("refused", "NUL" in str(exc) or "\\u0000" in str(exc)))
                s.rollback()
            else:
                out.append("committed")
            out.append(state_of(refused))
        with session() as s:  # json keeps a NUL, escaped: taken by both
            s.add(doc(id=2, raw={"note": "a\x00b"}))
            s.commit()
        return out

    expected = script(lambda: plain_session(engine), plain)
    assert expected == [("refused", True), ("transient", False)]
    message: list[str] = []

    def cached_script(db: Any) -> Any:
        with db.session() as s:  # the error names the column and the cause
            s.add(cached(id=3, **values))
            with pytest.raises(ConfigurationError) as refused:
                s.commit()
            message.append(str(refused.value))
        return script(db.session, cached)

    got, _ = in_mode(cached_script)
    assert got == expected
    column = next(iter(values))
    kind = "text[]" if column == "tags" else "jsonb"
    assert f"Doc.{column}: the value holds a NUL character" in message[0]
    assert f"a Postgres {kind} column cannot store" in message[0]

    client = redis.Redis.from_url(in_mode.redis_url)
    worker = FlushWorker(engine, client, namespace=namespace, models=[cached])
    try:
        assert worker.stats(database=False).length == 1  # the json row only
        drain(worker)
    finally:
        worker.release()
        client.close()
    with engine.connect() as conn:
        stored = conn.execute(select(cached.__table__.c.id, cached.__table__.c.raw)).all()
    assert stored == [(2, {"note": "a\x00b"})]
    assert letters(engine, namespace) == []


# -- 3. a failed enqueue leaves the objects as SQLAlchemy's rollback does --------------------


@pytest.fixture
def plain_views(engine: sa.Engine) -> Iterator[Any]:
    """A plain table of PageView's shape whose COMMIT fails (a deferred constraint
    trigger) when a row's path is ``/fail``: the oracle of a failed commit."""

    class Base(DeclarativeBase):
        pass

    class PlainView(Base):
        __tablename__ = "wb_review_plain_views"
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(sa.String(200))
        views: Mapped[int] = mapped_column(default=0)
        note: Mapped[str | None]

    Base.metadata.create_all(engine)
    ddl(
        engine,
        "CREATE OR REPLACE FUNCTION wb_review_fail() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF NEW.path = '/fail' THEN RAISE EXCEPTION 'refused at COMMIT' "
        "USING ERRCODE = 'check_violation'; END IF; RETURN NULL; END $$",
        "DROP TRIGGER IF EXISTS wb_review_fail ON wb_review_plain_views",
        "CREATE CONSTRAINT TRIGGER wb_review_fail AFTER INSERT OR UPDATE ON "
        "wb_review_plain_views DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        "EXECUTE FUNCTION wb_review_fail()",
        "DELETE FROM wb_review_plain_views",
    )
    yield PlainView
    Base.metadata.drop_all(engine)
    ddl(engine, "DROP FUNCTION IF EXISTS wb_review_fail()")
    Base.registry.dispose()


def test_a_failed_enqueue_restores_deleted_changed_and_new_objects_as_a_rollback(
    in_mode: Runner,
    models: Any,
    plain_views: Any,
    engine: sa.Engine,
    namespace: str,
) -> None:
    """One commit deletes row A, changes row B, adds C, and adds D, flushes it and
    expunges it. Plain SQLAlchemy's commit fails (at COMMIT) and the rollback that follows
    gives A back to the session (persistent, expired), expires B and makes C and D
    transient, with their values. Write-behind's commit fails at the enqueue
    (Redis stopped): B and C were reverted, but A stayed out of the session, detached, as
    if its delete had been written. All three must be as in plain SQLAlchemy, and nothing
    written or queued."""
    page_view, _ = models
    a_key, b_key, c_key, d_key = (uuid.uuid4() for _ in range(4))
    seeded = [{"id": a_key, "path": "/a", "views": 1}, {"id": b_key, "path": "/b", "views": 2}]
    with engine.begin() as conn:
        for model in (page_view, plain_views):
            conn.execute(model.__table__.insert(), seeded)

    def script(session: Callable[[], Any], view: Any, fail: Callable[[], None]) -> Any:
        with session() as s:
            a, b = s.get(view, a_key), s.get(view, b_key)
            s.delete(a)
            b.path = "/fail"
            c = view(id=c_key, path="/c", views=3)
            s.add(c)
            d = view(id=d_key, path="/d", views=4)
            s.add(d)
            s.flush()
            s.session.expunge(d)  # flushed, let go of: a rollback still undoes its creation
            fail()
            try:
                s.commit()
            except (sa.exc.DBAPIError, CacheUnavailableError) as exc:
                failed = type(exc).__name__
                s.rollback()
            else:
                failed = "committed"
            seen = [(obj in s, state_of(obj)) for obj in (a, b, c, d)]
            values = [(obj.path, obj.views) for obj in (a, b, c, d)]
            again = s.get(view, a_key) is a
        return seen, values, again, failed

    expected = script(lambda: plain_session(engine), plain_views, lambda: None)
    assert expected == (
        [
            (True, ("persistent", True)),
            (True, ("persistent", True)),
            (False, ("transient", False)),
            (False, ("transient", False)),
        ],
        [("/a", 1), ("/b", 2), ("/c", 3), ("/d", 4)],
        True,
        "IntegrityError",
    )
    with RedisServer(appendonly=True, appendfsync="always") as server:
        got, _ = replace(in_mode, redis_url=server.url)(
            lambda db: script(db.session, page_view, server.stop)
        )
        assert got[:3] == expected[:3]
        assert got[3] == "CacheUnavailableError"
        server.start()
        client = redis.Redis.from_url(server.url)
        worker = FlushWorker(engine, client, namespace=namespace, models=[page_view])
        try:
            assert worker.stats(database=False).length == 0
        finally:
            worker.release()
            client.close()
    assert rows(engine, page_view) == {a_key: ("/a", 1), b_key: ("/b", 2)}


def test_a_failed_enqueue_of_a_row_switch_restores_the_deleted_object(
    in_mode: Runner,
    models: Any,
    plain_views: Any,
    engine: sa.Engine,
    namespace: str,
) -> None:
    """A row deleted and a new object of its key added in one flush (SQLAlchemy's row
    switch: one UPDATE). The commit fails: plain SQLAlchemy's rollback gives the deleted
    object back, persistent, and makes the new one transient with its values; so must a
    failed enqueue, whose queued operation for the key is the new object's alone."""
    page_view, _ = models
    key = uuid.uuid4()
    with engine.begin() as conn:
        for model in (page_view, plain_views):
            conn.execute(model.__table__.insert(), [{"id": key, "path": "/old", "views": 1}])

    def script(session: Callable[[], Any], view: Any, fail: Callable[[], None]) -> Any:
        with session() as s:
            old = s.get(view, key)
            s.delete(old)
            new = view(id=key, path="/fail", views=2)
            s.add(new)
            s.flush()
            fail()
            try:
                s.commit()
            except (sa.exc.DBAPIError, CacheUnavailableError):
                s.rollback()
            seen = [(obj in s, state_of(obj)) for obj in (old, new)]
            values = [(obj.path, obj.views) for obj in (old, new)]
            return seen, values, s.get(view, key) is old

    expected = script(lambda: plain_session(engine), plain_views, lambda: None)
    assert expected == (
        [(True, ("persistent", True)), (False, ("transient", False))],
        [("/old", 1), ("/fail", 2)],
        True,
    )
    with RedisServer(appendonly=True, appendfsync="always") as server:
        got, _ = replace(in_mode, redis_url=server.url)(
            lambda db: script(db.session, page_view, server.stop)
        )
    assert got == expected
    assert rows(engine, page_view) == {key: ("/old", 1)}


# -- 4. a new object whose primary key the table already holds ------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="not fixed: a new object is queued as an upsert, which replaces the row the "
    "table already holds where SQLAlchemy's INSERT fails with IntegrityError (documented "
    "in docs/write-behind.md). Refusing it needs the operation to say 'insert' in the "
    "stream (a format older workers would dead-letter) and a worker that checks the key "
    "per coalesced run of operations, on every path (pipelined, set-based, executemany, "
    "bisection, replay): not a cheap change",
)
def test_a_new_object_with_a_taken_key_does_not_replace_the_row(
    factory: sessionmaker[Session],
    models: Any,
    plain_views: Any,
    make_worker: Any,
    engine: sa.Engine,
    worker_engine: sa.Engine,
    namespace: str,
) -> None:
    """Row K exists in the database. Plain SQLAlchemy's flush of a new object with key K
    fails (IntegrityError) and the row keeps its values. Write-behind queues the new
    object as an upsert: its commit succeeds and the worker replaces the row. It should
    keep the row (refused at the commit, or dead-lettered: never replaced silently)."""
    page_view, _ = models
    key = uuid.uuid4()
    with engine.begin() as conn:
        for model in (page_view, plain_views):
            conn.execute(model.__table__.insert(), [{"id": key, "path": "/kept", "views": 1}])
    with Session(engine) as s:
        s.add(plain_views(id=key, path="/new", views=2))
        with pytest.raises(sa.exc.IntegrityError):
            s.commit()
    refused = False
    with factory() as s:
        s.add(page_view(id=key, path="/new", views=2))
        try:
            s.commit()
        except (sa.exc.DBAPIError, ConfigurationError):
            refused = True
    drain(make_worker())
    assert rows(worker_engine, page_view) == {key: ("/kept", 1)}
    assert refused or len(letters(worker_engine, namespace)) == 1
