"""Classes mapping one table share its entity keys: what one class's read decoded is
never built as another's object, and classes that map different columns of the table
cannot both keep entity entries.

The entity key names the table, its columns' hash, the scope and the primary key; it
does not name the class. A hit on bytes decoded before reuses that decoding
(``DecodedEntries``) and the local tier keeps decoded entries: both hold one class's
identity key, so another class mapping the same columns must build its own object.
Classes mapping different columns would read each other's rows by position: ``attach()``
refuses them unless all but one keep out of the entity cache (checked in a child process
here, since a refused class would stay mapped in this one and refuse every later attach).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from sa_redis_cache import Cache, CachePolicy

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis


class Base(DeclarativeBase):
    pass


NOTES = sa.Table(
    f"two_classes_{secrets.token_hex(4)}",
    Base.metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(40), nullable=False),
    sa.Column("note", sa.String(40), nullable=False),
)


class Whole(Base):
    """Every column of the table."""

    __table__ = NOTES
    __cache__ = CachePolicy(ttl=300)


class Partial(Base):
    """The same table without ``name``: out of the entity cache, as ``attach()`` asks."""

    __table__ = NOTES
    __mapper_args__ = {"exclude_properties": ["name"]}  # noqa: RUF012 - SQLAlchemy's own
    __cache__ = CachePolicy(ttl=300, entity_cache=False)


class Twin(Base):
    """The same table and columns as ``Whole``, another class."""

    __table__ = NOTES
    __cache__ = CachePolicy(ttl=300)


@pytest.fixture
def table(engine: sa.Engine) -> Iterator[None]:
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(NOTES.insert().values(id=1, name="the name", note="the note"))
    yield
    Base.metadata.drop_all(engine)


@pytest.fixture(params=[False, True], ids=["redis", "local"])
def factory(
    request: pytest.FixtureRequest,
    engine: sa.Engine,
    redis_client: redis.Redis,
    namespace: str,
    table: None,
) -> Iterator[sessionmaker[Session]]:
    made: sessionmaker[Session] = sessionmaker(engine)
    cache = Cache(redis_client, namespace=namespace, default_ttl=300, local=request.param)
    cache.attach(made)
    if request.param:
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10.0)
    yield made
    cache.detach()


def sessions(factory: sessionmaker[Session], path: str) -> Session:
    session = factory()
    if path == "pipeline":
        # another listener: the get goes through SQLAlchemy's execute pipeline
        event.listen(session, "do_orm_execute", lambda orm_context: None)
    return session


def read(factory: sessionmaker[Session], path: str, cls: type[Any]) -> Any:
    with sessions(factory, path) as session:
        found = session.get(cls, 1)
        assert found is not None
        return found


@pytest.mark.parametrize("path", ["direct", "pipeline"])
def test_a_class_with_fewer_columns_gets_its_own_columns(
    factory: sessionmaker[Session], path: str
) -> None:
    for _ in range(3):  # a fill, then hits: decoded, kept, and locally held
        assert read(factory, path, Whole).note == "the note"
    partial = read(factory, path, Partial)
    assert sa.inspect(partial).mapper.class_ is Partial
    assert partial.note == "the note"
    assert not hasattr(partial, "name")
    assert read(factory, path, Whole).name == "the name"


@pytest.mark.parametrize("path", ["direct", "pipeline"])
def test_a_class_with_the_same_columns_gets_objects_of_its_own_class(
    factory: sessionmaker[Session], path: str
) -> None:
    for _ in range(3):
        read(factory, path, Whole)
    with sessions(factory, path) as session:
        twin: Any = session.get(Twin, 1)
        assert sa.inspect(twin).mapper.class_ is Twin
        assert sa.inspect(twin).key == (Twin, (1,), None)
        assert (twin.name, twin.note) == ("the name", "the note")
        # the session still finds the other class's row under its own key
        whole: Any = session.get(Whole, 1)
        assert sa.inspect(whole).mapper.class_ is Whole
        assert whole is not twin


CHILD = textwrap.dedent(
    """
    import sys

    import redis
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, sessionmaker

    from sa_redis_cache import Cache, CachePolicy, ConfigurationError

    second_policy = {
        "cached": CachePolicy(ttl=300),
        "out": CachePolicy(ttl=300, entity_cache=False),
    }[sys.argv[2]]

    class Base(DeclarativeBase):
        pass

    rows = sa.Table(
        "shared_rows",
        Base.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(40)),
        sa.Column("note", sa.String(40)),
    )

    class Named(Base):
        __table__ = rows
        __mapper_args__ = {"exclude_properties": ["note"]}
        __cache__ = CachePolicy(ttl=300)

    class Noted(Base):
        __table__ = rows
        __mapper_args__ = {"exclude_properties": ["name"]}
        __cache__ = second_policy

    cache = Cache(redis.Redis.from_url(sys.argv[1]), namespace=sys.argv[3])
    try:
        cache.attach(sessionmaker())
    except ConfigurationError as exc:
        print("refused:", exc)
    else:
        print("attached")
        cache.detach()
    """
)


def attach_in_child(redis_url: str, namespace: str, second: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, redis_url, second, namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_classes_mapping_other_columns_of_one_table_are_refused(
    redis_url: str, namespace: str
) -> None:
    # Named (id, name) and Noted (id, note) store rows of one width and the same types:
    # each would read the other's entries as its own, with the values in the wrong columns
    said = attach_in_child(redis_url, namespace, "cached")
    assert said.startswith("refused:"), said
    assert "'shared_rows'" in said
    assert "Named maps (id, name)" in said
    assert "Noted maps (id, note)" in said
    assert "CachePolicy(entity_cache=False)" in said


def test_one_layout_in_the_entity_cache_is_attached(redis_url: str, namespace: str) -> None:
    assert attach_in_child(redis_url, namespace, "out") == "attached"
