"""Attributes a query did not load, and the rest of what a load gives, on a ``FromCache``
hit: as plain SQLAlchemy has them.

A row does not hold every attribute of its object: ``defer()`` and ``load_only()``
columns, a joined-table subclass's own columns under ``select(Base)``, relationships not
eagerly loaded. Plain SQLAlchemy loads such a column on access (one SELECT), raises where
the query said ``raiseload``, and fires ``refresh`` when a query fills an object it held.
Each test reads through a hit of the Redis tier and of the local tier and compares what
every attribute gives with what the uncached query gives (docs/decisions.md, "Reads").
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Integer, Numeric, String, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    joinedload,
    load_only,
    mapped_column,
    query_expression,
    raiseload,
    relationship,
    selectinload,
    sessionmaker,
)

from sa_redis_cache import CachePolicy, FromCache
from sa_redis_cache.hydrate import loading_of
from tests.support import TierWorld

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


WAIT = 10.0


@dataclass
class Models:
    """The private models of this module (``unl_*`` tables)."""

    cat: Any
    item: Any
    emp: Any
    mgr: Any
    eng: Any
    node: Any


@pytest.fixture(scope="module")
def models(engine: sa.Engine) -> Iterator[Models]:
    """Categories and items, and an employee hierarchy with a joined-table (manager) and
    a single-table (engineer) subclass; tables made and dropped here, registry disposed
    of afterwards (no later ``attach()`` sees them)."""

    class Base(DeclarativeBase):
        pass

    class UnlCat(Base):
        __tablename__ = "unl_cat"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40))
        tags: Mapped[list[str]] = mapped_column(JSONB, default=list)
        extra: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(JSONB), default=dict)
        items: Mapped[list[UnlItem]] = relationship(back_populates="cat", order_by="UnlItem.id")

    class UnlItem(Base):
        __tablename__ = "unl_item"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        cat_id: Mapped[int] = mapped_column(ForeignKey("unl_cat.id"))
        name: Mapped[str] = mapped_column(String(40))
        price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
        note: Mapped[str | None] = mapped_column(String(200), deferred=True)
        doubled: Mapped[Decimal | None] = query_expression()
        cat: Mapped[UnlCat] = relationship(back_populates="items")

    class UnlEmp(Base):
        __tablename__ = "unl_emp"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(String(20))
        name: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "emp"}  # noqa: RUF012 - SQLAlchemy's declarative form

    class UnlMgr(UnlEmp):
        __tablename__ = "unl_mgr"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(ForeignKey("unl_emp.id"), primary_key=True)
        level: Mapped[int] = mapped_column(Integer)
        __mapper_args__ = {"polymorphic_identity": "mgr"}  # noqa: RUF012 - as above

    class UnlEng(UnlEmp):
        lang: Mapped[str | None] = mapped_column(String(20), nullable=True)
        __mapper_args__ = {"polymorphic_identity": "eng"}  # noqa: RUF012 - as above

    class UnlNode(Base):
        __tablename__ = "unl_node"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(ForeignKey("unl_node.id"))
        label: Mapped[str] = mapped_column(String(20))
        parent: Mapped[UnlNode | None] = relationship(
            back_populates="children", remote_side="UnlNode.id"
        )
        children: Mapped[list[UnlNode]] = relationship(back_populates="parent")

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([UnlCat(id=1, name="c1"), UnlCat(id=2, name="c2")])
        s.flush()
        s.add_all(
            UnlItem(id=i, cat_id=1 if i <= 3 else 2, name=f"i{i}", price=Decimal(i), note=f"n{i}")
            for i in range(1, 6)
        )
        s.add_all([UnlMgr(id=2, name="m", level=3), UnlEng(id=3, name="g", lang="py")])
        s.add(UnlNode(id=1, label="root"))
        s.flush()
        s.add_all([UnlNode(id=2, parent_id=1, label="a"), UnlNode(id=3, parent_id=1, label="b")])
        s.commit()
    try:
        yield Models(UnlCat, UnlItem, UnlEmp, UnlMgr, UnlEng, UnlNode)
    finally:
        Base.metadata.drop_all(engine)
        Base.registry.dispose()


World = TierWorld


@pytest.fixture
def world(models: Models, tiered: TierWorld) -> World:
    """Hits of the Redis tier, or of the local tier (``Cache(local=True)``), once the
    module's models are mapped."""
    return tiered


