"""The local Redis Cluster of devservices/cluster.py: built, resharded and failed over for real.

These test the harness the cluster mode of the suites runs on: a cluster of real
``redis-server`` processes, slots moved with their keys while a client runs (it meets
``ASK`` mid-migration and ``MOVED`` afterwards), and a replica promoted both by
``CLUSTER FAILOVER`` and by killing its primary.
"""

from __future__ import annotations

import shutil
import socket
import threading
from typing import TYPE_CHECKING, NoReturn

import pytest
import redis
from redis.exceptions import AskError, MovedError

from devservices.cluster import SLOTS, RedisCluster

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def number(client: redis.cluster.RedisCluster, key: str) -> int:
    value = client.get(key)
    assert value is not None, key
    return int(value)


def answer(node: redis.Redis, key: str) -> str:
    """What one node says to GET ``key``: its value, or ASK (moved mid-migration)."""
    try:
        node.get(key)
    except AskError:
        return "ask"
    return "value"


def refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def binaries(unavailable: Callable[[str], NoReturn]) -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")


@pytest.fixture
def cluster(binaries: None) -> Iterator[RedisCluster]:
    with RedisCluster(primaries=3, replicas=1, appendonly=False) as made:
        yield made


def test_the_cluster_serves_every_slot_with_a_replica_each_and_goes_away(
    cluster: RedisCluster,
) -> None:
    owners = cluster.slot_owners()
    assert sum(o.end - o.start + 1 for o in owners) == SLOTS
    primaries = cluster.primaries()
    assert len(primaries) == 3
    assert all(len(cluster.replicas_of(p)) == 1 for p in primaries)
    assert {n.role() for n in cluster.nodes} == {"master", "slave"}
    # every node is its own process with its own bus port
    assert len({n.bus_port for n in cluster.nodes} | {n.port for n in cluster.nodes}) == 12

    client = cluster.client()
    try:
        keys = [f"sarc:devservices:{{t{i}}}:k" for i in range(30)]
        assert len({cluster.owner_of(cluster.slot_of(k)).port for k in keys}) == 3
        for i, key in enumerate(keys):
            client.set(key, i)
        assert [number(client, k) for k in keys] == list(range(30))
    finally:
        client.close()

    folders = [n.data_dir for n in cluster.nodes]
    addresses = cluster.startup_nodes
    cluster.close()
    assert not any(folder.exists() for folder in folders)
    assert all(refuses(host, port) for host, port in addresses)


def test_the_url_names_a_live_node_and_asks_for_a_cluster(cluster: RedisCluster) -> None:
    host, port = cluster.live_addresses()[0]
    assert cluster.url == f"redis://{host}:{port}/0?cluster=true"


def test_reshard_moves_a_slot_with_its_keys_while_a_client_runs(cluster: RedisCluster) -> None:
    """Mid-migration a moved key answers ASK on its old node and an unmoved one its value;
    afterwards the old node answers MOVED. A cluster client writing throughout loses
    nothing."""
    tag = "{sarc:reshard}"
    keys = [f"sarc:devservices:{tag}:{i}" for i in range(25)]
    slot = cluster.slot_of(keys[0])
    source = cluster.owner_of(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    client = cluster.client()
    for key in keys:
        client.set(key, 0)

    # a writer that increments every key in turn, from another thread, all along
    stop = threading.Event()
    ran_during_migration = threading.Event()
    migrating = threading.Event()
    errors: list[BaseException] = []
    increments = [0]

    def writer() -> None:
        writer_client = cluster.client()
        try:
            while not stop.is_set():
                for key in keys:
                    writer_client.incr(key)
                    increments[0] += 1
                if migrating.is_set():
                    ran_during_migration.set()
        except BaseException as exc:
            errors.append(exc)
            ran_during_migration.set()
        finally:
            writer_client.close()

    seen: dict[str, int] = {"ask": 0, "value": 0}
    raw = source.admin()

    def between_batches(moving: int) -> None:
        assert moving == slot
        for key in keys:
            seen[answer(raw, key)] += 1
        # the cluster client follows ASK: every key reads, moved or not
        assert all(client.get(key) is not None for key in keys)
        migrating.set()
        assert ran_during_migration.wait(30)  # a full round of writes, mid-migration
        ran_during_migration.clear()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        cluster.reshard([slot], target, batch=10, between_batches=between_batches)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert seen["ask"] > 0
    assert seen["value"] > 0
    assert cluster.owner_of(slot) is target
    with pytest.raises(MovedError):
        raw.get(keys[0])
    assert sum(number(client, k) for k in keys) == increments[0]
    raw.close()
    client.close()


def test_failover_on_command_and_by_killing_the_primary(cluster: RedisCluster) -> None:
    key = "sarc:devservices:{failover}:k"
    slot = cluster.slot_of(key)
    client = cluster.client()
    client.set(key, "before")
    first = cluster.owner_of(slot)
    with first.admin() as admin:
        assert admin.wait(1, 5000) == 1  # the replica has it

    promoted = cluster.failover(first)
    assert promoted is not first
    assert promoted.role() == "master"
    assert first.role() == "slave"  # the old primary follows the new one
    assert client.get(key) == b"before"
    client.set(key, "after manual")
    with promoted.admin() as admin:
        assert admin.wait(1, 5000) == 1

    again = cluster.failover(promoted, kill=True)
    assert again is first
    assert not promoted.running
    assert client.get(key) == b"after manual"

    cluster.restart_node(promoted)  # back as a replica of whoever took its slots
    assert promoted.role() == "slave"
    assert cluster.replicas_of(first) == [promoted]
    client.close()
