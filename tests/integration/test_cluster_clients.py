"""Redis Cluster clients: what ``Cache``, the command line and the worker accept today.

Phase 1 of the cluster support (docs/cluster.md): a cache is made on a cluster client (or
a ``?cluster=true`` URL), every node's connections are watched for restarts, including
nodes found later, and what still needs the cluster protocol refuses clearly.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import TYPE_CHECKING, NoReturn

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from click.testing import CliRunner

from devservices.cluster import RedisCluster
from sa_redis_cache import Cache, ConfigurationError, FlushWorker
from sa_redis_cache.cli import cli
from sa_redis_cache.cli.admin import worker_main
from tests.wb_support import private_models

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import sqlalchemy as sa


@pytest.fixture(scope="module")
def live_cluster(unavailable: Callable[[str], NoReturn]) -> Iterator[RedisCluster]:
    """One cluster for the module (a failover test leaves it ok, with other primaries)."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    with RedisCluster(primaries=3, replicas=1, appendonly=False) as made:
        yield made


def keys_on_every_primary(cluster: RedisCluster, namespace: str) -> list[str]:
    """One key per primary (hash tags chosen so that each lands on another node)."""
    found: dict[int, str] = {}
    for i in range(1000):
        key = f"sarc:{namespace}:{{t{i}}}:k"
        found.setdefault(cluster.owner_of(cluster.slot_of(key)).port, key)
        if len(found) == len(cluster.primaries()):
            break
    return list(found.values())


def test_a_cluster_url_makes_cluster_clients(live_cluster: RedisCluster, namespace: str) -> None:
    cache = Cache(live_cluster.url, namespace=namespace)
    try:
        assert isinstance(cache.client, redis.cluster.RedisCluster)
        clients = cache._core.async_clients
        assert clients is not None

        async def made() -> object:
            client = clients.current().client
            await client.ping()
            await cache.aclose()
            return client

        assert isinstance(asyncio.run(made()), redis.asyncio.cluster.RedisCluster)
    finally:
        cache.client.close()


def test_cluster_clients_given_are_taken_and_checked(
    live_cluster: RedisCluster, namespace: str
) -> None:
    client = live_cluster.client()
    host, port = live_cluster.live_addresses()[0]
    aclient = redis.asyncio.cluster.RedisCluster(host=host, port=port)
    try:
        cache = Cache(client, async_client=aclient, namespace=namespace)
        assert cache.client is client
        with pytest.raises(ConfigurationError, match="same Redis"):
            Cache(client, async_client=redis.asyncio.Redis(), namespace=namespace)
        with pytest.raises(ConfigurationError, match="same Redis"):
            Cache(redis.Redis(), async_client=aclient, namespace=namespace)
        with pytest.raises(ConfigurationError, match="asyncio client as async_client"):
            Cache(aclient, namespace=namespace)  # type: ignore[arg-type]
        decoding = live_cluster.client(decode_responses=True)
        with pytest.raises(ConfigurationError, match="decode_responses"):
            Cache(decoding, namespace=namespace)
        decoding.close()
        adecoding = redis.asyncio.cluster.RedisCluster(host=host, port=port, decode_responses=True)
        with pytest.raises(ConfigurationError, match="decode_responses"):
            Cache(client, async_client=adecoding, namespace=namespace)
    finally:
        client.close()


