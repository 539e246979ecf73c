"""A thread keeps a connection of its own for the cache's calls
(``redis_io.ThreadConnections``), outside the client's pool.

Hits, looks and fills take nothing from the pool; ``detach()`` closes the threads'
connections; a forked child makes its own and leaves the
parent's socket alone; at most an eighth of the pool's ``max_connections`` threads hold
one (counted per pool), the others use the pool; a thread that ends leaves its
connection to the next; a connection the server dropped is made again; clients whose
pool does more than hand out connections get none.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from redis.credentials import UsernamePasswordCredentialProvider
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.redis_io import SyncRedisIO
from tests.support import cache_on_a_small_pool, exit_code_of_a_forked_child

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.orm import Session

    from sa_redis_cache.redis_io import ThreadConnections
    from tests.support import SQLCounter

GIVE_UP_S = 60.0  # how long a test waits for a thread before calling it stuck


def by_id(pid: int) -> sa.Select[Any]:
    return select(Product).where(Product.id == pid).options(FromCache())


def threads_of(cache: Cache) -> ThreadConnections:
    threads = cache._core.sync_io.threads
    assert threads is not None
    return threads


def own_connection(cache: Cache) -> Any:
    """The calling thread's connection (it must have one, and none lent)."""
    lent = threads_of(cache).lend()
    assert lent is not None
    lent.busy = False
    return lent.connection