@contextmanager
def served(world: World, stmt: Any) -> Iterator[tuple[Session, list[Any]]]:
    """A session holding ``stmt``'s objects as a cache hit gives them (no SQL ran for
    the query), of the local tier in the local world."""
    for _ in range(2):  # a fill, then a Redis hit (the local tier keeps it)
        with world.cached() as s:
            s.scalars(stmt).unique().all()
    if world.local:
        # the report Redis sends of this test's own fill may reach the tier after the Redis
        # hit it kept, and drop it (under load, in CI): read until one is served locally
        for _ in range(10):
            before = world.local_hits()
            with world.cached() as s:
                s.scalars(stmt).unique().all()
            if world.local_hits() > before:
                break
        else:
            raise AssertionError("the local tier never kept the entry")
    before = world.local_hits()
    with world.cached() as s:
        world.sql.reset()
        objects = list(s.scalars(stmt).unique().all())
        assert world.sql.count == 0, "the query was not served from the cache"
        if world.local:
            assert world.local_hits() == before + 1
        yield s, objects


@contextmanager
def uncached(world: World, stmt: Any) -> Iterator[tuple[Session, list[Any]]]:
    """A session holding ``stmt``'s objects as plain SQLAlchemy loads them."""
    with world.plain() as s:
        yield s, list(s.scalars(stmt).unique().all())


def outcome(world: World, obj: Any, attr: str) -> tuple[Any, ...]:
    """What reading ``attr`` gives: its value (a related object by its id) and the
    statements it ran, or that it raised."""
    world.sql.reset()
    try:
        value = getattr(obj, attr)
    except InvalidRequestError:
        return ("raises",)
    if hasattr(value, "_sa_instance_state"):
        value = (type(value).__name__, value.id)
    return (value, world.sql.count)


def compare(
    world: World, stmt: Any, attrs: tuple[str, ...], pick: Callable[[list[Any]], Any] = min
) -> None:
    """Each attribute of the picked object reads on a hit as without the cache."""
    expected: list[tuple[Any, ...]] = []
    with uncached(world, stmt) as (_, objects):
        obj = pick(objects)
        expected = [outcome(world, obj, attr) for attr in attrs]
    with served(world, stmt) as (_, objects):
        obj = pick(objects)
        got = [outcome(world, obj, attr) for attr in attrs]
    assert dict(zip(attrs, got, strict=True)) == dict(zip(attrs, expected, strict=True))


def by_id(wanted: int) -> Callable[[list[Any]], Any]:
    return lambda objects: next(o for o in objects if o.id == wanted)


# -- columns the row did not hold load on access ----------------------------------------


def test_a_joined_subclass_column_loads_on_access(world: World, models: Models) -> None:
    emp = models.emp
    stmt = select(emp).where(emp.id.in_([2, 3])).options(FromCache())
    compare(world, stmt, ("level", "name"), by_id(2))
    with served(world, stmt) as (_, objects):
        world.sql.reset()
        assert by_id(2)(objects).level == 3  # not None: one SELECT of the subclass table
        assert world.sql.count == 1


def test_a_single_table_subclass_column_loads_on_access(world: World, models: Models) -> None:
    emp = models.emp
    stmt = select(emp).where(emp.id == 3).options(FromCache())
    compare(world, stmt, ("lang", "kind"))


def test_a_deferred_column_loads_on_access(world: World, models: Models) -> None:
    item = models.item
    stmt = select(item).where(item.id == 1).options(defer(item.price), FromCache())
    compare(world, stmt, ("price", "cat_id", "note"))
    emp = models.emp
    stmt = select(emp).where(emp.id == 3).options(defer(emp.name), FromCache())
    compare(world, stmt, ("name", "lang"))


