"""Write-behind as the application's session sees it, with plain SQLAlchemy as the oracle.

Each scenario runs twice: with a plain ``Session`` (no cache) on tables of the same shape,
and with a cached ``Session`` or ``AsyncSession`` (``in_mode``) on the write-behind models.
What the session shows along the way (objects' states, ``session.get``, values) must be
the same, and so must the tables once a flush worker has drained the queue: a rolled-back
write must never be applied, a committed one never lost.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import CheckConstraint, String, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import DateTime

from devservices import RedisServer
from examples.shop import Category, Product, ProductStatus
from sa_redis_cache import ConfigurationError, FlushWorker, schema
from tests.modes import AsyncFacade, SyncFacade
from tests.wb_support import drain, private_models

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

if TYPE_CHECKING:
    from tests.modes import Db, Runner

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis


def _now() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def oracle_models(engine: sa.Engine) -> Iterator[tuple[Any, Any]]:
    """Tables of the write-behind models' shape, without a cache policy."""

    class Base(DeclarativeBase):
        pass

    class PlainView(Base):
        __tablename__ = "wb_review_views"
        __table_args__ = (CheckConstraint("views >= 0", name="wb_review_views_not_negative"),)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(String(200))
        views: Mapped[int] = mapped_column(default=0)
        note: Mapped[str | None]
        viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    class PlainStock(Base):
        __tablename__ = "wb_review_stock"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        warehouse: Mapped[str] = mapped_column(String(40))
        quantity: Mapped[int] = mapped_column(default=0)

    Base.metadata.create_all(engine)
    yield PlainView, PlainStock
    Base.metadata.drop_all(engine)
    Base.registry.dispose()


@pytest.fixture
def mode_redis_url(aof_redis: RedisServer) -> str:
    """``in_mode``'s caches use the AOF server: ``attach()`` demands it for these models."""
    return aof_redis.url


@pytest.fixture
def models(engine: sa.Engine, oracle_models: Any) -> Iterator[tuple[Any, Any]]:
    """``(PageView, StockLevel)`` and the oracle's tables, all empty."""
    schema.upgrade(engine)
    with private_models() as found:
        found[0].metadata.create_all(engine)
        with engine.begin() as conn:
            for model in (*found, *oracle_models):
                conn.execute(model.__table__.delete())
        yield found


@contextmanager
def plain_session(engine: sa.Engine, **kwargs: Any) -> Iterator[SyncFacade]:
    """A session no cache is attached to."""
    with Session(engine, **kwargs) as s:
        yield SyncFacade(s)


def state_of(obj: Any) -> str:
    """The object's state as ``inspect()`` tells it; "deleted" (flushed, not committed) is
    told as "detached", which a write-behind delete's flush leaves, as documented
    (docs/write-behind.md, "The flush")."""
    found = inspect(obj)
    for name in ("transient", "pending", "persistent", "deleted", "detached"):
        if getattr(found, name):
            return "detached" if name == "deleted" else name
    raise AssertionError("no state")


def seen(obj: Any) -> Any:
    """What the application reads from a page view or a stock level (or the error)."""
    if obj is None:
        return None
    try:
        if hasattr(obj, "path"):
            return (obj.path, obj.views, obj.note)
        return (obj.id, obj.warehouse, obj.quantity)
    except Exception as exc:  # the error is what the oracle compares
        return type(exc).__name__


def look(s: SyncFacade, obj: Any) -> tuple[Any, ...]:
    """The object as the session shows it: in it, its state, and its values."""
    return (obj in s, state_of(obj), seen(obj))


def merge(s: SyncFacade, obj: Any) -> Any:
    if isinstance(s, AsyncFacade):
        return await_(s.asession.merge(obj))
    return s.session.merge(obj)


def dml(s: SyncFacade, stmt: Any, params: Any = None) -> None:
    """Run an ORM-enabled DML statement, its result unread."""
    if isinstance(s, AsyncFacade):
        await_(s.asession.execute(stmt, params))
    else:
        s.session.execute(stmt, params)


def tables(engine: sa.Engine, view: Any, stock: Any) -> tuple[Any, Any]:
    """The two tables' rows, as comparable values."""
    with engine.connect() as conn:
        views = {r.id: (r.path, r.views, r.note) for r in conn.execute(select(view.__table__))}
        stocks = {r.id: (r.warehouse, r.quantity) for r in conn.execute(select(stock.__table__))}
    return views, stocks


