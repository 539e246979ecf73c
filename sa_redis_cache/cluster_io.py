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
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import PipelineCommand
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import ConfigurationError
from .protocol import cluster, scripts
from .redis_io import AsyncRedisIO, RedisIO, SyncRedisIO, is_cluster

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .protocol.scripts import Command, Script, ScriptCall

__all__ = ["AsyncClusterIO", "SyncClusterIO", "async_io_for", "io_for"]

_REDIRECTS = 5
"""How often :meth:`_ClusterCalls.run_then` follows a redirection (or reloads its script)
before it gives up: a slot moves once per reshard batch or failover."""

_REPLICAS_FOR_S = 1.0
"""How long a primary's count of connected replicas is trusted (:meth:`replicas_of`)."""

_REPLICAS: dict[str, tuple[int, float]] = {}
"""Per primary (``host:port``): its connected replicas, and when it said so. Shared by
every client of the process: it describes the server, not the client."""

_TRYAGAIN_S = 0.05
"""The pause before sending again a call refused with ``TRYAGAIN`` (its keys are split
between the two nodes of a slot being migrated, for the time of one ``MIGRATE``)."""


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

    def unlink(self, *keys: str | bytes) -> int:
        """UNLINK ``keys``, one command per key in one cluster pipeline; how many existed.

        Not one UNLINK per slot: while a slot migrates, a command over several of its keys
        gets ``TRYAGAIN`` (some moved, some not) for as long as the migration lasts, and
        ``cache.clear()`` failed with redis-py's "TTL exhausted" through every reshard. A
        key alone is always in one place, reached through ``ASK`` when it moved.
        """
        if len(keys) < 2:
            return int(super().unlink(*keys))
        return sum(int(reply) for reply in super().pipeline([("UNLINK", key) for key in keys]))

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

    def replicas_of(self, key: str) -> int:
        """How many replicas the primary of ``key``'s slot has connected, as it said at most
        :data:`_REPLICAS_FOR_S` ago (``INFO replication``: one round trip when older).

        Asked of the primary, not read from the client's slot map: ``CLUSTER SLOTS`` leaves
        out a replica until its replication offset has been gossiped, and a stopped
        replica stays connected (and counted) until ``repl-timeout``, so that a ``WAIT``
        for it times out rather than passing without it.
        """
        for _ in range(_REDIRECTS):
            node = self._node_of(key)
            now = time.monotonic()
            known = _REPLICAS.get(node.name)
            if known is not None and now - known[1] <= _REPLICAS_FOR_S:
                return known[0]
            try:
                reply = self._on_node(node, [("INFO", "replication")])[0]
            except (RedisConnectionError, RedisTimeoutError) as exc:
                reply = exc
            if isinstance(reply, Exception):
                self._gone(reply)
                raise reply
            if reply.get("role") == "master":
                _REPLICAS[node.name] = (int(reply.get("connected_slaves", 0)), now)
                return int(reply.get("connected_slaves", 0))
            # a primary demoted since the client's map was read (a failover): read it
            # again, or the count would be a replica's (none) and nothing waited for
            self._refresh()
        raise ClusterDownError(f"no primary found for the slot of {key}")

    def run_then(self, call: ScriptCall, commands: Sequence[Command]) -> list[Any]:
        """Run a one-slot script call, then ``commands``, on one connection of the slot's
        primary, in one round trip; replies as :meth:`RedisIO.run_then`.

        Never a cluster pipeline: it sends a keyless command (``WAIT``, ``WAITAOF``) to
        every node, each on a connection that wrote nothing, which answers at once. The
        redirections a cluster pipeline would follow are followed here: ``MOVED`` (the
        slot's map is read again), ``ASK`` (``ASKING`` first, on the importing node) and
        ``TRYAGAIN``; each means the script did not run, so sending it again is safe. A
        connection that fails is not sent again (the script may have run): the slot map
        is read again for the next call, and the error raised.
        """
        script, keys, args = call
        if not cluster.one_slot(keys):
            raise ConfigurationError(
                f"{script.name}.lua with commands after it must run in one slot: its keys "
                "span several (docs/cluster.md#write-behind)"
            )
        node = self._node_of(keys[0])
        asking = False
        first: Any = None
        # a slot held half moved answers TRYAGAIN on one node and ASK on the other: the
        # caller is told of the move (its TRYAGAIN), whichever came last
        moving: TryAgainError | None = None
        for _ in range(_REDIRECTS):
            sent: list[Command] = [("ASKING",)] if asking else []
            sent += [scripts.evalsha(script, keys, args), *commands]
            try:
                replies = self._on_node(node, sent)[len(sent) - len(commands) - 1 :]
            except (RedisConnectionError, RedisTimeoutError) as exc:
                replies = [exc]
            first = replies[0]
            if isinstance(first, RedisConnectionError | RedisTimeoutError):
                self._gone(first)
                raise first
            if isinstance(first, NoScriptError):
                self._on_node(node, [("SCRIPT", "LOAD", script.source)])
            elif isinstance(first, AskError):
                found = self.client.get_node(host=first.host, port=first.port)
                if found is None:
                    self._refresh()
                    node, asking = self._node_of(keys[0]), False
                else:
                    node, asking = found, True
            elif isinstance(first, MovedError | TryAgainError | ClusterDownError):
                if isinstance(first, TryAgainError):
                    moving = first
                    self.sleep(_TRYAGAIN_S)
                self._refresh()
                node, asking = self._node_of(keys[0]), False
            else:
                return replies
        raise moving or first

    def _node_of(self, key: str) -> Any:
        return self.client.get_node_from_key(key)

    def _gone(self, error: Exception) -> None:
        """A node's connection failed: read the slot map again (the node may have been
        replaced), so that the next call goes to the slot's new primary."""
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            with contextlib.suppress(RedisError):
                self._refresh()

    def _on_node(self, node: Any, commands: Sequence[Command]) -> list[Any]:
        """``commands`` on one connection of ``node``; error replies as exceptions."""
        raise NotImplementedError

    def _refresh(self) -> None:
        """Read the cluster's slot map again."""
        raise NotImplementedError

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

    def _on_node(self, node: Any, commands: Sequence[Command]) -> list[Any]:
        pipe = self.client.get_redis_connection(node).pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))

    def _refresh(self) -> None:
        self.client.nodes_manager.initialize()


class AsyncClusterIO(_ClusterCalls, AsyncRedisIO):
    """:class:`~sa_redis_cache.redis_io.AsyncRedisIO` over a
    ``redis.asyncio.cluster.RedisCluster``.

    Example::

        io = AsyncClusterIO(redis.asyncio.cluster.RedisCluster(host="node1", port=7000))
        await greenlet_spawn(io.get, "missing")  # None
    """

    __slots__ = ()

    def _node_of(self, key: str) -> Any:
        if not self.client.nodes_manager.slots_cache:
            # an asyncio cluster client learns the slots on its first command
            self._wait(self.client.initialize())
        return self.client.get_node_from_key(key)

    def _on_node(self, node: Any, commands: Sequence[Command]) -> list[Any]:
        sent = [PipelineCommand(at, *command) for at, command in enumerate(commands)]
        self._wait(node.execute_pipeline(sent))
        return [command.result for command in sent]

    def _refresh(self) -> None:
        self._wait(self.client.nodes_manager.initialize())


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
