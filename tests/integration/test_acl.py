"""The minimal ACL of docs/security.md, against a redis-server with exactly those users.

The ``ACL SETUSER`` lines are read from the page itself, so the documentation and what
is tested cannot drift apart. Each role runs its whole happy path as its own user; Redis's
``ACL LOG`` (every refused command, scripts' included) must stay empty, and nothing may
fail quietly into the database. A user without the scripting commands, and one without
INFO, show how the cache degrades: the connection stays usable, reads stay true, and the
log says which permission is missing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache, FlushWorker, FromCache, schema
from sa_redis_cache.cli import cli
from tests.wb_support import drain, private_models, queue, remove, rows
from tests.wb_support import update as update_row

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.modes import Db, Runner
    from tests.support import SQLCounter

SECURITY = Path(__file__).resolve().parents[2] / "docs" / "security.md"
PASSWORD = "acl-test-password"


def documented_users(namespace: str) -> dict[str, list[str]]:
    """The users of docs/security.md (name -> rules), for ``namespace``, with PASSWORD."""
    users: dict[str, list[str]] = {}
    for line in SECURITY.read_text().splitlines():
        if line.startswith("ACL SETUSER "):
            name, *rules = line.split()[2:]
            users[name] = [
                ">" + PASSWORD if rule.startswith(">") else rule.replace(":shop:", f":{namespace}:")
                for rule in rules
            ]
    assert set(users) == {"sarc_app", "sarc_worker", "sarc_cli"}, users
    return users


def without(rules: list[str], *refused: str) -> list[str]:
    return [rule for rule in rules if rule not in refused]


def user_args(users: dict[str, list[str]]) -> list[str]:
    """``redis-server`` arguments that create ``users`` with their rules."""
    return [arg for name, rules in users.items() for arg in ("--user", name, *rules)]


@pytest.fixture
def acl_server(namespace: str) -> Iterator[RedisServer]:
    """A Redis (AOF on, for write-behind) whose users are those of docs/security.md, plus
    ``sarc_noscript`` (the application's rules without the scripting commands) and
    ``sarc_noinfo`` (without INFO)."""
    users = documented_users(namespace)
    app = users["sarc_app"]
    users["sarc_noscript"] = without(app, "+evalsha", "+script|load")
    users["sarc_noinfo"] = without(app, "+info")
    with RedisServer(appendonly=True, appendfsync="always", extra_args=user_args(users)) as server:
        yield server


def url_of(server: RedisServer, user: str) -> str:
    return f"redis://{user}:{PASSWORD}@{server.host}:{server.port}/0"


def refusals(server: RedisServer) -> list[Any]:
    """``ACL LOG``, asked as the default user."""
    admin = redis.Redis.from_url(server.url)
    try:
        return list(admin.acl_log())
    finally:
        admin.close()


@pytest.fixture
def mode_redis_url(acl_server: RedisServer) -> str:
    """``in_mode``'s caches connect as the documented application user."""
    return url_of(acl_server, "sarc_app")


def test_the_application_needs_only_its_documented_commands(
    in_mode: Runner, acl_server: RedisServer, product: int
) -> None:
    """Hits and misses, session.get, a write-through commit, bulk DML, a rollback, every
    explicit invalidation, the published counters, and the bump after a server restart
    (scripts loaded with SCRIPT LOAD and run with EVALSHA: the ACL grants no EVAL)."""
    stmt = select(Product).where(Product.id == product).options(FromCache())

    def price_twice(db: Db) -> Decimal:
        db.sql.reset()
        for _ in range(2):
            with db.session() as s:
                (by_query,) = s.scalars(stmt)
            with db.session() as s:
                got = s.get(Product, product)
                assert got is not None
                assert got.price == by_query.price
        assert db.sql.count == 2  # a miss of each, then a hit of each
        return Decimal(by_query.price)

    def scenario(db: Db) -> None:
        assert price_twice(db) == Decimal("1.00")
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            got.price = Decimal("2.00")
            s.commit()  # write-through
        db.sql.reset()
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            assert got.price == Decimal("2.00")
        assert db.sql.count == 0
        with db.session() as s:
            s.execute(update(Product).where(Product.id == product).values(price=Decimal("3")))
            s.commit()
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            got.price = Decimal("9.99")
            s.flush()
            s.rollback()
        db.invalidate("invalidate", Product, product)
        db.invalidate("invalidate_model", Product)
        db.invalidate("invalidate_query", stmt)
        assert price_twice(db) == Decimal("3.00")
        assert db.cache._publisher.publish_now()
        assert db.cache.stats()["total"]["errors"] == 0

        acl_server.restart()
        with db.session() as s:
            # another row first: redis-py's asyncio client loses one call to the pooled
            # connection the server closed (that read goes to the database)
            s.get(Product, 1)
        assert price_twice(db) == Decimal("3.00")  # the restart retired every entry
        core = db.cache._core
        assert core.restarts_seen == 1
        assert core.undelivered == set()

    in_mode(scenario)
    assert refusals(acl_server) == []


def test_the_local_tier_needs_only_the_documented_commands(
    database_url: str, acl_server: RedisServer, namespace: str, product: int
) -> None:
    """Tracking, the invalidation subscription, leases, fences and acknowledgements, and
    the published gauges, as the application's user."""
    engines = [sa.create_engine(database_url) for _ in range(2)]
    caches = [
        Cache(url_of(acl_server, "sarc_app"), namespace=namespace, local=True) for _ in engines
    ]
    factories = [sessionmaker(engine) for engine in engines]
    for cache, factory in zip(caches, factories, strict=True):
        cache.attach(factory)
        tier = cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10)
    reader, writer = factories
    stmt = select(Product).where(Product.id == product).options(FromCache())
    try:
        for _ in range(3):
            with reader() as s:
                s.scalars(stmt).one()
                s.get(Product, product)
        assert caches[0].stats()["total"]["local_hits"] == 2
        with writer() as s:
            s.execute(update(Product).where(Product.id == product).values(price=Decimal("4")))
            s.commit()
        assert caches[1].stats()["total"]["fence_waits"] == 1
        with reader() as s:
            assert s.scalars(stmt).one().price == Decimal("4")
        caches[1].invalidate(Product, product)
        for cache in caches:
            assert cache.stats()["total"]["errors"] == 0
            tier = cache.inspector.local_tier
            assert tier is not None
            assert tier.breaks == 0
    finally:
        for cache, engine in zip(caches, engines, strict=True):
            cache.detach()
            engine.dispose()
    assert refusals(acl_server) == []