Script = Callable[[Callable[[], Any], Any, Any], Any]


def against_oracle(
    in_mode: Runner,
    models: Any,
    oracle_models: Any,
    engine: sa.Engine,
    namespace: str,
    script: Script,
    **session_kwargs: Any,
) -> Any:
    """Run ``script(session, View, Stock)`` with plain SQLAlchemy, then cached, sessions
    made with ``session_kwargs``; the observations and, after a drain, the tables must be
    equal. The observations."""
    expected = script(lambda: plain_session(engine, **session_kwargs), *oracle_models)
    runner = replace(in_mode, session_kwargs=session_kwargs)
    got, _ = runner(lambda db: script(db.session, *models))
    assert got == expected
    client = redis.Redis.from_url(in_mode.redis_url)
    worker = FlushWorker(engine, client, namespace=namespace, models=list(models))
    try:
        drain(worker)
    finally:
        worker.release()
        client.close()
    assert tables(engine, *models) == tables(engine, *oracle_models)
    return expected


# -- savepoints and rollbacks ---------------------------------------------------------------


def _committed(session: Callable[[], Any], view: Any, pk: uuid.UUID, **values: Any) -> None:
    with session() as s:
        s.add(view(id=pk, **values))
        s.commit()


def test_a_delete_rolled_back_in_a_savepoint_restores_the_object(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """A delete flushed in a savepoint that is then rolled back: SQLAlchemy puts the object
    back in the session, persistent, and a later change to it is written."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/kept", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            savepoint = s.begin_nested()
            s.delete(obj)
            s.flush()
            out.append(s.get(view, pk))
            savepoint.rollback()
            out.append(look(s, obj))
            out.append(s.get(view, pk) is obj)
            obj.views = 9
            s.commit()
            out.append(seen(obj))
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    restored = (True, "persistent", ("/kept", 1, None))
    assert expected[1:] == [restored, True, ("/kept", 9, None), ("/kept", 9, None)]


def test_a_rollback_after_a_flushed_delete_restores_the_object(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/kept", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            s.delete(obj)
            s.flush()
            s.rollback()
            out.append(look(s, obj))
            out.append(s.get(view, pk) is obj)
            obj.note = "after the rollback"
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[-1] == ("/kept", 1, "after the rollback")


def test_objects_created_then_deleted_come_back_as_their_creation_is_undone_or_not(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """An object created outside the savepoint and deleted in it comes back persistent with
    the outer state (and is committed); one created and deleted in the savepoint, or in a
    transaction rolled back, becomes transient."""
    outer_pk, inner_pk, lost_pk = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            outer = view(id=outer_pk, path="/outer", views=1)
            s.add(outer)
            s.flush()
            savepoint = s.begin_nested()
            outer.views = 2
            s.flush()
            inner = view(id=inner_pk, path="/inner")
            s.add(inner)
            s.flush()
            s.delete(outer)
            s.delete(inner)
            s.flush()
            savepoint.rollback()
            out.append((look(s, outer), look(s, inner)))
            s.commit()
        with session() as s:
            lost = view(id=lost_pk, path="/lost")
            s.add(lost)
            s.flush()
            s.delete(lost)
            s.flush()
            s.rollback()
            out.append(look(s, lost))
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (outer_pk, inner_pk, lost_pk)])
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[0] == (
        (True, "persistent", ("/outer", 1, None)),
        (False, "transient", ("/inner", 0, None)),
    )


def test_nested_savepoints_released_then_rolled_back_apply_nothing(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """An add, a change and a delete in an inner savepoint released into an outer one that
    is rolled back; then the same released into a transaction that is rolled back."""
    for keep in (True, False):
        nested_then_rolled_back(in_mode, models, oracle_models, engine, namespace, keep)


def nested_then_rolled_back(
    in_mode: Runner,
    models: Any,
    oracle_models: Any,
    engine: sa.Engine,
    namespace: str,
    expire_on_commit: bool,
) -> None:
    kept, changed, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        for pk in (kept, changed, gone):
            _committed(session, view, pk, path=f"/{pk}", views=1)
        out: list[Any] = []
        with session() as s:
            a, b, c = (s.get(view, pk) for pk in (kept, changed, gone))
            a.views = 2
            outer = s.begin_nested()
            new = view(path="/new")
            s.add(new)
            inner = s.begin_nested()
            a.views = 3
            b.note = "inner"
            s.delete(c)
            inner.commit()
            out.append([look(s, o) for o in (a, b, new)])
            outer.rollback()
            out.append([look(s, o) for o in (a, b, c, new)])
            out.append([seen(s.get(view, pk)) for pk in (kept, changed, gone)])
            s.commit()
        with session() as s:
            a, b, c = (s.get(view, pk) for pk in (kept, changed, gone))
            savepoint = s.begin_nested()
            a.views = 5
            s.delete(c)
            s.add(view(id=uuid.uuid4(), path="/lost"))
            savepoint.commit()
            s.rollback()
            out.append([look(s, o) for o in (a, b, c)])
        with session() as s:
            out.append([seen(s.get(view, pk)) for pk in (kept, changed, gone)])
        return out

    expected = against_oracle(
        in_mode,
        models,
        oracle_models,
        engine,
        namespace,
        script,
        expire_on_commit=expire_on_commit,
    )
    assert expected[-1] == [
        (f"/{kept}", 2, None),
        (f"/{changed}", 1, None),
        (f"/{gone}", 1, None),
    ]


def test_a_row_switch_rolled_back_in_a_savepoint(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """Delete and add again one key in a savepoint, rolled back: the old object is back,
    the new one transient, and the old row stays."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/old", views=1)
        out: list[Any] = []
        with session() as s:
            old = s.get(view, pk)
            savepoint = s.begin_nested()
            s.delete(old)
            s.flush()
            new = view(id=pk, path="/new")
            s.add(new)
            s.flush()
            out.append(seen(s.get(view, pk)))
            savepoint.rollback()
            out.append((look(s, old), look(s, new)))
            out.append(s.get(view, pk) is old)
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)


