"""Cached reads of model shapes real applications use, checked against an oracle.

The oracle is a plain session on an engine the cache is not attached to: after committed
writes (through a cached session under each write strategy, a plain session or Core on
the attached engine), a cached read (``FromCache``, ``session.get``, relationship loads)
must give what the oracle gives. The shapes are those the other read tests leave out:
inheritance, ``column_property``, relationship loaders over association tables,
composite and non-integer primary keys, version counters, server-side values.
"""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.ext.declarative import ConcreteBase
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    column_property,
    composite,
    deferred,
    joinedload,
    load_only,
    mapped_column,
    relationship,
    selectin_polymorphic,
    selectinload,
    sessionmaker,
    subqueryload,
    with_polymorphic,
)

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache, compat
from sa_redis_cache.fingerprint import fingerprint
from tests.conftest import delete_namespace
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclasses.dataclass
class World:
    """The models, a cached factory, the attached engine and the oracle's engine."""

    m: Any  # namespace of model classes
    factory: sessionmaker[Session]
    engine: sa.Engine
    oracle_engine: sa.Engine
    sql: SQLCounter
    cache: Cache
    strategy: str

    def oracle(self, read: Callable[[Session], Any]) -> Any:
        with Session(self.oracle_engine) as s:
            return read(s)

    def cached(self, read: Callable[[Session], Any]) -> Any:
        with self.factory() as s:
            return read(s)

    def served(self, read: Callable[[Session], Any]) -> Any:
        """What ``read`` gives once it is a hit (no SQL), checked against the oracle."""
        for _ in range(3):
            with self.factory() as s:
                self.sql.reset()
                got = read(s)
                if self.sql.count == 0:
                    assert got == self.oracle(read)
                    return got
        raise AssertionError(
            f"the read was never served from the cache: {self.sql.statements} "
            f"{self.cache.stats()['regions']}"
        )

    def agree(self, read: Callable[[Session], Any]) -> Any:
        """A cached read (twice: after its fill too) gives what the oracle gives."""
        want = self.oracle(read)
        assert self.cached(read) == want
        assert self.cached(read) == want
        return want


class _Models:
    pass


# each write strategy; and cache-aside with the local tier, which keeps decoded entries
STRATEGIES = ["cache_aside", "write_through", "cache_aside+local"]


def make_models(strategy: str) -> tuple[type[DeclarativeBase], Any]:
    class Base(DeclarativeBase):
        pass

    policy = CachePolicy(strategy=strategy, ttl=600)  # type: ignore[arg-type]
    m: Any = _Models()

    parent_tag = sa.Table(
        "rv_parent_tag",
        Base.metadata,
        sa.Column("parent_id", sa.ForeignKey("rv_parent.id"), primary_key=True),
        sa.Column("tag_id", sa.ForeignKey("rv_tag.id"), primary_key=True),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    )

    class RvChild(Base):
        __tablename__ = "rv_child"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey("rv_parent.id"))
        name: Mapped[str] = mapped_column(String(20))

    class RvTag(Base):
        __tablename__ = "rv_tag"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))

    class RvParent(Base):
        __tablename__ = "rv_parent"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        # a column computed from another table, loaded with every parent
        child_count: Mapped[int] = column_property(
            select(func.count(RvChild.id))
            .where(RvChild.parent_id == id)  # noqa: A003 - the column above
            .correlate_except(RvChild)
            .scalar_subquery()
        )
        children: Mapped[list[RvChild]] = relationship(
            order_by=RvChild.id, backref="parent", lazy="select"
        )
        tags: Mapped[list[RvTag]] = relationship(secondary=parent_tag, order_by=RvTag.id)
        active_tags: Mapped[list[RvTag]] = relationship(
            secondary=parent_tag,
            primaryjoin=lambda: sa.and_(
                RvParent.id == parent_tag.c.parent_id, parent_tag.c.active.is_(True)
            ),
            order_by=RvTag.id,
            viewonly=True,
        )

    # joined-table inheritance; the manager's columns are loaded by a second SELECT
    class RvEmployee(Base):
        __tablename__ = "rv_employee"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        type: Mapped[str] = mapped_column(String(20))
        name: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}  # noqa: RUF012

    class RvEngineer(RvEmployee):
        __tablename__ = "rv_engineer"
        __cache__ = policy
        id: Mapped[int] = mapped_column(ForeignKey("rv_employee.id"), primary_key=True)
        language: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_identity": "engineer"}  # noqa: RUF012

    class RvManager(RvEmployee):
        __tablename__ = "rv_manager"
        __cache__ = policy
        id: Mapped[int] = mapped_column(ForeignKey("rv_employee.id"), primary_key=True)
        budget: Mapped[int] = mapped_column()
        __mapper_args__ = {  # noqa: RUF012
            "polymorphic_identity": "manager",
            "polymorphic_load": "selectin",
        }

    # single-table inheritance
    class RvVehicle(Base):
        __tablename__ = "rv_vehicle"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(String(20))
        name: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}  # noqa: RUF012

    class RvCar(RvVehicle):
        __cache__ = policy
        doors: Mapped[int | None] = mapped_column(nullable=True)
        __mapper_args__ = {"polymorphic_identity": "car"}  # noqa: RUF012

    class RvBike(RvVehicle):
        __cache__ = policy
        __mapper_args__ = {"polymorphic_identity": "bike"}  # noqa: RUF012

    class RvPair(Base):  # a composite primary key, one part text
        __tablename__ = "rv_pair"
        __cache__ = policy
        a: Mapped[int] = mapped_column(primary_key=True)
        b: Mapped[str] = mapped_column(String(10), primary_key=True)
        val: Mapped[str] = mapped_column(String(20))

    class RvToken(Base):
        __tablename__ = "rv_token"
        __cache__ = policy
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
        label: Mapped[str] = mapped_column(String(20))

    class RvCode(Base):
        __tablename__ = "rv_code"
        __cache__ = policy
        code: Mapped[str] = mapped_column(String(10), primary_key=True)
        label: Mapped[str] = mapped_column(String(20))

    class RvVersioned(Base):
        __tablename__ = "rv_versioned"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        version: Mapped[int] = mapped_column(nullable=False)
        val: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"version_id_col": version}  # noqa: RUF012

    class RvStamped(Base):
        __tablename__ = "rv_stamped"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        val: Mapped[str] = mapped_column(String(20))
        created: Mapped[int] = mapped_column(server_default=sa.text("7"))
        edits: Mapped[int] = mapped_column(default=0, onupdate=sa.text("edits + 1"))

    class RvShape(Base):
        __tablename__ = "rv_shape"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        x: Mapped[int] = mapped_column()
        y: Mapped[int] = mapped_column()
        at: Mapped[Point] = composite("x", "y")
        body: Mapped[str] = deferred(mapped_column(String(200), default=""))

        @property
        def norm(self) -> int:
            return abs(self.x) + abs(self.y)

    class RvParentTag(Base):  # the association object over the secondary table
        __table__ = parent_tag
        __cache__ = policy

    # relationships the mapper itself loads eagerly: no option in the statement names them
    class RvBox(Base):
        __tablename__ = "rv_box"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        items: Mapped[list[RvItem]] = relationship(
            lazy="selectin", order_by="RvItem.id", back_populates="box"
        )

    class RvItem(Base):
        __tablename__ = "rv_item"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        box_id: Mapped[int] = mapped_column(ForeignKey("rv_box.id"))
        name: Mapped[str] = mapped_column(String(20))
        box: Mapped[RvBox] = relationship(lazy="joined", back_populates="items")

    for cls in (
        RvParentTag,
        RvBox,
        RvItem,
        RvChild,
        RvTag,
        RvParent,
        RvEmployee,
        RvEngineer,
        RvManager,
        RvVehicle,
        RvCar,
        RvBike,
        RvPair,
        RvToken,
        RvCode,
        RvVersioned,
        RvStamped,
        RvShape,
    ):
        setattr(m, cls.__name__.removeprefix("Rv").lower(), cls)
    m.parent_tag = parent_tag
    return Base, m


