"""The thread that keeps a local tier connected: tracking, invalidations, acks, lease renewal.

Two connections of its own per primary (one server, or each primary of a Redis Cluster:
tracking is per node), made with that node's options (address, TLS, credentials):

* the *invalidation connection* speaks RESP2 and is subscribed to ``__redis__:invalidate``;
  Redis writes the names of changed keys to it. It is read by this thread and, before any
  local hit, by the reading thread itself (:meth:`LocalTier.drain`), never through
  redis-py's parser: its socket is non-blocking and fed to a ``hiredis.Reader`` of the
  tier's, so a look for unread invalidations costs one ``recv`` that finds nothing;
* the *control connection* turned tracking on (``CLIENT TRACKING ON REDIRECT <id> BCAST
  PREFIX sarc:<namespace>:{``), and carries the acknowledgements and the lease renewals.
  Tracking belongs to it: if it closes, Redis stops tracking without a word. Each renewal
  therefore asks ``CLIENT TRACKINGINFO`` in the same round trip, and any failure on it
  drops both connections and empties the tier.

A lost connection, a server that restarted or failed over, or a killed client all end the
loop the same way: the tier is emptied and serves nothing until a new pair of connections
has tracking on again (:meth:`LocalTier.broken`), on every primary. On a cluster, each
renewal also asks every node for the cluster's primaries (``CLUSTER SLOTS``): another set
than the one tracked (a failover, a node that received slots) ends the loop the same way,
and the next connection asks the client for the primaries again. A key-bearing command
(a renewal, an acknowledgement) goes to the control connection of the primary the
client's slot map names; a ``MOVED`` reply, or a slot on an untracked node, ends the loop
too.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError, ResponseError

from sa_redis_cache import compat
from sa_redis_cache.protocol import scripts
from sa_redis_cache.redis_io import is_cluster

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sa_redis_cache.protocol import KeyScheme
    from sa_redis_cache.redis_io import SyncClient

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "__redis__:invalidate"
"""Where Redis publishes the invalidations of a RESP2 ``REDIRECT`` tracking client."""

# how long the loop waits before connecting again after a failure, doubling up to the last
_BACKOFF = (0.05, 1.0)
# seconds the invalidation connections have to answer a PING before they count as lost
_CATCH_UP = 2.0
# seconds an acknowledgement list lives: far longer than any writer waits
_ACK_TTL_MS = 60_000


class Client(Protocol):
    """The cache context as the listener sees it: the client its connections copy."""

    @property
    def client(self) -> SyncClient: ...


class Listened(Protocol):
    """The tier a :class:`Listener` serves (:class:`~sa_redis_cache.local.LocalTier`)."""

    holder: str
    lease: float
    lease_ms: int

    @property
    def core(self) -> Client: ...

    @property
    def keys(self) -> KeyScheme: ...

    def connected(self, socks: Sequence[socket.socket]) -> None: ...

    def broken(self) -> None: ...

    def read_invalidations(self) -> None: ...

    def take_acks(self) -> list[tuple[str, str]]: ...

    def caught_up(self, ping: int) -> bool: ...

    def held_tables(self) -> list[str]: ...

    def renewed(self, tables: Sequence[str], held: Sequence[bool], sent: float) -> None: ...

    def gauge_commands(self) -> list[tuple[Any, ...]]: ...


@dataclass(eq=False)
class _Link:
    """One primary's pair: the invalidation connection and the control connection."""

    name: str
    sub: Any
    ctl: Any = None
    sub_id: int = -1
    node_id: str = ""


class _Batches:
    """Commands to send, per link, in one round trip of wall time; replies by handle."""

    def __init__(self) -> None:
        self.commands: dict[_Link, list[tuple[Any, ...]]] = {}
        self.replies: dict[_Link, list[Any]] = {}

    def add(self, link: _Link, command: tuple[Any, ...]) -> tuple[_Link, int]:
        batch = self.commands.setdefault(link, [])
        batch.append(command)
        return link, len(batch) - 1

    def reply(self, handle: tuple[_Link, int]) -> Any:
        link, at = handle
        return self.replies[link][at]


