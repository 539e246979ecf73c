"""Publishes this process's counters to Redis, so that every process's add up in one place.

``cache.stats()`` counts in the process that served the lookups. An attached
:class:`~sa_redis_cache.Cache` also adds what its counters gained since the last publish
into one Redis hash per scope, ``sarc:<namespace>:stats:<scope>`` (``total``,
``model:Product``, ``region:pages``, ``function:profile``; see
:meth:`~sa_redis_cache.protocol.KeyScheme.stats_key`), every ``stats_publish_interval``
seconds: one pipeline of ``HINCRBY``, and a ``PEXPIRE`` that keeps each hash for 7 days
after its last publish. ``sa-redis-cache stats`` reads those hashes: the hits and misses
of every process, summed.

How it behaves:

* It runs on a daemon thread with a Redis connection pool of its own, made from the
  cache's synchronous client's settings: an asyncio application's event loop never waits
  for it, and it never takes a connection the application's pool could have given out.
* Only deltas are sent, computed from :meth:`Stats.snapshot
  <sa_redis_cache.stats.Stats.snapshot>` against what was last delivered. A publish that
  fails (Redis away) delivers nothing and changes nothing here: the next one sends the
  sum. It never raises; failed attempts are retried with a backoff (doubling, up to
  ``MAX_BACKOFF`` seconds) and logged once per outage.
* Delivery is at least once: a publish whose reply is lost (a timeout after Redis applied
  it) is sent again and counted twice. The numbers are for watching, not for billing.
* A stats key of another Redis type, or a field ``HINCRBY`` refuses (not an integer, at
  the largest one), is replaced and the deltas sent again: the hashes hold statistics
  only, and a publisher that failed on them would fail for good (:func:`_healing`).
* It neither asks nor feeds the circuit breaker: a background thread must not decide
  whether the application's reads use Redis, and it keeps its own backoff instead.
* ``detach()`` stops the thread and publishes what is left; a process that exits
  without it loses what it counted since the last publish (at most one interval). In a
  process forked from one that publishes (a pre-forking server), the child starts a
  thread of its own and publishes only what it counts itself; so does a child that
  attaches after the fork, its parent not publishing.

Example::

    cache = Cache(url, namespace="shop", stats_publish_interval=1.0)
    cache.attach(Session)   # starts the publisher
    ...
    cache.detach()          # stops it, after a last publish
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import RedisError

from . import compat
from .errors import ConfigurationError
from .protocol.scripts import COUNTER_TTL_MS
from .redis_io import SyncRedisIO, is_cluster

if TYPE_CHECKING:
    from .context import CacheContext
    from .protocol.scripts import Command
    from .redis_io import SyncClient

__all__ = ["MAX_BACKOFF", "STATS_TTL_MS", "TOTAL", "StatsPublisher", "group_of", "scope_of"]

log = logging.getLogger(__name__)

STATS_TTL_MS = COUNTER_TTL_MS
"""How long a scope's hash lives after its last publish: as long as the version counters."""

MAX_BACKOFF = 30.0
"""Longest wait, in seconds, between two attempts while publishing fails."""

_KINDS = {"models": "model", "regions": "region", "functions": "function"}
_GROUPS = {kind: group for group, kind in _KINDS.items()}
TOTAL = "total"
"""The scope of the counters that count each event once (``cache.stats()["total"]``)."""

# every publisher of the process, running or not: a forked child takes each one's counts
# as its baseline (_after_fork_in_child)
_publishers: weakref.WeakSet[StatsPublisher] = weakref.WeakSet()


def scope_of(group: str, name: str) -> str:
    """The scope name of ``cache.stats()[group][name]``, as :meth:`KeyScheme.stats_key` takes it.

    Example::

        >>> scope_of("models", "Product")
        'model:Product'
    """
    return f"{_KINDS[group]}:{name}"


def group_of(scope: str) -> tuple[str, str] | None:
    """``(group, name)`` of a published scope, the inverse of :func:`scope_of`; None for
    :data:`TOTAL` and for scopes this version does not publish.

    Example::

        >>> group_of("region:pages")
        ('regions', 'pages')
    """
    kind, _, name = scope.partition(":")
    group = _GROUPS.get(kind)
    return None if group is None or not name else (group, name)