def _world(
    param: str, engine: sa.Engine, redis_url: str, make: Callable[[str], tuple[Any, Any]]
) -> Iterator[World]:
    """The models ``make`` defines, their tables, a cache attached to a session factory of
    their own and an oracle engine the cache is not attached to; all removed afterwards."""
    strategy, local = param.split("+") if "+" in param else (param, "")
    base, m = make(strategy)
    base.metadata.drop_all(engine)
    base.metadata.create_all(engine)
    own = sa.create_engine(engine.url)
    oracle = sa.create_engine(engine.url)
    sql = SQLCounter()
    sa.event.listen(own, "before_cursor_execute", sql)
    factory = sessionmaker(own)
    namespace = f"rvorm{secrets.token_hex(4)}"
    cache = Cache(redis_url, namespace=namespace, local=bool(local))
    cache.attach(factory)
    if local:
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10.0)
    try:
        yield World(m, factory, own, oracle, sql, cache, strategy)
    finally:
        cache.detach()
        own.dispose()
        oracle.dispose()
        client = redis.Redis.from_url(redis_url)
        delete_namespace(client, namespace)
        client.close()
        base.metadata.drop_all(engine)
        base.registry.dispose()


@pytest.fixture(scope="module", params=STRATEGIES)
def world(request: pytest.FixtureRequest, engine: sa.Engine, redis_url: str) -> Iterator[World]:
    yield from _world(request.param, engine, redis_url, make_models)


@pytest.fixture
def w(world: World) -> World:
    """The world with its rows as every test starts from."""
    m = world.m
    with Session(world.oracle_engine) as s:
        s.execute(m.parent_tag.delete())
        for model in (m.item, m.box, m.child, m.parent, m.tag, m.engineer, m.manager):
            s.execute(sa.delete(model.__table__))
        for model in (
            m.employee,
            m.vehicle,
            m.pair,
            m.token,
            m.code,
            m.versioned,
            m.stamped,
            m.shape,
        ):
            s.execute(sa.delete(model.__table__))
        s.add_all([m.parent(id=1, name="p1"), m.parent(id=2, name="p2")])
        s.add_all([m.tag(id=1, name="t1"), m.tag(id=2, name="t2")])
        s.flush()
        s.add_all([m.child(id=1, parent_id=1, name="c1"), m.child(id=2, parent_id=1, name="c2")])
        s.execute(
            m.parent_tag.insert(),
            [
                {"parent_id": 1, "tag_id": 1, "active": True},
                {"parent_id": 1, "tag_id": 2, "active": False},
            ],
        )
        s.add_all(
            [
                m.engineer(id=1, name="e1", language="py"),
                m.manager(id=2, name="m1", budget=10),
                m.employee(id=3, name="x1"),
            ]
        )
        s.add_all([m.car(id=1, name="car1", doors=4), m.bike(id=2, name="bike1")])
        s.add_all([m.pair(a=1, b="x", val="v1"), m.pair(a=1, b="y", val="v2")])
        s.add(m.code(code="ab", label="l1"))
        s.add(m.versioned(id=1, val="v1"))
        s.add(m.stamped(id=1, val="s1"))
        s.add(m.shape(id=1, x=1, y=2, body="long"))
        s.add_all([m.box(id=1, name="b1"), m.box(id=2, name="b2")])
        s.flush()
        s.add_all([m.item(id=1, box_id=1, name="i1"), m.item(id=2, box_id=1, name="i2")])
        s.commit()
    # the seed ran behind the cache's back
    for model in (m.box, m.item, m.child, m.parent, m.tag, m.employee, m.vehicle, m.pair):
        world.cache.invalidate_model(model)
    for model in (m.engineer, m.manager, m.token, m.code, m.versioned, m.stamped, m.shape):
        world.cache.invalidate_model(model)
    world.cache.invalidate_table(m.parent_tag)
    return world


# -- column_property over another table ----------------------------------------------------


def test_a_column_property_over_another_table_follows_its_writes_by_get(w: World) -> None:
    m = w.m

    def count(s: Session) -> Any:
        return s.get_one(m.parent, 1).child_count

    assert w.agree(count) == 2
    with w.factory() as s:
        s.add(m.child(id=3, parent_id=1, name="c3"))
        s.commit()
    assert w.agree(count) == 3


def test_a_column_property_over_another_table_follows_its_writes_by_query(w: World) -> None:
    m = w.m

    def counts(s: Session) -> Any:
        stmt = select(m.parent).order_by(m.parent.id).options(FromCache())
        return [(p.id, p.child_count) for p in s.scalars(stmt)]

    assert w.agree(counts) == [(1, 2), (2, 0)]
    with w.factory() as s:
        s.add(m.child(id=3, parent_id=2, name="c3"))
        s.commit()
    assert w.agree(counts) == [(1, 2), (2, 1)]


# -- inheritance ----------------------------------------------------------------------------


def employees(stmt_of: Callable[[Any], Any]) -> Callable[[World], Callable[[Session], Any]]:
    def make(w: World) -> Callable[[Session], Any]:
        def read(s: Session) -> Any:
            stmt = stmt_of(w.m).options(FromCache())
            return [
                (
                    type(e).__name__,
                    e.id,
                    e.name,
                    getattr(e, "language", None),
                    getattr(e, "budget", None),
                )
                for e in s.scalars(stmt)
            ]

        return read

    return make


POLYMORPHIC_READS = {
    "base": employees(lambda m: select(m.employee).order_by(m.employee.id)),
    "with_polymorphic": employees(
        lambda m: select(with_polymorphic(m.employee, "*")).order_by(m.employee.id)
    ),
    "selectin_polymorphic": employees(
        lambda m: (
            select(m.employee)
            .order_by(m.employee.id)
            .options(selectin_polymorphic(m.employee, [m.engineer, m.manager]))
        )
    ),
    "engineer": employees(lambda m: select(m.engineer).order_by(m.engineer.id)),
    "manager": employees(lambda m: select(m.manager).order_by(m.manager.id)),
}


def write_engineer_language(w: World, how: str) -> None:
    m = w.m
    if how == "session":
        with w.factory() as s:
            s.get_one(m.engineer, 1).language = "rust"
            s.commit()
    elif how == "core":
        with w.engine.begin() as c:
            c.execute(
                sa.update(m.engineer.__table__).where(sa.column("id") == 1).values(language="rust")
            )
    else:
        with w.engine.begin() as c:
            c.execute(sa.text("UPDATE rv_engineer SET language = 'rust' WHERE id = 1"))


def write_manager_budget(w: World, how: str) -> None:
    m = w.m
    if how == "session":
        with w.factory() as s:
            s.get_one(m.manager, 2).budget = 99
            s.commit()
    elif how == "core":
        with w.engine.begin() as c:
            c.execute(sa.update(m.manager.__table__).where(sa.column("id") == 2).values(budget=99))
    else:
        with w.engine.begin() as c:
            c.execute(sa.text("UPDATE rv_manager SET budget = 99 WHERE id = 2"))


@pytest.mark.parametrize("how", ["session", "core", "text"])
@pytest.mark.parametrize("shape", sorted(POLYMORPHIC_READS))
def test_a_subclass_tables_write_reaches_polymorphic_queries(
    w: World, shape: str, how: str
) -> None:
    read = POLYMORPHIC_READS[shape](w)
    w.agree(read)  # a hit, whose unloaded subclass columns may still load on access
    write_engineer_language(w, how)
    write_manager_budget(w, how)
    w.agree(read)


def test_a_subclass_insert_and_delete_reach_base_queries(w: World) -> None:
    read = POLYMORPHIC_READS["base"](w)
    w.agree(read)
    with w.factory() as s:
        s.add(w.m.manager(id=4, name="m2", budget=5))
        s.commit()
    w.agree(read)
    with w.factory() as s:
        s.delete(s.get_one(w.m.engineer, 1))
        s.commit()
    w.agree(read)


