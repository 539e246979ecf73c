"""The thread that keeps a local tier connected: tracking, invalidations, acks, lease renewal.

Two connections of its own, made with the client's options (address, TLS, credentials):

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
has tracking on again (:meth:`LocalTier.broken`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisError, ResponseError

from sa_redis_cache import compat
from sa_redis_cache.protocol import scripts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sa_redis_cache.protocol import KeyScheme
    from sa_redis_cache.redis_io import SyncClient

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "__redis__:invalidate"
"""Where Redis publishes the invalidations of a RESP2 ``REDIRECT`` tracking client."""

# how long the loop waits before connecting again after a failure, doubling up to the last
_BACKOFF = (0.05, 1.0)
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

    def connected(self, sock: socket.socket) -> None: ...

    def broken(self) -> None: ...

    def read_invalidations(self) -> None: ...

    def take_acks(self) -> list[str]: ...

    def held_tables(self) -> list[str]: ...

    def renewed(self, tables: Sequence[str], held: Sequence[bool], sent: float) -> None: ...

    def gauge_commands(self) -> list[tuple[Any, ...]]: ...


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
        self._sub: Any = None
        self._ctl: Any = None
        self._sub_id = -1
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
        self._sub = self._ctl = None
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
        # RESP2 whatever the client speaks: invalidations then come as Pub/Sub messages on
        # a connection of their own, which Redis 6 and 7 both support
        sub = compat.dedicated_connection(client, protocol=2, health_check_interval=0)
        self._sub = sub
        sub.connect()
        sub.send_command("CLIENT", "ID")
        self._sub_id = int(sub.read_response())
        sub.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
        sub.read_response()
        ctl = compat.dedicated_connection(client, protocol=2, health_check_interval=0)
        self._ctl = ctl
        ctl.connect()
        ctl.send_command(
            "CLIENT",
            "TRACKING",
            "ON",
            "REDIRECT",
            self._sub_id,
            "BCAST",
            "PREFIX",
            tier.keys.tracked_prefix,
        )
        ctl.read_response()
        sock = compat.connection_socket(sub)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        tier.connected(sock)
        log.debug("local tier %s: tracking on", tier.holder)

    def _loop(self) -> None:
        tier = self.tier
        sock = compat.connection_socket(self._sub)
        wake = self._wake_r
        assert wake is not None
        renew_every = tier.lease / 3
        next_renewal = time.monotonic()
        while not self._stop.is_set():
            wait = max(0.0, next_renewal - time.monotonic())
            readable, _, _ = select.select([sock, wake], [], [], wait)
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
        commands: list[tuple[Any, ...]] = [
            ("ZREM", tier.keys.holders_key(table), tier.holder) for table in tables
        ]
        commands.append(("DEL", tier.keys.local_stats_key(tier.holder)))
        self._roundtrip(commands)

    @staticmethod
    def _clear_wakes(wake: socket.socket) -> None:
        try:
            while wake.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _send_acks(self) -> None:
        tier = self.tier
        tokens = tier.take_acks()
        if not tokens:
            return
        commands = [
            command
            for token in tokens
            for command in scripts.ack(tier.keys, token, tier.holder, _ACK_TTL_MS)
        ]
        self._roundtrip(commands)

    def _renew(self) -> None:
        """Extend the leases of the tables this process holds; check tracking is still on."""
        tier = self.tier
        tables = tier.held_tables()
        # loaded again each time: a SCRIPT FLUSH (any client may send one) must cost a
        # renewal nothing, rather than look like a broken connection that empties the tier
        hold = scripts.script("hold")
        commands: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", hold.source)] if tables else []
        for table in tables:
            _, keys, args = scripts.hold(tier.keys, table, tier.holder, tier.lease_ms, renew=True)
            commands.append(("EVALSHA", hold.sha, len(keys), *keys, *args))
        commands.append(("CLIENT", "TRACKINGINFO"))
        commands.extend(tier.gauge_commands())
        sent = time.monotonic()
        replies = self._roundtrip(commands)[1 if tables else 0 :]
        self._check_tracking(replies[len(tables)])
        held = [bool(reply[1]) for reply in replies[: len(tables)]]
        tier.renewed(tables, held, sent)

    def _check_tracking(self, reply: Any) -> None:
        info = _pairs(reply)
        flags = {_text(f) for f in info.get("flags", [])}
        if "on" not in flags or "broken_redirect" in flags or info.get("redirect") != self._sub_id:
            raise ConnectionError(f"client tracking is no longer on (CLIENT TRACKINGINFO: {info})")

    def _roundtrip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        ctl = self._ctl
        if ctl is None:
            raise ConnectionError("no control connection")
        ctl.send_packed_command(ctl.pack_commands(commands))
        # every reply is read before an error one is raised: the connection stays in step
        replies: list[Any] = []
        failure: RedisError | None = None
        for _ in commands:
            try:
                replies.append(ctl.read_response())
            except ResponseError as exc:  # noqa: PERF203 - a reply per command, few commands
                failure = failure or exc
                replies.append(exc)
        if failure is not None:
            raise failure
        return replies

    def _close(self) -> None:
        for connection in (self._sub, self._ctl):
            if connection is not None:
                with contextlib.suppress(RedisError, OSError):
                    connection.disconnect()
        self._sub = self._ctl = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, Any]:
    """A flat ``[name, value, ...]`` reply as a dict with text names."""
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    if not isinstance(reply, list):
        return {}
    return {_text(reply[i]): reply[i + 1] for i in range(0, len(reply) - 1, 2)}