def test_a_change_rolled_back_in_a_savepoint_is_never_applied(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    for keep in (True, False):
        changed_then_rolled_back(in_mode, models, oracle_models, engine, namespace, keep)


def changed_then_rolled_back(
    in_mode: Runner,
    models: Any,
    oracle_models: Any,
    engine: sa.Engine,
    namespace: str,
    expire_on_commit: bool,
) -> None:
    pk, other = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/a", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            created = view(id=other, path="/created")
            s.add(created)
            s.flush()
            with s.begin_nested():
                obj.views = 4
                created.views = 6
            savepoint = s.begin_nested()
            obj.views = 5
            obj.note = "rolled back"
            created.note = "rolled back too"
            s.flush()
            savepoint.rollback()
            out.append((look(s, obj), look(s, created)))
            s.commit()
            out.append((look(s, obj), look(s, created)))
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, other)])
        return out

    expected = against_oracle(
        in_mode,
        models,
        oracle_models,
        engine,
        namespace,
        script,
        expire_on_commit=expire_on_commit,
    )
    assert expected[-1] == [("/a", 4, None), ("/created", 6, None)]


# -- row switches with keys of other Python types -------------------------------------------


def test_a_delete_and_an_add_of_its_key_as_text_change_nothing(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """A delete and an add of the same key given as text (``str(uuid)``, ``"7"``): not one
    identity to SQLAlchemy, so no row switch; its flush fails (the INSERT collides), and
    the cache's refuses (a value of another type cannot be queued exactly). Either way the
    row is left as it was, and nothing is queued."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/old", views=1)
        with session() as s:
            s.add(stock(id=7, warehouse="north", quantity=3))
            s.commit()
        out: list[Any] = []
        replacements: list[tuple[Any, Any, Any]] = [
            (view, pk, view(id=str(pk), path="/new")),
            (stock, 7, stock(id="7", warehouse="south")),
        ]
        for model, key, new in replacements:
            with session() as s:
                s.delete(s.get(model, key))
                s.add(new)
                try:
                    s.commit()
                except (sa.exc.IntegrityError, ConfigurationError):
                    out.append("refused")
            with session() as s:
                out.append(seen(s.get(model, key)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected == ["refused", ("/old", 1, None), "refused", (7, "north", 3)]


# -- merge, expunge, expire_on_commit ------------------------------------------------------


def test_merge_of_a_detached_object_changed_while_detached(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    pk, fresh = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            obj = view(id=pk, path="/m", views=1)
            s.add(obj)
            s.commit()
            s.refresh(obj)
        obj.views = 8  # detached
        with session() as s:
            merged = merge(s, obj)
            out.append((look(s, merged), merged is obj, list(s.dirty) == [merged]))
            added = merge(s, view(id=fresh, path="/fresh"))
            out.append(look(s, added))
            s.commit()
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, fresh)])
        return out

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)


def test_expunge_after_a_flush_keeps_the_flushed_write(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/x", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            obj.views = 2
            s.flush()
            s.session.expunge(obj)
            obj.views = 3  # detached: never written
            out.append(look(s, obj))
            out.append(seen(s.get(view, pk)))
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)


# -- ORM bulk statements --------------------------------------------------------------------


def test_orm_bulk_statements_on_rows_in_the_database(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """ORM-enabled ``insert``/``update``/``delete`` write the database directly
    (docs/write-behind.md): on rows that are not queued, the session sees what SQLAlchemy
    shows."""
    a, b = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            dml(s, sa.insert(view), [{"id": a, "path": "/a"}, {"id": b, "path": "/b"}])
            out.append([seen(s.get(view, k)) for k in (a, b)])
            s.commit()
        with session() as s:
            obj = s.get(view, a)
            other = s.get(view, b)
            dml(s, sa.update(view).where(view.id == a).values(views=view.views + 4))
            out.append(seen(obj))
            dml(s, sa.delete(view).where(view.id == b))
            out.append((look(s, other), s.get(view, b)))
            s.commit()
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (a, b)])
        return out

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)


def test_a_restored_object_can_be_deleted_again_and_a_merge_finds_a_queued_delete(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """The object a rolled-back savepoint gave back is deleted for good by the next flush;
    merging a detached copy of it afterwards makes a new row, as for a row gone from the
    database."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/twice", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            savepoint = s.begin_nested()
            s.delete(obj)
            s.flush()
            savepoint.rollback()
            s.delete(obj)
            s.commit()
            out.append(look(s, obj))
        with session() as s:
            out.append(s.get(view, pk))
            merged = merge(s, obj)
            out.append((look(s, merged), merged is obj))
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[1] is None


def test_a_restored_object_shows_the_state_outside_the_rolled_back_savepoint(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """Changed in an outer savepoint, deleted in an inner one that is released, then the
    outer one rolled back: the object comes back with the transaction's state, not the
    savepoint's; one changed without a flush, then deleted, too."""
    pk, other = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/p", views=1)
        _committed(session, view, other, path="/o", views=1)
        out: list[Any] = []
        with session() as s:
            obj, unflushed = s.get(view, pk), s.get(view, other)
            obj.views = 2
            s.flush()
            outer = s.begin_nested()
            obj.views = 3
            s.flush()
            inner = s.begin_nested()
            s.delete(obj)
            unflushed.views = 7
            s.delete(unflushed)
            inner.commit()
            outer.rollback()
            out.append((look(s, obj), look(s, unflushed)))
            s.commit()
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, other)])
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[0] == (
        (True, "persistent", ("/p", 2, None)),
        (True, "persistent", ("/o", 1, None)),
    )


