"""Classes mapped after ``cache.attach()``: checked as ``attach()`` checks, as soon as
SQLAlchemy configures them, and known to every path of the cache from then on.

The models live in a declarative base of their own, disposed of before the test ends
(:func:`tests.integration.test_attach.private_base`): a refused class left mapped would be
refused again by every later ``attach()`` of the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from tests.integration.test_attach import private_base

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support import SQLCounter


@pytest.fixture
def attached(cache: Cache, shop_engine: sa.Engine) -> sessionmaker[Any]:
    """A session factory the cache is attached to before any model of the test exists."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    return factory


@pytest.fixture
def late_base(shop_engine: sa.Engine) -> Iterator[type[DeclarativeBase]]:
    """A private declarative base; its ``late_`` tables are dropped afterwards (its
    classes may map the shop's own tables too)."""
    with private_base() as base:
        try:
            yield base
        finally:
            own = [t for t in base.metadata.sorted_tables if t.name.startswith("late_")]
            base.metadata.drop_all(shop_engine, tables=own)


def gadget(base: type[DeclarativeBase], policy: Any, **columns: Any) -> Any:
    """A class ``Gadget`` on table ``late_gadgets`` (id, name), ``__cache__ = policy``."""
    namespace: dict[str, Any] = {
        "__tablename__": "late_gadgets",
        "__cache__": policy,
        "__annotations__": {"id": Mapped[int], "name": Mapped[str]},
        "id": mapped_column(Integer, primary_key=True, autoincrement=False),
        "name": mapped_column(String(40)),
        **columns,
    }
    return type("Gadget", (base,), namespace)


def gadget_rows(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.text("SELECT count(*) FROM late_gadgets")) or 0)


@pytest.mark.parametrize(
    ("policy", "problem", "fix"),
    [
        (CachePolicy(ttl=0), "Gadget: ttl=0 is not a positive", "give ttl a value > 0"),
        ({"ttl": 60}, "__cache__ is {'ttl': 60}, not a CachePolicy", "__cache__ = CachePolicy("),
        (
            CachePolicy(strategy="write_behind"),
            "queues writes in Redis, and this Redis server has AOF off",
            "accept_volatile",
        ),
    ],
    ids=["bad ttl", "not a CachePolicy", "write-behind without AOF"],
)
def test_a_late_model_with_a_bad_policy_is_refused_where_the_cache_needs_it(
    attached: sessionmaker[Any],
    late_base: type[DeclarativeBase],
    shop_engine: sa.Engine,
    caplog: pytest.LogCaptureFixture,
    policy: Any,
    problem: str,
    fix: str,
) -> None:
    model = gadget(late_base, policy)
    late_base.metadata.create_all(shop_engine)
    with caplog.at_level(logging.ERROR, logger="sa_redis_cache.admission"):
        sa.orm.configure_mappers()
    # every cache still attached in the process refuses it: this test's is one of them
    logged = [r.getMessage() for r in caplog.records if "Gadget" in r.getMessage()][-1]

    with attached() as session, pytest.raises(ConfigurationError) as read:
        session.scalars(select(model).options(FromCache())).all()
    with attached() as session:
        session.add(model(id=1, name="one"))
        with pytest.raises(ConfigurationError) as flush:
            session.commit()

    for message in (logged, str(read.value), str(flush.value)):
        assert "mapped after cache.attach()" in message
        assert problem in message
        assert fix in message
    assert gadget_rows(shop_engine) == 0  # refused before the INSERT


def test_a_late_model_is_taken_as_it_is_configured(
    attached: sessionmaker[Any],
    late_base: type[DeclarativeBase],
    shop_engine: sa.Engine,
    sql: SQLCounter,
) -> None:
    """Once configured, its first ``session.get`` reads the entity cache, though nothing
    else met the class first (``session.get`` looks models up only)."""
    model = gadget(late_base, CachePolicy(ttl=60))
    late_base.metadata.create_all(shop_engine)
    with shop_engine.begin() as connection:  # not a flush: the cache meets no object
        connection.execute(sa.insert(model.__table__).values(id=1, name="one"))
    sa.orm.configure_mappers()  # what the application's first use of any model does
    counts = []
    for _ in range(2):
        sql.reset()
        with attached() as session:
            assert session.get(model, 1).name == "one"
        counts.append(sql.count)
    assert counts == [1, 0]


def test_a_late_write_behind_model_queues_its_first_commit(
    attached: sessionmaker[Any],
    late_base: type[DeclarativeBase],
    shop_engine: sa.Engine,
    sql: SQLCounter,
) -> None:
    """Before it was taken as configured, the class was unknown to the flush's diversion
    until something else met it: its first commit went to the database."""
    model = gadget(late_base, CachePolicy(strategy="write_behind", accept_volatile=True))
    late_base.metadata.create_all(shop_engine)
    sql.reset()
    with attached() as session:
        session.add(model(id=1, name="queued"))
        session.commit()
    assert sql.count == 0
    assert gadget_rows(shop_engine) == 0
    with attached() as session:
        assert session.get(model, 1).name == "queued"  # served from its queued state


def test_a_late_model_mapping_other_columns_of_a_cached_table_is_refused(
    attached: sessionmaker[Any], late_base: type[DeclarativeBase]
) -> None:
    """``Category`` keeps ``categories`` in the entity cache with (id, name)."""

    class Heading(late_base):  # type: ignore[valid-type,misc]
        __tablename__ = "categories"
        __cache__ = CachePolicy(ttl=60)
        id: Mapped[int] = mapped_column(primary_key=True)

    with attached() as session, pytest.raises(ConfigurationError) as refused:
        session.scalars(select(Heading).options(FromCache())).all()
    message = str(refused.value)
    assert "Heading" in message
    assert "Category" in message
    assert "entity_cache=False" in message


def test_a_late_model_mapping_the_same_columns_of_a_cached_table_is_taken(
    attached: sessionmaker[Any], late_base: type[DeclarativeBase], sql: SQLCounter
) -> None:
    class Section(late_base):  # type: ignore[valid-type,misc]
        __tablename__ = "categories"
        __cache__ = CachePolicy(ttl=60)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(80))

    counts = []
    for _ in range(2):
        sql.reset()
        with attached() as session:
            assert session.scalars(select(Section).where(Section.id == 1).options(FromCache()))
        counts.append(sql.count)
    assert counts == [1, 0]


def test_a_late_model_cannot_open_a_slot_group(
    attached: sessionmaker[Any], late_base: type[DeclarativeBase]
) -> None:
    model = gadget(late_base, CachePolicy(ttl=60, slot_group="late"))
    with attached() as session:
        session.add(model(id=1, name="one"))
        with pytest.raises(ConfigurationError) as refused:
            session.flush()
    message = str(refused.value)
    assert "slot group 'late' after the cache's first attach()" in message
    assert "import the model before the first attach()" in message


def test_a_late_model_without_a_policy_is_read_as_before(
    attached: sessionmaker[Any],
    late_base: type[DeclarativeBase],
    shop_engine: sa.Engine,
    sql: SQLCounter,
) -> None:
    model = gadget(late_base, None)
    late_base.metadata.create_all(shop_engine)
    counts = []
    for _ in range(2):
        sql.reset()
        with attached() as session:
            session.scalars(select(model).where(model.id == 1).options(FromCache())).all()
        counts.append(sql.count)
    assert counts == [1, 0]