def test_cached_functions_need_only_the_documented_commands(
    acl_server: RedisServer, namespace: str
) -> None:
    cache = Cache(url_of(acl_server, "sarc_app"), namespace=namespace)
    calls: list[int] = []

    @cache.cached("square")
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    assert [square(3), square(3)] == [9, 9]
    assert calls == [3]
    square.invalidate(3)
    assert square(3) == 9
    assert calls == [3, 3]
    cache.client.close()
    assert refusals(acl_server) == []


def test_write_behind_and_the_worker_need_only_their_documented_commands(
    engine: sa.Engine, database_url: str, acl_server: RedisServer, namespace: str
) -> None:
    schema.upgrade(engine)
    with private_models() as (page_view, _):
        page_view.metadata.create_all(engine)
        with engine.begin() as conn:  # the table is shared with the other write-behind tests
            conn.execute(page_view.__table__.delete())
        cache = Cache(url_of(acl_server, "sarc_app"), namespace=namespace)
        factory = sessionmaker(engine)
        cache.attach(factory)  # its AOF check reads INFO: the ACL grants no CONFIG
        worker_client = redis.Redis.from_url(url_of(acl_server, "sarc_worker"))
        worker_engine = sa.create_engine(database_url)
        worker = FlushWorker(worker_engine, worker_client, namespace=namespace, models=[page_view])
        try:
            kept = queue(factory, page_view, path="/kept")
            gone = queue(factory, page_view, path="/gone")
            update_row(factory, page_view, kept, views=4)
            remove(factory, page_view, gone)
            with factory() as s:  # the queued state, read back
                got = s.get(page_view, kept)
                assert got is not None
                assert got.views == 4
            assert drain(worker) == 4
            assert rows(worker_engine, page_view) == {kept: ("/kept", 4)}
            stats = worker.stats()
            assert (stats.length, stats.pending, worker.backlog()) == (0, 0, 0)
            assert worker.errors == 0
            assert cache.stats()["total"]["errors"] == 0
        finally:
            worker.release()
            cache.detach()
            worker_client.close()
            worker_engine.dispose()
    assert refusals(acl_server) == []


