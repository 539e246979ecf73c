"""The Redis calls of the cache, written once for ``redis.Redis`` and ``redis.asyncio.Redis``.

The read and write paths run inside SQLAlchemy's synchronous session events, also under
``AsyncSession``: there the events run in a greenlet that SQLAlchemy spawned from the
event loop, and a coroutine can be awaited from them with SQLAlchemy's greenlet bridge
(``sqlalchemy.util.await_``, ``await_only`` before 2.1), which suspends the greenlet and
lets the loop run other tasks until the reply arrives.

:class:`RedisIO` is the one object those paths talk to. It holds the few operations the
library uses (MGET, GET, SET with PX and NX, UNLINK, a Lua script by EVALSHA, several
scripts in one round trip, a pipeline of plain commands, and a sleep for the stampede
poller), each written once: the redis-py methods of both clients have the same names and
arguments, and return a reply (``redis.Redis``) or a coroutine of it
(``redis.asyncio.Redis``). The only difference between the modes is the function that
turns what the client returned into the reply, and the sleep:

* :class:`SyncRedisIO`: the identity and :func:`time.sleep`;
* :class:`AsyncRedisIO`: the greenlet bridge and :func:`asyncio.sleep` through it.

Keys, codec, versions, scripts and the stampede logic above this module are shared.

Example::

    io = SyncRedisIO(redis.Redis())
    io.mget(["a", "b"])                       # [None, None]
    io.pipeline([("INCR", "n"), ("PEXPIRE", "n", 1000)])

    # inside a session event run by AsyncSession (a SQLAlchemy greenlet):
    io = AsyncRedisIO(redis.asyncio.Redis())
    io.mget(["a", "b"])                       # the event loop serves other tasks meanwhile
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol, Union, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import NoScriptError

from . import compat
from .errors import ConfigurationError
from .protocol import scripts
from .redaction import redact_text, redact_url

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence

    from .protocol.scripts import Command, Script, ScriptCall


__all__ = [
    "CLUSTER_PARAMETER",
    "HELD_SHARE",
    "AsyncClient",
    "AsyncClients",
    "AsyncRedisIO",
    "Held",
    "IdleConnections",
    "OwedReplies",
    "Pending",
    "PoolShare",
    "RedisIO",
    "SyncClient",
    "SyncRedisIO",
    "ThreadConnections",
    "async_client_from_url",
    "client_from_url",
    "clients_for",
    "is_cluster",
    "split_cluster_url",
    "unlink_matching",
]

SyncClient = Union[redis.Redis, redis.cluster.RedisCluster]  # noqa: UP007 - a runtime alias on 3.10
"""What the cache's synchronous Redis client may be: one server, or a Redis Cluster."""

AsyncClient = Union[redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster]  # noqa: UP007 - as above
"""What the cache's asyncio Redis client may be: one server, or a Redis Cluster."""