def _counts(snapshot: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The non-zero integer counters of a snapshot, by scope (rates and latency left out)."""
    groups = [(TOTAL, snapshot.get(TOTAL, {}))]
    groups += [
        (scope_of(group, name), values)
        for group in _KINDS
        for name, values in snapshot.get(group, {}).items()
    ]
    return {
        scope: {k: v for k, v in values.items() if type(v) is int and v} for scope, values in groups
    }


def _deltas(
    now: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for scope, values in now.items():
        old = before.get(scope, {})
        changed = {}
        for counter, value in values.items():
            delta = value - old.get(counter, 0)
            # below what was delivered: the counters were reset, and count from zero again
            if delta < 0:
                delta = value
            if delta:
                changed[counter] = delta
        if changed:
            out[scope] = changed
    return out


def _healing(commands: list[Command], replies: list[Any]) -> list[Command]:
    """The commands that replace unusable published counters and send their deltas again.

    A hash of another Redis type under a stats key (every ``HINCRBY`` on it failed) is
    deleted; a field holding what ``HINCRBY`` refuses (not an integer, at the largest one)
    is removed. They hold only statistics, and a publisher that failed on them would fail
    for good. Any other error is raised: nothing is deleted because Redis is out of memory
    or read-only.
    """
    healing: list[Command] = []
    dropped: set[Any] = set()
    for command, reply in zip(commands, replies, strict=True):
        if not isinstance(reply, Exception):
            continue
        text = str(reply)
        if command[0] != "HINCRBY" or not isinstance(reply, redis.ResponseError):
            raise reply
        key, field = command[1], command[2]
        if text.startswith("WRONGTYPE"):
            if key not in dropped:
                dropped.add(key)
                healing.append(("DEL", key))
        elif "not an integer" in text or "overflow" in text:
            healing.append(("HDEL", key, field))
        else:
            raise reply
        healing.append(command)
    if healing:
        keys = sorted({command[1] for command in healing})
        log.warning("unusable published cache counters replaced under %s", ", ".join(keys))
        healing += [("PEXPIRE", key, STATS_TTL_MS) for key in keys]
    return healing


def _own_client(client: SyncClient) -> SyncClient:
    """A client with a pool of its own, connecting as ``client`` does.

    The cache's connect hook (the restart check) is left out: it guards entries, and this
    client writes none. A pool of a kind that cannot be copied (Sentinel) is shared, and
    so is a Redis Cluster client (a pool per node, made as it discovers them).
    """
    if is_cluster(client):
        return client
    assert isinstance(client, redis.Redis)
    pool = client.connection_pool
    if type(pool) not in (redis.ConnectionPool, redis.BlockingConnectionPool):
        return client
    kwargs = compat.pool_options_without(pool)
    own = redis.ConnectionPool(connection_class=pool.connection_class, max_connections=2, **kwargs)
    return redis.Redis(connection_pool=own)


class StatsPublisher:
    """Adds one cache's counter deltas into Redis every ``interval`` seconds (0: never).

    :class:`~sa_redis_cache.Cache` makes one; ``attach()`` starts it and ``detach()``
    stops it. :meth:`publish_now` publishes at once (tests, shutdown hooks).

    Example::

        publisher = StatsPublisher(core, interval=1.0)
        publisher.start()
        publisher.publish_now()  # True: delivered, or nothing to deliver
        publisher.stop()         # joins the thread, then publishes what is left
    """

    def __init__(self, core: CacheContext, interval: float, *, stop_timeout: float = 5.0) -> None:
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval >= 0):
            raise ConfigurationError(
                f"stats_publish_interval={interval!r} must be a number of seconds >= 0 "
                "(0 turns publishing off)"
            )
        self.core = core
        self.interval = float(interval)
        self.stop_timeout = stop_timeout
        self.delivered = 0
        """Publishes that reached Redis (nothing to send counts as none)."""
        self.failed = 0
        """Publishes that did not; their deltas went with the next one."""
        self._published: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: SyncClient | None = None
        self._failing = False
        _publishers.add(self)

    @property
    def running(self) -> bool:
        """True while the publishing thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the thread (once; nothing when ``interval`` is 0)."""
        if self.interval <= 0 or self.running:
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(self._stop,),
            name=f"sa_redis_cache-stats-{self.core.namespace}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, publish what is left (one attempt) and close the connections."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(self.stop_timeout)
            self._publish(self.stop_timeout)
        client, self._client = self._client, None
        if isinstance(client, redis.Redis) and client is not self.core.client:
            client.connection_pool.disconnect()

    def publish_now(self) -> bool:
        """Send the deltas since the last delivered publish; False when Redis failed.

        Never raises a Redis error: what was not delivered is sent by the next publish.
        """
        return self._publish(None)

    def _publish(self, lock_timeout: float | None) -> bool:
        # a thread stuck in a publish (a client without timeouts) must not hang detach()
        if not self._lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout):
            log.warning("stats publish skipped: another publish is still waiting for Redis")
            return False
        try:
            now = _counts(self.core.counters.snapshot())
            deltas = _deltas(now, self._published)
            if not deltas:
                return True
            try:
                self._send(deltas)
            except RedisError as exc:
                self.failed += 1
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "could not publish cache counters to Redis (kept, retried later): %s",
                        exc,
                    )
                return False
            if self._failing:
                self._failing = False
                log.info("cache counters published to Redis again")
            self._published = now
            self.delivered += 1
            return True
        finally:
            self._lock.release()

    def _send(self, deltas: dict[str, dict[str, int]]) -> None:
        keys = self.core.keys
        commands: list[Command] = []
        for scope, changed in deltas.items():
            key = keys.stats_key(scope)
            commands += [("HINCRBY", key, counter, n) for counter, n in changed.items()]
            commands.append(("PEXPIRE", key, STATS_TTL_MS))
        if self._client is None:
            self._client = _own_client(self.core.client)
        pipe: Any = self._client.pipeline(transaction=False)  # its methods are untyped
        for command in commands:
            pipe.execute_command(*command)
        healing = _healing(commands, pipe.execute(raise_on_error=False))
        if healing:
            SyncRedisIO(self._client).pipeline(healing)

    def _run(self, stop: threading.Event) -> None:
        delay = self.interval
        while not stop.wait(delay):
            try:
                ok = self.publish_now()
            except Exception:  # a bug here must not kill the thread, nor reach the app
                log.exception("stats publisher failed; it keeps running")
                ok = False
            delay = self.interval if ok else min(max(delay * 2, self.interval), MAX_BACKOFF)

    def after_fork_in_child(self) -> None:
        """Start over in a forked child: its parent publishes what was counted before.

        The thread did not survive the fork, and the locks and connections belong to the
        parent: each is made anew, and the counters inherited from the parent become the
        baseline, so they are not published twice. So for a publisher that is not running
        too (a parent that detached, or never attached, before forking): each child that
        attaches would otherwise publish the parent's counts again, once per child.
        """
        self._lock = threading.Lock()
        self._client = None
        self._failing = False
        self._published = _counts(self.core.counters.snapshot())
        was_running = self._thread is not None
        self._thread = None
        if was_running:
            self.start()


def _after_fork_in_child() -> None:
    for publisher in list(_publishers):
        publisher.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