def test_the_command_line_needs_only_its_documented_commands(
    shop_engine: sa.Engine, acl_server: RedisServer, namespace: str, product: int
) -> None:
    cache = Cache(url_of(acl_server, "sarc_app"), namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        with factory() as s:
            s.scalars(select(Product).where(Product.id == product).options(FromCache())).all()
            s.get(Product, product)
        assert cache._publisher.publish_now()
    finally:
        cache.detach()
    base = ["--redis-url", url_of(acl_server, "sarc_cli"), "--namespace", namespace]
    base += ["--models", "examples.shop"]
    for command in (
        ["stats"],
        ["inspect", "Product", str(product)],
        ["invalidate", "Product", str(product), "--yes"],
        ["invalidate", "Product", "--yes"],
        ["invalidate", "--namespace-wide", "--yes"],
    ):
        result = CliRunner().invoke(cli, base + command, catch_exceptions=False)
        assert result.exit_code == 0, (command, result.output)
    assert refusals(acl_server) == []


def test_a_user_without_scripts_keeps_a_usable_connection_after_a_restart(
    in_mode: Runner,
    acl_server: RedisServer,
    namespace: str,
    product: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """INFO allowed, scripts refused: the bump after a restart cannot run. It used to fail
    every new connection of the process, ``cache.client.get()`` included, for good."""
    stmt = select(Product.price).where(Product.id == product).options(FromCache())

    def prices(db: Db) -> tuple[Decimal, Decimal]:
        with db.session() as s:
            by_query = s.scalars(stmt)[0]
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            return by_query, got.price

    def scenario(db: Db) -> None:
        assert prices(db) == (Decimal("1.00"), Decimal("1.00"))
        acl_server.restart()
        with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
            with db.session() as s:
                s.get(Product, 1)  # redis-py's asyncio client loses one call to the restart
            key = f"sarc:{namespace}:anything"
            if db.mode == "sync":
                assert db.cache.client.get(key) is None
            else:
                assert await_(db.cache._core.async_client().get(key)) is None
            for _ in range(3):
                assert prices(db) == (Decimal("1.00"), Decimal("1.00"))
        core = db.cache._core
        assert core.restarts_seen == 1
        assert "products" in core.undelivered  # read from the database until delivered

    replace(in_mode, redis_url=url_of(acl_server, "sarc_noscript"))(scenario)
    told = [r.getMessage() for r in caplog.records if "+evalsha" in r.getMessage()]
    assert len(told) == 1, told
    assert "docs/security.md" in told[0]


def test_a_user_without_info_is_told_once_and_caches(
    shop_engine: sa.Engine,
    acl_server: RedisServer,
    namespace: str,
    product: int,
    sql: SQLCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = Cache(url_of(acl_server, "sarc_noinfo"), namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    stmt = select(Product.price).where(Product.id == product).options(FromCache())
    try:
        with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
            for _ in range(2):
                with factory() as s:
                    assert s.scalars(stmt).one() == Decimal("1.00")
            acl_server.restart()
            sql.reset()
            with factory() as s:
                assert s.scalars(stmt).one() == Decimal("1.00")
            assert sql.count == 0  # cached, though no restart can be noticed
        told = [r.getMessage() for r in caplog.records if "refused INFO" in r.getMessage()]
        assert len(told) == 1, told
        assert "+info" in told[0]
    finally:
        cache.detach()