@pytest.fixture
def pool_takes(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the connections taken from the cache client's pool."""
    pool: Any = cache.client.connection_pool  # type: ignore[union-attr]
    taken: list[int] = []
    take = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        taken.append(1)
        return take(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counted)
    return taken


def test_hits_misses_and_fills_take_nothing_from_the_pool(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    sql: SQLCounter,
    pool_takes: list[int],
) -> None:
    for _ in range(3):
        with session_factory() as s:
            assert s.scalars(by_id(product)).one().id == product
        with session_factory() as s:
            assert s.get(Product, product) is not None
    assert sql.count == 2  # one miss per entry; the rest hits
    assert pool_takes == []
    region = cache.stats()["regions"]["default"]
    assert (region["hits"], region["fills"]) == (2, 1)


def in_a_thread(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a new thread, to its end; what it returned."""
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(work()))
    worker.start()
    worker.join(GIVE_UP_S)
    assert not worker.is_alive()
    assert len(got) == 1
    return got[0]


def test_a_thread_that_ends_leaves_its_connection_to_the_next(
    session_factory: sessionmaker[Session], cache: Cache, product: int, pool_takes: list[int]
) -> None:
    """A server that makes a thread per request must not connect once per request."""

    def read() -> Any:
        for _ in range(2):  # a miss and its fill, then a hit that reads the fill's reply
            with session_factory() as s:
                s.scalars(by_id(product)).one()
        connection = own_connection(cache)
        assert connection._sock is not None
        return connection

    first = in_a_thread(read)
    assert first._sock is not None  # kept open for the next thread
    assert len(threads_of(cache)._idle) == 1
    second = in_a_thread(read)
    assert second is first  # taken again: no new connection, no new handshake
    assert pool_takes == []
    cache.detach()
    assert first._sock is None  # the idle connections close with the cache


def test_idle_connections_beyond_the_cap_close(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int
) -> None:
    client, small, factory = cache_on_a_small_pool(shop_engine, redis_url, namespace, 8)
    workers = 3
    all_read = threading.Barrier(workers)
    connections: list[Any] = []

    def read() -> None:
        with factory() as s:
            s.scalars(by_id(product)).one()
        lent = threads_of(small).lend()
        if lent is not None:
            connections.append(lent.connection)
            lent.busy = False
        all_read.wait(GIVE_UP_S)

    threads = [threading.Thread(target=read) for _ in range(workers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(GIVE_UP_S)
        assert len(connections) == 1  # 8 // 8: one thread holds one
        assert len(threads_of(small)._idle) == 1  # its thread ended: kept, within the cap
    finally:
        all_read.abort()
        small.detach()
        client.close()
    assert connections[0]._sock is None


def test_caches_sharing_a_pool_share_its_thread_connections(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int
) -> None:
    """The cap is the pool's: two caches (or a cache and a worker) on one client hold no
    more connections beside it than one cache."""
    client, first, factory = cache_on_a_small_pool(shop_engine, redis_url, namespace, 16)
    second = Cache(client, namespace=f"{namespace}-second", default_ttl=300)
    other: sessionmaker[Session] = sessionmaker(shop_engine)
    second.attach(other)
    try:
        assert threads_of(first) is threads_of(second)
        for read_with in (factory, other):
            with read_with() as s:
                s.scalars(by_id(product)).one()
        assert len(threads_of(first)._made) == 1  # this thread's, used by both
    finally:
        second.detach()
        first.detach()
        client.close()


def test_a_pipeline_whose_commands_fail_to_come_leaves_the_connection_free(
    cache: Cache,
) -> None:
    io = cache._core.sync_io

    def commands() -> Iterator[tuple[Any, ...]]:
        yield ("PING",)
        raise RuntimeError("the caller's generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        io.pipeline(commands())
    own_connection(cache)  # not left lent: the thread still has its connection


def test_detach_closes_the_threads_connections(
    session_factory: sessionmaker[Session], cache: Cache, product: int
) -> None:
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    connection = own_connection(cache)
    assert connection._sock is not None
    cache.detach()
    assert connection._sock is None


def test_the_connection_is_made_again_after_the_server_dropped_it(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    sql: SQLCounter,
    redis_url: str,
) -> None:
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    connection = own_connection(cache)
    killer = redis.Redis.from_url(redis_url)
    try:
        assert killer.client_kill_filter(_id=None, addr=_local_address(connection)) == 1
    finally:
        killer.close()
    sql.reset()
    with session_factory() as s:
        assert s.scalars(by_id(product)).one().id == product  # a hit, on a new socket
    assert sql.count == 0
    assert cache.stats()["total"]["errors"] == 0


def _local_address(connection: Any) -> str:
    host, port = connection._sock.getsockname()[:2]
    return f"{host}:{port}"


def test_threads_beyond_an_eighth_of_the_pool_use_the_pool(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int
) -> None:
    client, small, factory = cache_on_a_small_pool(shop_engine, redis_url, namespace, 16)
    workers = 5
    all_read = threading.Barrier(workers + 1)
    done = threading.Barrier(workers + 1)
    own: list[bool] = []

    def read() -> None:
        with factory() as s:
            s.scalars(by_id(product)).one()
        with factory() as s:
            s.scalars(by_id(product)).one()
        lent = threads_of(small).lend()
        own.append(lent is not None)
        if lent is not None:
            lent.busy = False
        all_read.wait()
        done.wait()

    threads = [threading.Thread(target=read) for _ in range(workers)]
    try:
        for thread in threads:
            thread.start()
        all_read.wait(GIVE_UP_S)
        assert sorted(own) == [False, False, False, True, True]  # 16 // 8 hold one
        assert len(threads_of(small)._made) == 2
        done.wait(GIVE_UP_S)
        for thread in threads:
            thread.join(GIVE_UP_S)
        assert small.stats()["total"]["errors"] == 0
    finally:
        all_read.abort()  # a failed assertion must not leave the workers waiting
        done.abort()
        small.detach()
        client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_and_leaves_the_parents_socket(
    session_factory: sessionmaker[Session], cache: Cache, product: int, sql: SQLCounter
) -> None:
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    parents = own_connection(cache)

    def child() -> int:
        with session_factory() as s:
            s.scalars(by_id(product)).one()
        mine = own_connection(cache)
        if mine is parents:
            return 3
        del mine
        cache._core.sync_io.drop_connections()
        gc.collect()  # closes the parent's socket in the child: no shutdown of it
        return 0

    assert exit_code_of_a_forked_child(child) == 0
    sql.reset()
    with session_factory() as s:
        assert s.scalars(by_id(product)).one().id == product
    assert sql.count == 0
    assert own_connection(cache) is parents  # still open: nothing had to reconnect
    assert parents._sock is not None
    assert cache.stats()["total"]["errors"] == 0


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda url: redis.Redis.from_url(url, protocol=3), id="resp3"),
        pytest.param(
            lambda url: redis.Redis(
                connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=50)
            ),
            id="blocking-pool",
        ),
        pytest.param(
            lambda url: redis.Redis.from_url(
                url, credential_provider=UsernamePasswordCredentialProvider()
            ),
            id="credential-provider",
        ),
    ],
)
def test_pools_that_do_more_than_hand_out_connections_keep_every_call(
    redis_url: str, make: Any
) -> None:
    client = make(redis_url)
    try:
        io = SyncRedisIO(client)
        assert io.threads is not None
        assert io.threads.lend() is None
        assert io.call(("MGET", "sarc-test-absent")) == [None]
    finally:
        client.close()
