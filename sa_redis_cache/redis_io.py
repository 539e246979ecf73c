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
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from . import compat
from .errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from .protocol.scripts import Command, Script, ScriptCall


__all__ = [
    "AsyncClients",
    "AsyncRedisIO",
    "RedisIO",
    "SyncRedisIO",
    "clients_for",
    "unlink_matching",
]


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

    __slots__ = ("_sleep", "_wait", "client", "is_async")

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

    def run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script``; on NOSCRIPT (a restarted or flushed server) load it and retry."""
        client = self.client
        try:
            return self._wait(client.evalsha(script.sha, len(keys), *keys, *args))
        except NoScriptError:
            self._wait(client.script_load(script.source))
            return self._wait(client.evalsha(script.sha, len(keys), *keys, *args))

    def run_batch(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run several script calls in one round trip; their replies in order.

        A ``Script`` object queued in a pipeline makes redis-py send SCRIPT EXISTS before
        every execute, a second round trip on each commit. Raw EVALSHA is queued instead,
        and on NOSCRIPT the scripts are loaded and the batch is sent once more: every
        script given here must be safe to run twice.
        """
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [self.run_script(script, keys, args)]
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
                for script, _, _ in calls:
                    self._wait(client.script_load(script.source))
        raise AssertionError("unreachable")  # pragma: no cover

    def pipeline(self, commands: Iterable[Command]) -> list[Any]:
        """Send ``commands`` in one round trip (no MULTI); their replies in order."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(self._wait(pipe.execute()))

    def sleep(self, seconds: float) -> None:
        """Pause the calling session; under asyncio, other tasks run meanwhile."""
        self._wait(self._sleep(seconds))


class SyncRedisIO(RedisIO):
    """:class:`RedisIO` over a ``redis.Redis``: every call blocks until its reply.

    Example::

        SyncRedisIO(redis.Redis()).get("missing")  # None
    """

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        super().__init__(client, wait=_identity, sleep=time.sleep, is_async=False)


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
    threads, each get their own. ``prepare`` is called with each client before its first
    command (the cache hooks its pool).

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
    ) -> None:
        if (client is None) == (factory is None):
            raise ValueError("AsyncClients needs a client or a factory, not both")
        self._factory = factory
        self._prepare = prepare
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRedisIO] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._given: AsyncRedisIO | None = None
        self._given_loop: asyncio.AbstractEventLoop | None = None
        if client is not None:
            prepare(client)
            self._given = AsyncRedisIO(client)
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
        with self._lock:
            io = self._by_loop.get(loop)
            if io is None:
                assert self._factory is not None
                client = self._factory()
                self._prepare(client)
                io = self._by_loop[loop] = AsyncRedisIO(client)
        self._last = (loop, io)
        return io

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
            io = self._by_loop.pop(loop, None)
            if self._last[0] is loop:
                self._last = (None, None)
        if io is not None:
            await io.client.aclose()


def clients_for(
    redis_client: object, async_client: object, timeout: float
) -> tuple[redis.Redis, Callable[[], redis.asyncio.Redis] | None]:
    """Check what ``Cache()`` was given; the sync client and a maker of asyncio clients.

    ``redis_client`` is a ``redis.Redis`` or a URL (then both clients come from the URL,
    with ``timeout`` for sockets and connects); ``async_client`` a ``redis.asyncio.Redis``
    or None. The maker is None when there is no URL, or when ``async_client`` is given.
    Anything else raises :class:`~sa_redis_cache.errors.ConfigurationError` with the fix.

    Example::

        sync, make_async = clients_for("redis://localhost:6379/0", None, 0.25)
    """
    factory: Callable[[], redis.asyncio.Redis] | None = None
    if isinstance(redis_client, str):
        url = redis_client
        redis_client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )

        def from_url() -> redis.asyncio.Redis:
            return redis.asyncio.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )

        factory = from_url
    if isinstance(redis_client, redis.asyncio.Redis):
        raise ConfigurationError(
            "Cache() takes a synchronous redis.Redis (or a URL) first, for the "
            "synchronous sessions and the explicit invalidation methods; pass the "
            "asyncio client as async_client=, or give a URL and the cache makes both"
        )
    if not isinstance(redis_client, redis.Redis):
        raise ConfigurationError(
            f"Cache() needs a redis.Redis client or a redis:// URL, got "
            f"{type(redis_client).__name__}; pass redis.Redis.from_url(...) or the URL"
        )
    if compat.pool_option(redis_client, "decode_responses"):
        raise ConfigurationError(
            "Cache() needs a Redis client that returns bytes: this one was made with "
            "decode_responses=True, so no entry could ever be read back. Pass a client "
            "without it (a separate one if the application needs decoded replies)"
        )
    if async_client is None:
        return redis_client, factory
    if not isinstance(async_client, redis.asyncio.Redis):
        raise ConfigurationError(
            f"Cache(async_client=...) needs a redis.asyncio.Redis client, got "
            f"{type(async_client).__name__}; pass redis.asyncio.Redis.from_url(...)"
        )
    if compat.pool_option(async_client, "decode_responses"):
        raise ConfigurationError(
            "Cache(async_client=...) needs a client that returns bytes: this one was made "
            "with decode_responses=True; pass a client without it"
        )
    return redis_client, None  # the application's client wins over one from the URL


def unlink_matching(client: redis.Redis, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN, in batches of 500); how many went.

    Never a ``FLUSH``: the server may be shared.

    Example::

        unlink_matching(redis.Redis(), "sarc:shop:*")
    """
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += int(client.unlink(*batch))
    return removed
