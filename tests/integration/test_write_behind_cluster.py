"""Write-behind on a Redis Cluster (docs/cluster.md#write-behind): a commit is queued in its
slot with one ``wb_enqueue.lua`` call on the slot's primary, ``WAIT``s there for the
shard's replicas, and the worker drains the streams of every node.

The cluster has AOF on (``attach()`` demands it of every primary for write-behind
models: ``aof_cluster`` of :mod:`tests.wb_fixtures`). The commit scenarios run with a
``Session`` and an ``AsyncSession`` (``cluster-sync``, ``cluster-async``:
:mod:`tests.modes`); in the async mode any round trip of the synchronous client fails the
test, so the enqueue and its ``WAIT`` are proven to await the asyncio client.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from devservices import RedisCluster
from sa_redis_cache import Cache, ConfigurationError, FlushWorker, cluster_io
from sa_redis_cache.errors import CacheUnavailableError, NotReplicatedError
from sa_redis_cache.protocol.keys import KeyScheme
from sa_redis_cache.strategies.write_behind import session as wb_session
from tests.modes import CLUSTER_MODES, Runner
from tests.wb_support import drain, rows

if TYPE_CHECKING:
    from tests.modes import Db


pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture
def wb_redis_url(aof_cluster: RedisCluster) -> str:
    """``client``, ``factory`` and the workers here are on the cluster with AOF."""
    return aof_cluster.url


@pytest.fixture(params=CLUSTER_MODES)
def on_cluster(
    request: pytest.FixtureRequest,
    database_url: str,
    aof_cluster: RedisCluster,
    namespace: str,
    shop_engine: sa.Engine,
) -> Runner:
    return Runner(request.param, database_url, aof_cluster.url, namespace)


def stream_owner(cluster: RedisCluster, namespace: str, table: str) -> Any:
    """The primary that holds ``table``'s streams (every key of a table shares its slot)."""
    return cluster.owner_of(cluster.slot_of(KeyScheme(namespace).generation_key(table)))


def test_a_commit_is_queued_read_back_and_flushed_by_a_worker_on_the_cluster(
    on_cluster: Runner, models: Any, engine: sa.Engine, client: Any, namespace: str
) -> None:
    page_view, _ = models

    def scenario(db: Db) -> list[uuid.UUID]:
        with db.session() as s:
            views = [page_view(path=f"/p/{n}", views=n) for n in range(5)]
            s.add_all(views)
            s.commit()
            ids = [v.id for v in views]
        with db.session() as s:
            # served from the pending keys: the database has no row yet
            assert s.get(page_view, ids[3]).views == 3
        assert db.sql.statements == []
        return ids

    ids, _ = on_cluster(scenario)
    assert rows(engine, page_view) == {}
    worker = FlushWorker(engine, client, namespace=namespace, models=[page_view])
    try:
        assert drain(worker) == 5
    finally:
        worker.release()
    assert rows(engine, page_view) == {pk: (f"/p/{n}", n) for n, pk in enumerate(ids)}


def test_a_commit_writing_tables_of_two_slots_is_refused_at_flush_before_anything_is_queued(
    factory: sessionmaker[Session], models: Any, client: Any, namespace: str, engine: sa.Engine
) -> None:
    page_view, stock_level = models
    keys = KeyScheme(namespace)
    slots = {client.keyslot(keys.generation_key(m.__table__.name)) for m in models}
    assert len(slots) == 2  # the two tables' tags hash apart (true of almost every namespace)
    with factory() as s:
        s.add(page_view(path="/a"))
        s.add(stock_level(warehouse="north", quantity=1))
        with pytest.raises(ConfigurationError) as refused:
            s.flush()
    message = str(refused.value)
    assert "PageView, StockLevel" in message
    assert "CachePolicy(slot_group=...)" in message
    assert list(client.scan_iter(match=f"sarc:{namespace}:*")) == []
    # one table per transaction is one slot: queued
    with factory() as s:
        s.add(page_view(path="/b"))
        s.commit()
    with factory() as s:
        s.add(stock_level(warehouse="south", quantity=2))
        s.commit()
    assert rows(engine, page_view) == {}


