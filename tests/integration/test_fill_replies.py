"""A miss's fill is sent and its reply read later (``CacheContext.store``,
``redis_io.OwedReplies``).

The read returns without waiting for the fill's reply; the thread's next cache call
reads it first, so that thread's reads come after its fills; the counters read every
thread's owed reply before they are taken, waiting no more than ``OWED_WAIT`` for a Redis
that does not answer; a forked child leaves the parent's reply to the parent; a server
that lost its scripts still gets the fill; a traced fill is waited for, its span saying
what became of it.

Redis is held still with ``CLIENT PAUSE ... WRITE`` on a server of the module's own: a
paused server queues the fill (a script that writes) and answers nothing until unpaused.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis._parsers import _RESP2Parser
from sqlalchemy import event, select
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.context import OWED_WAIT
from sa_redis_cache.tracing import use_tracer_provider
from tests.support import cache_on_a_small_pool, exit_code_of_a_forked_child

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.orm import Session

    from tests.support import SQLCounter

PAUSE_MS = 600_000  # far longer than any test: a read that waited for its fill hangs
GIVE_UP_S = 60.0  # how long a test waits for a thread before calling it stuck


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: CLIENT PAUSE would hold every test's server."""
    with RedisServer(appendonly=False) as server:
        yield server


@pytest.fixture
def cache_client(own_redis: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(own_redis.url)


@pytest.fixture
def probe(own_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of the test's own: pauses, unpauses and looks at keys."""
    client = redis.Redis.from_url(own_redis.url)
    yield client
    client.client_unpause()
    client.close()


@pytest.fixture
def scripts_ran(
    session_factory: sessionmaker[Session], cache: Cache, probe: redis.Redis, product: int
) -> int:
    """The product, after two rounds of a read (a miss that fills) and an invalidation on
    a server that starts with no scripts: every script ran since the last NOSCRIPT, so the
    next fill is sent unwaited. The counters start from zero."""
    probe.script_flush()
    for _ in range(2):
        with session_factory() as s:
            s.scalars(by_id(product)).one()
        cache.invalidate_query(by_id(product))
    cache._core.counters.reset()
    return product


def by_id(pid: int) -> sa.Select[Any]:
    return select(Product).where(Product.id == pid).options(FromCache())


def before_the_next_query(engine: sa.Engine, action: Callable[[], object]) -> None:
    """Run ``action`` once, just before the next SQL statement: after the read's look,
    before its fill."""
    pending = [action]

    def run(*_: Any) -> None:
        while pending:
            pending.pop()()

    event.listen(engine, "before_cursor_execute", run)
    cleanups.append(lambda: event.remove(engine, "before_cursor_execute", run))


cleanups: list[Callable[[], None]] = []


@pytest.fixture(autouse=True)
def _remove_listeners() -> Iterator[None]:
    yield
    while cleanups:
        cleanups.pop()()


def pause_writes_before_the_query(engine: sa.Engine, probe: redis.Redis) -> None:
    """CLIENT PAUSE WRITE just before the next SELECT: the look ran, the fill will wait."""
    before_the_next_query(engine, lambda: probe.client_pause(PAUSE_MS, all=False))


def read_in_thread(factory: sessionmaker[Session], pid: int) -> list[str]:
    """Read the product in a thread of its own; the names it read (empty: still stuck)."""
    names: list[str] = []

    def read() -> None:
        with factory() as s:
            names.append(s.scalars(by_id(pid)).one().name)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(GIVE_UP_S)
    return names


def fills(cache: Cache) -> int:
    count: int = cache.stats()["regions"]["default"]["fills"]
    return count


def entry_keys(probe: redis.Redis, cache: Cache) -> list[bytes]:
    keys: list[bytes] = probe.keys(f"sarc:{cache.namespace}:*")  # type: ignore[assignment]
    return [k for k in keys if b":q:" in k and not k.endswith(b":inv")]


def test_a_miss_returns_before_redis_answers_its_fill(
    session_factory: sessionmaker[Session],
    cache: Cache,
    shop_engine: sa.Engine,
    probe: redis.Redis,
    scripts_ran: int,
) -> None:
    pause_writes_before_the_query(shop_engine, probe)
    assert read_in_thread(session_factory, scripts_ran) == ["scratch"]  # not stuck on the fill
    taken: list[int] = []
    taker = threading.Thread(target=lambda: taken.append(fills(cache)))
    taker.start()
    # the counters give up on the reply after OWED_WAIT: a hung Redis would otherwise hold
    # cache.stats(), and a metrics scrape, for as long as it hangs
    taker.join(OWED_WAIT + GIVE_UP_S)
    assert taken == [0]  # the reply has not come
    probe.client_unpause()
    assert fills(cache) == 1  # now read, by the counters, from the thread that sent it
    assert len(entry_keys(probe, cache)) == 1
    assert cache.stats()["regions"]["default"]["fill_refused"] == 0


def test_the_thread_that_filled_reads_after_its_fill(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter, scripts_ran: int
) -> None:
    statement = by_id(scripts_ran)
    for _ in range(3):
        sql.reset()
        with session_factory() as s:
            s.scalars(statement).one()
        with session_factory() as s:
            s.scalars(statement).one()  # its look comes after the fill: a hit
        assert sql.count == 1
        cache.invalidate_query(statement)
    region = cache.stats()["regions"]["default"]
    assert (region["misses"], region["fills"], region["hits"]) == (3, 3, 3)


def test_a_fill_reply_waits_on_the_threads_own_connection(
    session_factory: sessionmaker[Session], cache: Cache, scripts_ran: int
) -> None:
    """The fill is sent on the thread's own connection (``ThreadConnections``): the reply
    holds nothing out of the pool, and the thread's next call reads it first."""
    client = cache.client
    assert isinstance(client, redis.Redis)
    pool: Any = client.connection_pool
    threads = cache._core.sync_io.threads
    assert threads is not None
    for _ in range(4):
        cache.invalidate_query(by_id(scripts_ran))
        with session_factory() as s:
            s.scalars(by_id(scripts_ran)).one()
        assert len(pool._in_use_connections) == 0
        assert threads.lend() is None  # lent to the reply
        assert len(cache._core.owed.by_thread) == 1
    with session_factory() as s:
        s.scalars(by_id(scripts_ran)).one()  # reads the reply first: a hit
    lent = threads.lend()
    assert lent is not None  # given back
    lent.busy = False
    assert cache._core.owed.by_thread == {}
    region = cache.stats()["regions"]["default"]
    assert (region["fills"], region["hits"]) == (4, 1)


def test_a_server_that_lost_its_scripts_still_gets_the_fill(
    session_factory: sessionmaker[Session],
    cache: Cache,
    shop_engine: sa.Engine,
    probe: redis.Redis,
    scripts_ran: int,
) -> None:
    # after the look: the fill's EVALSHA meets NOSCRIPT
    before_the_next_query(shop_engine, probe.script_flush)
    with session_factory() as s:
        assert s.scalars(by_id(scripts_ran)).one().name == "scratch"
    region = cache.stats()["regions"]["default"]
    assert (region["fills"], region["errors"]) == (1, 0)
    assert len(entry_keys(probe, cache)) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_leaves_the_parents_fill_reply_to_the_parent(
    session_factory: sessionmaker[Session],
    cache: Cache,
    shop_engine: sa.Engine,
    probe: redis.Redis,
    scripts_ran: int,
) -> None:
    pause_writes_before_the_query(shop_engine, probe)
    with session_factory() as s:
        s.scalars(by_id(scripts_ran)).one()  # the fill waits in Redis: its reply is owed

    def child() -> int:  # takes its counters, which must not read the parent's reply
        probe.client_unpause()
        return 3 if cache.stats()["regions"]["default"]["fills"] else 0

    assert exit_code_of_a_forked_child(child) == 0
    assert fills(cache) == 1  # the parent read its own reply (the child did not take it)


def test_a_fill_of_a_script_the_server_has_not_run_is_waited_for(
    session_factory: sessionmaker[Session], cache: Cache, probe: redis.Redis, product: int
) -> None:
    """Its NOSCRIPT, read later, would hold the fill back until the thread's next call: on
    a fresh or restarted server another connection would not find the entry meanwhile."""
    probe.script_flush()
    with session_factory() as s:
        s.scalars(by_id(product)).one()
    assert cache._core.owed.by_thread == {}
    assert len(entry_keys(probe, cache)) == 1  # at once, on another connection


def test_a_traced_fill_is_waited_for(
    session_factory: sessionmaker[Session], cache: Cache, scripts_ran: int
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_tracer_provider(provider)
    try:
        with session_factory() as s:
            s.scalars(by_id(scripts_ran)).one()
    finally:
        use_tracer_provider(None)
        provider.shutdown()
    fill_spans = [span for span in exporter.get_finished_spans() if span.name.endswith("fill")]
    assert [(span.attributes or {}).get("sa_redis_cache.outcome") for span in fill_spans] == [
        "stored"
    ]
    assert cache._core.owed.by_thread == {}  # nothing owed: the reply was read in the read


def test_a_small_pool_is_not_held_out_by_idle_threads_fill_replies(
    shop_engine: sa.Engine, own_redis: RedisServer, namespace: str, scripts_ran: int
) -> None:
    """At most an eighth of the pool's ``max_connections`` waits out of it for replies:
    a thread that fills and then idles must not leave the others without a connection."""
    client, small, factory = cache_on_a_small_pool(shop_engine, own_redis.url, namespace, 8)
    threads = 4
    all_filled = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)
    statements = [
        select(Product).where(Product.id == scripts_ran, Product.price > i).options(FromCache())
        for i in range(threads)
    ]

    def read(statement: Any) -> None:
        with factory() as s:
            s.scalars(statement).all()  # a miss: its fill is sent
        all_filled.wait()
        done.wait()  # idle, as a worker thread between requests

    workers = [threading.Thread(target=read, args=(st,)) for st in statements]
    try:
        for worker in workers:
            worker.start()
        all_filled.wait()
        pool: Any = client.connection_pool
        assert len(pool._in_use_connections) <= 1  # one eighth of 8
        # and one thread (8 // 8) keeps a connection of its own, outside the pool
        assert len(small._core.owed.by_thread) <= 2
        done.wait()
        for worker in workers:
            worker.join()
        total = small.stats()["total"]
        assert (total["fills"], total["errors"]) == (threads, 0)
    finally:
        all_filled.abort()  # a failed assertion must not leave the workers waiting
        done.abort()
        small.detach()
        client.close()


def test_a_reply_lost_to_a_closed_pool_costs_the_next_call_nothing(
    shop_engine: sa.Engine, own_redis: RedisServer, namespace: str, scripts_ran: int
) -> None:
    """``client.close()`` (or ``connection_pool.disconnect()``) under an unread reply: the
    thread's next call reads the database or Redis as usual, and the reply is counted
    lost. The pure-Python parser raises ``AttributeError`` for such a socket, not a
    Redis error."""
    client = redis.Redis.from_url(own_redis.url, parser_class=_RESP2Parser)
    closing = Cache(client, namespace=f"{namespace}-closing", default_ttl=300)
    factory = sessionmaker(shop_engine)
    closing.attach(factory)
    try:
        with factory() as s:
            s.scalars(by_id(scripts_ran)).one()  # look.lua and fill.lua run on this client
        closing.invalidate_query(by_id(scripts_ran))
        with factory() as s:
            s.scalars(by_id(scripts_ran)).one()
        assert closing._core.owed.by_thread  # its fill's reply is owed
        client.connection_pool.disconnect()
        with factory() as s:
            assert s.scalars(by_id(scripts_ran)).one().name == "scratch"
        with factory() as s:
            s.scalars(by_id(scripts_ran)).one()
        assert closing.stats()["total"]["errors"] <= 1  # the lost reply, at most
    finally:
        closing.detach()
        client.close()
