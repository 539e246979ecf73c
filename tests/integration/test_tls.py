"""``rediss://`` with an ACL user: the cache, its local tier and the command line over TLS,
and credentials kept out of logs, errors and statistics.

The server's only port speaks TLS, with a certificate from an authority made for the
test (devservices/tls.py); the users are those of docs/security.md (tests/integration/
test_acl.py reads them from the page).
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import TYPE_CHECKING

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer
from devservices.tls import make_tls_files
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.cli import cli
from tests.integration.test_acl import PASSWORD, documented_users, refusals, user_args

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.modes import Db, Runner
    from tests.support import SQLCounter

WRONG = "not-the-password-9f3"


@pytest.fixture
def tls_server(tmp_path: Path, namespace: str) -> Iterator[RedisServer]:
    """A Redis whose one port speaks TLS, with the documented users (AOF on)."""
    args = user_args(documented_users(namespace))
    files = make_tls_files(tmp_path / "tls")
    with RedisServer(appendfsync="always", extra_args=args, tls=files) as server:
        yield server


def url_of(server: RedisServer, user: str, password: str = PASSWORD) -> str:
    assert server.tls is not None
    return f"rediss://{user}:{password}@{server.host}:{server.port}/0?ssl_ca_certs={server.tls.ca}"


@pytest.fixture
def mode_redis_url(tls_server: RedisServer) -> str:
    return url_of(tls_server, "sarc_app")


def test_the_server_speaks_tls_only(tls_server: RedisServer) -> None:
    plain = redis.Redis(host=tls_server.host, port=tls_server.port, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()


def test_reads_and_writes_over_tls_as_the_application_user(
    in_mode: Runner, tls_server: RedisServer, product: int
) -> None:
    stmt = select(Product).where(Product.id == product).options(FromCache())

    def scenario(db: Db) -> None:
        for _ in range(2):
            with db.session() as s:
                (found,) = s.scalars(stmt)
                assert found.price == Decimal("1.00")
            with db.session() as s:
                got = s.get(Product, product)
                assert got is not None
        assert db.cache.stats()["total"]["hits"] == 2
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            got.price = Decimal("2.00")
            s.commit()
        db.sql.reset()
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            assert got.price == Decimal("2.00")
        assert db.sql.count == 0  # written through, over TLS
        db.invalidate("invalidate_model", Product)
        assert db.cache.stats()["total"]["errors"] == 0

    in_mode(scenario)
    assert refusals(tls_server) == []


def test_the_local_tier_connects_over_tls_and_serves(
    database_url: str, tls_server: RedisServer, namespace: str, product: int
) -> None:
    """Its invalidation and control connections copy the pool's TLS options."""
    engines = [sa.create_engine(database_url) for _ in range(2)]
    caches = [
        Cache(url_of(tls_server, "sarc_app"), namespace=namespace, local=True) for _ in engines
    ]
    factories = [sessionmaker(engine) for engine in engines]
    stmt = select(Product).where(Product.id == product).options(FromCache())
    try:
        for cache, factory in zip(caches, factories, strict=True):
            cache.attach(factory)
            tier = cache.inspector.local_tier
            assert tier is not None
            assert tier.wait_ready(10)
        reader, writer = factories
        for _ in range(3):
            with reader() as s:
                s.scalars(stmt).one()
        assert caches[0].stats()["total"]["local_hits"] == 1
        with writer() as s:
            s.execute(update(Product).where(Product.id == product).values(price=Decimal("5")))
            s.commit()
        assert caches[1].stats()["total"]["fence_waits"] == 1  # the reader's tier answered
        with reader() as s:
            assert s.scalars(stmt).one().price == Decimal("5")
        for cache in caches:
            assert cache.stats()["total"]["errors"] == 0
    finally:
        for cache, engine in zip(caches, engines, strict=True):
            cache.detach()
            engine.dispose()
    assert refusals(tls_server) == []


def test_a_refused_password_reaches_no_log_error_or_statistic(
    shop_engine: sa.Engine,
    tls_server: RedisServer,
    namespace: str,
    product: int,
    sql: SQLCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = url_of(tls_server, "sarc_app", WRONG)
    stmt = select(Product.price).where(Product.id == product).options(FromCache())
    with caplog.at_level(logging.DEBUG):
        cache = Cache(url, namespace=namespace, local=True)
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        try:
            tier = cache.inspector.local_tier
            assert tier is not None
            assert not tier.wait_ready(0.5)  # refused: it never gets ready
            sql.reset()
            for _ in range(2):
                with factory() as s:
                    assert s.scalars(stmt).one() == Decimal("1.00")
            assert sql.count == 2  # the database answered, nothing raised
            stats = cache.stats()
            assert stats["total"]["errors"] >= 1
        finally:
            cache.detach()
    result = CliRunner().invoke(
        cli, ["--redis-url", url, "--namespace", namespace, "--models", "examples.shop", "stats"]
    )
    assert result.exit_code == 1, result.output
    assert "refused the credentials" in result.output
    shown = [r.getMessage() for r in caplog.records] + [str(stats), result.output]
    assert any("invalid username-password" in text or "WRONGPASS" in text for text in shown)
    assert not [text for text in shown if WRONG in text]
