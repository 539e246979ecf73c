"""The local tier of one cache: when it may serve, the leases it holds, what Redis pushed.

Entries live in a :class:`~.store.LocalStore`; invalidations arrive on a connection the
:class:`~.listener.Listener` keeps. This object decides when a local entry may be served:

* tracking is on (the listener connected and asked Redis for invalidations);
* this process holds a live *lease* on every table it keeps entries of. A writer's commit
  waits for the acknowledgement of every holder whose lease is live
  (:mod:`.fences`), or for its lease to end: a process that stops acknowledging (dead,
  paused, cut off) makes writers wait at most one lease, and stops serving before its
  lease ends on the server, because its local deadline is counted from *before* it asked;
* every invalidation Redis already wrote to the connection has been applied: the reading
  thread reads the socket itself before it serves (:meth:`drain`).

A lapsed lease, a broken connection, a restarted server or a ``fork()`` empty the store.

Example::

    tier = LocalTier(core, max_entries=10_000, max_bytes=64 << 20, lease=2.0)
    tier.start()
    if tier.serving():
        entry = tier.store.get(key)
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import ssl
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Literal, Protocol

import hiredis
from redis.exceptions import RedisError

from sa_redis_cache.protocol import scripts

from .listener import Listener
from .store import LocalStore, Mark

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sa_redis_cache.protocol import KeyScheme
    from sa_redis_cache.redis_io import RedisIO, SyncClient
    from sa_redis_cache.stats import Stats

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the local tier and the fences use of the cache they belong to (its context)."""

    @property
    def client(self) -> SyncClient: ...

    @property
    def keys(self) -> KeyScheme: ...

    @property
    def counters(self) -> Stats: ...

    def io(self) -> RedisIO: ...

    def redis_failed(self, exc: RedisError) -> None: ...


Consistency = Literal["strict", "bounded"]
"""``strict``: a commit returns once every process holding local entries of its tables has
dropped what it changed. ``bounded``: it does not wait; other processes drop them when the
invalidation reaches them (docs/guarantees.md, "The local tier")."""

# a local deadline ends this share of the lease before the lease ends on the server
_MARGIN = 0.1
_RECV = 1 << 18
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, InterruptedError)


def _arrivals(socks: Sequence[socket.socket]) -> Any:
    """A ``poll`` object that tells in one system call whether anything arrived on
    ``socks`` (data, or the peer's close), cheaper than a ``recv`` on each that fails with
    ``EAGAIN`` (0.7 against 2.0 µs per hit, benchmarks/results/speed.md); None where
    ``select.poll`` is missing (Windows) or a socket is TLS, whose library may hold
    decrypted bytes the kernel no longer reports: those are read every time."""
    if not hasattr(select, "poll") or any(isinstance(s, ssl.SSLSocket) for s in socks):
        return None
    arrivals = select.poll()
    for sock in socks:
        arrivals.register(sock, select.POLLIN)
    return arrivals


def _new_holder() -> str:
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