def test_a_bad_cluster_parameter_is_named_without_the_password(namespace: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Cache("redis://app:s3cret-pw@127.0.0.1:1/0?cluster=maybe", namespace=namespace)
    message = str(raised.value)
    assert "cluster='maybe' is not a boolean" in message
    assert "cluster=true" in message
    assert "s3cret-pw" not in message


def test_attach_takes_a_cluster_and_checks_every_primary_for_write_behind(
    live_cluster: RedisCluster, namespace: str, shop_engine: sa.Engine
) -> None:
    from sqlalchemy.orm import sessionmaker

    cache = Cache(live_cluster.url, namespace=namespace)
    try:
        factory = sessionmaker(shop_engine)
        cache.attach(factory)  # reads, cache-aside and write-through run on a cluster
        cache.detach()
        FlushWorker(shop_engine, cache.client, namespace=namespace, models=[]).release()
        with private_models() as (page_view, _):
            with pytest.raises(ConfigurationError) as refused:
                cache.attach(factory)
            # this cluster keeps no AOF: each primary is named (write-behind runs on a
            # cluster with AOF: tests/integration/test_write_behind_cluster.py)
            for node in live_cluster.primaries():
                assert f"{page_view.__name__}: Redis Cluster node {node.host}:{node.port}: " in (
                    str(refused.value)
                )
        # the local tier runs on a cluster (tests/integration/test_local_tier.py)
        local = Cache(live_cluster.url, namespace=namespace, local=True)
        try:
            local.attach(factory)
            tier = local.inspector.local_tier
            assert tier is not None
            assert tier.wait_ready(10.0)
            assert len(tier._listener._links) == len(live_cluster.primaries())
        finally:
            local.detach()
            local.client.close()

        # a cached function keeps one key per call: it works on a cluster already
        calls: list[int] = []

        @cache.cached("square")
        def square(n: int) -> int:
            calls.append(n)
            return n * n

        for _ in range(2):
            assert [square(n) for n in range(20)] == [n * n for n in range(20)]
        assert calls == list(range(20))  # the second round came from the cluster
    finally:
        cache.client.close()


def test_the_command_line_and_the_worker_take_a_cluster_url(
    live_cluster: RedisCluster,
    namespace: str,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = live_cluster.url.replace("redis://", "redis://default:s3cret-pw@")
    # stats, inspect and invalidate run on a cluster (tests/integration/test_cli_cluster.py)
    result = CliRunner().invoke(cli, ["--redis-url", url, "--namespace", namespace, "stats"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output

    code = worker_main(
        [
            *("--database-url", database_url, "--redis-url", url),
            # a module imported already: a write-behind one would stay mapped, and every
            # later attach() of this process would check it
            *("--namespace", namespace, "--model", "examples.shop:Product"),
        ]
    )
    assert code == 2  # Product is not a write-behind model: the cluster itself is taken
    err = capsys.readouterr().err
    assert "Product" in err
    assert "Redis Cluster" not in err
    assert "s3cret-pw" not in err

    dead = "redis://default:s3cret-pw@127.0.0.1:1/0?cluster=true"
    result = CliRunner().invoke(cli, ["--redis-url", dead, "--namespace", namespace, "stats"])
    assert result.exit_code == 1, result.output
    assert "cannot reach Redis" in result.output
    assert "s3cret-pw" not in result.output


def test_every_node_connection_is_watched_including_a_promoted_replica(
    live_cluster: RedisCluster, namespace: str
) -> None:
    cache = Cache(live_cluster.client(), namespace=namespace)
    core = cache._core
    keys = keys_on_every_primary(live_cluster, namespace)
    try:
        for key in keys:
            cache.client.set(key, b"1", px=60_000)
        primaries = {f"{n.host}:{n.port}" for n in live_cluster.primaries()}
        assert primaries <= set(core.node_run_ids)
        assert core.restarts_seen == 0  # several nodes, several run ids: no restart

        old = live_cluster.owner_of(live_cluster.slot_of(keys[0]))
        promoted = live_cluster.failover(old)
        assert cache.client.get(keys[0]) == b"1"  # MOVED, the new owner found
        assert f"{promoted.host}:{promoted.port}" in core.node_run_ids
        # the promoted replica serves slots another primary served: a restart of those
        assert core.restarts_seen == 1
    finally:
        cache.client.close()


def test_the_asyncio_cluster_client_watches_every_node_too(
    live_cluster: RedisCluster, namespace: str
) -> None:
    cache = Cache(live_cluster.url, namespace=namespace)
    keys = keys_on_every_primary(live_cluster, namespace)

    async def touch() -> None:
        client = cache._core.async_client()
        for key in keys:
            await client.set(key, b"1", px=60_000)
        await cache.aclose()

    try:
        asyncio.run(touch())
        primaries = {f"{n.host}:{n.port}" for n in live_cluster.primaries()}
        assert primaries <= set(cache._core.node_run_ids)
    finally:
        cache.client.close()


def test_a_restarted_node_is_a_restart(
    namespace: str, caplog: pytest.LogCaptureFixture, unavailable: Callable[[str], NoReturn]
) -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    with RedisCluster(primaries=3, replicas=0, appendonly=True) as cluster:
        cache = Cache(cluster.client(), namespace=namespace)
        keys = keys_on_every_primary(cluster, namespace)
        try:
            for key in keys:
                cache.client.set(key, b"1")
            node = cluster.owner_of(cluster.slot_of(keys[0]))
            node.stop()
            cluster.restart_node(node)
            with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
                # the client's old connection fails once; redis-py reconnects (the hook runs)
                for _ in range(3):
                    try:
                        assert cache.client.get(keys[0]) == b"1"
                        break
                    except redis.ConnectionError:
                        continue
            assert cache._core.restarts_seen == 1
            told = [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()]
            assert len(told) == 1
            assert f"{node.host}:{node.port}" in told[0]
        finally:
            cache.client.close()