def vehicles(stmt_of: Callable[[Any], Any]) -> Callable[[World], Callable[[Session], Any]]:
    def make(w: World) -> Callable[[Session], Any]:
        def read(s: Session) -> Any:
            stmt = stmt_of(w.m).options(FromCache())
            return [
                (type(v).__name__, v.id, v.name, getattr(v, "doors", None)) for v in s.scalars(stmt)
            ]

        return read

    return make


@pytest.mark.parametrize("target", ["vehicle", "car", "bike"])
def test_single_table_subclass_writes_reach_base_and_subclass_queries(
    w: World, target: str
) -> None:
    model = getattr(w.m, target)
    read = vehicles(lambda m: select(model).order_by(model.id))(w)
    w.agree(read)
    with w.factory() as s:
        s.get_one(w.m.car, 1).doors = 2
        s.add(w.m.bike(id=3, name="bike2"))
        s.commit()
    w.agree(read)
    with w.factory() as s:
        s.get_one(w.m.bike, 2).name = "bike1b"
        s.commit()
    w.agree(read)


# -- relationships --------------------------------------------------------------------------


LOADERS: dict[str, Callable[[Any], tuple[Any, ...]]] = {
    "selectin": lambda m: (
        selectinload(m.parent.children),
        selectinload(m.parent.tags),
        selectinload(m.parent.active_tags),
    ),
    "joined": lambda m: (
        joinedload(m.parent.children),
        joinedload(m.parent.tags),
        joinedload(m.parent.active_tags),
    ),
    "subquery": lambda m: (
        subqueryload(m.parent.children),
        subqueryload(m.parent.tags),
        subqueryload(m.parent.active_tags),
    ),
    "lazy": lambda m: (sa.orm.lazyload(m.parent.children),),
}


def relationship_read(loader: str) -> Callable[[World], Callable[[Session], Any]]:
    def make(w: World) -> Callable[[Session], Any]:
        def read(s: Session) -> Any:
            stmt = select(w.m.parent).order_by(w.m.parent.id)
            stmt = stmt.options(*LOADERS[loader](w.m), FromCache())
            return [
                (
                    p.id,
                    [(c.id, c.name) for c in p.children],
                    [(t.id, t.name) for t in p.tags],
                    [t.id for t in p.active_tags],
                )
                for p in s.scalars(stmt).unique()
            ]

        return read

    return make


RELATIONSHIP_WRITES: dict[str, Callable[[World], None]] = {}


def _rel_write(fn: Callable[[World], None]) -> Callable[[World], None]:
    RELATIONSHIP_WRITES[fn.__name__] = fn
    return fn


@_rel_write
def child_renamed(w: World) -> None:
    with w.factory() as s:
        s.get_one(w.m.child, 1).name = "c1b"
        s.commit()


@_rel_write
def child_moved_by_backref(w: World) -> None:
    with w.factory() as s:
        s.get_one(w.m.child, 2).parent = s.get_one(w.m.parent, 2)
        s.commit()


@_rel_write
def tag_renamed(w: World) -> None:
    with w.factory() as s:
        s.get_one(w.m.tag, 1).name = "t1b"
        s.commit()


@_rel_write
def tag_added_to_collection(w: World) -> None:
    with w.factory() as s:
        parent = s.get_one(w.m.parent, 2)
        parent.tags.append(s.get_one(w.m.tag, 2))
        s.commit()


@_rel_write
def association_flag_flipped_core(w: World) -> None:
    with w.engine.begin() as c:
        c.execute(w.m.parent_tag.update().where(w.m.parent_tag.c.tag_id == 2).values(active=True))


@pytest.mark.parametrize("write", sorted(RELATIONSHIP_WRITES))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_relationship_loads_follow_writes_on_either_side(w: World, loader: str, write: str) -> None:
    read = relationship_read(loader)(w)
    w.agree(read)
    w.agree(read)
    RELATIONSHIP_WRITES[write](w)
    w.agree(read)


def boxes(s: Session, m: Any) -> Any:
    stmt = select(m.box).order_by(m.box.id).options(FromCache())
    return [(b.id, b.name, [(i.id, i.name, i.box.name) for i in b.items]) for b in s.scalars(stmt)]


def items(s: Session, m: Any) -> Any:
    stmt = select(m.item).order_by(m.item.id).options(FromCache())
    return [(i.id, i.name, i.box.name) for i in s.scalars(stmt)]


@pytest.mark.parametrize("how", ["session", "core"])
def test_relationships_the_mapper_loads_eagerly_follow_their_targets_writes(
    w: World, how: str
) -> None:
    m = w.m
    w.served(lambda s: boxes(s, m))
    w.served(lambda s: items(s, m))
    # each side written alone: the other side's entries must follow it
    if how == "session":
        with w.factory() as s:
            s.get_one(m.item, 1).name = "i1b"
            s.add(m.item(id=3, box_id=2, name="i3"))
            s.commit()
    else:
        with w.engine.begin() as c:
            c.execute(sa.update(m.item.__table__).where(sa.column("id") == 1).values(name="i1b"))
            c.execute(sa.insert(m.item.__table__).values(id=3, box_id=2, name="i3"))
    w.agree(lambda s: boxes(s, m))
    w.agree(lambda s: items(s, m))
    if how == "session":
        with w.factory() as s:
            s.get_one(m.box, 1).name = "b1b"
            s.commit()
    else:
        with w.engine.begin() as c:
            c.execute(sa.update(m.box.__table__).where(sa.column("id") == 1).values(name="b1b"))
    w.agree(lambda s: boxes(s, m))
    w.agree(lambda s: items(s, m))


def test_get_of_a_model_with_eager_relationships_follows_their_targets_writes(w: World) -> None:
    m = w.m

    def box(s: Session) -> Any:
        b = s.get_one(m.box, 1)
        return [(i.id, i.name) for i in b.items]

    def item(s: Session) -> Any:
        return s.get_one(m.item, 1).box.name

    w.agree(box)
    w.agree(item)
    with w.engine.begin() as c:
        c.execute(sa.update(m.item.__table__).where(sa.column("id") == 1).values(name="i1b"))
    w.agree(box)
    w.agree(item)
    with w.engine.begin() as c:
        c.execute(sa.update(m.box.__table__).where(sa.column("id") == 1).values(name="b1b"))
    w.agree(box)
    w.agree(item)


# -- primary keys ---------------------------------------------------------------------------


def test_a_composite_key_with_text_follows_writes(w: World) -> None:
    m = w.m

    def both(s: Session) -> Any:
        got = [s.get(m.pair, (1, "x")), s.get(m.pair, {"a": 1, "b": "y"}), s.get(m.pair, (2, "x"))]
        return [None if p is None else (p.a, p.b, p.val) for p in got]

    def query(s: Session) -> Any:
        stmt = select(m.pair).where(m.pair.a == 1).order_by(m.pair.b).options(FromCache())
        return [(p.a, p.b, p.val) for p in s.scalars(stmt)]

    w.served(both)
    w.served(query)
    with w.factory() as s:
        s.get_one(m.pair, (1, "x")).val = "v1b"
        s.add(m.pair(a=2, b="x", val="v3"))
        s.commit()
    w.agree(both)
    w.agree(query)
    with w.factory() as s:
        s.get_one(m.pair, (1, "y")).b = "z"  # a key update
        s.commit()
    w.agree(both)
    w.agree(query)
    with w.engine.begin() as c:
        c.execute(sa.text("UPDATE rv_pair SET val = 'raw' WHERE a = 1 AND b = 'x'"))
    w.agree(both)


