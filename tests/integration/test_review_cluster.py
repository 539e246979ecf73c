"""Review probes of the cache on a Redis Cluster (docs/cluster.md, docs/guarantees.md
"Redis Cluster"), with the database as the oracle: a slot held half migrated (``ASK`` and
``TRYAGAIN`` for as long as the test wants), a failover that loses an acknowledged write,
and the write-behind worker with one primary of several down.

Each test starts a cluster of its own (a few seconds) when it kills or freezes nodes, so
that the run's shared cluster is left as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select

from devservices import RedisCluster
from sa_redis_cache import Cache, FlushWorker
from sa_redis_cache.protocol.keys import KeyScheme
from sa_redis_cache.redis_io import async_client_from_url, client_from_url
from tests.wb_support import private_models

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.orm import Session, sessionmaker

pytestmark = pytest.mark.slow


def owner_of_table(cluster: RedisCluster, namespace: str, table: str) -> Any:
    """The primary serving every key of ``table`` (they share its hash tag)."""
    return cluster.owner_of(cluster.slot_of(KeyScheme(namespace).generation_key(table)))


# --------------------------------------------------------------------------- write-behind


@pytest.fixture
def no_full_coverage_cluster() -> Iterator[RedisCluster]:
    """3 primaries without replicas, AOF on, serving their slots while another is down
    (``cluster-require-full-coverage no``: the set-up in which one shard can be down while
    the others serve)."""
    with RedisCluster(
        primaries=3,
        replicas=0,
        appendonly=True,
        node_timeout_ms=1000,
        extra_args=["--cluster-require-full-coverage", "no"],
    ) as made:
        yield made


def split_namespace(cluster: RedisCluster, tables: list[str]) -> str:
    """A namespace in which ``tables`` live on distinct primaries."""
    for n in range(1000):
        name = f"rc{n}"
        owners = {owner_of_table(cluster, name, t).node_id for t in tables}
        if len(owners) == len(tables):
            return name
    raise AssertionError("no namespace spreads the tables")


@dataclass
class Queued:
    """Write-behind models queueing on a cluster, and a worker flushing them."""

    namespace: str
    page_view: Any
    stock_level: Any
    made: sessionmaker[Session]
    worker: FlushWorker


@contextmanager
def queued_on(
    cluster: RedisCluster,
    engine: sa.Engine,
    database_url: str,
    *,
    spread: bool = False,
    **worker_options: Any,
) -> Iterator[Queued]:
    """A :class:`Queued` whose sessionmaker's cache and worker work in a namespace of their
    own, the tables empty before and after. The worker flushes PageView; with ``spread``,
    StockLevel too, in a namespace that puts the two tables on distinct primaries (and
    the cache gets a client without the socket timeouts a URL gives it)."""
    from sa_redis_cache import schema

    schema.upgrade(engine)
    with private_models() as (page_view, stock_level):
        page_view.metadata.create_all(engine)
        models = [page_view, stock_level] if spread else [page_view]
        tables = [model.__table__ for model in models]
        if spread:
            namespace = split_namespace(cluster, [table.name for table in tables])
        else:
            namespace = f"rv{secrets.token_hex(4)}"
        with engine.begin() as conn:
            for table in tables:
                conn.execute(table.delete())
        worker_engine = sa.create_engine(database_url)
        cache = Cache(client_from_url(cluster.url) if spread else cluster.url, namespace=namespace)
        made: sessionmaker[Session] = sa.orm.sessionmaker(engine)
        cache.attach(made)
        worker = FlushWorker(
            worker_engine,
            client_from_url(cluster.url),
            namespace=namespace,
            models=models,
            **worker_options,
        )
        try:
            yield Queued(namespace, page_view, stock_level, made, worker)
        finally:
            with contextlib.suppress(Exception):
                worker.release()
            cache.detach()
            worker_engine.dispose()
            with engine.begin() as conn:
                for table in tables:
                    conn.execute(table.delete())


def test_the_worker_keeps_draining_the_other_primaries_while_one_is_down(
    no_full_coverage_cluster: RedisCluster, engine: sa.Engine, database_url: str
) -> None:
    """Queues on two primaries; the primary of one is killed (no replica to promote). The
    worker must go on flushing the other's queue, and flush the first once it is back."""
    from sa_redis_cache import CacheUnavailableError

    cluster = no_full_coverage_cluster
    with queued_on(cluster, engine, database_url, spread=True, max_backoff=0.2) as queued:
        namespace, made, worker = queued.namespace, queued.made, queued.worker
        page_view, stock_level = queued.page_view, queued.stock_level
        tables = [page_view.__table__.name, stock_level.__table__.name]

        def add(obj: Any) -> None:
            with made() as s:
                s.add(obj)
                s.commit()

        add(page_view(path="/first", views=1))
        add(stock_level(warehouse="first", quantity=1))
        for _ in range(20):
            if not worker.run_once():
                break
        assert len(count_rows(engine, page_view)) == 1
        assert len(count_rows(engine, stock_level)) == 1

        down = owner_of_table(cluster, namespace, tables[1])
        # the stock levels' shard holds queued writes when it dies: they are on
        # its disk (AOF), flushed once it is back
        add(stock_level(warehouse="queued", quantity=2))
        add(page_view(path="/queued", views=2))
        down.kill()
        # the page views' shard is up: its commits queue, its queue drains
        for n in range(5):
            add(page_view(path=f"/while-down/{n}", views=n))
        # the dead shard's: refused in the library's words, nothing queued
        with pytest.raises(CacheUnavailableError, match="did not take"):
            add(stock_level(warehouse="refused", quantity=3))
        # the worker's own loop (idle waits, heartbeat thread), stopped once the live
        # primary's queue is in the database
        stop = threading.Event()

        def drained() -> None:
            if len(count_rows(engine, page_view)) == 7:
                stop.set()

        runner = threading.Thread(target=worker.run, args=(stop,), kwargs={"on_pass": drained})
        runner.start()
        runner.join(timeout=30)
        stop.set()
        runner.join()
        assert len(count_rows(engine, page_view)) == 7, (
            "the worker stopped draining the live primary's queues while another was down"
        )
        # run() released its leases on the way out: those on the live primary are free
        live = [p.lease for p in worker.partitions if p.info.table == tables[0]]
        assert worker.client.exists(*live) == 0
        cluster.restart_node(down)

        # the dead shard's partitions wait out their backoff (time-based): polled
        def flushed_the_queued_level() -> bool:
            worker.run_once()
            return len(count_rows(engine, stock_level)) == 2

        cluster._wait("the queued stock level to be flushed", flushed_the_queued_level)
        assert sorted(r[0] for r in count_rows(engine, stock_level).values()) == [
            "first",
            "queued",
        ]