# -- write-through, the same way ------------------------------------------------------------


def test_write_through_savepoints_and_rollbacks_as_plain_sqlalchemy(
    in_mode: Runner, shop_engine: sa.Engine
) -> None:
    """Write-through writes the database as plain SQLAlchemy does, and caches at commit the
    rows it wrote: a savepoint's rolled-back change, a savepoint released into a
    transaction rolled back, a delete rolled back, must all leave the cached row the
    database's (read by later sessions from the cache)."""
    with shop_engine.connect() as conn:
        category = conn.scalar(select(sa.func.min(Category.id)))
        top = conn.scalar(select(sa.func.max(Product.id))) or 0
    plain_pk, cached_pk = top + 1001, top + 1002

    def script(session: Callable[[], Any], pk: int) -> Any:
        out: list[Any] = []

        def reads() -> Any:
            # twice: a miss fills the entry, the second read is served from it
            with session() as s:
                first = s.get(Product, pk)
                first = None if first is None else (first.name, first.price)
            with session() as s:
                again = s.get(Product, pk)
                return first, None if again is None else (again.name, again.price)

        with session() as s:
            s.add(
                Product(
                    id=pk,
                    category_id=category,
                    name="wt",
                    price=Decimal("1.00"),
                    status=ProductStatus.ACTIVE,
                )
            )
            s.commit()
        out.append(reads())
        with session() as s:
            p = s.get(Product, pk)
            p.price = Decimal("2.00")
            s.flush()
            savepoint = s.begin_nested()
            p.price = Decimal("3.00")
            p.name = "in the savepoint"
            s.flush()
            savepoint.rollback()
            out.append((p.name, p.price))
            s.commit()
        out.append(reads())
        with session() as s:
            p = s.get(Product, pk)
            with s.begin_nested():
                p.price = Decimal("5.00")
            s.rollback()
            out.append(p.price)
        out.append(reads())
        with session() as s:
            p = s.get(Product, pk)
            savepoint = s.begin_nested()
            s.delete(p)
            s.flush()
            savepoint.rollback()
            out.append((p in s.session, p.price))
            p.price = Decimal("7.00")
            s.commit()
        out.append(reads())
        with session() as s:
            s.delete(s.get(Product, pk))
            s.commit()
        out.append(reads())
        return out

    try:
        expected = script(lambda: plain_session(shop_engine), plain_pk)
        got, _ = in_mode(lambda db: script(db.session, cached_pk))
        assert got == expected
        assert expected[-2] == (("wt", Decimal("7.00")), ("wt", Decimal("7.00")))
    finally:
        with shop_engine.begin() as conn:
            conn.execute(sa.delete(Product).where(Product.id.in_([plain_pk, cached_pk])))


