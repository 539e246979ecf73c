"""Every SQLAlchemy and redis-py internal the library touches exists in the installed release.

One test per symbol (``sa_redis_cache.compat.PROBES``): when a release moves one, the
failure names it and the versions, instead of a cached read going wrong somewhere deep.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import redis
import sqlalchemy

from sa_redis_cache import compat

FOUND = dict(compat.probe())


@pytest.mark.parametrize("symbol", compat.PROBES)
def test_the_internal_symbol_exists(symbol: str) -> None:
    assert FOUND[symbol], (
        f"{symbol} is gone in SQLAlchemy {sqlalchemy.__version__} / redis-py "
        f"{redis.__version__}: sa_redis_cache.compat must follow it"
    )


def test_every_probe_is_checked() -> None:
    assert set(FOUND) == set(compat.PROBES)


def test_script_calls_are_packed_as_redis_py_packs_them() -> None:
    """send_now frames the cache's commands in C; the bytes must be redis-py's own."""
    from sa_redis_cache.protocol import KeyScheme, scripts

    keys = KeyScheme("shop")
    row = scripts.RowCommit("k\u00e9y", "7", 3, 600_000, b"\x00\xffstate")
    calls = [
        scripts.flush_mark(keys, "products", "tok", [("e", "7")], bulk=False),
        scripts.commit(keys, "products", "tok", [row], bulk=False, scope="00ff"),
        scripts.fence(keys, "products", "tok"),
    ]
    commands = [("EVALSHA", s.sha, len(k), *k, *a) for s, k, a in calls]
    connection = redis.Connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
    assert b"".join(compat._packed(connection, commands)) == b"".join(
        connection.pack_commands(commands)  # type: ignore[no-untyped-call]  # as above
    )


def test_an_asyncio_cluster_clients_refreshes_can_be_watched() -> None:
    """Its nodes manager has ``__slots__``: ``watch_slot_map`` gives the instance a
    subclass of its class whose ``initialize`` reports, which redis-py must accept."""
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1)  # not connected
    manager = client.nodes_manager
    base = type(manager)
    maps: list[dict[int, str]] = []
    assert compat.watch_slot_map(client, maps.append)
    assert isinstance(client.nodes_manager, base)
    assert client.nodes_manager is manager
    assert type(manager).initialize is not base.initialize
    moves = [name for name in ("move_slot", "_update_moved_slots") if hasattr(base, name)]
    assert moves, "redis-py moves a slot on MOVED some other way: watch_slot_map must follow"
    assert all(getattr(type(manager), name) is not getattr(base, name) for name in moves)
    assert maps == []  # nothing known before the first refresh


def test_a_cluster_client_watched_by_several_caches_is_wrapped_once() -> None:
    """Every cache made on one client watches it: redis-py's methods are wrapped once,
    and a watcher whose object is gone is forgotten (not called, not kept alive)."""
    client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1)  # not connected
    manager = client.nodes_manager
    base = type(manager)

    class Watcher:
        def seen(self, slots: dict[int, str]) -> None: ...

    first, second = Watcher(), Watcher()
    assert compat.watch_slot_map(client, first.seen)
    watched = type(manager)
    assert compat.watch_slot_map(client, second.seen)
    assert type(manager) is watched
    assert watched.__mro__[1] is base
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None


def test_a_synchronous_cluster_clients_moved_slots_are_watched() -> None:
    moves = [
        name
        for name in ("move_slot", "_update_moved_slots")
        if hasattr(redis.cluster.NodesManager, name)
    ]
    assert moves, "redis-py moves a slot on MOVED some other way: watch_slot_map must follow"