def count_rows(engine: sa.Engine, model: Any) -> dict[Any, tuple[Any, ...]]:
    """``{id: (the row's second column, ...)}`` of ``model``'s table, read with plain SQL."""
    table = model.__table__
    with engine.connect() as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(select(table))}


# --------------------------------------------------------------------- a slot held half moved


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[RedisCluster]:
    """3 primaries with a replica each, AOF on (write-behind), for this module's slot moves."""
    with RedisCluster(primaries=3, replicas=1, appendonly=True, node_timeout_ms=1000) as made:
        yield made


@pytest.fixture
def category(shop_engine: sa.Engine) -> Iterator[int]:
    """A category of the test's own (deleted after)."""
    from examples.shop import Category

    with sa.orm.Session(shop_engine) as s:
        c = Category(name=f"review-{secrets.token_hex(4)}")
        s.add(c)
        s.commit()
        cid = c.id
    yield cid
    with sa.orm.Session(shop_engine) as s:
        s.execute(sa.delete(Category).where(Category.id == cid))
        s.commit()


def read_name(made: sessionmaker[Session], cid: int) -> str:
    from examples.shop import Category
    from sa_redis_cache import FromCache

    with made() as s:
        return str(
            s.scalars(select(Category.name).where(Category.id == cid).options(FromCache())).one()
        )


def rename(made: sessionmaker[Session], cid: int, name: str) -> str:
    """Commit ``name`` for category ``cid`` through ``made``; the name."""
    from examples.shop import Category

    with made() as s:
        c = s.get(Category, cid)
        assert c is not None
        c.name = name
        s.commit()
    return name