def test_a_key_deleted_outside_a_savepoint_and_added_in_it(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """Deleted in the transaction, added again in a savepoint that is rolled back: the new
    object is transient (its creation undone), the row stays deleted at commit. Then the
    same with a second savepoint deleting and adding once more."""
    pk, twice = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/old", views=1)
        _committed(session, view, twice, path="/old", views=1)
        out: list[Any] = []
        with session() as s:
            old = s.get(view, pk)
            s.delete(old)
            s.flush()
            savepoint = s.begin_nested()
            new = view(id=pk, path="/new")
            s.add(new)
            s.flush()
            savepoint.rollback()
            out.append((look(s, old), look(s, new), s.get(view, pk)))
            first = s.get(view, twice)
            s.delete(first)
            s.flush()
            second = view(id=twice, path="/second")
            s.add(second)
            s.flush()
            savepoint = s.begin_nested()
            s.delete(second)
            s.flush()
            third = view(id=twice, path="/third")
            s.add(third)
            s.flush()
            savepoint.rollback()
            out.append((look(s, second), look(s, third), s.get(view, twice) is second))
            s.commit()
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, twice)])
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[-1] == [None, ("/second", 0, None)]


def test_closing_a_session_after_a_flushed_delete_restores_nothing(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """``close()`` (and the end of a ``with`` block) rolls back without restoring: every
    object leaves the session, a deleted one too, and the session is empty if used again."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/kept", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            s.delete(obj)
            new = view(path="/new")
            s.add(new)
            s.flush()
            s.session.expunge(new)
            s.close()
            out.append((look(s, obj), len(s.session.identity_map)))
            out.append(state_of(new))
            again = s.get(view, pk)
            out.append((seen(again), again is obj))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[:2] == [((False, "detached", ("/kept", 1, None)), 0), "detached"]


def test_a_failed_flush_then_a_rollback_restores_a_deleted_object(
    in_mode: Runner,
    models: Any,
    oracle_models: Any,
    engine: sa.Engine,
    namespace: str,
    shop_engine: sa.Engine,
) -> None:
    """A flush that the database refuses (an ordinary row breaks a unique constraint)
    rolls the transaction back: a write-behind object deleted earlier in it comes back."""
    pk = uuid.uuid4()
    with shop_engine.connect() as conn:
        taken = conn.scalar(select(Category.name).limit(1))

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/kept", views=1)
        out: list[Any] = []
        with session() as s:
            obj = s.get(view, pk)
            s.delete(obj)
            s.flush()
            s.add(Category(name=taken))
            with pytest.raises(sa.exc.IntegrityError):
                s.flush()
            s.rollback()
            out.append(look(s, obj))
            obj.note = "after the failed flush"
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected == [
        (True, "persistent", ("/kept", 1, None)),
        ("/kept", 1, "after the failed flush"),
    ]


def test_a_row_switch_keeps_the_row_not_the_deleted_objects_unflushed_changes(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """The deleted object was changed before its delete, without a flush: SQLAlchemy's row
    switch updates the row as stored, so the columns the new object leaves unset keep the
    row's values, not those changes; also for a value changed while expired."""
    pk, expired = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/old", views=1, note="stored")
        _committed(session, view, expired, path="/old", views=1, note="stored")
        out: list[Any] = []
        with session() as s:
            old = s.get(view, pk)
            old.note = "never flushed"
            old.views = 5
            s.delete(old)
            new = view(id=pk, path="/new")
            s.add(new)
            other = s.get(view, expired)
            s.session.expire(other, ["note"])
            other.note = "never flushed either"
            s.delete(other)
            s.add(view(id=expired, path="/new"))
            s.commit()
            out.append(seen(new))
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, expired)])
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[-1] == [("/new", 1, "stored"), ("/new", 1, "stored")]