class LocalTier:
    """The in-process tier of one cache (see the module docstring)."""

    def __init__(
        self,
        core: Host,
        *,
        max_entries: int,
        max_bytes: int,
        lease: float,
        consistency: Consistency = "strict",
    ) -> None:
        self.core = core
        self.keys = core.keys
        self.store = LocalStore(max_entries=max_entries, max_bytes=max_bytes)
        self.lease = lease
        self.lease_ms = int(lease * 1000)
        self.consistency: Consistency = consistency
        self.holder = _new_holder()
        # the gauge key of the id a reconnection replaced, deleted at the next publication
        self._replaced_gauges: str | None = None
        self.lock = threading.Lock()
        self.ready = False
        self._ready_event = threading.Event()
        self.deadline = 0.0
        self._held: dict[str, float] = {}
        # one (socket, reader) per tracked primary
        self._socks: list[tuple[socket.socket, Any]] = []
        # polls them all at once (_arrivals); None: each is read every time
        self._arrivals: Any = None
        self._pongs: list[int] = []
        self._acks: list[tuple[str, str]] = []
        self._listener = Listener(self)
        self._started = False
        self.lapses = 0
        self.breaks = 0
        self.renewals = 0
        _TIERS.add(self)

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the listener thread (idempotent); the tier serves once tracking is on."""
        if not self._started:
            self._started = True
            self._listener.start()

    def stop(self) -> None:
        """Stop the listener (it leaves the holder sets first) and empty the store."""
        self._started = False
        self._listener.stop()
        self.broken()
        # a later attach() starts a listener of its own
        self._listener = Listener(self)

    def after_fork_in_child(self) -> None:
        """A forked child shares its parent's sockets: forget them, start afresh when used."""
        self._listener.forget()
        self._listener = Listener(self)
        self.lock = threading.Lock()
        self.holder = _new_holder()
        self._watch(())
        self.ready = False
        self._ready_event = threading.Event()
        self._held.clear()
        self.deadline = 0.0
        self._acks = []
        self.store.clear()
        if self._started:
            self._listener.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for tracking to be on; whether it is.

        Example::

            cache.attach(Session)
            cache.inspector.local_tier.wait_ready(5.0)   # e.g. in a readiness probe
        """
        return self._ready_event.wait(timeout) and self.ready

    # -- serving ---------------------------------------------------------------------------

    def serving(self) -> bool:
        """May a local entry be served now? Applies every invalidation already received.

        False while tracking is off, while no lease is held, or once one lapsed (which
        empties the store: writers may have stopped waiting for this process).
        """
        if not self.ready:
            return False
        if time.monotonic() >= self.deadline:
            if self._held:
                self.lapse()
            return False
        return self.drain()

    def drain(self) -> bool:
        """Apply every invalidation the connections hold; False when one broke."""
        with self.lock:
            if not self._socks or not self.ready:
                return False
            try:
                self._read_locked()
            except (OSError, ValueError) as exc:
                log.warning("local tier: invalidation connection lost, tier emptied: %s", exc)
                self._broken_locked()
                self._listener.wake()
                return False
        if self._acks:
            self._listener.wake()
        return True

    def read_invalidations(self) -> None:
        """The listener's read: like :meth:`drain`, but a broken connection raises, and so
        does one a reading thread found broken (:meth:`drain` let go of it): the listener
        still watches its socket, readable at every poll once closed, and would spin on it
        until its next renewal found tracking off, the tier idle meanwhile."""
        with self.lock:
            if not self.ready:
                raise ConnectionError("the invalidation connection was found broken")
            self._read_locked()

    def _read_locked(self) -> None:
        socks = self._socks
        arrivals = self._arrivals
        for sock, _ in socks:
            if sock.fileno() < 0:
                # closed under the tier (redis-py closes a connection whose send failed):
                # its number may already be another socket's, which the poll would ask
                raise ConnectionError("the invalidation connection was closed")
        if arrivals is None or arrivals.poll(0):
            # every primary's reports, each connection's in its order: an entry kept
            # under counters of several nodes goes when any of them reports one
            for sock, reader in socks:
                while True:
                    try:
                        data = sock.recv(_RECV)
                    except _WOULD_BLOCK:
                        break
                    if not data:
                        raise ConnectionError("the invalidation connection was closed")
                    reader.feed(data)
                    if len(data) < _RECV:
                        break
        # a read cut short after it fed a reader (an exception from a signal handler)
        # leaves reports there that no poll will announce again: the readers are always
        # asked
        for at, (_, reader) in enumerate(socks):
            message = reader.gets()
            while message is not False:
                if type(message) is list and message and message[0] == b"pong":
                    # the answer to the listener's PING (listener.Listener._catch_up)
                    self._pongs[at] = int(message[1])
                else:
                    self._apply(message)
                message = reader.gets()

    def _apply(self, message: Any) -> None:
        if type(message) is not list or len(message) != 3 or message[0] != b"message":
            return  # the subscription's confirmation
        keys = message[2]
        if keys is None:
            # FLUSHDB or FLUSHALL: everything went
            self.store.clear()
            return
        self.store.invalidate(keys)
        fence_token = self.keys.fence_token
        for key in keys:
            if b":fence:" in key:
                token = fence_token(key)
                if token is not None:
                    self._acks.append((token, key.decode()))

    def caught_up(self, ping: int) -> bool:
        """Whether every invalidation connection has answered the listener's PING ``ping``."""
        with self.lock:
            return bool(self._pongs) and min(self._pongs) >= ping

    def take_acks(self) -> list[tuple[str, str]]:
        """The ``(commit token, fence key)`` seen since the last call (for the listener)."""
        with self.lock:
            acks, self._acks = self._acks, []
        return acks

    # -- leases ----------------------------------------------------------------------------

    def hold(self, tables: Iterable[str]) -> Mark | None:
        """Before a Redis look whose entry may be kept: the store's mark, leases held.

        Registers this process as a holder of each table it does not hold yet (one round
        trip, the first time in each lease). None when the tier cannot keep anything now.
        """
        if not self.ready:
            return None
        mark = self.store.mark()
        missing = [t for t in tables if t not in self._held]
        if not missing:
            if time.monotonic() >= self.deadline:
                self.lapse()
                return None
            return mark
        core = self.core
        sent = time.monotonic()
        try:
            replies = core.io().run_batch(
                [
                    scripts.hold(self.keys, t, self.holder, self.lease_ms, renew=False)
                    for t in missing
                ]
            )
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            return None
        ends = sent + self.lease * (1 - _MARGIN)
        with self.lock:
            if mark.epoch != self.store.epoch:
                return None
            for table, reply in zip(missing, replies, strict=True):
                if int(reply[1]):
                    self._held[table] = ends
            self.deadline = min(self._held.values(), default=0.0)
        return mark

    def held_tables(self) -> list[str]:
        """The tables whose leases the listener renews."""
        with self.lock:
            return list(self._held)

    def renewed(self, tables: Sequence[str], held: Sequence[bool], sent: float) -> None:
        """The listener's renewal, sent at ``sent``, came back."""
        with self.lock:
            self.renewals += 1
            if not all(held) or (self._held and time.monotonic() >= self.deadline):
                # pruned by a writer, or lapsed meanwhile (paused): writers may have gone
                # on without this process's acknowledgement
                self._lapse_locked()
                return
            ends = sent + self.lease * (1 - _MARGIN)
            for table in tables:
                if table in self._held:
                    self._held[table] = ends
            self.deadline = min(self._held.values(), default=0.0)

    def lapse(self) -> None:
        """A lease ended: empty the store; every table is held anew before it is kept."""
        with self.lock:
            self._lapse_locked()

    def _lapse_locked(self) -> None:
        if self._held:
            self.lapses += 1
            log.info("local tier %s: lease lapsed, tier emptied", self.holder)
        self._held.clear()
        self.deadline = 0.0
        self.store.clear()

    # -- the connection ------------------------------------------------------------------

    def connected(self, socks: Sequence[socket.socket]) -> None:
        """Tracking is on, on every primary, and its invalidations come to ``socks``.

        The tier holds its tables under a new id from here on: a writer waiting for the
        id of the connection before may wait for the fence that connection lost, and
        must see that id's lease end, not renewed by this connection's registrations
        (it would wait for an acknowledgement that cannot come, up to its cap).
        """
        with self.lock:
            self._replaced_gauges = self.keys.local_stats_key(self.holder)
            # before the store's new epoch: a hold() that marked the store after it
            # registers under this id
            self.holder = _new_holder()
            self._watch(socks)
            self.store.clear()
            self.ready = True
            self._ready_event.set()

    def _watch(self, socks: Sequence[socket.socket]) -> None:
        # what is kept per tracked socket, all derived from the same list: its parser, the
        # poll over all of them, and its last PING's number
        self._socks = [(sock, hiredis.Reader()) for sock in socks]
        self._arrivals = _arrivals(socks) if socks else None
        self._pongs = [0] * len(socks)

    def broken(self) -> None:
        """The invalidation connection or tracking is gone: serve nothing, keep nothing."""
        with self.lock:
            self._broken_locked()

    def _broken_locked(self) -> None:
        if self.ready:
            self.breaks += 1
        self.ready = False
        self._ready_event.clear()
        self._watch(())
        self._held.clear()
        self.deadline = 0.0
        self._acks.clear()
        self.store.clear()

    def reset(self, reason: str) -> None:
        """Empty the store and hold every table anew (a restarted server)."""
        log.info("local tier %s emptied: %s", self.holder, reason)
        self.lapse()

    # -- gauges ----------------------------------------------------------------------------

    def gauges(self) -> dict[str, Any]:
        """What ``cache.stats()["local"]`` shows for this process."""
        store = self.store
        last = store.last_invalidation
        return {
            "holder": self.holder,
            "ready": self.ready,
            "consistency": self.consistency,
            "entries": len(store),
            "bytes": store.bytes,
            "max_entries": store.max_entries,
            "max_bytes": store.max_bytes,
            "evictions": store.evictions,
            "invalidations": store.invalidations,
            "seconds_since_invalidation": (
                None if last is None else round(time.monotonic() - last, 3)
            ),
            "tables_held": len(self._held),
            "lapses": self.lapses,
            "reconnects": self.breaks,
        }

    def gauge_commands(self) -> list[tuple[Any, ...]]:
        """Commands that publish this process's gauges for ``sa-redis-cache stats``."""
        # on the listener's thread: the local counters only, no wait for fills' replies
        totals = self.core.counters.snapshot(settled=False).get("total", {})
        fields: dict[str, Any] = {
            "hits": totals.get("local_hits", 0),
            "misses": totals.get("local_misses", 0),
            "pid": os.getpid(),
        }
        for name, value in self.gauges().items():
            fields[name] = "" if value is None else str(value)
        key = self.keys.local_stats_key(self.holder)
        flat = [item for pair in fields.items() for item in pair]
        replaced, self._replaced_gauges = self._replaced_gauges, None
        # written whole each time, so deleting it first costs nothing and replaces a key of
        # another Redis type, on which HSET failed at every renewal and broke the tier
        return [
            *([("DEL", replaced)] if replaced is not None else []),
            ("DEL", key),
            ("HSET", key, *flat),
            ("PEXPIRE", key, max(10_000, self.lease_ms * 3)),
        ]


_TIERS: weakref.WeakSet[LocalTier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for tier in list(_TIERS):
        tier.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