@dataclass
class Pair:
    """Two processes' caches on one namespace of the cluster, each with its sessionmaker."""

    keys: KeyScheme
    writer_cache: Cache
    reader_cache: Cache
    writer: sessionmaker[Session]
    reader: sessionmaker[Session]


@contextmanager
def writer_and_reader(cluster: RedisCluster, engine: sa.Engine, *, local: bool) -> Iterator[Pair]:
    """A :class:`Pair` on ``engine`` in a namespace of its own (``Cache(local=local)``),
    detached when the block ends."""
    namespace = f"rv{secrets.token_hex(4)}"
    writer_cache = Cache(cluster.url, namespace=namespace, local=local)
    reader_cache = Cache(cluster.url, namespace=namespace, local=local)
    writer: sessionmaker[Session] = sa.orm.sessionmaker(engine)
    reader: sessionmaker[Session] = sa.orm.sessionmaker(engine)
    writer_cache.attach(writer)
    reader_cache.attach(reader)
    try:
        yield Pair(KeyScheme(namespace), writer_cache, reader_cache, writer, reader)
    finally:
        writer_cache.detach()
        reader_cache.detach()


def db_name(engine: sa.Engine, cid: int) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(sa.text("SELECT name FROM categories WHERE id = :i"), {"i": cid}))


def on_node(node: Any, *command: Any) -> Any:
    """One command on a plain connection to ``node`` (redis-py leaves it unannotated)."""
    with contextlib.closing(node.admin()) as admin:
        return admin.execute_command(*command)