def test_uuid_and_text_keys_follow_writes_and_key_updates(w: World) -> None:
    m = w.m
    one, two = uuid.uuid4(), uuid.uuid4()
    with w.factory() as s:
        s.add(m.token(id=one, label="a"))
        s.commit()

    def tokens(s: Session) -> Any:
        got = [s.get(m.token, one), s.get(m.token, str(two)), s.get(m.code, "ab")]
        return [None if t is None else (t.label,) for t in got]

    w.served(tokens)
    with w.factory() as s:
        s.get_one(m.token, one).id = two  # the row moves to another key
        s.get_one(m.code, "ab").code = "cd"
        s.commit()
    w.agree(tokens)
    with w.factory() as s:
        s.add(m.code(code="ab", label="new"))
        s.commit()
    w.agree(tokens)


# -- versions, server-side values, composites, deferred columns ----------------------------


def test_a_version_counter_is_served_as_the_database_has_it(w: World) -> None:
    m = w.m

    def versioned(s: Session) -> Any:
        v = s.get_one(m.versioned, 1)
        return (v.version, v.val)

    w.served(versioned)
    for value in ("v2", "v3"):
        with w.factory() as s:
            s.get_one(m.versioned, 1).val = value
            s.commit()
        w.agree(versioned)
    # a write from a cached read's object does not raise StaleDataError
    with w.factory() as s:
        s.get_one(m.versioned, 1).val = "v4"
        s.commit()
    w.agree(versioned)


def test_server_defaults_and_sql_onupdate_are_served_as_the_database_has_them(w: World) -> None:
    m = w.m

    def stamped(s: Session) -> Any:
        got = [s.get(m.stamped, 1), s.get(m.stamped, 2)]
        return [None if x is None else (x.val, x.created, x.edits) for x in got]

    def query(s: Session) -> Any:
        stmt = select(m.stamped).order_by(m.stamped.id).options(FromCache())
        return [(x.val, x.created, x.edits) for x in s.scalars(stmt)]

    w.served(stamped)
    w.served(query)
    with w.factory() as s:
        s.get_one(m.stamped, 1).val = "s1b"
        s.add(m.stamped(id=2, val="s2"))
        s.commit()
    w.agree(stamped)
    w.agree(query)
    with w.factory() as s:
        x = s.get_one(m.stamped, 2)
        x.val = "s2b"
        s.flush()
        s.get_one(m.stamped, 2).val = "s2c"
        s.commit()
    w.agree(stamped)
    w.agree(query)


def test_composite_and_deferred_columns_follow_writes(w: World) -> None:
    m = w.m

    def shape(s: Session) -> Any:
        x = s.get_one(m.shape, 1)
        return (x.at, x.norm, x.body)

    def query(s: Session) -> Any:
        stmt = select(m.shape).options(FromCache())
        return [(x.at, x.body) for x in s.scalars(stmt)]

    def only(s: Session) -> Any:
        stmt = select(m.shape).options(load_only(m.shape.x), FromCache())
        return [(x.x, x.y, x.at) for x in s.scalars(stmt)]

    def undeferred(s: Session) -> Any:
        stmt = select(m.shape).options(sa.orm.undefer(m.shape.body), FromCache())
        return [(x.at, x.body) for x in s.scalars(stmt)]

    for read in (shape, query, only, undeferred):
        w.agree(read)
    with w.factory() as s:
        x = s.get_one(m.shape, 1)
        x.at = Point(5, -6)
        x.body = "changed"
        s.commit()
    for read in (shape, query, only, undeferred):
        w.agree(read)


# -- column selects, aggregates, joins -----------------------------------------------------


COLUMN_READS: dict[str, Callable[[Any], Any]] = {
    "rows": lambda m: select(m.child.id, m.child.name).order_by(m.child.id),
    "count": lambda m: select(func.count(m.child.id)),
    "grouped": lambda m: (
        select(m.child.parent_id, func.count())
        .group_by(m.child.parent_id)
        .order_by(m.child.parent_id)
    ),
    "join": lambda m: (
        select(m.parent.name, m.child.name).join(m.child, m.parent.children).order_by(m.child.id)
    ),
    "entities": lambda m: (
        select(m.parent, m.child).join(m.child, m.parent.children).order_by(m.child.id)
    ),
    "subquery": lambda m: select(m.parent.name).where(
        m.parent.id.in_(select(m.child.parent_id).where(m.child.name != "zz"))
    ),
    "exists": lambda m: select(m.parent.id).where(
        sa.exists().where(m.child.parent_id == m.parent.id)
    ),
    "association": lambda m: select(m.tag.name).join(m.parent.tags).where(m.parent.id == 1),
}


def plain(value: Any) -> Any:
    if isinstance(value, sa.Row):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "__table__"):
        return (type(value).__name__, sa.inspect(value).identity, getattr(value, "name", None))
    return value


@pytest.mark.parametrize("kind", ["all", "scalars", "scalar", "unique", "mappings"])
@pytest.mark.parametrize("shape", sorted(COLUMN_READS))
def test_column_selects_follow_writes_on_either_side(w: World, shape: str, kind: str) -> None:
    m = w.m

    def read(s: Session) -> Any:
        stmt = COLUMN_READS[shape](m).options(FromCache())
        if kind == "all":
            return plain(list(s.execute(stmt).all()))
        if kind == "scalars":
            return plain(list(s.scalars(stmt).all()))
        if kind == "scalar":
            return plain(s.scalar(stmt))
        if kind == "unique":
            return plain(list(s.execute(stmt).unique().all()))
        return [dict(r) for r in s.execute(stmt).mappings()] if shape in ("rows", "count") else None

    w.served(read)
    with w.factory() as s:
        s.add(m.child(id=5, parent_id=2, name="c5"))
        s.commit()
    w.agree(read)
    with w.factory() as s:
        s.get_one(m.parent, 1).name = "p1b"
        s.get_one(m.tag, 1).name = "t1b"
        s.commit()
    w.agree(read)
    with Session(w.engine) as s:  # a plain session on the attached engine
        s.execute(sa.update(m.child).where(m.child.id == 5).values(name="zz"))
        s.commit()
    w.agree(read)


# -- a second set of shapes: classes over joins, relationships through other tables ---------