def test_a_rollback_with_savepoints_still_open_restores_every_deleted_object(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    keys = [uuid.uuid4() for _ in range(3)]

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        for n, pk in enumerate(keys):
            _committed(session, view, pk, path=f"/{n}", views=n)
        out: list[Any] = []
        with session() as s:
            a, b, c = (s.get(view, pk) for pk in keys)
            s.delete(a)
            s.flush()
            s.begin_nested()
            s.delete(b)
            s.flush()
            s.begin_nested()
            c.views = 9
            s.delete(c)
            s.flush()
            s.rollback()
            out.append([look(s, o) for o in (a, b, c)])
            for o in (a, b, c):
                o.note = "kept"
            s.commit()
        with session() as s:
            out.append([seen(s.get(view, pk)) for pk in keys])
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected[-1] == [(f"/{n}", n, "kept") for n in range(3)]


def test_orm_bulk_update_in_a_transaction_that_writes_the_row_is_overwritten(
    in_mode: Runner, models: Any, engine: sa.Engine, namespace: str
) -> None:
    """What docs/write-behind.md says of mixing them: the bulk UPDATE writes the database
    at once; the transaction's own queued write of the row, the full row as the session
    held it at its flush, overwrites it once flushed."""
    view, _ = models
    pk = uuid.uuid4()
    client = redis.Redis.from_url(in_mode.redis_url)
    worker = FlushWorker(engine, client, namespace=namespace, models=[view])

    def scenario(db: Db) -> None:
        _committed(db.session, view, pk, path="/p", views=1, note="stored")

    def mixed(db: Db) -> Any:
        with db.session() as s:
            obj = s.get(view, pk)
            obj.views = 2
            dml(s, sa.update(view).where(view.id == pk).values(note="bulk"))
            s.commit()
            return seen(obj)

    try:
        in_mode(scenario)
        drain(worker)
        assert in_mode(mixed)[0] == ("/p", 2, "stored")
        assert tables(engine, *models)[0][pk] == ("/p", 1, "bulk")
        drain(worker)
        assert tables(engine, *models)[0][pk] == ("/p", 2, "stored")
    finally:
        worker.release()
        client.close()


def test_a_key_of_another_python_type_is_refused_and_a_rollback_restores_all(
    in_mode: Runner, models: Any, engine: sa.Engine, namespace: str
) -> None:
    """``Decimal(7)`` for an integer key: SQLAlchemy would write 7 (a row switch, the two
    being one identity); write-behind refuses a value of another type than its column's at
    the flush (docs/write-behind.md). The delete this flush had already taken out is undone
    by the rollback: its object is back, and the row as it was."""
    _, stock = models

    def scenario(db: Db) -> Any:
        with db.session() as s:
            s.add(stock(id=7, warehouse="north", quantity=3))
            s.commit()
        with db.session() as s:
            old = s.get(stock, 7)
            s.delete(old)
            s.add(stock(id=Decimal(7), warehouse="south"))
            with pytest.raises(ConfigurationError, match="cannot be queued exactly"):
                s.flush()
            s.rollback()
            restored = look(s, old)
            s.commit()
        with db.session() as s:
            return restored, seen(s.get(stock, 7))

    got, _ = in_mode(scenario)
    assert got == ((True, "persistent", (7, "north", 3)), (7, "north", 3))


def cached_script(script: Callable[[Callable[[], Any], int], Any], pk: int, db: Db) -> Any:
    return script(db.session, pk)


def test_write_through_row_switch_merge_and_bulk_statements_as_plain_sqlalchemy(
    in_mode: Runner, shop_engine: sa.Engine
) -> None:
    """A row switch (written as an UPDATE), a merge of a detached copy, ORM bulk UPDATE and
    DELETE, with ``expire_on_commit`` on and off: later sessions read from the cache what
    the database holds."""
    with shop_engine.connect() as conn:
        category = conn.scalar(select(sa.func.min(Category.id)))
        top = conn.scalar(select(sa.func.max(Product.id))) or 0

    def script(session: Callable[[], Any], pk: int) -> Any:
        out: list[Any] = []

        def reads() -> Any:
            seen_twice = []
            for _ in range(2):  # a miss fills the entry, the second read is served from it
                with session() as s:
                    p = s.get(Product, pk)
                    seen_twice.append(None if p is None else (p.name, p.price, p.attributes))
            return seen_twice

        def product(**values: Any) -> Any:
            fields = {"category_id": category, "status": ProductStatus.ACTIVE, "id": pk}
            return Product(**{**fields, **values})

        with session() as s:
            s.add(product(name="first", price=Decimal("1.00"), attributes={"a": 1}))
            s.commit()
        out.append(reads())
        with session() as s:
            s.delete(s.get(Product, pk))
            s.add(product(name="switched", price=Decimal("2.50")))
            s.commit()
        out.append(reads())
        with session() as s:
            detached = s.get(Product, pk)
        detached.price = Decimal("3.00")
        with session() as s:
            merge(s, detached)
            s.commit()
        out.append(reads())
        with session() as s:
            p = s.get(Product, pk)
            dml(s, sa.update(Product).where(Product.id == pk).values(price=Product.price + 1))
            out.append(p.price)
            s.commit()
        out.append(reads())
        with session() as s:
            dml(s, sa.delete(Product).where(Product.id == pk))
            out.append(s.get(Product, pk))
            s.commit()
        out.append(reads())
        return out

    pks = iter(range(top + 2001, top + 2100))
    made: list[int] = []
    try:
        for keep in (True, False):
            plain_pk, cached_pk = next(pks), next(pks)
            made += [plain_pk, cached_pk]
            plain = functools.partial(plain_session, shop_engine, expire_on_commit=keep)
            expected = script(plain, plain_pk)
            runner = replace(in_mode, session_kwargs={"expire_on_commit": keep})
            got, _ = runner(functools.partial(cached_script, script, cached_pk))
            assert got == expected
            # the row switch's UPDATE left the column the new object did not set
            assert expected[2] == [("switched", Decimal("3.00"), {"a": 1})] * 2
    finally:
        with shop_engine.begin() as conn:
            conn.execute(sa.delete(Product).where(Product.id.in_(made)))


def refresh_locking(s: SyncFacade, obj: Any) -> None:
    if isinstance(s, AsyncFacade):
        await_(s.asession.refresh(obj, with_for_update=True))
    else:
        s.session.refresh(obj, with_for_update=True)


def test_a_locking_read_of_a_write_behind_model_is_refused(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """``with_for_update()`` on a queued row: SQLAlchemy's second locker waits (here,
    ``nowait``: refused); served from the queued state, it took no lock, and both
    read-modify-writes went through, the first lost. A lock in the database cannot cover
    a queued state, so a locking read of a write-behind model is refused, by key or not."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/locked", views=1)
        out: list[Any] = []
        with session() as a, session() as b:
            first = a.get(view, pk, with_for_update=True)
            out.append(seen(first))
            with pytest.raises(sa.exc.OperationalError, match="lock"):
                b.get(view, pk, with_for_update={"nowait": True})
        return out

    expected = script(lambda: plain_session(engine), *oracle_models)
    assert expected == [("/locked", 1, None)]

    def cached(db: Db) -> None:
        _committed(db.session, models[0], pk, path="/locked", views=1)
        locking = [
            select(models[0]).where(models[0].id == pk).with_for_update(),
            select(models[0]).where(models[0].path == "/locked").with_for_update(nowait=True),
        ]
        with db.session() as s:
            with pytest.raises(ConfigurationError, match="locking read"):
                s.get(models[0], pk, with_for_update=True)
            for statement in locking:
                with pytest.raises(ConfigurationError, match="locking read"):
                    s.scalars(statement)
            obj = s.get(models[0], pk)
            with pytest.raises(ConfigurationError, match="locking read"):
                refresh_locking(s, obj)
            assert seen(s.get(models[0], pk)) == ("/locked", 1, None)  # the session usable

    in_mode(cached)


def test_a_change_to_an_object_a_query_loaded_keeps_the_rows_later_commits(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """A query reads the database (docs/write-behind.md): before the worker flushed a later
    commit of the row, its object holds the row as it was. Changing one of its columns must
    not write the others back as they were: SQLAlchemy's UPDATE sets the changed column
    only, and the later commit stays. And a change to such an object whose row another
    session deleted since raises ``StaleDataError``, as the UPDATE would match no row,
    instead of writing the row back."""
    pk, gone = uuid.uuid4(), uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/q", views=1)
        _committed(session, view, gone, path="/gone", views=1)
        return []

    def later(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            s.get(view, pk).views = 5
            s.commit()
        with session() as s:
            (obj,) = s.scalars(select(view).where(view.path == "/q"))
            obj.note = "changed by a query's object"
            s.flush()
            out.append(seen(obj))
            s.commit()
            out.append(seen(obj))
        with session() as s, session() as other:
            (obj,) = s.scalars(select(view).where(view.path == "/gone"))
            other.delete(other.get(view, gone))
            other.commit()
            obj.note = "too late"
            with pytest.raises(sa.orm.exc.StaleDataError):
                s.flush()
        with session() as s:
            out.append([seen(s.get(view, k)) for k in (pk, gone)])
        return out

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, later)
    assert expected[-1] == [("/q", 5, "changed by a query's object"), None]


def test_a_row_switch_of_an_object_a_query_loaded_keeps_the_rows_later_commits(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """The deleted object of a row switch was loaded by a query, before the worker flushed
    a later commit: the columns the new object leaves unset keep the row's newest values."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/q", views=1, note="first")
        return []

    def later(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        with session() as s:
            obj = s.get(view, pk)
            obj.views, obj.note = 5, "later"
            s.commit()
        with session() as s:
            (obj,) = s.scalars(select(view).where(view.path == "/q"))
            s.delete(obj)
            new = view(id=pk, path="/switched")
            s.add(new)
            s.commit()
        with session() as s:
            return [seen(s.get(view, pk))]

    against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, later)
    assert expected == [("/switched", 5, "later")]


def test_a_new_object_with_a_taken_key_replaces_the_row_as_documented(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """SQLAlchemy's INSERT of a taken key fails (IntegrityError); write-behind queues an
    upsert without looking (the flush runs no SQL), which replaces the row: what
    docs/write-behind.md says."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/first", views=3, note="kept?")
        with session() as s:
            s.add(view(id=pk, path="/second"))
            try:
                s.commit()
            except sa.exc.IntegrityError:
                return "refused"
        with session() as s:
            return seen(s.get(view, pk))

    assert script(lambda: plain_session(engine), *oracle_models) == "refused"
    got, _ = in_mode(lambda db: script(db.session, *models))
    assert got == ("/second", 0, None)


def test_a_new_object_expunged_after_its_flush_is_transient_after_the_rollback(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """SQLAlchemy makes every object the rolled-back transaction inserted transient, also
    one the application expunged meanwhile: added again, it is inserted."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        out: list[Any] = []
        with session() as s:
            obj = view(id=pk, path="/expunged")
            s.add(obj)
            s.flush()
            s.session.expunge(obj)
            s.rollback()
            out.append(look(s, obj))
            s.add(obj)
            s.commit()
        with session() as s:
            out.append(seen(s.get(view, pk)))
        return out

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected == [(False, "transient", ("/expunged", 0, None)), ("/expunged", 0, None)]


def test_merge_without_load_then_a_change(
    in_mode: Runner, models: Any, oracle_models: Any, engine: sa.Engine, namespace: str
) -> None:
    """``merge(load=False)`` of a clean detached copy trusts it as the row; a change to the
    merged object then writes that column only."""
    pk = uuid.uuid4()

    def script(session: Callable[[], Any], view: Any, stock: Any) -> Any:
        _committed(session, view, pk, path="/m", views=1)
        with session() as s:
            detached = s.get(view, pk)
            s.session.expunge(detached)
        with session() as s:
            s.get(view, pk).views = 4
            s.commit()
        with session() as s:
            merged = s.session.merge(detached, load=False)
            merged.note = "merged"
            s.commit()
        with session() as s:
            return [seen(s.get(view, pk))]

    expected = against_oracle(in_mode, models, oracle_models, engine, namespace, script)
    assert expected == [("/m", 4, "merged")]
