"""A throwaway Redis Cluster started from ``redis-server`` binaries, for tests and benchmarks.

:class:`RedisCluster` starts ``primaries * (1 + replicas)`` servers with ``cluster-enabled
yes`` on free loopback ports (each with a cluster bus port of its own, also free), and
builds the cluster from Python, without ``redis-cli``: every node meets the first one
(``CLUSTER MEET``), each primary takes an equal share of the 16384 slots (``CLUSTER
ADDSLOTSRANGE``), each replica follows its primary (``CLUSTER REPLICATE``). It returns once
every live node says ``cluster_state:ok`` and every node reports the same owner for every
slot. Then:

* :meth:`RedisCluster.reshard` moves slots to another primary *with their keys*, while
  clients run: ``CLUSTER SETSLOT ... IMPORTING`` on the target, ``MIGRATING`` on the
  source, ``MIGRATE`` in batches (a client asking for a moved key meanwhile gets ``ASK``),
  then ``SETSLOT ... NODE`` everywhere (``MOVED`` from then on). ``between_batches`` runs
  between two batches, so that a test can act in the middle of a migration.
* :meth:`RedisCluster.failover` promotes a replica of a primary: with ``CLUSTER FAILOVER``
  on the replica (the primary hands over, nothing is lost), or, with ``kill=True``, by
  SIGKILLing the primary and waiting for the replicas to elect one (after
  ``cluster-node-timeout``, short here). :meth:`RedisCluster.restart_node` brings a killed
  node back (as a replica of whoever took its slots).

The nodes are :class:`ClusterNode` objects, :class:`~devservices.servers.RedisServer`
subclasses: each can be stopped, killed and restarted alone, and keeps its ports and
``nodes.conf``. Nothing is flushed, ever; the whole cluster's folders are deleted by
:meth:`RedisCluster.close` (and at interpreter exit).

Example::

    from devservices.cluster import RedisCluster

    with RedisCluster(primaries=3, replicas=1) as cluster:
        client = cluster.client()                    # a redis.cluster.RedisCluster
        client.set("sarc:{x}:k", "v")
        slot = cluster.slot_of("sarc:{x}:k")
        cluster.reshard([slot], cluster.primaries()[1])
        cluster.failover(cluster.owner_of(slot))
        client.get("sarc:{x}:k")                     # b"v", after MOVED and a refresh
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from devservices.process import ServerStartError, free_port
from devservices.servers import RedisServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

__all__ = ["SLOTS", "ClusterNode", "ClusterNotReady", "RedisCluster", "SlotOwner"]

SLOTS = 16384
"""How many hash slots a Redis Cluster has."""

# between two looks at the cluster's state while waiting for it to settle
_POLL = 0.02
# how long a reshard waits for the nodes to agree before it tells them the new owner again
_SETTLE_S = 10.0


class ClusterNotReady(ServerStartError):
    """The cluster did not reach the state asked for in time; the message says which."""


class ClusterNode(RedisServer):
    """One ``redis-server`` of a :class:`RedisCluster`: cluster mode on, its own bus port.

    The bus port is chosen free on the first start and kept, as the client port is: the
    other nodes know both from ``nodes.conf``.

    Example::

        node = cluster.nodes[0]
        node.admin().cluster("info")
        node.kill()
        node.restart()
    """

    def __init__(
        self,
        *,
        node_timeout_ms: int,
        appendonly: bool,
        appendfsync: str,
        host: str,
        extra_args: Sequence[str],
        binary: str | None,
        startup_timeout: float,
    ) -> None:
        super().__init__(
            appendonly=appendonly,
            appendfsync=appendfsync,
            host=host,
            extra_args=extra_args,
            binary=binary,
            startup_timeout=startup_timeout,
        )
        self.node_timeout_ms = node_timeout_ms
        self._bus_port: int | None = None
        self._bus_port_kept = False
        self._node_id: str | None = None

    @property
    def bus_port(self) -> int:
        """The cluster bus port (nodes talk to each other on it)."""
        if self._bus_port is None:
            raise RuntimeError("the cluster node has not been started")
        return self._bus_port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to."""
        return self.host, self.port

    @property
    def node_id(self) -> str:
        """The node's id in the cluster (``CLUSTER MYID``), kept across restarts."""
        if self._node_id is None:
            with contextlib.closing(self.admin()) as client:
                self._node_id = _text(_run(client, "CLUSTER", "MYID"))
        return self._node_id

    def start(self) -> ClusterNode:
        """Start the node (see :meth:`ManagedServer.start`); the bus port is then kept."""
        super().start()
        self._bus_port_kept = True
        return self

    def admin(self, **options: Any) -> redis.Redis:
        """A plain ``redis.Redis`` on this node alone (no redirection is followed)."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=2,
            socket_timeout=options.pop("socket_timeout", 10),
            retry=Retry(NoBackoff(), 0),
            **options,
        )

    def role(self) -> str:
        """``master`` or ``slave``, as the node says (``ROLE``)."""
        with contextlib.closing(self.admin()) as client:
            return _text(_run(client, "ROLE")[0])

    def _command(self) -> list[str]:
        if not self._bus_port_kept:
            self._bus_port = free_port(self.host)
        return [
            *super()._command(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-port",
            str(self._bus_port),
            # the harness decides who replicates whom; a replica must not wander off
            "--cluster-allow-replica-migration",
            "no",
            # a replica that lost its primary long ago may still be promoted (tests kill
            # primaries on purpose)
            "--cluster-replica-validity-factor",
            "0",
            # a replica syncs at once instead of waiting 5 s for others to share the transfer
            "--repl-diskless-sync-delay",
            "0",
        ]


@dataclass(frozen=True, slots=True)
class SlotOwner:
    """A range of slots and who serves it, as ``CLUSTER SLOTS`` says."""

    start: int
    end: int
    primary: str  # node id
    replicas: tuple[str, ...]


class RedisCluster:
    """A local Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each.

    ``node_timeout_ms`` is ``cluster-node-timeout``: how long before a silent primary is
    declared failed and a replica takes over (short, so that a failover test takes a few
    seconds). ``appendonly`` turns AOF on in every node (write-behind needs it).
    ``extra_args`` go to every ``redis-server``. Use it as a context manager, or call
    :meth:`start` and :meth:`close`.

    Example::

        with RedisCluster(primaries=3, replicas=1, appendonly=True) as cluster:
            cluster.url            # 'redis://127.0.0.1:PORT/0?cluster=true'
            cluster.client().ping()
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary and no negative replicas")
        self.host = host
        self.startup_timeout = startup_timeout
        self.nodes = [
            ClusterNode(
                node_timeout_ms=node_timeout_ms,
                appendonly=appendonly,
                appendfsync=appendfsync,
                host=host,
                extra_args=extra_args,
                binary=binary,
                startup_timeout=startup_timeout,
            )
            for _ in range(primaries * (1 + replicas))
        ]
        self._primary_count = primaries
        self._replica_count = replicas
        self._started = False

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> RedisCluster:
        """Start every node, build the cluster and wait until it is ok everywhere."""
        if self._started:
            for node in self.nodes:
                node.start()
            self.wait_ok()
            return self
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        primaries = self.nodes[: self._primary_count]
        for epoch, node in enumerate(self.nodes, start=1):
            # distinct epochs up front: no collision to resolve once the slots are assigned
            self._call(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for node in self.nodes[1:]:
            self._call(node, "CLUSTER", "MEET", first.host, first.port, first.bus_port)
        share = SLOTS // len(primaries)
        for i, node in enumerate(primaries):
            start = i * share
            end = SLOTS - 1 if i == len(primaries) - 1 else start + share - 1
            self._call(node, "CLUSTER", "ADDSLOTSRANGE", start, end)
        self._wait(
            "every node to know every other",
            lambda: all(len(self._known(node)) == len(self.nodes) for node in self.nodes),
        )
        replicas = self.nodes[self._primary_count :]
        for i, node in enumerate(replicas):
            primary = primaries[i % len(primaries)]
            self._wait(
                f"{node.port} to see its primary {primary.port}",
                lambda node=node, primary=primary: primary.node_id in self._known(node),  # type: ignore[misc]
            )
            self._call(node, "CLUSTER", "REPLICATE", primary.node_id)
        self._started = True
        self.wait_ok()
        return self

    def stop(self) -> None:
        """Stop every node cleanly (data and ``nodes.conf`` kept: :meth:`start` resumes)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop every node and delete its folder."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- where things are -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL the library reads as a cluster: ``redis://host:port/0?cluster=true``."""
        first = self.live_nodes()[0]
        return f"redis://{first.host}:{first.port}/0?cluster=true"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """Every node's ``(host, port)``."""
        return [node.address for node in self.nodes]

    def client(self, **options: Any) -> redis.cluster.RedisCluster:
        """A ``redis.cluster.RedisCluster`` on the live nodes (bytes replies)."""
        seeds = [
            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]  # unannotated in redis-py
            for host, port in self.live_addresses()
        ]
        return redis.cluster.RedisCluster(startup_nodes=seeds, **options)

    def live_nodes(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [node for node in self.nodes if node.running]

    def live_addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of the live nodes."""
        return [node.address for node in self.live_nodes()]

    def node(self, node_id: str) -> ClusterNode:
        """The node of id ``node_id``."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of ``key`` (its hash tag's, when it has one)."""
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def slot_owners(self, via: ClusterNode | None = None) -> list[SlotOwner]:
        """Who serves which slots, and who replicates them, as ``via`` (by default the
        first live node) sees it in ``CLUSTER NODES`` (failed nodes left out)."""
        node = via or self.live_nodes()[0]
        primaries: dict[str, list[tuple[int, int]]] = {}
        replicas: dict[str, list[str]] = {}
        for line in _text(self._call(node, "CLUSTER", "NODES")).splitlines():
            node_id, _address, flags, primary, *_, link = line.split()[:8]
            ranges = line.split()[8:]
            if "fail" in flags.split(",") or link != "connected":
                continue
            if primary != "-":
                replicas.setdefault(primary, []).append(node_id)
            for text in ranges:
                if text.startswith("["):
                    continue  # a slot being imported or migrated: its owner is listed
                first, _, last = text.partition("-")
                primaries.setdefault(node_id, []).append((int(first), int(last or first)))
        owners = [
            SlotOwner(start, end, node_id, tuple(sorted(replicas.get(node_id, ()))))
            for node_id, spans in primaries.items()
            for start, end in spans
        ]
        return sorted(owners, key=lambda o: o.start)

    def owner_of(self, slot: int) -> ClusterNode:
        """The primary that serves ``slot`` now."""
        for owner in self.slot_owners():
            if owner.start <= slot <= owner.end:
                return self.node(owner.primary)
        raise KeyError(f"slot {slot} is not served")

    def primaries(self) -> list[ClusterNode]:
        """The live primaries that serve slots, in slot order."""
        ids: list[str] = []
        for owner in self.slot_owners():
            if owner.primary not in ids:
                ids.append(owner.primary)
        return [self.node(i) for i in ids]

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        """The live replicas that follow ``primary``."""
        ids = {r for o in self.slot_owners() if o.primary == primary.node_id for r in o.replicas}
        return [node for node in self.live_nodes() if node.node_id in ids]

    # -- changes ----------------------------------------------------------------------------

    def reshard(
        self,
        slots: Iterable[int],
        to_node: ClusterNode,
        *,
        batch: int = 10,
        between_batches: Callable[[int], None] | None = None,
    ) -> None:
        """Move ``slots`` to primary ``to_node``, with their keys, while clients run.

        Per slot: the target imports it, the source migrates it, its keys go over with
        ``MIGRATE`` ``batch`` at a time (``between_batches(slot)`` runs after each batch,
        while the slot is half moved: clients asking for a moved key get ``ASK``), then
        every primary learns the new owner (``MOVED`` from then on). Returns once every
        node agrees.
        """
        target = to_node.node_id
        moved: list[int] = []
        for slot in slots:
            source = self.owner_of(slot)
            if source.node_id == target:
                continue
            moved.append(slot)
            self._call(to_node, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            self._call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target)
            with contextlib.closing(source.admin()) as client:
                while True:
                    keys = _run(client, "CLUSTER", "GETKEYSINSLOT", slot, batch)
                    if not keys:
                        break
                    _run(
                        client, "MIGRATE", to_node.host, to_node.port, "", 0, 10_000, "KEYS", *keys
                    )
                    if between_batches is not None:
                        between_batches(slot)
            # the target first, then the source, then everyone else (as redis-cli does)
            self._assign(slot, to_node, [source, *self.primaries()])
        try:
            self.wait_ok(timeout=_SETTLE_S)
        except ClusterNotReady:
            # Seen when one slot moves back and forth quickly: the new owner gives the
            # slot back to a stale claim gossiped by its old owner, and the nodes never
            # agree. Telling every primary again and making the new owner's config epoch
            # the highest lets its claim win.
            for slot in moved:
                self._assign(slot, to_node, self.primaries())
            self._call(to_node, "CLUSTER", "BUMPEPOCH")
            self.wait_ok()

    def _assign(self, slot: int, owner: ClusterNode, others: Iterable[ClusterNode]) -> None:
        """Tell ``owner``, then ``others``, that ``owner`` serves ``slot``."""
        for node in [owner, *others]:
            with contextlib.suppress(redis.ResponseError):  # a replica refuses: fine
                self._call(node, "CLUSTER", "SETSLOT", slot, "NODE", owner.node_id)

    def failover(self, primary: ClusterNode, *, kill: bool = False) -> ClusterNode:
        """Promote a replica of ``primary``; returns the new primary once the cluster is ok.

        Without ``kill``, ``CLUSTER FAILOVER`` on the replica: the primary stops taking
        writes, the replica catches up and takes over, and the old primary follows it.
        With ``kill``, the primary is SIGKILLed and the replicas elect one after
        ``cluster-node-timeout`` (what a crash does); the dead node stays down
        (:meth:`restart_node` brings it back as a replica).
        """
        replicas = self.replicas_of(primary)
        if not replicas:
            raise ValueError(f"primary {primary.port} has no live replica to promote")
        slots = [o for o in self.slot_owners() if o.primary == primary.node_id]
        if kill:
            primary.kill()
        else:
            self._call(replicas[0], "CLUSTER", "FAILOVER")
        candidates = {r.node_id for r in replicas}

        def taken_over() -> bool:
            owners = self.slot_owners(via=replicas[0])
            return all(
                any(o.start == s.start and o.primary in candidates for o in owners) for s in slots
            )

        self._wait(f"a replica of {primary.port} to take its slots over", taken_over)
        self.wait_ok()
        return self.owner_of(slots[0].start)

    def restart_node(self, node: ClusterNode) -> None:
        """Start a stopped or killed node again and wait until the cluster agrees."""
        node.start()
        self.wait_ok()

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every live node says ``cluster_state:ok`` and serves every slot in
        its view, every live replica's link to its primary is up, and all agree on who
        serves and who replicates what."""

        def settled() -> bool:
            views = []
            for node in self.live_nodes():
                info = self._info(node)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                    return False
                role = self._call(node, "ROLE")
                # a replica counts once its link to the primary is up (it can take over)
                if _text(role[0]) == "slave" and _text(role[3]) != "connected":
                    return False
                views.append(self.slot_owners(via=node))
            return all(view == views[0] for view in views)

        self._wait("the cluster to be ok on every node, all agreeing", settled, timeout)

    # -- internals --------------------------------------------------------------------------

    def _call(self, node: ClusterNode, *command: Any) -> Any:
        with contextlib.closing(node.admin()) as client:
            return _run(client, *command)

    def _known(self, node: ClusterNode) -> set[str]:
        """The ids of the nodes ``node`` knows and does not think failed or handshaking."""
        text = _text(self._call(node, "CLUSTER", "NODES"))
        known = set()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 2 and "handshake" not in fields[2] and "noaddr" not in fields[2]:
                known.add(fields[0])
        return known

    def _info(self, node: ClusterNode) -> dict[str, str]:
        text = _text(self._call(node, "CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def _wait(self, what: str, done: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if done():
                    return
            except (redis.RedisError, OSError) as exc:  # a node restarting, a view in flux
                last = exc
            time.sleep(_POLL)  # polling the servers' state: there is nothing to wait on
        why = f" (last error: {last})" if last is not None else ""
        raise ClusterNotReady(f"timed out waiting for {what}{why}")


def _run(client: Any, *command: Any) -> Any:
    """One command on a plain client (redis-py leaves ``execute_command`` unannotated)."""
    return client.execute_command(*command)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