def make_models2(strategy: str) -> tuple[type[DeclarativeBase], Any]:
    class Base(DeclarativeBase):
        pass

    policy = CachePolicy(strategy=strategy, ttl=600)  # type: ignore[arg-type]
    m: Any = _Models()

    users = sa.Table(
        "rv2_user",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(20), nullable=False),
    )
    addresses = sa.Table(
        "rv2_address",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.ForeignKey("rv2_user.id"), nullable=False, unique=True),
        sa.Column("email", sa.String(40), nullable=False),
    )

    class RvUserMail(Base):  # one class over a join of two tables
        __table__ = sa.join(users, addresses)
        __cache__ = policy
        id = column_property(users.c.id, addresses.c.user_id)
        address_id = addresses.c.id
        __mapper_args__ = {"primary_key": [users.c.id]}  # noqa: RUF012

    group_member = sa.Table(
        "rv2_group_member",
        Base.metadata,
        sa.Column("group_id", sa.ForeignKey("rv2_group.id"), primary_key=True),
        sa.Column("member_id", sa.ForeignKey("rv2_member.id"), primary_key=True),
    )

    class RvBlocked(Base):  # members hidden from every group's list
        __tablename__ = "rv2_blocked"
        __cache__ = policy
        member_id: Mapped[int] = mapped_column(ForeignKey("rv2_member.id"), primary_key=True)

    class RvMember(Base):
        __tablename__ = "rv2_member"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        code: Mapped[str] = mapped_column(String(10), unique=True)

    class RvGroup(Base):
        __tablename__ = "rv2_group"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        leader_code: Mapped[str | None] = mapped_column(ForeignKey("rv2_member.code"))
        # a relationship whose condition reads a third table
        visible: Mapped[list[RvMember]] = relationship(
            secondary=group_member,
            secondaryjoin=lambda: sa.and_(
                RvMember.id == group_member.c.member_id,
                ~RvMember.id.in_(select(RvBlocked.member_id)),
            ),
            order_by=RvMember.id,
            viewonly=True,
        )
        members: Mapped[list[RvMember]] = relationship(secondary=group_member, order_by=RvMember.id)
        # a many-to-one to a column that is not the target's primary key
        leader: Mapped[RvMember | None] = relationship(
            primaryjoin=lambda: RvGroup.leader_code == RvMember.code, viewonly=True
        )
        member_names: Mapped[str | None] = sa.orm.query_expression()

    # collections that are not lists
    RvGroup.member_set = relationship(
        RvMember, secondary=group_member, collection_class=set, viewonly=True
    )
    RvGroup.members_by_code = relationship(
        RvMember,
        secondary=group_member,
        collection_class=sa.orm.attribute_keyed_dict("code"),
        viewonly=True,
    )

    # a relationship to an aliased class over a subquery that reads two more tables
    unblocked = (
        select(RvMember, group_member.c.group_id)
        .join(group_member, group_member.c.member_id == RvMember.id)
        .where(~RvMember.id.in_(select(RvBlocked.member_id)))
        .subquery()
    )
    RvGroup.unblocked = relationship(
        sa.orm.aliased(RvMember, unblocked),
        primaryjoin=RvGroup.id == unblocked.c.group_id,
        order_by=unblocked.c.id,
        viewonly=True,
    )

    # concrete table inheritance: each class its own table, the base a UNION of them
    class RvAnimal(ConcreteBase, Base):
        __tablename__ = "rv2_animal"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_identity": "animal", "concrete": True}  # noqa: RUF012

        @classmethod
        def __declare_first__(cls) -> None:
            # SQLAlchemy 2.0 runs this hook from a global listener that outlives the
            # registry's dispose(): once disposed, the class has no mapper to set up, and
            # the hook would fail every later configure of any registry in the process
            if hasattr(cls, "__mapper__"):
                super().__declare_first__()  # type: ignore[no-untyped-call]

    class RvDog(RvAnimal):
        __tablename__ = "rv2_dog"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(20))
        bark: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_identity": "dog", "concrete": True}  # noqa: RUF012

    class RvPerson(Base):  # a column_property over the row's own columns keeps the entity cache
        __tablename__ = "rv2_person"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        first: Mapped[str] = mapped_column(String(20))
        last: Mapped[str] = mapped_column(String(20))
        full: Mapped[str] = column_property(first + " " + last)
        upper_last: Mapped[str] = deferred(column_property(func.upper(last)))

    renamed = sa.Table(
        "rv2_renamed",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("db_a", sa.String(20), key="table_a"),
        sa.Column("db_b", sa.Integer),
    )

    class RvRenamed(Base):  # attribute names, column keys and column names all differ
        __table__ = renamed
        __cache__ = policy
        attr_a = renamed.c.table_a
        attr_b = renamed.c.db_b

    class RvTouched(Base):  # values a BEFORE trigger sets, which the ORM only fetches
        __tablename__ = "rv2_touched"
        __cache__ = policy
        id: Mapped[int] = mapped_column(primary_key=True)
        val: Mapped[str] = mapped_column(String(20))
        touches: Mapped[int] = mapped_column(
            server_default=sa.FetchedValue(), server_onupdate=sa.FetchedValue()
        )
        __mapper_args__ = {"eager_defaults": False}  # noqa: RUF012

    sa.event.listen(
        RvTouched.__table__,
        "after_create",
        sa.DDL(  # type: ignore[no-untyped-call]
            "CREATE OR REPLACE FUNCTION rv2_touch() RETURNS trigger AS $$ BEGIN "
            "NEW.touches := COALESCE(OLD.touches, 0) + 1; RETURN NEW; END $$ LANGUAGE plpgsql;"
            "CREATE TRIGGER rv2_touch BEFORE INSERT OR UPDATE ON rv2_touched "
            "FOR EACH ROW EXECUTE FUNCTION rv2_touch()"
        ),
    )
    sa.event.listen(
        RvTouched.__table__,
        "after_drop",
        sa.DDL("DROP FUNCTION IF EXISTS rv2_touch()"),  # type: ignore[no-untyped-call]
    )

    for kind in (RvAnimal, RvDog, RvPerson, RvRenamed, RvTouched):
        setattr(m, kind.__name__.removeprefix("Rv").lower(), kind)

    for cls in (RvUserMail, RvBlocked, RvMember, RvGroup):
        setattr(m, cls.__name__.removeprefix("Rv").lower(), cls)
    m.users, m.addresses, m.group_member = users, addresses, group_member
    return Base, m


@pytest.fixture(scope="module", params=STRATEGIES)
def world2(request: pytest.FixtureRequest, engine: sa.Engine, redis_url: str) -> Iterator[World]:
    yield from _world(request.param, engine, redis_url, make_models2)


@pytest.fixture
def w2(world2: World) -> World:
    m = world2.m
    with world2.oracle_engine.begin() as c:
        for table in (m.group_member, m.blocked.__table__, m.group.__table__):
            c.execute(table.delete())
        for table in (m.member.__table__, m.addresses, m.users, m.animal.__table__):
            c.execute(table.delete())
        for table in (
            m.dog.__table__,
            m.person.__table__,
            m.renamed.__table__,
            m.touched.__table__,
        ):
            c.execute(table.delete())
        c.execute(m.users.insert(), [{"id": 1, "name": "u1"}, {"id": 2, "name": "u2"}])
        c.execute(
            m.addresses.insert(),
            [{"id": 10, "user_id": 1, "email": "a@x"}, {"id": 20, "user_id": 2, "email": "b@x"}],
        )
        c.execute(
            m.member.__table__.insert(),
            [{"id": i, "name": f"m{i}", "code": f"c{i}"} for i in (1, 2, 3)],
        )
        c.execute(m.group.__table__.insert(), [{"id": 1, "leader_code": "c1"}])
        c.execute(m.animal.__table__.insert(), [{"id": 1, "name": "generic"}])
        c.execute(m.renamed.__table__.insert(), [{"id": 1, "table_a": "a", "db_b": 1}])
        c.execute(
            m.person.__table__.insert(),
            [{"id": 1, "first": "ada", "last": "lovelace"}, {"id": 2, "first": "al", "last": "t"}],
        )
        c.execute(m.dog.__table__.insert(), [{"id": 2, "name": "rex", "bark": "woof"}])
        c.execute(m.group_member.insert(), [{"group_id": 1, "member_id": i} for i in (1, 2, 3)])
    for table in ("rv2_user", "rv2_address", "rv2_group_member", "rv2_blocked"):
        world2.cache.invalidate_table(table)
    for table in (
        "rv2_member",
        "rv2_group",
        "rv2_animal",
        "rv2_dog",
        "rv2_person",
        "rv2_renamed",
        "rv2_touched",
    ):
        world2.cache.invalidate_table(table)
    return world2


@pytest.mark.parametrize("how", ["session", "core", "text"])
def test_a_class_over_a_join_follows_writes_to_either_table(w2: World, how: str) -> None:
    m = w2.m

    def by_get(s: Session) -> Any:
        u = s.get_one(m.usermail, 1)
        return (u.name, u.email)

    def by_query(s: Session) -> Any:
        stmt = select(m.usermail).order_by(m.usermail.id).options(FromCache())
        return [(u.id, u.name, u.email) for u in s.scalars(stmt)]

    w2.agree(by_get)
    w2.agree(by_query)
    if how == "session":
        with w2.factory() as s:
            s.get_one(m.usermail, 1).email = "new@x"
            s.commit()
    elif how == "core":
        with w2.engine.begin() as c:
            c.execute(m.addresses.update().where(m.addresses.c.id == 10).values(email="new@x"))
    else:
        with w2.engine.begin() as c:
            c.execute(sa.text("UPDATE rv2_address SET email = 'new@x' WHERE id = 10"))
    w2.agree(by_get)
    w2.agree(by_query)