CLUSTER_PARAMETER = "cluster"
"""The query parameter of a Redis URL that asks for a Redis Cluster client:
``redis://host:port/0?cluster=true`` (or ``rediss://`` for TLS). redis-py's URLs name the
transport in the scheme and client options in the query; whether to speak the cluster
protocol is such an option, read and removed by this library before redis-py sees the URL
(a plain redis-py client given it fails on connect, rather than talking to one node)."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _identity(reply: Any) -> Any:
    return reply


class RedisIO:
    """The Redis operations the cache uses, over one client; see the module docstring.

    ``client`` is a ``redis.Redis`` or a ``redis.asyncio.Redis``; ``wait`` turns what one
    of its methods returned into the reply; ``sleep`` pauses the calling session. Use
    :class:`SyncRedisIO` or :class:`AsyncRedisIO` rather than this class.

    Example::

        io = SyncRedisIO(redis.Redis())
        io.set("k", b"v", px=1000, nx=True)   # True the first time, then False
    """

    __slots__ = ("_sleep", "_wait", "client", "is_async", "replies_out", "scripts_seen", "threads")

    def __init__(
        self,
        client: Any,
        *,
        wait: Callable[[Any], Any],
        sleep: Callable[[float], Any],
        is_async: bool,
    ) -> None:
        self.client = client
        self.is_async = is_async
        self._wait = wait
        self._sleep = sleep
        # the SHAs of the scripts run by this client since it last met NOSCRIPT (a server
        # that lost its scripts loses them all): the ones send_later may send unwaited
        self.scripts_seen: set[str] = set()
        # a connection per thread, for clients whose commands go past execute_command
        # (SyncRedisIO); None: every call takes one from the client's pool
        self.threads: ThreadConnections | None = None
        # the connections send_later's replies hold out of the pool now
        self.replies_out = PoolShare()

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key), in one round trip."""
        return cast("list[bytes | None]", self._wait(self.client.mget(keys)))

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None."""
        return cast("bytes | None", self._wait(self.client.get(key)))

    def set(self, key: str, value: bytes | str, *, px: int, nx: bool = False) -> bool:
        """SET with a TTL in milliseconds; with ``nx``, only when the key is absent."""
        return bool(self._wait(self.client.set(key, value, px=px, nx=nx)))

    def unlink(self, *keys: str | bytes) -> int:
        """UNLINK ``keys``; how many existed."""
        return int(self._wait(self.client.unlink(*keys)))

    def scan(self, pattern: str) -> Iterator[bytes]:
        """Every key matching ``pattern`` (SCAN, 1,000 per round trip; on a Redis Cluster,
        every primary's), each round trip awaited like the other calls."""
        found = self.client.scan_iter(match=pattern, count=1000)
        if not self.is_async:
            yield from found
            return
        while (key := self._wait(anext(found, None))) is not None:
            yield key

    def unlink_matching(self, pattern: str, *, only: Callable[[bytes], bool] | None = None) -> int:
        """UNLINK every key matching ``pattern`` (with ``only``: that it accepts), in
        batches of 500; how many went. Never a ``FLUSH``: the server may be shared."""
        removed = 0
        batch: list[bytes] = []
        for key in self.scan(pattern):
            if only is not None and not only(key):
                continue
            batch.append(key)
            if len(batch) >= 500:
                removed += self.unlink(*batch)
                batch.clear()
        if batch:
            removed += self.unlink(*batch)
        return removed

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script``; on NOSCRIPT (a restarted or flushed server) load it and retry."""
        try:
            reply = self._evalsha(script, keys, args)
        except NoScriptError:
            self.reload_scripts([script])
            reply = self._evalsha(script, keys, args)
        self.scripts_seen.add(script.sha)
        return reply

    def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self._wait(self.client.evalsha(script.sha, len(keys), *keys, *args))

    def _script_load(self, script: Script) -> None:
        self._wait(self.client.script_load(script.source))

    def reload_scripts(self, scripts: Iterable[Script]) -> None:
        """The server answered NOSCRIPT: it lost every script (a restart, SCRIPT FLUSH).
        Load ``scripts`` again, and send no script unwaited (:meth:`send_later`) until it
        has run again.

        Example::

            io.reload_scripts([scripts.script("fill")])
        """
        self.scripts_seen.clear()
        for script in scripts:
            self._script_load(script)

    def look(
        self, keys: Sequence[str], lease_key: str, token: str
    ) -> tuple[list[bytes | None], bool]:
        """The values of ``keys`` (an entry first) and whether the entry's fill lease
        (``lease_key``) was taken for ``token``: asked only when the entry is absent, in
        the same script (``lua/look.lua``). One round trip.

        Example::

            values, leased = io.look([entry, *counters], keys.lease_key(entry), token)
        """
        got = self.run_script(*scripts.look(keys, lease_key, token))
        return list(got[:-1]), bool(got[-1])

    def run_batch(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run several script calls in one round trip; their replies in order.

        A ``Script`` object queued in a pipeline makes redis-py send SCRIPT EXISTS before
        every execute, a second round trip on each commit. Raw EVALSHA is queued instead,
        and on NOSCRIPT the scripts are loaded and the batch is sent once more: every
        script given here must be safe to run twice. A batch holding a fence is not sent
        again: :class:`ScriptsReloaded` is raised once the scripts are loaded.
        """
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [self.run_script(script, keys, args)]
        lent = self._lend()
        if lent is not None:
            return self._run_batch_on(lent, calls)
        client = self.client
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return list(self._wait(pipe.execute()))
            except NoScriptError:
                if attempt:
                    raise
                self.reload_for_another_try(calls)
        raise AssertionError("unreachable")  # pragma: no cover

    def reload_for_another_try(self, calls: Sequence[ScriptCall]) -> None:
        """A call of batch ``calls`` met NOSCRIPT: load the scripts again, so that the batch
        can be sent once more; raise :class:`ScriptsReloaded` when it holds a script that
        vouches for the calls before it (a fence), which ran after the refused call."""
        self.reload_scripts(script for script, _, _ in calls)
        if any(script.name in scripts.VOUCHING_SCRIPTS for script, _, _ in calls):
            raise ScriptsReloaded(
                "NOSCRIPT in a batch that holds a fence: the scripts are loaded again, "
                "and the fences must be new"
            )

    def send_batch(self, calls: Sequence[ScriptCall]) -> Pending | None:
        """Send several script calls now and read their replies later (:class:`Pending`),
        so that the round trip overlaps the caller's other work (a database statement).

        None where that is not offered (the asyncio and cluster clients, a client whose
        commands something watches through ``execute_command``
        (:func:`compat.sends_directly <sa_redis_cache.compat.sends_directly>`), and a
        ``BlockingConnectionPool``): use :meth:`run_batch`. Every script given here must
        be safe to run twice, as for :meth:`run_batch`. Raises ``RedisError`` when the
        calls cannot be sent. They go on the thread's own connection when it has one free
        (:class:`ThreadConnections`), else on one taken from the pool.

        Example::

            pending = io.send_batch(calls)     # sent
            ...                                # the database works meanwhile
            replies = pending.replies() if pending else io.run_batch(calls)
        """
        return self._send(calls, capped=False)

    def _send(self, calls: Sequence[ScriptCall], *, capped: bool) -> Pending | None:
        # capped: the reply may wait long (send_later): at most an eighth of the pool
        if self.is_async or not compat.sends_directly(self.client):
            return None
        if isinstance(self.client.connection_pool, redis.BlockingConnectionPool):
            # the connection stays out of the pool while the caller works, and that work
            # can wait (a flush's statement for a row lock) on a thread that waits for a
            # connection of this pool: a deadlock until the pool's timeout
            return None
        commands = [scripts.evalsha(*call) for call in calls]
        lent = self._lend()
        if lent is not None:
            try:
                compat.send_on(lent.connection, commands)
            except BaseException:
                lent.busy = False
                raise
            return Pending(self, lent.connection, calls, lent)
        share = self.replies_out if capped else None
        if share is not None and not share.take(self.client.connection_pool.max_connections):
            return None
        try:
            connection = compat.send_now(self.client, commands)
        except BaseException:
            if share is not None:
                share.give_back()
            raise
        return Pending(self, connection, calls, share=share)

    def send_later(self, call: ScriptCall) -> Pending | None:
        """Send one script call whose reply can wait (a fill): its :class:`Pending`, or
        None (use :meth:`run_script`) where :meth:`send_batch` offers none; when the
        server may not have the script (it has not run on this client since it last met
        NOSCRIPT), whose NOSCRIPT, read later, would hold the call back until then; and,
        when the thread's own connection (:class:`ThreadConnections`) is not free, when
        such replies would hold more than an eighth of the pool's ``max_connections`` out
        of it (:class:`PoolShare`): more could leave another thread without a connection
        (redis-py 8's pools hold 100 by default).

        Example::

            pending = io.send_later(call)
            reply = pending.replies()[0] if pending else io.run_script(*call)
        """
        if call[0].sha not in self.scripts_seen:
            return None
        return self._send([call], capped=True)

    def run_then(self, call: ScriptCall, commands: Sequence[Command]) -> list[Any]:
        """Run a script call, then ``commands``, on one connection in one round trip.

        For commands that concern the writes of their own connection (``WAITAOF`` and
        ``WAIT`` count the acknowledgements of those alone: on another connection of the
        pool they would answer at once). Replies in order, an error reply as its
        exception (not raised); the script is loaded and the whole batch sent again on
        NOSCRIPT. Raises ``RedisError`` when the connection fails.

        Example::

            ids, on_disk = io.run_then(wb_enqueue(...), [wait_for_fsync(100)])
        """
        script, keys, args = call
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            for command in commands:
                pipe.execute_command(*command)
            replies = list(self._wait(pipe.execute(raise_on_error=False)))
            if not isinstance(replies[0], NoScriptError) or attempt:
                return replies
            self.reload_scripts([script])
        raise AssertionError("unreachable")  # pragma: no cover

    def _lend(self) -> Held | None:
        threads = self.threads
        if threads is None or not compat.sends_directly(self.client):
            return None
        return threads.lend()

    def _run_batch_on(self, lent: Held, calls: Sequence[ScriptCall]) -> list[Any]:
        commands = [scripts.evalsha(*call) for call in calls]
        try:
            replies = compat.run_on(lent.connection, commands)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                self.reload_for_another_try(calls)
                replies = compat.run_on(lent.connection, commands)
        finally:
            lent.busy = False
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def replicas_of(self, key: str) -> int:
        """How many replicas must confirm a write of ``key`` before it is known to survive
        a failover: none on a single server (no failover moves its data elsewhere); on a
        cluster, every replica of the slot's primary (``cluster_io``).

        Example::

            io.replicas_of("sarc:shop:{shop:views}:wb:00ff:0")  # 0
        """
        del key
        return 0

    def pipeline(self, commands: Iterable[Command]) -> list[Any]:
        """Send ``commands`` in one round trip (no MULTI); their replies in order."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(self._wait(pipe.execute()))

    def sleep(self, seconds: float) -> None:
        """Pause the calling session; under asyncio, other tasks run meanwhile."""
        self._wait(self._sleep(seconds))


class PoolShare:
    """How many connections replies hold out of a pool, kept to an eighth of it
    (:meth:`RedisIO.send_later`); a forked child starts from none.

    Example::

        share = PoolShare()
        if share.take(pool.max_connections):
            ...               # one connection out, until share.give_back()
    """

    __slots__ = ("_lock", "_out", "_pid")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out = 0
        self._pid = os.getpid()

    def take(self, max_connections: Any) -> bool:
        """Count one more, unless that makes more than an eighth of ``max_connections``."""
        with self._lock:
            if self._pid != os.getpid():
                self._pid, self._out = os.getpid(), 0
            if isinstance(max_connections, int) and (self._out + 1) * 8 > max_connections:
                return False
            self._out += 1
            return True

    def give_back(self) -> None:
        """One fewer out."""
        with self._lock:
            self._out = max(0, self._out - 1)


class ScriptsReloaded(NoScriptError):
    """A batch met NOSCRIPT and holds a fence, which Redis ran after the refused call: the
    scripts are loaded again, and the sender sends the batch again with new fences
    (:meth:`Fences.run <sa_redis_cache.local.fences.Fences.run>`). A holder that saw the
    old fence may have acknowledged it before the refused call's changes existed.

    Example::

        try:
            io.run_batch([*commit_calls, *fence_calls])
        except ScriptsReloaded:
            ...  # new fence calls, under a new token
    """


class Pending:
    """Script calls sent by :meth:`RedisIO.send_batch` whose replies are not read yet.

    Read them once with :meth:`replies` (or drop them with :meth:`discard`): until then
    the connection they were sent on is out of the pool.

    Example::

        pending = io.send_batch(calls)
        replies = pending.replies()   # as run_batch(calls) would return them
    """

    __slots__ = ("_calls", "_connection", "_io", "_lent", "_share")

    def __init__(
        self,
        io: RedisIO,
        connection: Any,
        calls: Sequence[ScriptCall],
        lent: Held | None = None,
        *,
        share: PoolShare | None = None,
    ) -> None:
        self._io = io
        self._connection: Any = connection
        self._calls = calls
        # the sending thread's own connection (ThreadConnections), lent until the replies
        # are read; None: a connection of the client's pool (counted in share, if given)
        self._lent = lent
        self._share = share

    def _read(self, connection: Any) -> list[Any]:
        lent, share = self._lent, self._share
        if lent is None:
            try:
                return compat.read_replies(self._io.client, connection, len(self._calls))
            finally:
                if share is not None:
                    share.give_back()
        try:
            return compat.read_on(connection, len(self._calls))
        finally:
            lent.busy = False

    def replies(self, *, resend: bool = True) -> list[Any]:
        """The replies in order, as :meth:`RedisIO.run_batch` returns them.

        A server that lost its scripts (NOSCRIPT) gets them loaded and the calls run
        again; so does a connection lost before the replies came (the client's own
        retry would have sent them again too), unless ``resend`` is False: then its
        ``ConnectionError`` or ``TimeoutError`` is raised. Other error replies are raised.
        """
        connection, self._connection = self._connection, None
        if connection is None:
            raise RuntimeError("the replies of these calls were already read")
        io, calls = self._io, self._calls
        try:
            got = self._read(connection)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if not resend:
                raise
            return io.run_batch(calls)
        if any(isinstance(reply, NoScriptError) for reply in got):
            io.reload_for_another_try(calls)
            return io.run_batch(calls)
        for reply in got:
            if isinstance(reply, Exception):
                raise reply
        return got

    def arrived(self, timeout: float) -> bool:
        """Whether the replies are here, or :meth:`replies` can say at once what became
        of them (read already, a connection dropped since), waiting up to ``timeout`` s."""
        connection = self._connection
        if connection is None or getattr(connection, "_sock", None) is None:
            return True
        try:
            return bool(connection.can_read(timeout))
        except Exception:  # noqa: BLE001 - any broken connection: replies() says what became of it
            return True

    def discard(self) -> None:
        """Read and drop the replies (the caller no longer needs them); never raises
        a Redis error."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        # a lost connection was dropped; what the calls did is the callers' concern
        with contextlib.suppress(redis.exceptions.RedisError):
            self._read(connection)


class Settle(Protocol):
    """How an owed reply is read: ``settle(pending, resend=...)`` (:class:`OwedReplies`).

    Example::

        def settle(pending: Pending, *, resend: bool) -> None:
            count(pending.replies(resend=resend))
    """

    def __call__(self, pending: Pending, *, resend: bool) -> None: ...


MAX_OWED = 64
"""How many threads may each hold a connection out of the pool for an unread reply
(:class:`OwedReplies`) before the one that sends next reads the others' (threads that
ended, or went quiet, would otherwise keep theirs)."""


class OwedReplies:
    """Script calls sent without waiting for their replies, one batch per thread: a
    miss's fill, whose reply only says whether it was stored.

    The sending thread reads its reply at its next call of the cache (:meth:`settle_own`,
    before the call is sent), so that thread's reads come after its fills, as on one
    connection. Whoever takes the counters reads every thread's replies that have come
    (:meth:`settle_all`), so they count the fills sent. Until then the reply's connection
    stays out of the pool. A forked child forgets the parent's: the sockets are the
    parent's, and so are the replies.

    ``settle(pending, resend=...)`` reads a reply and must not raise; ``resend`` is False when
    the reply is read on another thread's behalf: a call whose connection was lost is not
    sent again there (it would make the counters wait for a round trip or a connect).

    Example::

        owed = OwedReplies()
        owed.owe(io.send_batch([fill_call]), lambda pending, *, resend: print(pending.replies()))
        ...
        owed.settle_own()      # this thread's next call: prints [1]
    """

    __slots__ = ("_lock", "_pid", "by_thread")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # thread ident (or a key of its own for a reply settle_all left) -> what is owed
        self.by_thread: dict[int, tuple[Pending, Settle]] = {}

    def owe(self, pending: Pending, settle: Settle) -> None:
        """Hold ``pending`` until the calling thread's next call; ``settle`` reads it."""
        self._forget_if_forked()
        ident = threading.get_ident()
        with self._lock:
            earlier = self.by_thread.pop(ident, None)
            self.by_thread[ident] = (pending, settle)
            crowded = len(self.by_thread) > MAX_OWED
        if earlier is not None:
            earlier[1](earlier[0], resend=True)
        if crowded:
            self.settle_all(wait=0.0, keep_own=True)

    def settle_own(self) -> None:
        """Read the calling thread's owed replies, if any (blocks until they arrive)."""
        ident = threading.get_ident()
        if ident not in self.by_thread:
            return
        self._forget_if_forked()
        with self._lock:
            owed = self.by_thread.pop(ident, None)
        if owed is not None:
            owed[1](owed[0], resend=True)

    def settle_all(self, wait: float, *, keep_own: bool = False) -> None:
        """Read every thread's owed replies that arrive within ``wait`` seconds in all;
        the later ones stay owed (a Redis that stopped answering delays no caller of
        this more than ``wait``). ``keep_own``: leave the calling thread's."""
        self._forget_if_forked()
        own = threading.get_ident()
        with self._lock:
            taken = [item for item in self.by_thread.items() if not (keep_own and item[0] == own)]
            for key, _ in taken:
                del self.by_thread[key]
        deadline = time.monotonic() + wait
        late: list[tuple[int, tuple[Pending, Settle]]] = []
        for key, (pending, settle) in taken:
            if pending.arrived(max(0.0, deadline - time.monotonic())):
                settle(pending, resend=key == own)
            else:
                late.append((key, (pending, settle)))
        if late:
            with self._lock:
                for key, owed in late:
                    # the thread may owe a newer call by now: keep this one beside it
                    self.by_thread[key if key not in self.by_thread else -id(owed)] = owed

    def _forget_if_forked(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self.by_thread = {}


class Held:
    """A thread's connection (:class:`ThreadConnections`) and whether it is lent: to a
    call in progress, or to replies not read yet (:class:`Pending`), which any thread may
    read, and which give it back (``busy = False``) once read.

    Example::

        lent = threads.lend()          # busy
        ...                            # one call on lent.connection
        lent.busy = False
    """

    __slots__ = ("__weakref__", "busy", "connection", "idle", "pid")

    def __init__(self, connection: Any, idle: IdleConnections) -> None:
        self.connection = connection
        self.idle = idle
        self.pid = os.getpid()
        self.busy = False

    def __del__(self) -> None:
        # its thread ended (or the cache let go of it): the connection waits for the next
        # new thread, or is closed now, not whenever the collector reaches the socket
        # (which would warn that it was left open)
        if self.connection is None:
            return
        if self.pid == os.getpid():
            self.idle.keep(self.connection)
        else:  # a forked child: closing leaves the parent's socket open (redis-py checks)
            _close_quietly(self.connection)


class IdleConnections:
    """Connections of threads that ended, for the next new threads: a server that makes a
    thread (or a greenlet) per request would otherwise connect, check the server's run id
    and leave a socket in TIME_WAIT for every request. At most ``room`` are kept; closed
    ones close whatever comes back to them.

    Example::

        idle = IdleConnections(room=12)
        idle.keep(connection)          # a thread ended
        idle.take()                    # the connection, for a new thread
    """

    __slots__ = ("_connections", "closed", "room")

    def __init__(self, room: int) -> None:
        self.room = room
        self.closed = False
        # appended and popped without a lock: keep() runs in __del__, possibly while
        # this thread is inside take() or close()
        self._connections: collections.deque[Any] = collections.deque()

    def keep(self, connection: Any) -> None:
        """Keep ``connection`` for a new thread, or close it (closed, or no room)."""
        if self.closed or len(self._connections) >= self.room:
            _close_quietly(connection)
            return
        self._connections.append(connection)
        self._close_if_closed()

    def _close_if_closed(self) -> None:
        # close() may have run since keep() looked (detach() on another thread): it may
        # not have seen the connection just kept
        if self.closed:
            self.close()

    def take(self) -> Any | None:
        """An idle connection, or None."""
        try:
            return self._connections.pop()
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        """Close every idle connection, and those given back from now on."""
        self.closed = True
        while (connection := self.take()) is not None:
            _close_quietly(connection)


def _close_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):
        connection.disconnect()


HELD_SHARE = 8
"""Threads may hold at most one connection each outside the client's pool for every
``HELD_SHARE`` the pool may hold (``max_connections``; redis-py 8's default, 100, lets 12
threads hold one)."""


class ThreadConnections:
    """A connection per thread, outside a client's pool, for that thread's calls.

    redis-py takes a connection from the pool for every call and gives it back after:
    ~20 µs of locks, a readiness poll and observability records, a quarter of a loopback
    round trip and more than a tenth of a cache hit. A thread that keeps its own pays
    none of it. The connection is made as the pool makes its own
    (:func:`compat.connection_outside_pool <sa_redis_cache.compat.connection_outside_pool>`,
    which also says which pools get none), connects on first use, is checked before each
    call as the pool checks its own, and reconnects after an error as pool connections
    do. When its thread ends it waits for the next new thread (:class:`IdleConnections`);
    :meth:`drop_all` closes them all; a forked child makes its own.

    One per pool (:meth:`of`), whichever caches and workers use it: at most
    ``max_connections // HELD_SHARE`` threads hold one (at least one thread); the others,
    and a call made while the thread's connection is lent (a reply not read yet), use the
    pool as before. ``client.close()`` closes the pool's connections, not these.

    Example::

        threads = ThreadConnections.of(redis.Redis())
        lent = threads.lend() if threads else None      # None: use the pool
        if lent is not None:
            try:
                compat.call_on(lent.connection, ("MGET", "a"))
            finally:
                lent.busy = False
    """

    __slots__ = ("__weakref__", "_cap", "_idle", "_local", "_made", "_pid", "_pool")

    @classmethod
    def of(cls, client: Any) -> ThreadConnections | None:
        """The thread connections of ``client``'s pool; None for a client without one (a
        cluster client)."""
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            return None
        with _OF_POOL_LOCK:
            threads = _OF_POOL.get(pool)
            if threads is None:
                threads = _OF_POOL[pool] = cls(pool)
            return threads

    def __init__(self, pool: Any) -> None:
        # weakly: the pool is this object's key in _of_pool
        self._pool = weakref.ref(pool)
        cap = getattr(pool, "max_connections", None)
        self._cap = max(1, cap // HELD_SHARE) if isinstance(cap, int) else 0
        self._local = threading.local()
        # every thread's Held, to count them; a thread that ends drops its own
        self._made: weakref.WeakSet[Held] = weakref.WeakSet()
        self._idle = IdleConnections(self._cap)
        self._pid = os.getpid()

    def lend(self) -> Held | None:
        """The calling thread's connection, lent (``busy``) until the caller sets
        ``busy = False``; None when the thread has none, or it is lent already."""
        held: Held | None = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid():
            held = self._hold()
        if held.busy or held.connection is None:
            return None
        held.busy = True
        try:
            compat.drop_if_stale(held.connection)
        except BaseException:
            held.busy = False
            raise
        return held

    def _hold(self) -> Held:
        if self._pid != os.getpid():
            # a forked child: the parent's sockets are the parent's
            self._pid = os.getpid()
            self._made = weakref.WeakSet()
            self._idle = IdleConnections(self._cap)
        connection = self._idle.take()
        pool = self._pool()
        if connection is None and pool is not None and len(self._made) < self._cap:
            connection = compat.connection_outside_pool(pool)
        held = Held(connection, self._idle)
        if connection is not None:
            self._made.add(held)
        # a thread refused one keeps using the pool (checked once, not on every call)
        self._local.held = held
        return held

    def drop_all(self) -> None:
        """Let go of every thread's connection: closed now, or, lent to a call, once
        that call gives it back."""
        idle, self._idle = self._idle, IdleConnections(self._cap)
        idle.close()
        self._local = threading.local()
        made, self._made = self._made, weakref.WeakSet()
        for held in list(made):
            # now, not when the collector reaches it: an exception's traceback (one the
            # application keeps, a test's) may hold it in a cycle, and the socket's own
            # finalizer, run first, warns that it was left open. A thread that still
            # uses it reconnects on its next send, as after any disconnect
            if not held.busy and held.connection is not None:
                _close_quietly(held.connection)


_OF_POOL: weakref.WeakKeyDictionary[Any, ThreadConnections] = weakref.WeakKeyDictionary()
_OF_POOL_LOCK = threading.Lock()


class SyncRedisIO(RedisIO):
    """:class:`RedisIO` over a ``redis.Redis``: every call blocks until its reply.

    Example::

        SyncRedisIO(redis.Redis()).get("missing")  # None
    """

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        super().__init__(client, wait=_identity, sleep=time.sleep, is_async=False)
        self.threads = ThreadConnections.of(client)

    # The per-read commands go straight to the thread's connection (ThreadConnections) or
    # a pooled one (compat.call_now), unless something watches execute_command
    # (compat.sends_directly).

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` (None for a missing key), in one round trip."""
        if compat.sends_directly(self.client):
            return cast("list[bytes | None]", self.call(("MGET", *keys)))
        return super().mget(keys)

    def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if compat.sends_directly(self.client):
            return self.call(scripts.evalsha(script, keys, args))
        return super()._evalsha(script, keys, args)

    def _script_load(self, script: Script) -> None:
        if compat.sends_directly(self.client):
            self.call(("SCRIPT", "LOAD", script.source))
        else:
            super()._script_load(script)

    def pipeline(self, commands: Iterable[Command]) -> list[Any]:
        """Send ``commands`` in one round trip (no MULTI); their replies in order, as
        redis-py's pipeline gives them. On the thread's connection when it has one free."""
        sent = list(commands)  # before lending: a generator may raise
        lent = self._lend()
        if lent is None:
            return super().pipeline(sent)
        try:
            replies = compat.run_on(lent.connection, sent)
        finally:
            lent.busy = False
        return compat.as_pipelines_return(self.client, sent, replies)

    def call(self, command: Command) -> Any:
        """Run one command whose reply redis-py leaves as the server sent it (MGET,
        EVALSHA) the way the cache runs its own: on the thread's connection, or one of
        the pool's (:func:`compat.call_now <sa_redis_cache.compat.call_now>`). For a
        client that :func:`compat.sends_directly <sa_redis_cache.compat.sends_directly>`.

        Example::

            SyncRedisIO(redis.Redis()).call(("MGET", "a", "b"))   # [None, None]
        """
        lent = self.threads.lend() if self.threads is not None else None
        if lent is None:
            return compat.call_now(self.client, command)
        try:
            return compat.call_on(lent.connection, command)
        finally:
            lent.busy = False

    def drop_connections(self) -> None:
        """Close the threads' own connections (:class:`ThreadConnections`), each once no
        call uses it: the cache is detached.

        Example::

            io.drop_connections()
        """
        if self.threads is not None:
            self.threads.drop_all()


class AsyncRedisIO(RedisIO):
    """:class:`RedisIO` over a ``redis.asyncio.Redis``, for code run by ``greenlet_spawn``.

    Each call hands the client's coroutine to the event loop through SQLAlchemy's greenlet
    bridge and suspends the calling greenlet until the reply: the loop is never blocked.
    Outside such a greenlet its methods raise ``sqlalchemy.exc.MissingGreenlet``; the
    cache only uses it when :func:`in_greenlet` says so. The client's connections belong
    to the event loop that opened them.

    Example::

        io = AsyncRedisIO(redis.asyncio.Redis())
        await greenlet_spawn(io.get, "missing")  # None
    """

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        super().__init__(client, wait=compat.await_, sleep=asyncio.sleep, is_async=True)


class AsyncClients:
    """The asyncio Redis client(s) of one cache, by event loop.

    A client given by the application serves one loop at a time (its connections belong
    to the loop that opened them): used from a second loop while the first is still open,
    it raises :class:`~sa_redis_cache.errors.ConfigurationError` instead of redis-py's
    obscure failures. A ``factory`` (the cache was made from a URL) makes one client per
    running loop, on first use: ``asyncio.run`` called several times, or loops in several
    threads, each get their own, closed when their loop shuts down (:meth:`_closer`).
    ``prepare`` is called with each client before its first
    command (the cache hooks its pool); ``make_io`` wraps each client (the cluster variant
    of :mod:`sa_redis_cache.cluster_io` for a cluster client).

    Example::

        clients = AsyncClients(factory=lambda: redis.asyncio.Redis.from_url(url))
        clients.current()   # inside a coroutine or a SQLAlchemy greenlet
        await clients.aclose()
    """

    def __init__(
        self,
        client: Any = None,
        *,
        factory: Callable[[], Any] | None = None,
        prepare: Callable[[Any], None] = _identity,
        make_io: Callable[[Any], AsyncRedisIO] = AsyncRedisIO,
    ) -> None:
        if (client is None) == (factory is None):
            raise ValueError("AsyncClients needs a client or a factory, not both")
        self._factory = factory
        self._prepare = prepare
        self._make_io = make_io
        # each open loop's client (an entry leaves when its loop shuts down: _closer)
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._given: AsyncRedisIO | None = None
        self._given_loop: asyncio.AbstractEventLoop | None = None
        if client is not None:
            prepare(client)
            self._given = make_io(client)
        # (loop, io) of the last lookup, read and written as one object (threads)
        self._last: tuple[object, AsyncRedisIO | None] = (None, None)

    def current(self) -> AsyncRedisIO:
        """The :class:`AsyncRedisIO` for the running event loop."""
        loop = asyncio.get_running_loop()
        given = self._given
        if given is not None:
            if loop is not self._given_loop:
                self._adopt(loop)
            return given
        last_loop, last_io = self._last
        if last_loop is loop and last_io is not None:
            return last_io
        made: _LoopClient | None = None
        with self._lock:
            found = self._by_loop.get(loop)
            if found is None:
                self._forget_closed_loops()
                assert self._factory is not None
                client = self._factory()
                self._prepare(client)
                io = self._make_io(client)
                found = made = self._by_loop[loop] = _LoopClient(io, self._closer(loop, io))
        if made is not None:
            _start(made.closer)
        self._last = (loop, found.io)
        return found.io

    async def _closer(
        self, loop: asyncio.AbstractEventLoop, io: AsyncRedisIO
    ) -> AsyncGenerator[None, None]:
        """Closes ``io``'s client when its loop shuts down: started by :meth:`current`, it
        waits at its ``yield``, an async generator the loop finalizes
        (``loop.shutdown_asyncgens()``, which ``asyncio.run`` awaits before it closes the
        loop), or :meth:`aclose` closes. Without it the client, its connections (a socket
        each, a client on the server) and the loop itself were kept for the life of the
        cache: the client's connections hold their loop, so the weak key never died."""
        try:
            yield
        finally:
            with self._lock:
                found = self._by_loop.get(loop)
                if found is not None and found.io is io:
                    del self._by_loop[loop]
                if self._last[1] is io:
                    self._last = (None, None)
            await io.client.aclose()

    def _forget_closed_loops(self) -> None:
        """Let go of the clients of loops closed without finalizing their async
        generators (a loop closed by hand): the garbage collector closes their sockets.
        Holds ``_lock``."""
        for loop in [known for known in self._by_loop if known.is_closed()]:
            del self._by_loop[loop]

    def _adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """The given client is used on ``loop``: refuse it while its first loop is open."""
        with self._lock:
            previous = self._given_loop
            if previous is not None and previous is not loop and not previous.is_closed():
                raise ConfigurationError(
                    "the async_client given to Cache() is used on a second event loop while "
                    "the first one is still open; an asyncio Redis client serves one loop. "
                    "Make the cache from a URL (one client per loop) or one cache per loop"
                )
            self._given_loop = loop

    async def aclose(self) -> None:
        """Close the client this object made for the running loop (a given one is left open)."""
        if self._given is not None:
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            found = self._by_loop.pop(loop, None)
            if self._last[0] is loop:
                self._last = (None, None)
        if found is not None:
            await found.closer.aclose()  # its finally closes the client


class _LoopClient:
    """The client :class:`AsyncClients` made for one event loop, and the async generator
    that closes it when that loop shuts down."""

    __slots__ = ("closer", "io")

    def __init__(self, io: AsyncRedisIO, closer: AsyncGenerator[None, None]) -> None:
        self.io = io
        self.closer = closer


def _start(closer: AsyncGenerator[None, None]) -> None:
    """Run ``closer`` to its ``yield`` now, on the running loop's thread: its first step
    hands it to the loop's async generator hooks (``sys.set_asyncgen_hooks``), which is
    what makes ``shutdown_asyncgens()`` finalize it. The step awaits nothing, so it ends
    here, without being scheduled."""
    step = closer.__anext__()
    with contextlib.suppress(StopIteration):
        step.send(None)


def is_cluster(client: object) -> bool:
    """True for a Redis Cluster client (``redis.cluster.RedisCluster`` or its asyncio twin).

    Example::

        is_cluster(redis.Redis())  # False
    """
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def split_cluster_url(url: str) -> tuple[str, bool]:
    """``url`` without the :data:`CLUSTER_PARAMETER`, and whether it asked for a cluster.

    Raises ``ValueError`` (without the URL's secrets) for a value that is not a boolean.

    Example::

        >>> split_cluster_url("rediss://app:pw@node1:6379/0?cluster=true&socket_timeout=1")
        ('rediss://app:pw@node1:6379/0?socket_timeout=1', True)
        >>> split_cluster_url("redis://localhost:6379/0")
        ('redis://localhost:6379/0', False)
    """
    parts = urlsplit(url)
    if not parts.query:
        return url, False
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [value for name, value in query if name == CLUSTER_PARAMETER]
    if not values:
        return url, False
    word = values[-1].strip().lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(
            f"{redact_url(url)}: {CLUSTER_PARAMETER}={values[-1]!r} is not a boolean; "
            f"write {CLUSTER_PARAMETER}=true for a Redis Cluster (or leave it out)"
        )
    rest = urlencode([(name, value) for name, value in query if name != CLUSTER_PARAMETER])
    return urlunsplit(parts._replace(query=rest)), word in _TRUE


def client_from_url(url: str, **options: Any) -> SyncClient:
    """A ``redis.Redis``, or a ``redis.cluster.RedisCluster`` for a URL with
    ``?cluster=true``, made with ``options`` (timeouts...); nothing connects yet for a
    single server, a cluster client asks the seed node for the slots at once.

    Raises ``ValueError`` (or redis-py's errors) for a URL that cannot be used.

    Example::

        client_from_url("redis://localhost:6379/0", socket_timeout=0.25)
        client_from_url("rediss://app:pw@node1:6379/0?cluster=true")
    """
    plain, cluster = split_cluster_url(url)
    if cluster:
        return redis.cluster.RedisCluster.from_url(plain, **options)
    return redis.Redis.from_url(plain, **options)


def async_client_from_url(url: str, **options: Any) -> AsyncClient:
    """:func:`client_from_url` for asyncio: a ``redis.asyncio.Redis`` or
    ``redis.asyncio.cluster.RedisCluster`` (which connects on its first command).

    Example::

        async_client_from_url("redis://node1:6379/0?cluster=true", socket_timeout=0.25)
    """
    plain, cluster = split_cluster_url(url)
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(plain, **options)
    return redis.asyncio.Redis.from_url(plain, **options)


def clients_for(
    redis_client: object, async_client: object, timeout: float
) -> tuple[SyncClient, Callable[[], AsyncClient] | None]:
    """Check what ``Cache()`` was given; the sync client and a maker of asyncio clients.

    ``redis_client`` is a ``redis.Redis``, a ``redis.cluster.RedisCluster`` or a URL
    (then both clients come from the URL, with ``timeout`` for sockets and connects;
    ``?cluster=true`` makes them cluster clients); ``async_client`` a
    ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster`` of the same kind as
    the synchronous client, or None. The maker is None when there is no URL, or when
    ``async_client`` is given. Anything else raises
    :class:`~sa_redis_cache.errors.ConfigurationError` with the fix.

    Example::

        sync, make_async = clients_for("redis://localhost:6379/0", None, 0.25)
    """
    factory: Callable[[], AsyncClient] | None = None
    if isinstance(redis_client, str):
        url = redis_client
        try:
            redis_client = client_from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"Cache() cannot use the Redis URL {redact_url(url)!r}: "
                f"{redact_text(str(exc), url)}; write it as "
                "redis[s]://[USER:PASSWORD@]HOST:PORT/DB, with ?cluster=true for a Redis Cluster"
            ) from exc

        def from_url() -> AsyncClient:
            return async_client_from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )

        factory = from_url
    if isinstance(redis_client, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        raise ConfigurationError(
            "Cache() takes a synchronous redis.Redis or redis.cluster.RedisCluster (or a "
            "URL) first, for the synchronous sessions and the explicit invalidation "
            "methods; pass the asyncio client as async_client=, or give a URL and the "
            "cache makes both"
        )
    if not isinstance(redis_client, redis.Redis | redis.cluster.RedisCluster):
        raise ConfigurationError(
            f"Cache() needs a redis.Redis or redis.cluster.RedisCluster client or a "
            f"redis:// URL, got {type(redis_client).__name__}; pass "
            "redis.Redis.from_url(...) or the URL"
        )
    if compat.pool_option(redis_client, "decode_responses"):
        raise ConfigurationError(
            "Cache() needs a Redis client that returns bytes: this one was made with "
            "decode_responses=True, so no entry could ever be read back. Pass a client "
            "without it (a separate one if the application needs decoded replies)"
        )
    if async_client is None:
        return redis_client, factory
    if not isinstance(async_client, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        raise ConfigurationError(
            f"Cache(async_client=...) needs a redis.asyncio.Redis or "
            f"redis.asyncio.cluster.RedisCluster client, got {type(async_client).__name__}; "
            "pass redis.asyncio.Redis.from_url(...)"
        )
    if is_cluster(async_client) != is_cluster(redis_client):
        kinds = {True: "a Redis Cluster client", False: "a single-server client"}
        raise ConfigurationError(
            f"Cache() got {kinds[is_cluster(redis_client)]} and, as async_client, "
            f"{kinds[is_cluster(async_client)]}: both must reach the same Redis. Pass "
            "redis.cluster.RedisCluster with redis.asyncio.cluster.RedisCluster (or give "
            "a URL, and the cache makes both)"
        )
    if compat.pool_option(async_client, "decode_responses"):
        raise ConfigurationError(
            "Cache(async_client=...) needs a client that returns bytes: this one was made "
            "with decode_responses=True; pass a client without it"
        )
    return redis_client, None  # the application's client wins over one from the URL


def unlink_matching(
    client: SyncClient, pattern: str, only: Callable[[bytes], bool] | None = None
) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, in batches of 500), only those ``only``
    accepts when it is given; how many went.

    Never a ``FLUSH``: the server may be shared.

    Example::

        unlink_matching(redis.Redis(), "sarc:shop:*")
    """
    from .cluster_io import io_for  # here: cluster_io imports this module

    # a cluster client's variant: one UNLINK per key, which a slot migration never refuses
    return io_for(client).unlink_matching(pattern, only=only)