def test_a_commit_raises_when_the_replica_of_its_shard_does_not_confirm_and_stays_queued(
    factory: sessionmaker[Session],
    models: Any,
    aof_cluster: RedisCluster,
    client: Any,
    namespace: str,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``WAIT`` follows the enqueue on the connection that ran it: on any other
    connection (or on every node, as a cluster pipeline sends a keyless command) it
    would answer at once with the connected replica, and the commit would return."""
    page_view, _ = models
    owner = stream_owner(aof_cluster, namespace, page_view.__table__.name)
    (replica,) = aof_cluster.replicas_of(owner)
    with factory() as s:
        s.add(page_view(path="/copied", views=1))
        s.commit()  # the replica runs: confirmed
    pid = replica.pid
    assert pid is not None
    monkeypatch.setattr(wb_session, "DURABLE_WAIT_S", 0.5)  # the wait that must time out
    os.kill(pid, signal.SIGSTOP)
    try:
        with factory() as s:
            view = page_view(path="/not-copied", views=2)
            s.add(view)
            with pytest.raises(NotReplicatedError, match="fewer than the 1 replica"):
                s.commit()
            assert view.views == 2  # queued all the same: the object keeps its state
            pk = view.id
    finally:
        os.kill(pid, signal.SIGCONT)
    worker = FlushWorker(engine, client, namespace=namespace, models=[page_view])
    try:
        drain(worker)
    finally:
        worker.release()
    assert rows(engine, page_view)[pk] == ("/not-copied", 2)
    assert len(rows(engine, page_view)) == 2


def test_after_a_failover_the_commit_waits_for_the_new_primarys_replica(
    factory: sessionmaker[Session],
    models: Any,
    aof_cluster: RedisCluster,
    client: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cache's slot map still names the old primary after a ``CLUSTER FAILOVER``; the
    count of replicas to wait for must be the new primary's, not the demoted node's (a
    replica has none: nothing would be waited for)."""
    page_view, _ = models
    with factory() as s:
        s.add(page_view(path="/before", views=1))
        s.commit()  # the cache's client has learned the slot's primary
    owner = stream_owner(aof_cluster, namespace, page_view.__table__.name)
    promoted = aof_cluster.failover(owner)  # the old primary is now its replica
    assert stream_owner(aof_cluster, namespace, page_view.__table__.name) is promoted
    # the demoted node keeps answering (INFO, MOVED) but stops applying its primary's
    # writes, so a WAIT for it times out
    monkeypatch.setattr(wb_session, "DURABLE_WAIT_S", 0.5)  # the wait that must time out
    owner.admin().execute_command("CLIENT", "PAUSE", 15_000, "WRITE")
    # as a client that has not heard of the failover yet (another process's, say): its map
    # names the demoted node for the slot
    slot = aof_cluster.slot_of(KeyScheme(namespace).generation_key(page_view.__table__.name))
    stale = client.nodes_manager.get_node(host=owner.host, port=owner.port)
    client.nodes_manager.slots_cache[slot] = [stale]
    cluster_io._REPLICAS.clear()  # nor asked any primary how many replicas it has
    try:
        with factory() as s:
            s.add(page_view(path="/after", views=2))
            with pytest.raises(NotReplicatedError):
                s.commit()
    finally:
        owner.admin().execute_command("CLIENT", "UNPAUSE")


def test_a_commit_writing_two_tables_of_one_slot_group_is_queued_and_flushed(
    models: Any,
    client: Any,
    namespace: str,
    engine: sa.Engine,
    worker_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fix the refusal above names: the two tables in one slot group are one slot, so
    one commit writing both is queued in one call, and a worker flushes both."""
    page_view, stock_level = models
    for model in models:
        grouped = dataclasses.replace(model.__cache__, slot_group="stock")
        monkeypatch.setattr(model, "__cache__", grouped)
    cache = Cache(client, namespace=namespace)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        with factory() as s:
            view = page_view(path="/together", views=3)
            level = stock_level(warehouse="east", quantity=4)
            s.add_all([view, level])
            s.commit()
            view_id, level_id = view.id, level.id
        worker = FlushWorker(
            worker_engine, client, namespace=namespace, models=list(models), consumer="w1"
        )
        try:
            assert drain(worker) == 2
        finally:
            worker.release()
        assert rows(engine, page_view) == {view_id: ("/together", 3)}
        with engine.connect() as conn:
            table = stock_level.__table__
            found = conn.execute(sa.select(table.c.quantity).where(table.c.id == level_id))
            assert found.scalar_one() == 4
    finally:
        cache.detach()


def test_a_commit_refused_while_its_slot_is_half_moved_names_the_migration(
    factory: sessionmaker[Session],
    models: Any,
    aof_cluster: RedisCluster,
    client: Any,
    namespace: str,
    engine: sa.Engine,
) -> None:
    """While a reshard holds the table's slot half moved, a commit's enqueue (one script
    over keys of both nodes) gets ``TRYAGAIN`` each time it is sent. The commit is refused
    with nothing queued, and the error says why and what to do: a bare "TRYAGAIN" looked
    like a broken server. Once the slot has moved, the same commit goes through."""
    from tests.integration.test_review_cluster import start_moving

    page_view, _ = models
    keys = KeyScheme(namespace)
    with factory() as s:
        s.add(page_view(path="/before", views=1))
        s.commit()  # the slot holds the table's keys: some can move without the others
    generation = keys.generation_key(page_view.__table__.name)
    slot = aof_cluster.slot_of(generation)
    target = start_moving(aof_cluster, slot, lambda key: key == generation)
    try:
        with factory() as s:
            s.add(page_view(path="/during", views=2))
            with pytest.raises(CacheUnavailableError) as refused:
                s.commit()
    finally:
        aof_cluster.reshard([slot], target)
    message = str(refused.value)
    assert "none of them was queued" in message
    assert "being moved between cluster nodes" in message
    assert "docs/cluster.md" in message
    with factory() as s:
        s.add(page_view(path="/after", views=3))
        s.commit()
    worker = FlushWorker(engine, client, namespace=namespace, models=[page_view])
    try:
        drain(worker)
    finally:
        worker.release()
    assert sorted(path for path, _ in rows(engine, page_view).values()) == ["/after", "/before"]
