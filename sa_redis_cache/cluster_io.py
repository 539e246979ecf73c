"""The Redis calls of the cache on a Redis Cluster: :class:`~sa_redis_cache.redis_io.RedisIO`
whose calls over several slots are split by :mod:`sa_redis_cache.protocol.cluster`.

The cache picks this variant once, when it is made on a cluster client
(:func:`io_for`); a single server's calls never pay for the slot arithmetic. A call whose
keys share a slot (every write-path script, every entity read, a statement over one
table) is sent exactly as on a single server; redis-py routes it to the slot's primary
and follows ``MOVED`` and ``ASK``. A pipeline becomes redis-py's cluster pipeline: each
command goes to its slot's primary, all nodes are written before any is read, and the
commands of one node keep their order on one connection (a table's fence after its
commit script, as the local tier needs).

Example::

    io = io_for(redis.cluster.RedisCluster(host="node1", port=7000))
    io.mget(["sarc:s:{s:a}:v", "sarc:s:{s:b}:v"])   # one MGET per slot, one round trip
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from .errors import ConfigurationError
from .protocol import cluster
from .redis_io import AsyncRedisIO, RedisIO, SyncRedisIO, is_cluster

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .protocol.scripts import Command, Script, ScriptCall

__all__ = ["AsyncClusterIO", "SyncClusterIO", "async_io_for", "io_for"]


class _ClusterCalls(RedisIO):
    """The calls of :class:`RedisIO` that may span slots, split per slot."""

    __slots__ = ()

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET over any slots: one MGET per slot, in one round trip."""
        given: list[Command] = [("MGET", *keys)]
        sent, where = cluster.split_mget(given)
        if where[0][1] is None:
            return super().mget(keys)
        return list(cluster.join_mget(given, where, super().pipeline(sent))[0])

    def pipeline(self, commands: Iterable[Command]) -> list[Any]:
        """Send ``commands`` in one cluster pipeline; an MGET over several slots is split."""
        given = list(commands)
        sent, where = cluster.split_mget(given)
        return cluster.join_mget(given, where, super().pipeline(sent))

    def look(
        self, keys: Sequence[str], lease_key: str, token: str
    ) -> tuple[list[bytes | None], bool]:
        """The look script in one slot; over several, a plain MGET and no lease (the read
        path then asks for it with its second look)."""
        if cluster.one_slot([*keys, lease_key]):
            return super().look(keys, lease_key, token)
        return self.mget(keys), False

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA in one slot; over several, the split of :mod:`.protocol.cluster`."""
        if cluster.one_slot(keys):
            return super().run_script(script, keys, args)
        call: ScriptCall = (script, list(keys), list(args))
        if script.name == "fill":
            return self._fill_across(cluster.fill_plan(call))
        parts = cluster.split(call)
        return parts.merge(super().run_batch(parts.calls))

    def run_batch(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Several script calls in one round trip; a call over several slots is split."""
        if all(cluster.one_slot(keys) for _, keys, _ in calls):
            return super().run_batch(calls)
        sent: list[ScriptCall] = []
        merges: list[tuple[int, int, Any]] = []
        for call in calls:
            if cluster.one_slot(call[1]):
                merges.append((len(sent), 1, None))
                sent.append(call)
            else:
                parts = cluster.split(call)
                merges.append((len(sent), len(parts.calls), parts.merge))
                sent += parts.calls
        replies = super().run_batch(sent)
        return [
            replies[at] if merge is None else merge(replies[at : at + count])
            for at, count, merge in merges
        ]

    def _fill_across(self, plan: cluster.FillPlan) -> int:
        """Check the foreign slots, then fill in the entry's slot (docs/guarantees.md)."""
        try:
            answers = super().run_batch(plan.checks)
        except RedisError:
            self._release(plan)
            raise
        if all(int(answer) == 1 for answer in answers):
            return int(super().run_script(*plan.fill))
        self._release(plan)
        return 0

    def _release(self, plan: cluster.FillPlan) -> None:
        if plan.release is not None:
            # the lease expires on its own; the failure was reported by the caller
            with contextlib.suppress(RedisError):
                super().run_script(*plan.release)


class SyncClusterIO(_ClusterCalls, SyncRedisIO):
    """:class:`~sa_redis_cache.redis_io.SyncRedisIO` over a ``redis.cluster.RedisCluster``.

    Example::

        SyncClusterIO(redis.cluster.RedisCluster(host="node1", port=7000)).get("missing")
    """

    __slots__ = ()


class AsyncClusterIO(_ClusterCalls, AsyncRedisIO):
    """:class:`~sa_redis_cache.redis_io.AsyncRedisIO` over a
    ``redis.asyncio.cluster.RedisCluster``.

    Example::

        io = AsyncClusterIO(redis.asyncio.cluster.RedisCluster(host="node1", port=7000))
        await greenlet_spawn(io.get, "missing")  # None
    """

    __slots__ = ()


def io_for(client: Any) -> SyncRedisIO:
    """The synchronous I/O for ``client``: the cluster variant for a cluster client.

    Example::

        io_for(redis.Redis())  # a SyncRedisIO
    """
    return SyncClusterIO(client) if is_cluster(client) else SyncRedisIO(client)


def async_io_for(client: Any) -> AsyncRedisIO:
    """:func:`io_for` for an asyncio client.

    Example::

        async_io_for(redis.asyncio.Redis())  # an AsyncRedisIO
    """
    return AsyncClusterIO(client) if is_cluster(client) else AsyncRedisIO(client)


WRITE_BEHIND_ON_CLUSTER = (
    "CachePolicy(strategy='write_behind') does not run on a Redis Cluster yet: a commit's "
    "queued operations must be enqueued atomically, in one slot, and the worker does not "
    "drain per node yet (docs/cluster.md, 'Not supported yet'). Use write_through or "
    "invalidate on a cluster, or give the cache a single Redis server"
)
"""Why ``attach()`` refuses a write-behind model on a cluster (said per model)."""


def refuse_local_tier_on_cluster(local: bool) -> None:
    """Raise :class:`~sa_redis_cache.errors.ConfigurationError` for a local tier on a
    cluster: its invalidations come from client-side tracking, which is per node, and the
    tier tracks one server (docs/cluster.md, "Not supported yet").

    Example::

        refuse_local_tier_on_cluster(cache_has_local_tier)
    """
    if local:
        raise ConfigurationError(
            "cache.attach(): the local tier (Cache(local=True)) does not run on a Redis "
            "Cluster yet: it learns of changes through client-side tracking, which is per "
            "node, and tracks one server. Make the cache without local=True on a cluster "
            "(docs/cluster.md, 'Not supported yet')"
        )
