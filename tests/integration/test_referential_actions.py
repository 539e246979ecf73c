"""Rows the database writes through foreign-key actions: ``ON DELETE CASCADE`` / ``SET
NULL`` and ``ON UPDATE CASCADE`` change rows of the referencing table that no statement
names (``relationship(passive_deletes=True)`` leaves them to Postgres). After the commit,
neither ``session.get`` nor a ``FromCache`` query of the referencing table serves the old
rows; a write that fires no action leaves their entries alone (sa_redis_cache/referential.py).
The explicit invalidations, which say that a write the cache did not see happened, retire
the rows its actions wrote too; ``invalidate_table`` retires an association table.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from tests.conftest import delete_namespace
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@dataclass
class World:
    """The models, a cached session factory and the engine's SQL counter."""

    parent: Any
    child: Any
    node: Any
    tags: sa.Table
    factory: sessionmaker[Session]
    engine: sa.Engine
    sql: SQLCounter
    cache: Cache
    outside: sa.Engine  # not attached: its writes are another program's

    def seed(self) -> None:
        with Session(self.engine) as s:
            s.execute(self.tags.delete())
            for model in (self.child, self.parent, self.node):
                s.execute(sa.delete(model))
            s.add_all([self.parent(id=1), self.parent(id=2)])
            s.add(self.node(id=1, parent_id=None))
            s.flush()
            s.add_all([self.child(id=1, parent_id=1, nulled_id=1), self.child(id=2, parent_id=2)])
            s.add_all([self.node(id=2, parent_id=1), self.node(id=3, parent_id=None)])
            s.commit()

    def served(self, read: Callable[[Session], Any]) -> Any:
        """What ``read`` gives in a fresh cached session once it is a hit (no SQL)."""
        for _ in range(3):
            with self.factory() as s:
                self.sql.reset()
                got = read(s)
                if self.sql.count == 0:
                    return got
        raise AssertionError("the read was never served from the cache")

    def read(self, read: Callable[[Session], Any]) -> Any:
        """What ``read`` gives in a fresh cached session, hit or not."""
        with self.factory() as s:
            return read(s)