def test_load_only_leaves_the_other_columns_to_load_on_access(world: World, models: Models) -> None:
    item = models.item
    stmt = select(item).where(item.id == 1).options(load_only(item.name), FromCache())
    compare(world, stmt, ("price", "cat_id", "cat", "note"))


def test_load_only_on_eagerly_loaded_objects(world: World, models: Models) -> None:
    cat, item = models.cat, models.item
    stmt = (
        select(cat)
        .where(cat.id == 1)
        .options(selectinload(cat.items).load_only(item.name), FromCache())
    )
    compare(world, stmt, ("price", "cat_id"), lambda cats: cats[0].items[0])
    stmt = (
        select(cat)
        .where(cat.id == 2)
        .options(joinedload(cat.items).load_only(item.name, raiseload=True), FromCache())
    )
    compare(world, stmt, ("price", "name"), lambda cats: cats[0].items[0])


# -- per-query raiseload ------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(lambda m: [raiseload(m.item.cat)], id="raiseload(rel)"),
        pytest.param(lambda _: [raiseload("*")], id="raiseload(*)"),
        pytest.param(lambda m: [defer(m.item.note, raiseload=True)], id="defer-raiseload"),
        pytest.param(lambda m: [defer(m.item.price, raiseload=True)], id="defer-raiseload-2"),
        pytest.param(lambda m: [load_only(m.item.name, raiseload=True)], id="load_only-raiseload"),
    ],
)
def test_a_raiseload_option_raises_on_a_hit(
    world: World, models: Models, options: Callable[[Models], list[Any]]
) -> None:
    item = models.item
    stmt = select(item).where(item.id == 1).options(*options(models), FromCache())
    compare(world, stmt, ("cat", "note", "price", "cat_id"))


def test_raiseload_on_eagerly_loaded_objects(world: World, models: Models) -> None:
    cat, item = models.cat, models.item
    stmt = (
        select(cat)
        .where(cat.id == 1)
        .options(selectinload(cat.items).raiseload(item.cat), FromCache())
    )
    compare(world, stmt, ("cat", "price"), lambda cats: cats[0].items[0])
    compare(world, stmt, ("name",))  # the category itself: nothing raises


def test_an_option_of_the_root_path_stays_there_for_the_same_class_loaded_deeper(
    world: World, models: Models
) -> None:
    """``raiseload(Node.parent)`` is an option of the queried nodes' path; their children,
    loaded eagerly, are nodes too, at another path, and load ``parent`` as the class says.
    A per-class shortcut once gave the children the root's raising loader."""
    node = models.node
    stmt = (
        select(node)
        .where(node.id == 1)
        .options(selectinload(node.children), raiseload(node.parent), FromCache())
    )
    compare(world, stmt, ("parent",))  # the root: raises
    compare(world, stmt, ("parent",), lambda nodes: nodes[0].children[0])  # a child: loads


# -- the refresh event --------------------------------------------------------------------


def test_a_hit_that_fills_an_expired_object_fires_refresh(world: World, models: Models) -> None:
    item = models.item
    stmt = select(item).where(item.cat_id == 1).order_by(item.id).options(FromCache())
    seen: list[tuple[int, list[str]]] = []

    def on_refresh(target: Any, _context: Any, attrs: Any) -> None:
        seen.append((target.id, sorted(attrs or ())))

    def run(factory: sessionmaker[Session]) -> list[tuple[int, list[str]]]:
        seen.clear()
        with factory() as s:
            held = s.scalars(select(item).where(item.id == 1)).one()
            s.expire(held)
            s.scalars(stmt).all()
            world.sql.reset()
            assert held.name == "i1"
            assert world.sql.count == 0  # filled by the query (or the hit)
        return list(seen)

    for _ in range(2):  # a fill, then a Redis hit (the local tier keeps it)
        with world.cached() as s:
            s.scalars(stmt).all()
    sa.event.listen(item, "refresh", on_refresh)
    try:
        expected = run(world.plain)
        assert expected == [(1, ["cat", "cat_id", "doubled", "id", "name", "note", "price"])]
        assert run(world.cached) == expected
    finally:
        sa.event.remove(item, "refresh", on_refresh)


