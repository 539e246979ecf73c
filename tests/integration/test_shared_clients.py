"""Caches made one after another on one Redis client, as a test suite's fixtures or an
application that re-configures itself do: a cache that was detached and dropped leaves
nothing behind on the client.

Each cache checks the server's run id on every new connection of its client and, on a
Redis Cluster, watches the client's slot map. Those hooks used to pile up: every cache
ever made on the client kept its check (one ``INFO`` per new connection each, forever)
and its slot map watcher, and they kept the dropped cache's whole context alive.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import TYPE_CHECKING, Any

import pytest
import redis

from sa_redis_cache import Cache
from sa_redis_cache.redis_io import async_client_from_url, client_from_url
from tests.seams import RedisTap

if TYPE_CHECKING:
    from collections.abc import Callable

    from devservices.cluster import RedisCluster
    from tests.seams import RoundTrip

DROPPED = 5


def _made_and_dropped(make: Callable[[str], Cache], namespace: str) -> list[weakref.ref[Any]]:
    """``DROPPED`` caches made by ``make``, detached and dropped: weak references to
    their contexts (what their hooks would keep alive)."""
    refs = []
    for number in range(DROPPED):
        cache = make(f"{namespace}-{number}")
        cache.detach()
        refs.append(weakref.ref(cache._core))
        del cache
    gc.collect()
    return refs


def test_dropped_caches_run_no_check_on_a_new_connection_of_their_client(
    redis_url: str, namespace: str
) -> None:
    tap = RedisTap()
    client = tap.client(redis_url)
    refs = _made_and_dropped(lambda ns: Cache(client, namespace=ns), namespace)
    assert [ref() for ref in refs] == [None] * DROPPED
    live = Cache(client, namespace=namespace)
    trips: list[RoundTrip] = []
    tap.listen(trips.append)
    try:
        client.connection_pool.disconnect()
        assert client.ping()
        infos = [trip for trip in trips if trip == [("INFO", "server")]]
        assert len(infos) == 1  # the live cache's check, once
        # the live cache still notices a restart: its check runs and knows the server
        assert live._core.restarts_seen == 0
    finally:
        tap.remove(trips.append)
        live.detach()
        client.close()


def test_dropped_caches_run_no_check_on_a_new_connection_of_their_asyncio_client(
    redis_url: str, namespace: str
) -> None:
    tap = RedisTap()
    client = redis.Redis.from_url(redis_url)
    async_client = tap.async_client(redis_url)

    def make(ns: str) -> Cache:
        return Cache(client, async_client=async_client, namespace=ns)

    refs = _made_and_dropped(make, namespace)
    assert [ref() for ref in refs] == [None] * DROPPED
    live = make(namespace)
    trips: list[RoundTrip] = []
    tap.listen(trips.append)

    async def ping() -> None:
        await async_client.connection_pool.disconnect()
        assert await async_client.ping()
        await async_client.aclose()

    try:
        asyncio.run(ping())
        assert [trip for trip in trips if trip == [("INFO", "server")]] == [[("INFO", "server")]]
    finally:
        live.detach()
        client.close()


@pytest.mark.cluster
@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_dropped_caches_leave_no_watcher_on_a_shared_cluster_client(
    redis_cluster: RedisCluster, namespace: str, kind: str
) -> None:
    """A cluster client's checks (one per node connection) and slot map watchers."""
    client: Any
    if kind == "sync":
        client = client_from_url(redis_cluster.url)

        def make(ns: str) -> Cache:
            return Cache(client, namespace=ns)
    else:
        sync_client = client_from_url(redis_cluster.url)
        client = async_client_from_url(redis_cluster.url)

        def make(ns: str) -> Cache:
            return Cache(sync_client, async_client=client, namespace=ns)

    refs = _made_and_dropped(make, namespace)
    assert [ref() for ref in refs] == [None] * DROPPED
    live = make(namespace)
    try:
        epoch = live._core.trust_epoch()
        if kind == "sync":
            client.nodes_manager.initialize()  # a refresh: the live watcher still sees it
        else:

            async def refresh() -> None:
                await client.initialize()
                await client.nodes_manager.initialize()
                await client.aclose()

            asyncio.run(refresh())
        # the live cache's watcher saw the refresh begin (its reads' replies distrusted
        # meanwhile) and end
        assert live._core.trust_epoch() > epoch
        assert live._core.slot_map_refreshes == 0
    finally:
        live.detach()