@pytest.fixture(scope="module", params=["cache_aside", "write_through"])
def world(request: pytest.FixtureRequest, engine: sa.Engine, redis_url: str) -> Iterator[World]:
    strategy = request.param

    class Base(DeclarativeBase):
        pass

    parent_tags = sa.Table(
        "ref_parent_tag",
        Base.metadata,
        sa.Column("parent_id", sa.ForeignKey("ref_parent.id"), primary_key=True),
        sa.Column("tag_id", sa.ForeignKey("ref_node.id"), primary_key=True),
    )

    class RefParent(Base):
        __tablename__ = "ref_parent"
        __cache__ = CachePolicy(strategy=strategy, ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        label: Mapped[str] = mapped_column(String(20), default="p")
        children: Mapped[list[RefChild]] = relationship(
            passive_deletes=True, foreign_keys="RefChild.parent_id"
        )
        tags: Mapped[list[RefNode]] = relationship(secondary=parent_tags, order_by="RefNode.id")

    class RefChild(Base):
        __tablename__ = "ref_child"
        __cache__ = CachePolicy(strategy=strategy, ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(
            ForeignKey("ref_parent.id", ondelete="CASCADE", onupdate="CASCADE")
        )
        nulled_id: Mapped[int | None] = mapped_column(
            ForeignKey("ref_parent.id", ondelete="SET NULL")
        )

    class RefNode(Base):
        __tablename__ = "ref_node"
        __cache__ = CachePolicy(strategy=strategy, ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int | None] = mapped_column(ForeignKey("ref_node.id", ondelete="CASCADE"))

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    own = sa.create_engine(engine.url)
    sql = SQLCounter()
    sa.event.listen(own, "before_cursor_execute", sql)
    factory = sessionmaker(own)
    namespace = f"ref{secrets.token_hex(4)}"
    cache = Cache(redis_url, namespace=namespace)
    cache.attach(factory)
    try:
        yield World(RefParent, RefChild, RefNode, parent_tags, factory, own, sql, cache, engine)
    finally:
        cache.detach()
        own.dispose()
        client = redis.Redis.from_url(redis_url)
        delete_namespace(client, namespace)
        client.close()
        Base.metadata.drop_all(engine)
        Base.registry.dispose()


def child_of(world: World, pk: int) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        found = s.get(world.child, pk)
        return None if found is None else (found.parent_id, found.nulled_id)

    return read


def children(world: World) -> Callable[[Session], Any]:
    stmt = select(world.child).order_by(world.child.id).options(FromCache())
    return lambda s: [(c.id, c.parent_id, c.nulled_id) for c in s.scalars(stmt)]


def test_a_deleted_parents_cascaded_and_nulled_children_are_not_served(world: World) -> None:
    world.seed()
    assert world.served(child_of(world, 1)) == (1, 1)
    assert world.served(children(world)) == [(1, 1, 1), (2, 2, None)]
    with world.factory() as s:
        s.delete(s.get_one(world.parent, 1))  # Postgres deletes child 1
        s.commit()
    assert world.read(child_of(world, 1)) is None
    assert world.read(children(world)) == [(2, 2, None)]


def test_set_null_is_seen(world: World) -> None:
    world.seed()
    with world.factory() as s:
        s.add(world.child(id=3, parent_id=2, nulled_id=1))
        s.commit()
    assert world.served(child_of(world, 3)) == (2, 1)
    with world.factory() as s:
        s.execute(sa.delete(world.parent).where(world.parent.id == 1))  # ORM bulk delete
        s.commit()
    assert world.read(child_of(world, 3)) == (2, None)


def test_a_key_update_cascades_to_the_children(world: World) -> None:
    world.seed()
    assert world.served(child_of(world, 2)) == (2, None)
    with world.factory() as s:
        s.get_one(world.parent, 2).id = 20  # ON UPDATE CASCADE moves child 2
        s.commit()
    assert world.read(child_of(world, 2)) == (20, None)


def test_core_and_textual_deletes_cascade_too(world: World) -> None:
    world.seed()
    assert world.served(child_of(world, 1)) == (1, 1)
    with world.engine.begin() as connection:
        connection.execute(sa.text("DELETE FROM ref_parent WHERE id = 1"))
    assert world.read(child_of(world, 1)) is None
    assert world.served(child_of(world, 2)) == (2, None)
    with world.engine.begin() as connection:
        connection.execute(sa.delete(world.parent.__table__).where(sa.column("id") == 2))
    assert world.read(child_of(world, 2)) is None


def test_a_tree_that_cascades_into_itself(world: World) -> None:
    world.seed()
    node = world.node
    assert world.served(lambda s: s.get(node, 2) is not None)
    with world.factory() as s:
        s.delete(s.get_one(node, 1))  # Postgres deletes node 2, its child
        s.commit()
    assert world.read(lambda s: s.get(node, 2)) is None
    assert world.read(lambda s: s.get(node, 3) is not None)


def test_a_write_that_fires_no_action_leaves_the_children_cached(world: World) -> None:
    world.seed()
    assert world.served(child_of(world, 1)) == (1, 1)
    with world.factory() as s:
        s.get_one(world.parent, 1).label = "renamed"  # no referenced key changes
        s.add(world.parent(id=3))
        s.commit()
    assert world.served(child_of(world, 1)) == (1, 1)
    with world.factory() as s:
        world.sql.reset()
        assert child_of(world, 1)(s) == (1, 1)
        assert world.sql.count == 0, "the children's entries were retired"


def _outside(world: World, statement: str) -> None:
    with world.outside.begin() as connection:
        connection.execute(sa.text(statement))


@pytest.mark.parametrize("call", ["invalidate", "invalidate_model", "invalidate_table"])
def test_an_explicit_invalidation_retires_what_an_unseen_delete_cascaded_to(
    world: World, call: str
) -> None:
    world.seed()
    assert world.served(child_of(world, 1)) == (1, 1)
    assert world.served(children(world)) == [(1, 1, 1), (2, 2, None)]
    _outside(world, "DELETE FROM ref_parent WHERE id = 1")  # Postgres deletes child 1
    assert world.served(child_of(world, 1)) == (1, 1), "unseen: still cached until told"
    if call == "invalidate":
        world.cache.invalidate(world.parent, 1)
    elif call == "invalidate_model":
        world.cache.invalidate_model(world.parent)
    else:
        assert world.cache.invalidate_table("ref_parent") == ["ref_child", "ref_parent"]
    assert world.read(child_of(world, 1)) is None
    assert world.read(children(world)) == [(2, 2, None)]


def test_invalidate_table_retires_an_association_tables_readers(world: World) -> None:
    world.seed()
    tagged = select(world.parent).order_by(world.parent.id).options(FromCache())

    def tags_of(s: Session) -> Any:
        return [[t.id for t in p.tags] for p in s.scalars(tagged)]

    assert world.served(tags_of) == [[], []]
    _outside(world, "INSERT INTO ref_parent_tag VALUES (1, 1), (2, 3)")
    assert world.served(tags_of) == [[], []], "unseen: still cached until told"
    assert world.cache.invalidate_table(world.tags) == ["ref_parent_tag"]
    assert world.read(tags_of) == [[1], [3]]
    assert world.served(tags_of) == [[1], [3]]


def test_invalidate_table_names_what_it_refuses(world: World) -> None:
    with pytest.raises(
        ConfigurationError, match="no mapped MetaData has a table named 'ref_parent_tags'"
    ):
        world.cache.invalidate_table("ref_parent_tags")
    with pytest.raises(TypeError, match="at least one"):
        world.cache.invalidate_table()
    with pytest.raises(TypeError, match="Table objects or names"):
        world.cache.invalidate_table(world.parent)