def test_a_hit_fires_loaded_as_persistent_for_each_object_it_builds(
    world: World, models: Models
) -> None:
    """The session event ``loaded_as_persistent`` (an audit, a tenant check) fires for
    every object a hit builds, as for a database load: the query's objects and those of
    its eager loads, and ``session.get``'s."""
    cat = models.cat
    stmt = select(cat).where(cat.id == 1).options(selectinload(cat.items), FromCache())
    seen: list[tuple[Session, str, int]] = []

    def on_loaded(session: Session, instance: Any) -> None:
        seen.append((session, type(instance).__name__, instance.id))

    def loaded_by(session: Session) -> list[tuple[str, int]]:
        return sorted((name, pk) for s, name, pk in seen if s is session)

    for factory in (world.cached, world.plain):
        sa.event.listen(factory, "loaded_as_persistent", on_loaded)
    with uncached(world, stmt) as (s, _):
        expected = loaded_by(s)
    assert expected == [("UnlCat", 1), ("UnlItem", 1), ("UnlItem", 2), ("UnlItem", 3)]
    with served(world, stmt) as (s, _):
        assert loaded_by(s) == expected
    for _ in range(3):  # a miss that fills the entity entry, then hits
        with world.cached() as s:
            world.sql.reset()
            assert s.get(models.item, 4) is not None
            hit = world.sql.count == 0
            assert loaded_by(s) == [("UnlItem", 4)]
    assert hit, "session.get was never served from the cache"


# -- the rest of what a database load gives -------------------------------------------------


def test_a_hits_rows_are_found_by_the_objects_that_name_their_columns(
    world: World, models: Models
) -> None:
    """``row._mapping[Model]``, ``row._mapping[Model.column]``, ``columns(Model.column)``
    and ``scalars(Model.column)``: the ORM's results find a column by the entity or
    attribute that names it; a hit's results do too (they raised ``KeyError``)."""
    cat, item = models.cat, models.item
    stmt = select(cat, cat.name, item).join(cat.items).order_by(item.id).options(FromCache())

    def read(s: Session) -> list[Any]:
        first = s.execute(stmt).first()
        assert first is not None
        return [
            first._mapping[cat].id,
            first._mapping[cat.name],
            first._mapping[item].id,
            [(r[0].id, r[1]) for r in s.execute(stmt).columns(item, cat.name)],
            s.execute(stmt).scalars(cat.name).all(),
        ]

    with uncached(world, stmt) as (s, _):
        expected = read(s)
    with served(world, stmt) as (s, _):
        assert read(s) == expected
    by_pk = select(item).where(item.id == 2).options(FromCache())
    for _ in range(3):  # the entity cache's result of a primary-key select
        with world.cached() as s:
            row = s.execute(by_pk).first()
            assert row is not None
            assert row._mapping[item].id == 2


def test_unique_refuses_unhashable_column_values_as_the_orm_does(
    world: World, models: Models
) -> None:
    """``unique()`` over a JSONB column: the ORM refuses it with ``InvalidRequestError``
    naming the type; a hit did not, and raised ``TypeError`` from hashing a list."""
    cat = models.cat
    stmt = select(cat.id, cat.tags).order_by(cat.id).options(FromCache())
    with uncached(world, stmt) as (s, _), pytest.raises(InvalidRequestError, match="JSONB"):
        s.execute(stmt).unique().all()
    with served(world, stmt) as (s, _), pytest.raises(InvalidRequestError, match="JSONB"):
        s.execute(stmt).unique().all()