def visible_members(loader: str) -> Callable[[World], Callable[[Session], Any]]:
    def make(w: World) -> Callable[[Session], Any]:
        m = w.m

        def read(s: Session) -> Any:
            stmt = select(m.group).order_by(m.group.id)
            if loader == "selectin":
                stmt = stmt.options(selectinload(m.group.visible), selectinload(m.group.leader))
            elif loader == "joined":
                stmt = stmt.options(joinedload(m.group.visible), joinedload(m.group.leader))
            stmt = stmt.options(FromCache())
            return [
                (
                    g.id,
                    [x.id for x in g.visible],
                    [x.id for x in g.members],
                    None if g.leader is None else g.leader.name,
                )
                for g in s.scalars(stmt).unique()
            ]

        return read

    return make


@pytest.mark.parametrize("loader", ["selectin", "joined", "lazy"])
def test_a_relationship_over_a_third_table_follows_its_writes(w2: World, loader: str) -> None:
    m = w2.m
    read = visible_members(loader)(w2)
    w2.agree(read)
    with w2.factory() as s:
        s.add(m.blocked(member_id=2))
        s.commit()
    w2.agree(read)
    with w2.factory() as s:
        s.get_one(m.member, 1).name = "m1b"
        s.commit()
    w2.agree(read)
    with w2.factory() as s:
        s.get_one(m.group, 1).leader_code = "c3"  # a many-to-one to a non-key column
        s.commit()
    w2.agree(read)
    with w2.factory() as s:
        s.get_one(m.member, 3).name = "m3b"
        s.commit()
    w2.agree(read)


def test_a_query_expression_over_another_table_follows_its_writes(w2: World) -> None:
    m = w2.m

    def read(s: Session) -> Any:
        names = (
            select(func.string_agg(m.member.name, sa.literal_column("','")))
            .join(m.group_member, m.group_member.c.member_id == m.member.id)
            .where(m.group_member.c.group_id == m.group.id)
            .scalar_subquery()
        )
        stmt = select(m.group).options(sa.orm.with_expression(m.group.member_names, names))
        return [(g.id, g.member_names) for g in s.scalars(stmt.options(FromCache()))]

    w2.agree(read)
    with w2.factory() as s:
        s.get_one(m.member, 1).name = "m1b"
        s.commit()
    w2.agree(read)


def test_a_lazy_relationship_does_not_tie_the_parents_queries_to_its_target(w2: World) -> None:
    """The relationship's third table is a dependency; its target's table is not (a write
    to members must not retire every cached query of groups)."""
    m = w2.m
    tables = fingerprint(compat.statement_cache_key(select(m.group)).key).tables
    assert sorted(t.name for t in tables) == ["rv2_blocked", "rv2_group", "rv2_group_member"]


# -- keys made of parameters, and statements that bypass the cache -------------------------


PARAMETER_READS: dict[str, Callable[[Any, int], Any]] = {
    "in": lambda m, n: select(m.child.id).where(m.child.id.in_(list(range(1, n + 1)))),
    "limit": lambda m, n: select(m.child.id).order_by(m.child.id).limit(n),
    "offset": lambda m, n: select(m.child.id).order_by(m.child.id).offset(n - 1),
    "tuple_in": lambda m, n: select(m.pair.val).where(
        sa.tuple_(m.pair.a, m.pair.b).in_([(1, "x"), (1, "y")][:n])
    ),
    "any": lambda m, n: select(m.parent.id).where(m.parent.children.any(m.child.name == f"c{n}")),
    "slice": lambda m, n: select(m.child.id).order_by(m.child.id).slice(0, n),
}


@pytest.mark.parametrize("shape", sorted(PARAMETER_READS))
def test_parameters_key_entries_apart(w: World, shape: str) -> None:
    m = w.m
    for n in (1, 2, 1, 2):

        def read(s: Session, n: int = n) -> Any:
            stmt = PARAMETER_READS[shape](m, n).options(FromCache())
            return list(s.scalars(stmt))

        w.agree(read)


@pytest.mark.parametrize(
    "variant", ["populate_existing", "yield_per", "first", "one_or_none", "partitions"]
)
def test_result_methods_and_bypasses_agree(w: World, variant: str) -> None:
    m = w.m

    def read(s: Session) -> Any:
        stmt = select(m.child).order_by(m.child.id).options(FromCache())
        if variant == "populate_existing":
            return [c.name for c in s.scalars(stmt.execution_options(populate_existing=True))]
        if variant == "yield_per":
            return [c.name for c in s.scalars(stmt.execution_options(yield_per=1))]
        if variant == "first":
            got = s.scalars(stmt).first()
            return None if got is None else got.name
        if variant == "one_or_none":
            got = s.scalars(stmt.where(m.child.id == 1)).one_or_none()
            return None if got is None else got.name
        return [[c.name for c in part] for part in s.scalars(stmt).partitions(1)]

    w.agree(read)
    with w.factory() as s:
        s.get_one(m.child, 1).name = "c1b"
        s.commit()
    w.agree(read)


@pytest.mark.parametrize("loader", ["selectin", "joined", "subquery", "lazy"])
def test_a_relationship_to_an_aliased_subquery_follows_its_tables_writes(
    w2: World, loader: str
) -> None:
    m = w2.m

    def read(s: Session) -> Any:
        stmt = select(m.group).order_by(m.group.id)
        if loader != "lazy":
            option = {"selectin": selectinload, "joined": joinedload, "subquery": subqueryload}
            stmt = stmt.options(option[loader](m.group.unblocked))
        return [
            (g.id, [x.id for x in g.unblocked])
            for g in s.scalars(stmt.options(FromCache())).unique()
        ]

    w2.agree(read)
    with w2.factory() as s:
        s.add(m.blocked(member_id=2))
        s.commit()
    w2.agree(read)
    with w2.engine.begin() as c:
        c.execute(m.group_member.delete().where(m.group_member.c.member_id == 3))
    w2.agree(read)


@pytest.mark.parametrize("how", ["session", "core", "text"])
def test_concrete_inheritance_queries_follow_each_tables_writes(w2: World, how: str) -> None:
    m = w2.m

    def base(s: Session) -> Any:
        stmt = select(m.animal).order_by(m.animal.id).options(FromCache())
        return [(type(a).__name__, a.id, a.name, getattr(a, "bark", None)) for a in s.scalars(stmt)]

    def dogs(s: Session) -> Any:
        stmt = select(m.dog).order_by(m.dog.id).options(FromCache())
        return [(d.id, d.name, d.bark) for d in s.scalars(stmt)]

    def got(s: Session) -> Any:
        d = s.get(m.dog, 2)
        return None if d is None else (d.name, d.bark)

    for read in (base, dogs, got):
        w2.agree(read)
    if how == "session":
        with w2.factory() as s:
            s.get_one(m.dog, 2).bark = "grr"
            s.commit()
    elif how == "core":
        with w2.engine.begin() as c:
            c.execute(m.dog.__table__.update().values(bark="grr"))
    else:
        with w2.engine.begin() as c:
            c.execute(sa.text("UPDATE rv2_dog SET bark = 'grr'"))
    for read in (base, dogs, got):
        w2.agree(read)


def test_a_column_property_over_the_rows_own_columns_follows_its_writes(w2: World) -> None:
    m = w2.m
    assert w2.cache.inspector is not None

    def by_get(s: Session) -> Any:
        p = s.get_one(m.person, 1)
        return (p.full, p.upper_last)

    def by_query(s: Session) -> Any:
        stmt = select(m.person).order_by(m.person.id).options(FromCache())
        return [(p.full, p.upper_last) for p in s.scalars(stmt)]

    w2.served(lambda s: s.get_one(m.person, 1).full)
    w2.agree(by_get)
    w2.agree(by_query)
    with w2.factory() as s:
        s.get_one(m.person, 1).last = "byron"  # one row: RETURNING
        s.commit()
    w2.agree(by_get)
    w2.agree(by_query)
    with w2.factory() as s:
        for p in s.scalars(select(m.person)):
            p.first = p.first.upper()  # several rows: read back with a SELECT
        s.add(m.person(id=3, first="grace", last="hopper"))
        s.commit()
    w2.agree(by_get)
    w2.agree(lambda s: s.get_one(m.person, 3).full)
    w2.agree(by_query)


