"""Caching every query, and lazy-loaded collections (issue 16).

``cache.attach(factory, cache_queries=FromCache(...))`` and ``CachePolicy(cache_queries=
True)`` cache every eligible select, leaving primary-key loads to the entity cache and
skipping refreshes and relationship loads; one-to-many and many-to-many lazy loads are
read from query entries that writes to either side invalidate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Column, ForeignKey, String, Table, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from examples.shop import Category, Customer, Product
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Iterator


class Base(DeclarativeBase):
    pass


post_tags = Table(
    "cq_post_tags",
    Base.metadata,
    Column("post_id", ForeignKey("cq_posts.id"), primary_key=True),
    Column("tag_id", ForeignKey("cq_tags.id"), primary_key=True),
)


class Post(Base):
    __tablename__ = "cq_posts"
    __cache__ = CachePolicy(cache_queries=True)

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(80))
    tags: Mapped[list[Tag]] = relationship(secondary=post_tags, back_populates="posts")


class Tag(Base):
    __tablename__ = "cq_tags"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    posts: Mapped[list[Post]] = relationship(secondary=post_tags, back_populates="tags")


@pytest.fixture
def blog(shop_engine: sa.Engine) -> Iterator[sa.Engine]:
    Base.metadata.create_all(shop_engine)
    with Session(shop_engine) as s:
        python, sql_tag, redis_tag = (
            Tag(id=1, name="python"),
            Tag(id=2, name="sql"),
            Tag(id=3, name="redis"),
        )
        s.add_all(
            [
                Post(id=1, title="caching", tags=[python, redis_tag]),
                Post(id=2, title="joins", tags=[sql_tag]),
            ]
        )
        s.commit()
    yield shop_engine
    Base.metadata.drop_all(shop_engine)


def sql_of(sql: SQLCounter, factory: sessionmaker[Session], read: object) -> list[int]:
    """Statements each of two fresh sessions sends for ``read(session)``."""
    used = []
    for _ in range(2):
        with factory() as s:
            sql.reset()
            read(s)  # type: ignore[operator]  # a callable
            used.append(sql.count)
    return used


# --------------------------------------------------------------------------- cache_queries


def test_attach_with_cache_queries_caches_plain_selects(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter
) -> None:
    factory = sessionmaker(shop_engine)
    cache.attach(factory, cache_queries=FromCache(ttl=60, region="everything"))
    cheap = select(Product).where(Product.price < 20).order_by(Product.id)
    assert sql_of(sql, factory, lambda s: s.scalars(cheap).all()) == [1, 0]
    counted = cache.stats()["regions"]["everything"]
    assert (counted["hits"], counted["misses"]) == (1, 1)
    # opted out: the database every time
    out = cheap.execution_options(cache_queries=False)
    assert sql_of(sql, factory, lambda s: s.scalars(out).all()) == [1, 1]
    # a statement's own FromCache wins (its region counts)
    own = select(Category).options(FromCache(region="own"))
    assert sql_of(sql, factory, lambda s: s.scalars(own).all()) == [1, 0]
    assert cache.stats()["regions"]["own"]["hits"] == 1


def test_cache_queries_leaves_pk_loads_to_the_entity_cache(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter, product: int
) -> None:
    factory = sessionmaker(shop_engine)
    cache.attach(factory, cache_queries=True)
    assert sql_of(sql, factory, lambda s: s.get(Product, product)) == [1, 0]
    assert "default" not in cache.stats()["regions"]  # no query entry for a get
    assert cache.stats()["models"]["Product"]["hits"] == 1


def test_cache_queries_skips_refreshes(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter, product: int
) -> None:
    factory = sessionmaker(shop_engine)
    cache.attach(factory, cache_queries=True)
    with factory() as s:
        found = s.scalars(select(Product).where(Product.id == product)).one()
        for _ in range(2):
            sql.reset()
            s.refresh(found)
            assert sql.count == 1
            s.expire(found, ["name"])
            sql.reset()
            assert found.name == "scratch"
            assert sql.count == 1


def test_cache_queries_whatever_the_order_of_other_hooks(
    shop_engine: sa.Engine, cache: Cache, sql: SQLCounter, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's user hook, registered after attach(), saw 0 hits: the option is chosen
    inside the cache's own listener, so hooks of the application around it do not matter."""
    factory = sessionmaker(shop_engine)
    seen: list[bool] = []
    sa.event.listen(factory, "do_orm_execute", lambda ctx: seen.append(ctx.is_select))
    cache.attach(factory)
    cache.attach(factory, cache_queries=True)  # attached again: the option takes effect

    def late_hook(ctx: Any) -> None:
        seen.append(ctx.is_select)

    sa.event.listen(factory, "do_orm_execute", late_hook)
    stmt = select(Customer).where(Customer.email == "customer1@example.com")
    with caplog.at_level(logging.WARNING, logger="sa_redis_cache.sessions"):
        assert sql_of(sql, factory, lambda s: s.scalars(stmt).one()) == [1, 0]
    # SQLAlchemy stops at the first listener that returns a result: the one registered
    # after attach() does not see the hit, and is told so once
    assert len(seen) == 3
    (warning,) = [r.getMessage() for r in caplog.records if "late_hook" in r.getMessage()]
    assert "runs after the cache's" in warning
    assert "before cache.attach()" in warning
    cache.attach(factory, cache_queries=None)  # and taken back
    assert sql_of(sql, factory, lambda s: s.scalars(stmt).one()) == [1, 1]