def test_a_joined_many_to_one_target_loads_before_the_objects_that_hold_it(
    world: World, models: Models
) -> None:
    """As a joined eager load builds an item's category before the item, the category's
    ``load`` event (a reconstructor) fires first: an item's reconstructor may read what
    its category's set up (it found nothing there on a hit, which fired them in reverse)."""
    cat, item = models.cat, models.item
    stmt = select(item).order_by(item.id).options(joinedload(item.cat), FromCache())
    seen: list[tuple[Session | None, int, bool]] = []

    def on_cat(target: Any, _context: Any) -> None:
        target.__dict__["set_up_on_load"] = True

    def on_item(target: Any, _context: Any) -> None:
        ready = "set_up_on_load" in target.__dict__["cat"].__dict__
        seen.append((sa.orm.object_session(target), target.id, ready))

    def loaded_by(session: Session) -> list[tuple[int, bool]]:
        return sorted((pk, ready) for s, pk, ready in seen if s is session)

    sa.event.listen(cat, "load", on_cat)
    sa.event.listen(item, "load", on_item)
    try:
        with uncached(world, stmt) as (s, _):
            expected = loaded_by(s)
        assert expected == [(i, True) for i in range(1, 6)]
        with served(world, stmt) as (s, _):
            assert loaded_by(s) == expected
    finally:
        sa.event.remove(cat, "load", on_cat)
        sa.event.remove(item, "load", on_item)


def test_a_hit_fills_the_expired_attributes_of_an_object_with_pending_changes(
    world: World, models: Models
) -> None:
    """Without autoflush, a query's row fills the expired attributes of an object the
    session holds with unflushed changes (SQLAlchemy's ``_populate_partial``) and fires
    ``refresh``; a hit left them expired, to one more SELECT each."""
    item = models.item
    stmt = select(item).where(item.id == 1).options(FromCache())
    refreshed: list[list[str]] = []

    def on_refresh(_target: Any, _context: Any, attrs: Any) -> None:
        refreshed.append(sorted(attrs or ()))

    def run(factory: sessionmaker[Session]) -> tuple[int, list[list[str]], Any, int]:
        refreshed.clear()
        with factory() as s, s.no_autoflush:
            held = s.scalars(select(item).where(item.id == 1)).one()
            s.expire(held, ["price"])
            held.name = "changed, not flushed"
            world.sql.reset()
            s.scalars(stmt).all()
            query_sql = world.sql.count
            world.sql.reset()
            price = held.price
            return query_sql, list(refreshed), price, world.sql.count

    for _ in range(2):  # a fill, then a Redis hit: the entry is there
        with world.cached() as s:
            s.scalars(stmt).all()
    sa.event.listen(item, "refresh", on_refresh)
    try:
        query_sql, *expected = run(world.plain)
        assert query_sql == 1
        assert expected[1:] == [Decimal(1), 0]
        assert "price" in expected[0][0]
        query_sql, *got = run(world.cached)
        assert query_sql == 0, "the query was not a hit"
        assert got == expected
    finally:
        sa.event.remove(item, "refresh", on_refresh)


def test_a_hits_tracked_json_is_tracked_as_a_database_loads_is(
    world: World, models: Models
) -> None:
    """``MutableDict.as_mutable(JSONB)``, the usual way to track changes inside a JSONB
    value: a hit's value is the tracked type again (its class's ``load`` listener wraps
    it), and a change inside it marks the object dirty and is committed. Such rows were
    never stored: the codec refused the tracked dict, and every read went to the
    database."""
    cat = models.cat
    stmt = select(cat).where(cat.id == 2).options(FromCache())
    with served(world, stmt) as (s, objects):
        held = objects[0]
        assert type(held.extra) is MutableDict
        held.extra["seen_by"] = "a hit"
        assert held in s.dirty
        s.commit()
    for _ in range(3):  # a miss that fills the entity entry, then hits
        with world.cached() as s:
            world.sql.reset()
            got = s.get(cat, 2)
            assert got is not None
            assert type(got.extra) is MutableDict
            assert got.extra["seen_by"] == "a hit"
    assert world.sql.count == 0, "session.get was not served from the cache"