def start_moving(cluster: RedisCluster, slot: int, moved: Callable[[str], bool]) -> Any:
    """Put ``slot`` half way to another primary: importing there, migrating here, and only
    its keys for which ``moved(key)`` moved; the target."""
    source = cluster.owner_of(slot)
    target = next(p for p in cluster.primaries() if p.node_id != source.node_id)
    found = on_node(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    present = [k.decode() for k in found if moved(k.decode())]
    assert present, found
    assert len(present) < len(found), found  # really split in two
    on_node(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    on_node(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    on_node(source, "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *present)
    return target


@pytest.mark.parametrize("moved", ["version", "all-but-version"])
def test_a_slot_held_half_moved_degrades_to_the_database_and_never_serves_a_stale_read(
    own_cluster: RedisCluster, shop_engine: sa.Engine, category: int, moved: str
) -> None:
    """The table's keys split between the two nodes of a migrating slot: every multi-key
    script on them gets ``TRYAGAIN`` for as long as the migration lasts. Reads must come
    from the database (not raise), a commit must not raise, and no process (this one,
    or another that filled the entry before) may serve the old name after the commit,
    during the migration or after it ends."""
    cluster = own_cluster
    with writer_and_reader(cluster, shop_engine, local=False) as pair:
        keys, writer, reader = pair.keys, pair.writer, pair.reader
        first = db_name(shop_engine, category)
        assert read_name(reader, category) == first  # filled
        assert read_name(reader, category) == first  # served
        assert read_name(writer, category) == first
        slot = cluster.slot_of(keys.version_key("categories"))
        version = keys.version_key("categories")
        target = start_moving(cluster, slot, lambda k: (k == version) == (moved == "version"))
        assert read_name(reader, category) == first
        rename(writer, category, f"{first}-renamed")
        assert db_name(shop_engine, category) == f"{first}-renamed"
        for made in (writer, reader):
            assert read_name(made, category) == f"{first}-renamed"
        cluster.reshard([slot], target)  # the rest of the keys, then NODE everywhere
        for made in (writer, reader, writer, reader):
            assert read_name(made, category) == f"{first}-renamed"


# --------------------------------------------------------------- a failover that loses a write


@pytest.fixture
def fresh_cluster() -> Iterator[RedisCluster]:
    """3 primaries with a replica each, for one test that kills a primary."""
    with RedisCluster(primaries=3, replicas=1, appendonly=False, node_timeout_ms=1000) as made:
        yield made


def connect_to_replica(cluster: RedisCluster, client: Any, replica: Any) -> None:
    """Once ``replica`` holds data the slot map lists it (a refresh may then ask it):
    ``client``, a synchronous cluster client, opens a connection to it."""

    def listed() -> bool:
        client.nodes_manager.initialize()
        return client.get_node(*replica.address) is not None

    cluster._wait("the replica to be listed", listed)
    assert client.get_redis_connection(client.get_node(*replica.address)).ping()


def categories_shard(cluster: RedisCluster) -> tuple[str, int, Any, Any]:
    """A fresh namespace, the slot of its ``categories`` counters, that slot's primary
    and the primary's one replica."""
    namespace = f"rv{secrets.token_hex(4)}"
    slot = cluster.slot_of(KeyScheme(namespace).version_key("categories"))
    primary = cluster.owner_of(slot)
    (replica,) = cluster.replicas_of(primary)
    return namespace, slot, primary, replica


@pytest.mark.parametrize(
    "reader_kind",
    [
        "sync",
        "async",
        "sync, connected before",
        "sync, knew the replica",
        "async, knew the replica",
    ],
)
def test_a_failover_that_lost_the_commits_bump_serves_no_entry_older_than_the_commit(
    fresh_cluster: RedisCluster,
    shop_engine: sa.Engine,
    database_url: str,
    category: int,
    reader_kind: str,
) -> None:
    """The replica misses the commit's bump (its link was cut before), then the primary
    dies and the replica is elected: the promoted node holds the entry and the counter as
    they were before the commit. A process that saw the old primary (the writer, and a
    reader that filled the entry, with a ``Session`` or an ``AsyncSession`` on one event
    loop throughout) must notice the slot changed hands and not serve the entry
    (docs/guarantees.md, "Failovers and restarts: per-slot owners").

    Two synchronous readers whose client's connections the cache never checked: one
    whose client was connected to the slot's primary before the cache was made, and one
    whose client kept a connection to the replica (a slot map refresh asks any node). The
    first read after the failover reaches the promoted node on a connection opened before
    it, inside redis-py's own retry of the read."""
    import os
    import signal

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from examples.shop import Category
    from sa_redis_cache import FromCache
    from tests.modes import async_url

    cluster = fresh_cluster
    namespace, slot, primary, replica = categories_shard(cluster)
    writer_cache = Cache(cluster.url, namespace=namespace)
    # redis-py 8 refreshes its slot map after a failed node only once per interval: with
    # none, the first read after the failover refreshes and retries inside its command
    refreshes = inspect.signature(redis.cluster.RedisCluster).parameters
    options: dict[str, Any] = (
        {"topology_refresh_min_interval": 0} if "topology_refresh_min_interval" in refreshes else {}
    )
    # the asyncio client is closed on the event loop that used it
    aclient: Any = async_client_from_url(cluster.url, **options)
    seed = primary if reader_kind == "sync, connected before" else cluster.live_nodes()[0]
    sync_client: Any = redis.cluster.RedisCluster(seed.host, seed.port, **options)
    if reader_kind == "sync, connected before":
        assert sync_client.ping()  # the application used its client before making the cache
    reader_cache = Cache(sync_client, async_client=aclient, namespace=namespace)
    writer: sessionmaker[Session] = sa.orm.sessionmaker(shop_engine)
    reader: sessionmaker[Session] = sa.orm.sessionmaker(shop_engine)
    async_engine = create_async_engine(async_url(database_url))
    async_reader = async_sessionmaker(async_engine)
    writer_cache.attach(writer)
    reader_cache.attach(async_reader if reader_kind.startswith("async") else reader)
    first = db_name(shop_engine, category)

    async def read() -> str:
        if reader_kind.startswith("sync"):
            return read_name(reader, category)
        statement = select(Category.name).where(Category.id == category).options(FromCache())
        async with async_reader() as s:
            return str((await s.scalars(statement)).one())

    def lose_the_bump_and_fail_over() -> None:
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            on_node(primary, "CLIENT", "KILL", "TYPE", "replica")
            rename(writer, category, f"{first}-renamed")
            written = int(on_node(primary, "INFO", "replication")["master_repl_offset"])
            primary.kill()
        finally:
            os.kill(replica.pid, signal.SIGCONT)

        # (not cluster.failover: CLUSTER SLOTS no longer lists a replica whose link is down)
        def elected() -> bool:
            try:
                return bool(cluster.owner_of(slot).node_id == replica.node_id)
            except KeyError:  # no node serves the slot yet
                return False

        cluster._wait("the replica to be elected", elected)
        cluster.wait_ok()
        # the promoted node took over short of the commit's writes (its new history starts
        # at the offset it had reached): the entry's stamp matched its counter again
        taken_over = int(on_node(replica, "INFO", "replication")["second_repl_offset"])
        assert taken_over - 1 < written
        assert db_name(shop_engine, category) == f"{first}-renamed"

    async def scenario() -> list[str]:
        seen = []
        try:
            assert await read() == first  # filled
            assert await read() == first  # served
            assert read_name(writer, category) == first
            if reader_kind == "sync, knew the replica":
                connect_to_replica(cluster, sync_client, replica)
            if reader_kind == "async, knew the replica":
                deadline = asyncio.get_running_loop().time() + 30
                while aclient.get_node(*replica.address) is None:
                    assert asyncio.get_running_loop().time() < deadline, "replica never listed"
                    await asyncio.sleep(0.05)  # polled: the primary gossips its replica's offset
                    await aclient.nodes_manager.initialize()
                assert await aclient.execute_command(
                    "PING", target_nodes=aclient.get_node(*replica.address)
                )
            await asyncio.to_thread(lose_the_bump_and_fail_over)
            for _ in range(2):
                seen.append(await read())
                seen.append(read_name(writer, category))
        finally:
            writer_cache.detach()
            reader_cache.detach()
            await aclient.aclose()
            sync_client.close()
            await async_engine.dispose()
        return seen

    assert asyncio.run(scenario()) == [f"{first}-renamed"] * 4


def test_a_moved_from_the_old_primary_after_a_lossy_failover_serves_no_older_entry(
    fresh_cluster: RedisCluster, shop_engine: sa.Engine, category: int
) -> None:
    """The replica misses a commit's bump and is elected while its primary is stopped;
    the old primary comes back a replica and answers the reader's next read with
    ``MOVED``. redis-py moves that one slot (no refresh of the whole map) and sends the
    read to the promoted node, on a connection the reader opened while it was a replica:
    the read must not serve the entry the commit retired."""
    import os
    import signal

    cluster = fresh_cluster
    namespace, slot, primary, replica = categories_shard(cluster)
    assert primary.pid is not None
    assert replica.pid is not None
    writer_cache = Cache(cluster.url, namespace=namespace)
    seed = cluster.live_nodes()[0]
    sync_client: Any = redis.cluster.RedisCluster(seed.host, seed.port)
    reader_cache = Cache(sync_client, namespace=namespace)
    writer: sessionmaker[Session] = sa.orm.sessionmaker(shop_engine)
    reader: sessionmaker[Session] = sa.orm.sessionmaker(shop_engine)
    writer_cache.attach(writer)
    reader_cache.attach(reader)
    try:
        first = db_name(shop_engine, category)
        assert read_name(reader, category) == first  # filled
        assert read_name(reader, category) == first  # served
        connect_to_replica(cluster, sync_client, replica)
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            on_node(primary, "CLIENT", "KILL", "TYPE", "replica")
            rename(writer, category, f"{first}-renamed")
            os.kill(primary.pid, signal.SIGSTOP)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        try:

            def elected() -> bool:  # asked of the replica: the stopped primary answers none
                return any(
                    owner.start <= slot <= owner.end and owner.primary == replica.node_id
                    for owner in cluster.slot_owners(via=replica)
                )

            cluster._wait("the replica to be elected", elected)
        finally:
            os.kill(primary.pid, signal.SIGCONT)  # back as a replica: it answers MOVED
        cluster.wait_ok()
        assert db_name(shop_engine, category) == f"{first}-renamed"
        assert read_name(reader, category) == f"{first}-renamed"
        assert read_name(reader, category) == f"{first}-renamed"
    finally:
        writer_cache.detach()
        reader_cache.detach()
        sync_client.close()


# --------------------------------------------------------------------------- the local tier


def local_hits(cache: Cache) -> int:
    return int(cache.stats()["total"]["local_hits"])


def ready(*caches: Cache) -> bool:
    """Every cache's local tier tracks every primary (its set-up runs on its own thread)."""
    tiers = [cache.inspector.local_tier for cache in caches]
    return all(tier is not None and tier.wait_ready(10.0) for tier in tiers)


def test_a_local_entry_is_dropped_by_a_commit_after_its_slot_moved(
    own_cluster: RedisCluster, shop_engine: sa.Engine, category: int
) -> None:
    """A reader's local tier holds the category; the table's slot moves to another
    primary (every key with it); a writer then commits a rename, which the new owner
    reports. The reader must read the new name, from its tier or not, and its tier must
    serve again once it tracks the new owner."""
    cluster = own_cluster
    with writer_and_reader(cluster, shop_engine, local=True) as pair:
        keys, writer, reader = pair.keys, pair.writer, pair.reader
        assert ready(pair.reader_cache, pair.writer_cache)
        name = db_name(shop_engine, category)
        assert read_name(reader, category) == name
        hits = local_hits(pair.reader_cache)
        assert read_name(reader, category) == name
        assert read_name(reader, category) == name
        assert local_hits(pair.reader_cache) > hits  # the tier serves it
        slot = cluster.slot_of(keys.version_key("categories"))
        source = cluster.owner_of(slot)
        target = next(p for p in cluster.primaries() if p.node_id != source.node_id)
        for n in range(2):  # there and back: the second move returns to a tracked node
            cluster.reshard([slot], target if n == 0 else source)
            name = rename(writer, category, f"{name}-{n}")
            for _ in range(3):
                assert read_name(reader, category) == name
        assert ready(pair.reader_cache)  # tracking the slot's owner again
        hits = local_hits(pair.reader_cache)
        for _ in range(3):
            assert read_name(reader, category) == name
        assert local_hits(pair.reader_cache) > hits  # serving again after the moves


# ----------------------------------------------------------------------- write-behind mid-move


def test_a_write_behind_commit_on_a_slot_held_half_moved_is_all_or_nothing(
    own_cluster: RedisCluster, engine: sa.Engine, database_url: str
) -> None:
    """The queue's slot is half moved (its stream on the target, the rest on the source):
    ``wb_enqueue.lua`` gets ``TRYAGAIN`` until the move ends. A commit meanwhile either
    queues every write or raises ``CacheUnavailableError`` having queued none; once the
    slot has moved, commits queue again and the worker flushes exactly the acknowledged
    writes, once each."""
    from sa_redis_cache import CacheUnavailableError

    cluster = own_cluster
    with queued_on(cluster, engine, database_url) as queued:
        namespace, page_view, made, worker = (
            queued.namespace,
            queued.page_view,
            queued.made,
            queued.worker,
        )
        acknowledged: set[Any] = set()
        refused = 0

        def commit(path: str) -> None:
            nonlocal refused
            with made() as s:
                views = [page_view(path=f"{path}/{n}", views=n) for n in range(3)]
                s.add_all(views)
                try:
                    s.commit()
                except CacheUnavailableError:
                    refused += 1
                    return
                acknowledged.update(v.id for v in views)

        commit("/before")
        keys = KeyScheme(namespace)
        slot = cluster.slot_of(keys.generation_key(page_view.__table__.name))
        target = start_moving(cluster, slot, lambda k: ":wb:" in k)
        for n in range(3):
            commit(f"/during-{n}")
        cluster.reshard([slot], target)
        commit("/after")

        # a partition that failed mid-move waits out its backoff (time-based): polled
        def drained() -> bool:
            worker.run_once()
            return not worker.backlog()

        cluster._wait("the worker to drain the queue", drained)
        flushed = count_rows(engine, page_view)
        assert set(flushed) >= acknowledged  # none lost
        # a refused commit queued nothing: every row flushed was acknowledged
        assert set(flushed) == acknowledged, (refused, len(flushed), len(acknowledged))
        assert len(acknowledged) % 3 == 0


@pytest.mark.parametrize("moved", ["generation", "version"])
def test_a_local_entry_is_not_served_after_a_commit_made_while_its_slot_is_half_moved(
    own_cluster: RedisCluster, shop_engine: sa.Engine, category: int, moved: str
) -> None:
    """The table's slot is half moved (one counter on the target, the rest on the
    source) when a writer commits: its flush mark and commit script get ``TRYAGAIN``. A
    reader whose local tier holds the category must not serve the old name afterwards."""
    cluster = own_cluster
    with writer_and_reader(cluster, shop_engine, local=True) as pair:
        keys, writer, reader = pair.keys, pair.writer, pair.reader
        assert ready(pair.reader_cache, pair.writer_cache)
        name = db_name(shop_engine, category)
        # a commit makes the table's generation key exist
        name = rename(writer, category, f"{name}-0")
        for _ in range(3):
            assert read_name(reader, category) == name
        assert local_hits(pair.reader_cache) > 0
        slot = cluster.slot_of(keys.version_key("categories"))
        one = (
            keys.generation_key("categories")
            if moved == "generation"
            else keys.version_key("categories")
        )
        target = start_moving(cluster, slot, lambda k: k == one)
        try:
            name = rename(writer, category, f"{name}-1")
            assert db_name(shop_engine, category) == name
            for _ in range(3):
                assert read_name(reader, category) == name
        finally:
            cluster.reshard([slot], target)
        for _ in range(3):
            assert read_name(reader, category) == name


@pytest.mark.parametrize("moved", [":v", ":e:", ":rw:", ":q:"])
def test_write_through_on_a_slot_held_half_moved_serves_no_stale_price(
    own_cluster: RedisCluster, shop_engine: sa.Engine, category: int, moved: str
) -> None:
    """As above for a write-through table read by primary key (the entity cache) and by
    statement: the commit's store after the database commit meets ``TRYAGAIN``; neither
    the writer nor another process may serve the old price afterwards."""
    from decimal import Decimal

    from examples.shop import Product
    from sa_redis_cache import FromCache

    with sa.orm.Session(shop_engine) as s:
        p = Product(category_id=category, name="half moved", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        pid = p.id
    cluster = own_cluster
    namespace = f"rv{secrets.token_hex(4)}"
    keys = KeyScheme(namespace)
    caches = [Cache(cluster.url, namespace=namespace) for _ in range(2)]
    makers: list[sessionmaker[Session]] = [sa.orm.sessionmaker(shop_engine) for _ in caches]
    for cache, made in zip(caches, makers, strict=True):
        cache.attach(made)

    def prices() -> list[Decimal]:
        seen = []
        for made in makers:
            with made() as s:
                got = s.get(Product, pid)
                assert got is not None
                seen.append(got.price)
            with made() as s:
                statement = select(Product.price).where(Product.id == pid).options(FromCache())
                seen.append(s.scalars(statement).one())
        return seen

    try:
        for _ in range(2):
            assert prices() == [Decimal("1.00")] * 4  # filled, then served
        slot = cluster.slot_of(keys.version_key("products"))
        target = start_moving(cluster, slot, lambda k: moved in k)
        try:
            with makers[0]() as s:
                got = s.get(Product, pid)
                assert got is not None
                got.price = Decimal("2.00")
                s.commit()
            assert prices() == [Decimal("2.00")] * 4
        finally:
            cluster.reshard([slot], target)
        assert prices() == [Decimal("2.00")] * 4
        assert prices() == [Decimal("2.00")] * 4
    finally:
        for cache in caches:
            cache.detach()
        with sa.orm.Session(shop_engine) as s:
            s.execute(sa.delete(Product).where(Product.id == pid))
            s.commit()


def test_the_worker_and_commits_during_a_reshard_of_the_queues_slot_lose_and_repeat_nothing(
    own_cluster: RedisCluster, engine: sa.Engine, database_url: str
) -> None:
    """The slot of a write-behind table's queue moves a few keys at a time; after every
    batch (``ASK`` and ``TRYAGAIN`` meanwhile) a commit is made and the worker runs a pass.
    Postgres must end with exactly the acknowledged writes: none lost, none twice, no
    dead letter."""
    from sa_redis_cache import CacheUnavailableError
    from sa_redis_cache.schema import dead_letters

    cluster = own_cluster
    with queued_on(cluster, engine, database_url, batch_size=3, max_backoff=0.05) as queued:
        namespace, page_view, made, worker = (
            queued.namespace,
            queued.page_view,
            queued.made,
            queued.worker,
        )
        acknowledged: dict[Any, int] = {}
        refused = 0

        def commit(n: int) -> None:
            nonlocal refused
            with made() as s:
                view = page_view(path=f"/p/{n}", views=n)
                s.add(view)
                try:
                    s.commit()
                except CacheUnavailableError:
                    refused += 1
                    return
                acknowledged[view.id] = n

        counter = iter(range(10_000))

        def between(slot: int) -> None:
            commit(next(counter))
            worker.run_once()

        for _ in range(12):
            commit(next(counter))
        worker.run_once()  # a few applied, the rest still queued
        slot = cluster.slot_of(KeyScheme(namespace).generation_key(page_view.__table__.name))
        source = cluster.owner_of(slot)
        target = next(p for p in cluster.primaries() if p.node_id != source.node_id)
        cluster.reshard([slot], target, batch=4, between_batches=between)
        for _ in range(3):
            commit(next(counter))

        # a partition that failed during the reshard waits out its backoff (time-based):
        # polled until the worker has drained the queue
        def drained() -> bool:
            worker.run_once()
            return not worker.backlog()

        cluster._wait("the worker to drain the queue", drained)
        flushed = {pk: row[1] for pk, row in count_rows(engine, page_view).items()}
        assert refused < len(acknowledged)  # the reshard did not refuse everything
        assert flushed == acknowledged, f"{refused} refused"
        with engine.connect() as conn:
            dead = conn.scalar(
                select(sa.func.count())
                .select_from(dead_letters)
                .where(dead_letters.c.namespace == namespace)
            )
        assert dead == 0


@pytest.mark.parametrize(
    ("moved", "kind"), [("version", "sync"), ("all-but-version", "sync"), ("version", "async")]
)
def test_clear_on_a_slot_held_half_moved_leaves_no_entry_it_returned_over(
    own_cluster: RedisCluster, shop_engine: sa.Engine, category: int, moved: str, kind: str
) -> None:
    """The database changed behind the cache (a restored backup), and ``cache.clear()`` runs
    while a table's slot is half moved. When ``clear()`` returns, no process may serve the
    old name. (It raised redis-py's ``ClusterError`` "TTL exhausted": one ``UNLINK`` over
    keys of the slot on both nodes gets ``TRYAGAIN`` until the migration ends.)"""
    cluster = own_cluster
    namespace = f"rv{secrets.token_hex(4)}"
    keys = KeyScheme(namespace)
    aclient = async_client_from_url(cluster.url) if kind == "async" else None
    caches = [
        Cache(client_from_url(cluster.url), async_client=aclient, namespace=namespace),
        Cache(cluster.url, namespace=namespace),
    ]
    makers: list[sessionmaker[Session]] = [sa.orm.sessionmaker(shop_engine) for _ in caches]
    for cache, made in zip(caches, makers, strict=True):
        cache.attach(made)

    async def aclear() -> None:
        try:
            await caches[0].aclear()
        finally:
            assert aclient is not None
            await aclient.aclose()

    try:
        first = db_name(shop_engine, category)
        for made in makers * 2:
            assert read_name(made, category) == first
        slot = cluster.slot_of(keys.version_key("categories"))
        version = keys.version_key("categories")
        target = start_moving(cluster, slot, lambda k: (k == version) == (moved == "version"))
        try:
            with shop_engine.begin() as conn:
                conn.execute(
                    sa.text("UPDATE categories SET name = name || '-restored' WHERE id = :i"),
                    {"i": category},
                )
            if kind == "sync":
                caches[0].clear()
            else:
                asyncio.run(aclear())
        finally:
            cluster.reshard([slot], target)
        for made in makers * 2:
            assert read_name(made, category) == f"{first}-restored"
    finally:
        for cache in caches:
            cache.detach()
