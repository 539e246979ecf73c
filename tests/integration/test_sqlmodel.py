"""SQLModel models, as a FastAPI application defines them (issue 16, findings 1 to 3).

SQLModel stores every ``str`` field as ``AutoString`` (a ``TypeDecorator``), and
applications pass primary keys as they come (a JWT's ``sub`` is a ``str`` for a UUID
column). The cache must hit on those reads, write them through, and never call its own
key mismatch "corruption".
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import CHAR, Column, String, TypeDecorator
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, Session, SQLModel, select

from sa_redis_cache import Cache, CachePolicy, FromCache
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Iterator


class Lowered(TypeDecorator[str]):
    """Stores e-mail addresses in lower case: a load gives the lowered value."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        return None if value is None else value.lower()


class Shouted(TypeDecorator[str]):
    """A decorator with a low-level bind processor of its own: not predictable."""

    impl = String(200)
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        return lambda value: None if value is None else value.upper()


class SmUser(SQLModel, table=True):
    __tablename__ = "sm_users"
    __cache__ = CachePolicy(strategy="write_through", ttl=600)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(sa_column=Column(Lowered(), unique=True, nullable=False))
    name: str


class SmBadge(SQLModel, table=True):
    __tablename__ = "sm_badges"
    __cache__ = CachePolicy(strategy="write_through", ttl=600)

    id: int | None = Field(default=None, primary_key=True)
    motto: str = Field(sa_column=Column(Shouted(), nullable=False))


class SmCode(SQLModel, table=True):
    """A padded ``CHAR`` key: Postgres matches ``'ab'`` to the row ``'ab    '``."""

    __tablename__ = "sm_codes"
    __cache__ = CachePolicy()

    code: str = Field(sa_column=Column(CHAR(6), primary_key=True))
    label: str


# a table no model maps, as an application's audit log or a library's own table
AUDIT = sa.Table(
    "sm_audit",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("what", sa.String(40)),
)
TABLES: list[sa.Table] = [
    sa.inspect(model).local_table  # type: ignore[misc]  # a Table: SQLModel's are
    for model in (SmUser, SmBadge, SmCode)
]


@pytest.fixture(scope="module")
def sm_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    SQLModel.metadata.create_all(engine, tables=TABLES)
    AUDIT.create(engine)
    yield engine
    AUDIT.drop(engine)
    SQLModel.metadata.drop_all(engine, tables=TABLES)


@pytest.fixture
def sm_cache(redis_url: str, namespace: str) -> Iterator[Cache]:
    cache = Cache(redis_url, namespace=namespace)
    yield cache
    cache.detach()
    cache.client.close()


@pytest.fixture
def factory(sm_engine: sa.Engine, sm_cache: Cache) -> Iterator[sessionmaker[Session]]:
    made = sessionmaker(sm_engine, class_=Session)
    sm_cache.attach(made)
    yield made
    with sm_engine.begin() as conn:
        for table in TABLES:
            conn.execute(table.delete())


@pytest.fixture
def sql(sm_engine: sa.Engine) -> Iterator[SQLCounter]:
    counter = SQLCounter()
    sa.event.listen(sm_engine, "before_cursor_execute", counter)
    yield counter
    sa.event.remove(sm_engine, "before_cursor_execute", counter)