def test_a_query_expression_the_statement_did_not_set_is_left_alone(
    world: World, models: Models
) -> None:
    """A ``query_expression()`` without ``with_expression()`` reads as None with no SQL,
    and is not among an object's expired attributes; a hit marked it expired."""
    item = models.item
    stmt = select(item).where(item.id == 1).options(FromCache())
    with uncached(world, stmt) as (_, objects):
        expected = sorted(sa.inspect(objects[0]).expired_attributes)
    with served(world, stmt) as (_, objects):
        state = sa.inspect(objects[0])
        assert sorted(state.expired_attributes) == expected
        world.sql.reset()
        assert objects[0].doubled is None
        assert world.sql.count == 0


# -- what plain statements pay ------------------------------------------------------------


def test_a_statement_without_loader_options_resolves_nothing(models: Models) -> None:
    item, emp = models.item, models.emp
    assert loading_of(select(item).where(item.id == 1)) is None
    assert loading_of(select(emp)) is None
    # options that leave every attribute as the class says: nothing per hit either
    assert loading_of(select(models.cat).options(selectinload(models.cat.items))) is None
    assert loading_of(select(item).options(raiseload(item.cat))) is not None


def test_with_loader_criteria_reaches_the_lazy_loads_of_a_hits_objects(
    world: World, models: Models
) -> None:
    """SQLAlchemy keeps a statement's ``with_loader_criteria()`` on the objects it loads
    and applies it to their lazy loads; a hit's objects keep it too, with the values of
    the execution that built them (the lazy load read every item without it)."""

    def statement(limit: int) -> Any:
        return (
            select(models.cat)
            .where(models.cat.id == 1)
            .options(
                FromCache(), sa.orm.with_loader_criteria(models.item, lambda c: c.price < limit)
            )
        )

    for limit, names in ((2, ["i1"]), (10, ["i1", "i2", "i3"])):
        with uncached(world, statement(limit)) as (_, objects):
            assert [i.name for i in objects[0].items] == names
        with served(world, statement(limit)) as (_, objects):
            assert [i.name for i in objects[0].items] == names


def test_loader_options_reach_the_lazy_loads_of_a_hits_objects(
    world: World, models: Models
) -> None:
    """A loader option below a relationship the query does not load eagerly
    (``defaultload(Cat.items).raiseload(Item.cat)``) applies when the objects' lazy load
    runs: SQLAlchemy replays it from the objects' load options and path."""
    stmt = (
        select(models.cat)
        .where(models.cat.id == 1)
        .options(FromCache(), sa.orm.defaultload(models.cat.items).raiseload(models.item.cat))
    )
    with uncached(world, stmt) as (_, objects):
        expected = outcome(world, objects[0].items[0], "cat")
    with served(world, stmt) as (_, objects):
        got = outcome(world, objects[0].items[0], "cat")
    assert got == expected == ("raises",)
    # the lazy load served too (a cached collection): its objects sit below the
    # parent's path, where the option names them
    with served(world, stmt) as (_, objects):
        items = outcome(world, objects[0], "items")
        assert items[1] == 0, "the lazy load was not served from the cache"
        assert outcome(world, objects[0].items[0], "cat") == ("raises",)


def test_a_lazy_load_with_criteria_runs_uncached(world: World, models: Models) -> None:
    """``lazyload(rel.and_(...))``: SQLAlchemy gives each object a lazy loader holding
    the criteria's values of that execution, which a hit cannot (it loaded every item),
    so the statement runs uncached, with each execution's values."""

    def statement(limit: int) -> Any:
        criteria = models.cat.items.and_(models.item.price < limit)
        return (
            select(models.cat)
            .where(models.cat.id == 1)
            .options(FromCache(), sa.orm.lazyload(criteria))
        )

    for limit, names in ((2, ["i1"]), (10, ["i1", "i2", "i3"]), (2, ["i1"])):
        for _ in range(2):
            with world.cached() as s:
                assert [i.name for i in s.scalars(statement(limit)).one().items] == names
    assert world.cache.stats()["total"]["uncacheable"] == 6