def test_a_policy_with_cache_queries(blog: sa.Engine, cache: Cache, sql: SQLCounter) -> None:
    factory = sessionmaker(blog)
    cache.attach(factory)
    posts = select(Post).where(Post.title == "caching")
    assert sql_of(sql, factory, lambda s: s.scalars(posts).one()) == [1, 0]
    tags = select(Tag).where(Tag.name == "sql")  # Tag's policy does not ask for it
    assert sql_of(sql, factory, lambda s: s.scalars(tags).one()) == [1, 1]


def test_cache_queries_must_be_an_option(shop_engine: sa.Engine, cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match="cache_queries=60"):
        cache.attach(sessionmaker(shop_engine), cache_queries=60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="session factory"):
        cache.attach(shop_engine, cache_queries=True)


# --------------------------------------------------------------------------- collections


def test_one_to_many_lazy_load_is_cached_and_invalidated(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter, product: int
) -> None:
    def names(s: Session) -> list[str]:
        category = s.get(Category, 1)
        assert category is not None
        return sorted(p.name for p in category.products)

    assert sql_of(sql, session_factory, names) == [2, 0]
    assert cache.stats()["regions"]["Category.products"]["hits"] == 1
    with session_factory() as s, Session(session_factory.kw["bind"]) as plain:
        for cid in (1, 2, 3):  # one entry per parent
            cached, fresh = s.get(Category, cid), plain.get(Category, cid)
            assert cached is not None
            assert fresh is not None
            assert [p.id for p in cached.products] == [p.id for p in fresh.products]
    with session_factory() as s:  # a write to the collection's side
        moved = s.get(Product, product)
        assert moved is not None
        moved.name = "renamed scratch"
        s.commit()
    with session_factory() as s:
        sql.reset()
        assert "renamed scratch" in names(s)
        assert sql.count == 1
    with session_factory() as s:  # the product leaves the category
        moved = s.get(Product, product)
        assert moved is not None
        moved.category_id = 2
        s.commit()
    with session_factory() as s:
        assert "renamed scratch" not in names(s)
    with session_factory() as s:
        back = s.get(Product, product)
        assert back is not None
        back.category_id = 1
        s.commit()

    def orders(s: Session) -> int:
        customer = s.scalars(select(Customer).order_by(Customer.email).limit(1)).one()
        return len(customer.orders)  # Order has no CachePolicy: not cached

    assert sql_of(sql, session_factory, orders) == [2, 2]


def test_many_to_many_lazy_load_is_cached_and_invalidated_by_either_side(
    blog: sa.Engine, cache: Cache, sql: SQLCounter
) -> None:
    factory = sessionmaker(blog)
    cache.attach(factory)

    def tags(s: Session) -> list[str]:
        post = s.get(Post, 1)
        assert post is not None
        return sorted(t.name for t in post.tags)

    assert sql_of(sql, factory, tags) == [2, 0]
    with factory() as s:  # the association table
        post, tag = s.get(Post, 1), s.get(Tag, 2)
        assert post is not None
        assert tag is not None
        post.tags.append(tag)
        s.commit()
    with factory() as s:
        assert tags(s) == ["python", "redis", "sql"]
    with factory() as s:  # the target table
        renamed = s.get(Tag, 3)
        assert renamed is not None
        renamed.name = "valkey"
        s.commit()
    with factory() as s:
        assert tags(s) == ["python", "sql", "valkey"]
    with factory() as s:  # and the other direction
        sql.reset()
        tag = s.get(Tag, 2)
        assert tag is not None
        assert sorted(p.title for p in tag.posts) == ["caching", "joins"]
    assert sql_of(sql, factory, lambda s: [p.title for p in s.get(Tag, 2).posts]) == [0, 0]