class Listener:
    """Runs one local tier's connections in a daemon thread (see the module docstring).

    Example::

        listener = Listener(tier)
        listener.start()
        ...
        listener.stop()
    """

    def __init__(self, tier: Listened) -> None:
        self.tier = tier
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # made when the thread starts: a listener never started holds no socket
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._links: list[_Link] = []
        self._cluster = False
        self._pings = 0
        self._last_failure = ""

    @property
    def alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is not None:
            return
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        self._wake_w.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        self._thread = threading.Thread(
            target=self._run, name=f"sa-redis-cache-local-{self.tier.holder}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its connections."""
        self._stop.set()
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        # (the thread does it too, unless the join timed out) before the sockets close,
        # so that no reading thread looks at a closed socket's number, maybe reused
        self.tier.broken()
        self._close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def wake(self) -> None:
        """Make the loop look again now (acks queued by a reading thread, stop)."""
        wake = self._wake_w
        if wake is None:
            return  # not started
        # full (a wake is pending anyway) or closed (stopping)
        with contextlib.suppress(OSError):
            wake.send(b"x")

    def forget(self) -> None:
        """After ``fork()``: the parent's connections and thread are not this process's."""
        self._links = []
        self._thread = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()  # this process's copies only
        self._wake_r = self._wake_w = None

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = _BACKOFF[0]
        while not self._stop.is_set():
            try:
                self._connect()
                delay = _BACKOFF[0]
                self._loop()
                self._leave()
            except (RedisError, OSError, ValueError) as exc:
                # ValueError: hiredis.ProtocolError, a reply that is not RESP
                if not self._stop.is_set():
                    # said once per kind of failure: a refused command (an ACL) or a
                    # server away would otherwise repeat it every second
                    said = str(exc) == self._last_failure
                    self._last_failure = str(exc)
                    (log.debug if said else log.warning)(
                        "local tier: no invalidations from redis, tier emptied: %s", exc
                    )
            finally:
                self.tier.broken()
                self._close()
            self._stop.wait(delay)
            delay = min(delay * 2, _BACKOFF[1])

    def _connect(self) -> None:
        tier = self.tier
        client = tier.core.client
        self._cluster = is_cluster(client)
        for name, node in compat.primary_clients(client):
            sub = compat.dedicated_connection(node, protocol=2, health_check_interval=0)
            link = _Link(name, sub)
            self._links.append(link)
            self._track(link, node)
        socks = [compat.connection_socket(link.sub) for link in self._links]
        for sock in socks:
            sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        # ready once every primary tracks: a resharded slot's later changes are reported by
        # its new owner, which must be tracked before anything of it is served
        tier.connected(socks)
        log.debug("local tier %s: tracking on %d node(s)", tier.holder, len(socks))

    def _track(self, link: _Link, node: Any) -> None:
        # RESP2 whatever the client speaks: invalidations then come as Pub/Sub messages on
        # a connection of their own, which Redis 6 and 7 both support
        sub = link.sub
        sub.connect()
        sub.send_command("CLIENT", "ID")
        link.sub_id = int(sub.read_response())
        sub.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
        sub.read_response()
        ctl = compat.dedicated_connection(node, protocol=2, health_check_interval=0)
        link.ctl = ctl
        ctl.connect()
        ctl.send_command(
            "CLIENT",
            "TRACKING",
            "ON",
            "REDIRECT",
            link.sub_id,
            "BCAST",
            "PREFIX",
            self.tier.keys.tracked_prefix,
        )
        ctl.read_response()
        if self._cluster:
            ctl.send_command("CLUSTER", "MYID")
            link.node_id = _text(ctl.read_response())

    def _link_for(self, key: str) -> _Link:
        """The link whose control connection takes ``key``'s commands."""
        if not self._cluster:
            return self._links[0]
        name = compat.node_name_of(self.tier.core.client, key)
        for link in self._links:
            if link.name == name:
                return link
        raise ConnectionError(f"{key}'s slot is on {name}, which this tier does not track yet")

    def _loop(self) -> None:
        tier = self.tier
        wake = self._wake_r
        assert wake is not None
        watched = [compat.connection_socket(link.sub) for link in self._links] + [wake]
        renew_every = tier.lease / 3
        next_renewal = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, next_renewal - time.monotonic())
            readable, _, _ = select.select(watched, [], [], wait)
            if wake in readable:
                self._clear_wakes(wake)
            tier.read_invalidations()
            self._send_acks()
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + renew_every
                self._renew()

    def _leave(self) -> None:
        """Stopping: leave the holder sets, so that no writer waits for this process."""
        tier = self.tier
        tables = tier.held_tables()
        tier.broken()  # nothing is served from here on
        batches = _Batches()
        for table in tables:
            key = tier.keys.holders_key(table)
            batches.add(self._link_for(key), ("ZREM", key, tier.holder))
        stats = tier.keys.local_stats_key(tier.holder)
        batches.add(self._link_for(stats), ("DEL", stats))
        self._exchange(batches)

    @staticmethod
    def _clear_wakes(wake: socket.socket) -> None:
        try:
            while wake.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _send_acks(self) -> None:
        tier = self.tier
        # again while any came: catching up reads on, and may find more fences
        while seen := tier.take_acks():
            if self._cluster:
                self._catch_up()
            batches = _Batches()
            for token, fence in seen:
                # on a cluster each fence is acknowledged by name: the writer waits for
                # every table's, each reported by its own node (fences.py)
                named = fence if self._cluster else None
                for command in scripts.ack(tier.keys, token, tier.holder, _ACK_TTL_MS, fence=named):
                    batches.add(self._link_for(command[1]), command)
            self._exchange(batches)

    def _catch_up(self) -> None:
        """Before acknowledging on a cluster: apply every node's reports sent so far.

        A table's fence is normally set on the node that ran the commit's script for it,
        so that node's reports come first on one connection. Mid-resharding the two may
        run on the two nodes of the slot (the script on the source, the fence, redirected,
        on the target): the source's report then comes on another connection, sent before
        the fence but not necessarily read before it. A ``PING`` on every invalidation
        connection is answered after everything that node sent on it before; once every
        answer is read, every report sent before the fences just seen has been applied.
        """
        tier = self.tier
        self._pings += 1
        for link in self._links:
            link.sub.send_command("PING", self._pings)
        deadline = time.monotonic() + _CATCH_UP
        watched = [compat.connection_socket(link.sub) for link in self._links]
        tier.read_invalidations()
        while not tier.caught_up(self._pings):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionError("an invalidation connection did not answer PING")
            select.select(watched, [], [], left)
            tier.read_invalidations()

    def _renew(self) -> None:
        """Extend the leases of the tables this process holds; check tracking is still on."""
        tier = self.tier
        tables = tier.held_tables()
        batches = _Batches()
        checks = []
        for link in self._links:
            tracking = batches.add(link, ("CLIENT", "TRACKINGINFO"))
            slots = batches.add(link, ("CLUSTER", "SLOTS")) if self._cluster else None
            checks.append((link, tracking, slots))
        # loaded again each time: a SCRIPT FLUSH (any client may send one) must cost a
        # renewal nothing, rather than look like a broken connection that empties the tier
        hold = scripts.script("hold")
        loaded: set[_Link] = set()
        renewals = []
        for table in tables:
            _, keys, args = scripts.hold(tier.keys, table, tier.holder, tier.lease_ms, renew=True)
            link = self._link_for(keys[0])
            if link not in loaded:
                loaded.add(link)
                batches.add(link, ("SCRIPT", "LOAD", hold.source))
            renewals.append(batches.add(link, scripts.evalsha(hold, keys, args)))
        for command in tier.gauge_commands():
            batches.add(self._link_for(command[1]), command)
        sent = time.monotonic()
        self._exchange(batches)
        tracked = {link.node_id for link in self._links}
        for link, tracking, slots in checks:
            self._check_tracking(link, batches.reply(tracking))
            if slots is not None:
                _check_primaries(link, tracked, batches.reply(slots))
        held = [bool(batches.reply(handle)[1]) for handle in renewals]
        tier.renewed(tables, held, sent)

    @staticmethod
    def _check_tracking(link: _Link, reply: Any) -> None:
        info = _pairs(reply)
        flags = {_text(f) for f in info.get("flags", [])}
        if "on" not in flags or "broken_redirect" in flags or info.get("redirect") != link.sub_id:
            raise ConnectionError(
                f"client tracking is no longer on at {link.name} (CLIENT TRACKINGINFO: {info})"
            )

    def _exchange(self, batches: _Batches) -> None:
        """Send every link's commands, then read every reply (one round trip of wall time)."""
        for link, commands in batches.commands.items():
            ctl = link.ctl
            if ctl is None:
                raise ConnectionError("no control connection")
            ctl.send_packed_command(ctl.pack_commands(commands))
        # every reply is read before an error one is raised: the connections stay in step
        failure: RedisError | None = None
        for link, commands in batches.commands.items():
            replies = batches.replies[link] = []
            for _ in commands:
                try:
                    replies.append(link.ctl.read_response())
                except ResponseError as exc:  # noqa: PERF203 - a reply per command, few commands
                    failure = failure or exc
                    replies.append(exc)
        if failure is not None:
            raise failure

    def _close(self) -> None:
        for link in self._links:
            for connection in (link.sub, link.ctl):
                if connection is not None:
                    with contextlib.suppress(RedisError, OSError):
                        connection.disconnect()
        self._links = []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_primaries(link: _Link, tracked: set[str], reply: Any) -> None:
    """Raise when ``link``'s node names other primaries than the ones tracked."""
    # CLUSTER SLOTS: [[first slot, last slot, [host, port, node id, ...], replicas...], ...]
    primaries = {_text(entry[2][2]) for entry in reply}
    if primaries != tracked:
        raise ConnectionError(
            f"the cluster's primaries changed ({link.name} names {len(primaries)}, "
            f"{len(primaries - tracked)} of them untracked): tracking them anew"
        )


def _pairs(reply: Any) -> dict[str, Any]:
    """A flat ``[name, value, ...]`` reply as a dict with text names."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    if not isinstance(reply, list):
        return {}
    return {_text(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}