# -- shapes attach() refuses ------------------------------------------------------------------


@pytest.mark.parametrize("expression", ["own_row", "other_table"])
def test_write_behind_refuses_a_column_property_with_a_clear_error(
    engine: sa.Engine, redis_url: str, namespace: str, expression: str
) -> None:
    """A queued row cannot know a SQL expression only the database evaluates: attach()
    says so (it raised AttributeError from inside its checks)."""

    class Base(DeclarativeBase):
        pass

    class RvOther(Base):
        __tablename__ = "rv3_other"
        id: Mapped[int] = mapped_column(primary_key=True)

    class RvQueued(Base):
        __tablename__ = "rv3_queued"
        __cache__ = CachePolicy(strategy="write_behind", accept_volatile=True)
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        name: Mapped[str] = mapped_column(String(20))
        derived: Mapped[Any] = column_property(
            func.upper(name)
            if expression == "own_row"
            else select(func.count(RvOther.id)).scalar_subquery()
        )

    cache = Cache(redis_url, namespace=namespace)
    try:
        with pytest.raises(ConfigurationError, match=r"RvQueued\.derived .*SQL expression"):
            cache.attach(sessionmaker(engine))
    finally:
        cache.detach()
        Base.registry.dispose()


# -- SQL the cache cannot see tables in ---------------------------------------------------


HIDDEN_TABLE_READS: dict[str, Callable[[Any], Any]] = {
    "literal_column": lambda m: select(
        m.child.id, sa.literal_column("(SELECT count(*) FROM rv_tag)")
    ).order_by(m.child.id),
    "lightweight_table": lambda m: select(
        sa.table("rv_tag", sa.column("id"), sa.column("name")).c.name
    ).order_by(sa.column("name")),
    "lightweight_in_where": lambda m: select(m.child.id).where(
        m.child.name.in_(select(sa.table("rv_tag", sa.column("name")).c.name))
    ),
}


def lightweight_join(m: Any) -> Any:
    tag = sa.table("rv_tag", sa.column("id"), sa.column("name"))
    return select(m.child.id, tag.c.name).join(tag, sa.true()).order_by(m.child.id, tag.c.name)


HIDDEN_TABLE_READS["lightweight_join"] = lightweight_join


@pytest.mark.parametrize("shape", sorted(HIDDEN_TABLE_READS))
def test_sql_whose_tables_the_cache_cannot_see_is_never_served_stale(w: World, shape: str) -> None:
    m = w.m

    def read(s: Session) -> Any:
        return [tuple(r) for r in s.execute(HIDDEN_TABLE_READS[shape](m).options(FromCache()))]

    w.agree(read)
    with w.factory() as s:
        s.add(m.tag(id=7, name="c1"))
        s.commit()
    w.agree(read)


def test_legacy_query_api_follows_writes(w: World) -> None:
    """``session.query(...)`` returns objects for one entity and de-duplicates them, as it
    reads from the result's attributes: a hit's result must say what the ORM's says."""
    m = w.m

    def read(s: Session) -> Any:
        q = s.query(m.child).options(FromCache()).order_by(m.child.id)
        first = q.first()
        parents = (
            s.query(m.parent)
            .options(joinedload(m.parent.children), FromCache())
            .order_by(m.parent.id)
        )
        joined = s.query(m.parent).join(m.parent.children).options(FromCache())
        pairs = s.query(m.parent, m.child).join(m.parent.children).options(FromCache())
        return (
            [c.name for c in q.all()],
            None if first is None else first.name,
            [c.name for c in q],
            q.filter(m.child.parent_id == 1).count(),
            s.query(m.child.name).options(FromCache()).filter_by(id=1).scalar(),
            [(p.id, [c.id for c in p.children]) for p in parents],
            sorted(p.id for p in joined.order_by(m.parent.id)),
            [(p.id, c.id) for p, c in pairs.order_by(m.child.id)],
            [tuple(type(x).__name__ for x in row) for row in q.only_return_tuples(value=True)],
            [
                tuple(r)
                for r in s.query(m.child.parent_id).options(FromCache()).order_by("parent_id")
            ],
        )

    w.agree(read)
    with w.factory() as s:
        s.get_one(m.child, 1).name = "c1b"
        s.add(m.child(id=8, parent_id=1, name="c8"))
        s.commit()
    w.agree(read)


@pytest.mark.parametrize(
    "shape",
    [
        lambda m: select(func.count()).select_from(m.child),
        lambda m: select(m.parent.id).where(sa.exists().where(m.child.parent_id == m.parent.id)),
        lambda m: select(m.child.id, sa.literal_column("name")).order_by(m.child.id),
    ],
    ids=["count_star", "exists", "a_named_literal"],
)
def test_literal_names_and_stars_stay_cached(w: World, shape: Callable[[Any], Any]) -> None:
    """``count(*)``, ``exists()`` and a literal column that only names a column read no
    table of their own: still served from the cache."""
    m = w.m
    w.served(lambda s: [tuple(r) for r in s.execute(shape(m).options(FromCache()))])


# -- lambdas: SQLAlchemy keys them by their code ---------------------------------------------


def test_loader_criteria_follow_the_tables_they_read(w: World) -> None:
    child, tag, parent = w.m.child, w.m.tag, w.m.parent

    def by_criteria(s: Session) -> Any:
        stmt = (
            select(child)
            .order_by(child.id)
            .options(
                sa.orm.with_loader_criteria(child, lambda cls: cls.name.in_(select(tag.name))),
                FromCache(),
            )
        )
        return [c.id for c in s.scalars(stmt).all()]

    def by_parent_criteria(s: Session) -> Any:
        stmt = (
            select(parent)
            .order_by(parent.id)
            .options(
                selectinload(parent.children),
                sa.orm.with_loader_criteria(child, child.name.in_(select(tag.name))),
                FromCache(),
            )
        )
        return [(p.id, [c.id for c in p.children]) for p in s.scalars(stmt).all()]

    reads = (by_criteria, by_parent_criteria)
    for read in reads:
        w.agree(read)
    with w.factory() as s:
        s.add(tag(id=7, name="c1"))
        s.commit()
    for read in reads:
        w.agree(read)


@pytest.mark.parametrize("how", ["cached", "plain_session", "core", "text"])
def test_an_absent_row_and_a_query_that_missed_it_see_its_insert(w: World, how: str) -> None:
    m = w.m

    def absent(s: Session) -> Any:
        got = [s.get(m.code, "zz"), s.get(m.pair, (9, "q"))]
        stmt = select(m.code.label).where(m.code.code == "zz").options(FromCache())
        return [None if x is None else type(x).__name__ for x in got], s.scalars(stmt).all()

    w.served(absent)
    if how in ("cached", "plain_session"):
        with w.factory() if how == "cached" else Session(w.engine) as s:
            s.add_all([m.code(code="zz", label="new"), m.pair(a=9, b="q", val="v")])
            s.commit()
    else:
        with w.engine.begin() as c:
            if how == "core":
                c.execute(m.code.__table__.insert().values(code="zz", label="new"))
                c.execute(m.pair.__table__.insert().values(a=9, b="q", val="v"))
            else:
                c.execute(sa.text("INSERT INTO rv_code (code, label) VALUES ('zz', 'new')"))
                c.execute(sa.text("INSERT INTO rv_pair (a, b, val) VALUES (9, 'q', 'v')"))
    w.agree(absent)