@pytest.fixture
def warnings_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The WARNING lines the library logs during the test."""
    caplog.set_level(logging.WARNING, logger="sa_redis_cache")
    return caplog.records


def _user(factory: sessionmaker[Session], **values: Any) -> uuid.UUID:
    with factory() as s:
        user = SmUser(email="Ada@Example.com", name="Ada", **values)
        s.add(user)
        s.commit()
        return user.id


# --------------------------------------------------------------------------- finding 1


def test_get_by_a_str_uuid_hits_and_logs_nothing(
    factory: sessionmaker[Session],
    sm_cache: Cache,
    sql: SQLCounter,
    warnings_logged: list[logging.LogRecord],
) -> None:
    """``session.get(User, token.sub)``: the ``str`` is keyed as the UUID a load gives."""
    uid = _user(factory)
    sm_cache.invalidate(SmUser, uid)  # start from a miss: read through the database
    used = []
    for _ in range(4):
        with factory() as s:
            sql.reset()
            got = s.get(SmUser, str(uid))
            assert got is not None
            assert got.id == uid
            assert got.name == "Ada"
            used.append(sql.count)
    assert used == [1, 0, 0, 0]
    counted = sm_cache.stats()["models"]["SmUser"]
    assert counted["decode_errors"] == 0
    assert counted["hits"] == 3
    # a value that is no UUID: the database answers (here: refuses) it as without the cache
    with factory() as s, pytest.raises(sa.exc.DataError):
        s.get(SmUser, "not-a-uuid")
    assert not warnings_logged


def test_invalidate_takes_the_pk_as_the_application_has_it(
    factory: sessionmaker[Session], sm_cache: Cache, sql: SQLCounter
) -> None:
    uid = _user(factory)
    with factory() as s:
        assert s.get(SmUser, uid) is not None
    sm_cache.invalidate(SmUser, str(uid))  # the same row
    with factory() as s:
        sql.reset()
        assert s.get(SmUser, uid) is not None
        assert sql.count == 1
    with pytest.raises(ValueError, match=r"SmUser\.id .*'not-a-uuid' \(str\) cannot be read"):
        sm_cache.invalidate(SmUser, "not-a-uuid")


def test_a_row_the_database_matched_to_another_key_is_not_corruption(
    factory: sessionmaker[Session],
    sm_cache: Cache,
    sql: SQLCounter,
    warnings_logged: list[logging.LogRecord],
) -> None:
    """``CHAR(6)``: ``get(SmCode, "ab")`` loads the row ``"ab    "``; it is not stored
    under ``"ab"``, so no later read finds "another row" there."""
    with factory() as s:
        s.add(SmCode(code="ab", label="padded"))
        s.commit()
    sm_cache.invalidate_model(SmCode)
    for _ in range(3):
        with factory() as s:
            got = s.get(SmCode, "ab")
            assert got is not None
            assert got.label == "padded"
    counted = sm_cache.stats()["models"]["SmCode"]
    assert counted["decode_errors"] == 0
    assert counted["uncacheable"] == 3
    assert not warnings_logged
    with factory() as s:  # keyed as loaded: the padded value hits
        assert s.get(SmCode, "ab    ") is not None
    with factory() as s:
        sql.reset()
        assert s.get(SmCode, "ab    ") is not None
        assert sql.count == 0


# --------------------------------------------------------------------------- finding 2


def test_write_through_of_sqlmodel_strings(
    factory: sessionmaker[Session],
    sm_cache: Cache,
    sql: SQLCounter,
    warnings_logged: list[logging.LogRecord],
) -> None:
    """``AutoString`` round-trips as its impl; ``Lowered`` through its bind hook."""
    uid = _user(factory)
    with factory() as s:
        user = s.get(SmUser, uid)
        assert user is not None
        user.name = "Ada Lovelace"
        user.email = "ADA@Analytical.Engine"
        s.commit()
    with factory() as s:
        sql.reset()
        got = s.get(SmUser, uid)
        assert got is not None
        assert sql.count == 0  # written through
        assert (got.name, got.email) == ("Ada Lovelace", "ada@analytical.engine")
    with sm_engine_connection(factory) as conn:
        stored = conn.execute(sa.text("SELECT name, email FROM sm_users")).one()
    assert tuple(stored) == ("Ada Lovelace", "ada@analytical.engine")
    assert sm_cache.stats()["models"]["SmUser"]["write_through_fallbacks"] == 0
    assert not warnings_logged


def sm_engine_connection(factory: sessionmaker[Session]) -> sa.Connection:
    bind = factory.kw["bind"]
    assert isinstance(bind, sa.Engine)
    return bind.connect()


def test_write_through_stores_what_postgres_holds_for_a_type_that_changes_values(
    factory: sessionmaker[Session],
    sm_cache: Cache,
    sql: SQLCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Shouted`` changes values in a way the cache cannot predict from the object: the
    state written through is the row read back after the flush, never a guess."""
    caplog.set_level(logging.DEBUG, logger="sa_redis_cache")
    with factory() as s:
        badge = SmBadge(motto="first")
        s.add(badge)
        s.commit()
        bid = badge.id
    for motto in ("hello", "again"):
        with factory() as s:
            found = s.get(SmBadge, bid)
            assert found is not None
            found.motto = motto
            s.commit()
        with factory() as s:
            sql.reset()
            got = s.get(SmBadge, bid)
            assert got is not None
            assert got.motto == motto.upper()  # what Postgres holds
            assert sql.count == 0  # written through
    assert not [r for r in caplog.records if "write_through_fallbacks" in r.getMessage()]
    assert sm_cache.stats()["models"]["SmBadge"]["write_through_fallbacks"] == 0


# --------------------------------------------------------------------------- finding 3


def test_text_dml_on_a_table_no_entry_reads_touches_nothing(
    factory: sessionmaker[Session], sm_cache: Cache, sql: SQLCounter
) -> None:
    """The same write as Core ``insert()``: the users' cached query keeps its entry."""
    _user(factory)
    users = select(SmUser).where(SmUser.name == "Ada").options(FromCache())
    version = sm_cache.keys.version_key("sm_users")
    with factory() as s:
        assert len(s.exec(users).all()) == 1
    before = sm_cache.client.get(version)
    with sm_engine_connection(factory) as conn:
        conn.execute(sa.text("INSERT INTO sm_audit (what) VALUES ('login')"))
        conn.execute(sa.insert(AUDIT).values(what="core"))
        conn.commit()
    assert sm_cache.client.get(version) == before
    with factory() as s:
        sql.reset()
        assert len(s.exec(users).all()) == 1
        assert sql.count == 0
    with sm_engine_connection(factory) as conn:  # and a write to users still invalidates
        conn.execute(sa.text("UPDATE sm_users SET name = 'Ada'"))
        conn.commit()
    assert sm_cache.client.get(version) != before
