"""The per-read commands (MGET, EVALSHA) sent straight to a connection (the thread's
own, ``redis_io.ThreadConnections``, or a pooled one, ``compat.call_now``), past
redis-py's per-call layer, must behave as ``client.execute_command`` would: the
connection's own retry policy, NOSCRIPT raised for the reload; and whatever watches
``execute_command`` (an application's ``redis.Redis`` subclass, an instrumentation that
patches the method) still sees every command.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import select

from examples.shop import Product
from sa_redis_cache import Cache, FromCache, compat
from sa_redis_cache.redis_io import SyncRedisIO

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session, sessionmaker

    from tests.support import SQLCounter


class DropOnce(redis.Connection):
    """A connection that, when armed, loses its socket just before it sends: a reset
    between the pool's health check and the command, which only a retry survives."""

    armed = False
    dropped = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        sock: Any = self._sock
        if DropOnce.armed and sock is not None:
            DropOnce.armed = False
            DropOnce.dropped += 1
            sock.close()  # the next send fails with a connection error
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@pytest.fixture
def dropping_client(redis_url: str, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    retries: int = request.param
    pool = redis.ConnectionPool.from_url(
        redis_url, connection_class=DropOnce, retry=Retry(NoBackoff(), retries)
    )
    client = redis.Redis.from_pool(pool)
    DropOnce.armed, DropOnce.dropped = False, 0
    yield client
    client.close()


def test_call_now_answers_as_execute_command(redis_client: redis.Redis, namespace: str) -> None:
    key = f"{namespace}:direct"
    redis_client.set(key, b"\x00value\xff")
    command = ("MGET", key, f"{namespace}:absent")
    expected = redis_client.execute_command(*command)  # type: ignore[no-untyped-call]
    assert compat.call_now(redis_client, command) == expected
    with pytest.raises(redis.exceptions.NoScriptError):
        compat.call_now(redis_client, ("EVALSHA", "0" * 40, 0))
    with pytest.raises(redis.exceptions.ResponseError, match="wrong number"):
        compat.call_now(redis_client, ("MGET",))
    redis_client.delete(key)


def test_a_pipeline_on_the_threads_connection_answers_as_redis_pys(
    redis_client: redis.Redis, namespace: str
) -> None:
    """``SyncRedisIO.pipeline`` on the thread's own connection: the replies of redis-py's
    pipeline, its response callbacks applied (``SET`` True or None, ``SMEMBERS`` a set,
    ``PEXPIRE`` a bool), and an error reply raised."""
    io = SyncRedisIO(redis_client)
    key, members = f"{namespace}:p", f"{namespace}:s"
    redis_client.sadd(members, "a", "b")

    def commands() -> list[tuple[Any, ...]]:
        return [
            ("SET", key, "v", "NX", "PX", 10_000),
            ("SMEMBERS", members),
            ("PEXPIRE", key, 10_000),
            ("MGET", key, f"{namespace}:absent"),
        ]

    lent = io.threads.lend() if io.threads is not None else None
    assert lent is not None  # the pipeline below runs on the thread's connection
    lent.busy = False
    ours = io.pipeline(commands())
    redis_client.delete(key)
    pipe = redis_client.pipeline(transaction=False)
    for command in commands():
        pipe.execute_command(*command)  # type: ignore[no-untyped-call]
    assert ours == pipe.execute()
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        io.pipeline([("GET", members)])
    redis_client.delete(key, members)


def _read(factory: sessionmaker[Session], pid: int) -> str:
    with factory() as s:
        stmt = select(Product).where(Product.id == pid).options(FromCache())
        return s.scalars(stmt).one().name


@pytest.mark.parametrize(
    ("dropping_client", "statements", "errors"),
    [(1, 0, 0), (0, 1, 1)],  # retried: served from Redis; no retries: the database answers
    indirect=["dropping_client"],
    ids=["one-retry", "no-retries"],
)
def test_a_connection_lost_before_a_hit_follows_the_clients_retry_policy(
    dropping_client: redis.Redis,
    statements: int,
    errors: int,
    shop_engine: Any,
    namespace: str,
    product: int,
    sql: SQLCounter,
) -> None:
    from sqlalchemy.orm import sessionmaker

    cache = Cache(dropping_client, namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        name = _read(factory, product)  # miss and fill
        sql.reset()
        DropOnce.armed = True
        assert _read(factory, product) == name  # the application never sees the error
        assert DropOnce.dropped == 1
        assert sql.count == statements
        assert cache.stats()["total"]["errors"] == errors
    finally:
        cache.detach()


class Recording(redis.Redis):
    """An application's instrumented client: it must see the cache's commands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.seen.append(str(args[0]))
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_a_subclassed_client_sees_every_read(
    redis_url: str, shop_engine: Any, namespace: str, product: int
) -> None:
    from sqlalchemy.orm import sessionmaker

    client = Recording(connection_pool=redis.ConnectionPool.from_url(redis_url))
    cache = Cache(client, namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        _read(factory, product)  # a miss: the look and the fill (EVALSHA)
        assert client.seen.count("EVALSHA") >= 2
        client.seen.clear()
        _read(factory, product)  # a first hit looks with a lease if absent (EVALSHA)
        _read(factory, product)  # later hits are an MGET
        assert client.seen == ["EVALSHA", "MGET"]
        client.seen.clear()
        for _ in range(2):  # an entity miss, then its hit
            with factory() as s:
                s.get(Product, product)
        assert client.seen.count("MGET") == 2
    finally:
        cache.detach()
        client.close()


def test_an_instrumentation_patching_execute_command_sees_every_command(
    redis_url: str,
    shop_engine: Any,
    namespace: str,
    product: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As OpenTelemetry's redis instrumentation does: ``redis.Redis.execute_command``
    wrapped on the class, after the cache was made."""
    from sqlalchemy.orm import sessionmaker

    client = redis.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    seen: list[str] = []
    original = redis.Redis.execute_command

    @functools.wraps(original)
    def traced(self: redis.Redis, *args: Any, **options: Any) -> Any:
        seen.append(str(args[0]))
        return original(self, *args, **options)  # type: ignore[no-untyped-call]

    try:
        for _ in range(3):  # a miss, a first hit, a hit: all direct so far
            _read(factory, product)
        monkeypatch.setattr(redis.Redis, "execute_command", traced)
        _read(factory, product)  # a hit (MGET)
        with factory() as s:
            s.get(Product, product)  # an entity miss: its look and its fill (EVALSHA)
        assert seen[0] == "MGET"
        assert seen.count("EVALSHA") >= 2
        monkeypatch.undo()
        seen.clear()
        _read(factory, product)
        assert seen == []  # direct again once the patch is gone
    finally:
        cache.detach()
        client.close()