def test_eager_relationships_are_loaded_by_get_as_the_orm_loads_them(w: World) -> None:
    """``relationship(lazy="selectin")`` / ``"joined"`` are loaded by ``session.get``: an
    application reads them after the session closed (or under asyncio, where a lazy load
    raises)."""
    m = w.m

    def read(s: Session) -> Any:
        box = s.get_one(m.box, 1)
        item = s.get_one(m.item, 2)
        s.expunge_all()  # what the session loaded is all there is
        return [(i.id, i.name) for i in box.items], item.box.name

    for _ in range(3):
        w.agree(read)
    with w.factory() as s:
        s.get_one(m.item, 1).name = "i1b"
        s.commit()
    w.agree(read)


@pytest.mark.parametrize("target", ["manager", "engineer"])
def test_orm_bulk_writes_through_a_subclass_reach_every_query_of_its_tables(
    w: World, target: str
) -> None:
    m = w.m
    model = getattr(m, target)
    own = model.__table__

    def reads(s: Session) -> Any:
        return (
            POLYMORPHIC_READS["base"](w)(s),
            POLYMORPHIC_READS[target](w)(s),
            [tuple(r) for r in s.execute(select(own).order_by(own.c.id).options(FromCache()))],
        )

    w.agree(reads)
    column = "budget" if target == "manager" else "language"
    value: Any = 5 if target == "manager" else "go"
    with w.factory() as s:
        s.execute(sa.update(model).where(model.id.in_([1, 2])).values({column: value}))
        s.commit()
    w.agree(reads)
    with w.factory() as s:
        for obj in s.scalars(select(model)):
            s.delete(obj)
        s.commit()
    w.agree(reads)


def test_attributes_named_apart_from_their_columns_follow_writes(w2: World) -> None:
    m = w2.m

    def by_get(s: Session) -> Any:
        x = s.get_one(m.renamed, 1)
        return (x.attr_a, x.attr_b)

    def by_query(s: Session) -> Any:
        stmt = select(m.renamed).where(m.renamed.attr_b > 0).options(FromCache())
        return [(x.attr_a, x.attr_b) for x in s.scalars(stmt)]

    w2.served(by_get)
    w2.served(by_query)
    with w2.factory() as s:
        x = s.get_one(m.renamed, 1)
        x.attr_a, x.attr_b = "b", 2
        s.commit()
    w2.agree(by_get)
    w2.agree(by_query)
    with w2.factory() as s:
        s.add(m.renamed(id=2, attr_a="c", attr_b=3))
        for x in s.scalars(select(m.renamed)):
            x.attr_b += 10
        s.commit()
    w2.agree(by_get)
    w2.agree(lambda s: (s.get_one(m.renamed, 2).attr_a, s.get_one(m.renamed, 2).attr_b))
    w2.agree(by_query)


@pytest.mark.parametrize("loader", ["selectin", "joined", "lazy"])
def test_set_and_dict_collections_follow_writes(w2: World, loader: str) -> None:
    m = w2.m

    def read(s: Session) -> Any:
        stmt = select(m.group).order_by(m.group.id)
        if loader != "lazy":
            option = selectinload if loader == "selectin" else joinedload
            stmt = stmt.options(option(m.group.member_set), option(m.group.members_by_code))
        return [
            (
                g.id,
                type(g.member_set).__name__,
                sorted(x.id for x in g.member_set),
                sorted((k, v.id) for k, v in g.members_by_code.items()),
            )
            for g in s.scalars(stmt.options(FromCache())).unique()
        ]

    w2.agree(read)
    with w2.factory() as s:
        s.get_one(m.member, 2).code = "z2"
        s.execute(m.group_member.delete().where(m.group_member.c.member_id == 3))
        s.commit()
    w2.agree(read)


def test_values_a_trigger_sets_are_served_as_the_database_has_them(w2: World) -> None:
    m = w2.m
    with w2.factory() as s:
        s.add(m.touched(id=1, val="a"))
        s.commit()

    def by_get(s: Session) -> Any:
        x = s.get_one(m.touched, 1)
        return (x.val, x.touches)

    def by_query(s: Session) -> Any:
        stmt = select(m.touched).order_by(m.touched.id).options(FromCache())
        return [(x.val, x.touches) for x in s.scalars(stmt)]

    w2.agree(by_get)
    w2.agree(by_query)
    for value in ("b", "c"):
        with w2.factory() as s:
            s.get_one(m.touched, 1).val = value
            s.commit()
        w2.agree(by_get)
        w2.agree(by_query)
    with w2.factory() as s:
        s.add(m.touched(id=2, val="x"))
        for x in s.scalars(select(m.touched)):
            x.val += "!"
        s.commit()
    w2.agree(by_get)
    w2.agree(lambda s: s.get_one(m.touched, 2).touches)
    w2.agree(by_query)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_association_objects_written_reach_the_secondary_relationships(
    w: World, loader: str
) -> None:
    m = w.m
    read = relationship_read(loader)(w)
    w.agree(read)
    with w.factory() as s:
        s.add(m.parenttag(parent_id=2, tag_id=1, active=True))
        s.get_one(m.parenttag, (1, 2)).active = True
        s.commit()
    w.agree(read)
    with w.factory() as s:
        s.delete(s.get_one(m.parenttag, (1, 1)))
        s.commit()
    w.agree(read)


@pytest.mark.parametrize(
    "how", ["bulk_update_mappings", "bulk_insert_mappings", "bulk_save_objects", "orm_bulk"]
)
def test_legacy_bulk_operations_reach_cached_reads(w: World, how: str) -> None:
    m = w.m

    def reads(s: Session) -> Any:
        stmt = select(m.child).order_by(m.child.id).options(FromCache())
        rows = [(c.id, c.name) for c in s.scalars(stmt)]  # first: a result with objects
        s.expunge_all()  # the session held before is served but not stored
        one = s.get(m.child, 1)
        absent = s.get(m.child, 9)
        return rows, None if one is None else one.name, None if absent is None else absent.name

    w.served(reads)
    with w.factory() as s:
        if how == "bulk_update_mappings":
            s.bulk_update_mappings(m.child, [{"id": 1, "name": "bulk"}])
        elif how == "bulk_insert_mappings":
            s.bulk_insert_mappings(m.child, [{"id": 9, "parent_id": 1, "name": "bulk"}])
        elif how == "bulk_save_objects":
            s.bulk_save_objects([m.child(id=9, parent_id=1, name="bulk")])
        else:
            s.execute(sa.update(m.child), [{"id": 1, "name": "bulk"}])
        s.commit()
    w.agree(reads)


def test_eager_relationships_under_asyncio_need_no_lazy_load(
    w: World, database_url: str, redis_url: str
) -> None:
    """Under asyncio a lazy load raises (MissingGreenlet): what the mapper loads eagerly
    must be loaded by a cached ``get`` and a cached query, as by the ORM's."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from sa_redis_cache.redis_io import async_client_from_url
    from tests.modes import async_url

    m = w.m

    async def run() -> list[Any]:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine)
        client = redis.Redis.from_url(redis_url)
        aclient = async_client_from_url(redis_url)
        namespace = f"rvasync{secrets.token_hex(4)}"
        cache = Cache(client, async_client=aclient, namespace=namespace)
        cache.attach(factory)
        seen = []
        try:
            for _ in range(3):  # a miss, then hits
                async with factory() as s:
                    box = await s.get_one(m.box, 1)
                    items = [i.name for i in box.items]
                async with factory() as s:
                    item = await s.get_one(m.item, 2)
                    parent = item.box.name
                async with factory() as s:
                    stmt = select(m.box).order_by(m.box.id).options(FromCache())
                    boxes = (await s.scalars(stmt)).all()
                    graph = [(b.id, [(i.id, i.box.name) for i in b.items]) for b in boxes]
                seen.append((items, parent, graph))
        finally:
            cache.detach()
            delete_namespace(client, namespace)
            client.close()
            await aclient.aclose()
            await engine.dispose()
        return seen

    seen = asyncio.run(run())
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][0] == ["i1", "i2"]
