"""Exact points of the cache's protocol, reached from the outside, to force interleavings.

The library carries no test hooks: a test stops one side of the protocol at a point that
public mechanisms can see, and runs the other side there. Four points:

* **After a database read** (:meth:`Seams.after_database_read`): an engine
  ``after_cursor_execute`` listener. It runs once a SELECT has reached Postgres and its
  rows are in the driver's buffer, before SQLAlchemy hands them to the caller: for a cache
  miss, between the database read and the fill.
* **Before the post-commit work** (:meth:`Seams.before_post_commit`): a session
  ``after_commit`` listener registered with ``insert=True`` on the sessions the cache is
  attached to, so it runs before the cache's own: the transaction is committed in
  Postgres and its cache work (the bumps, the write-through states, the marks' release)
  has not started.
* **Before a lease is asked for** (:meth:`Seams.before_lease`) and **when a caller starts
  waiting for one** (:meth:`Seams.lease_wait`): a :class:`RedisTap` on the cache's Redis
  clients sees the commands of each round trip before they are sent. A lease request is
  ``SET <entry>:lease <token> NX ...``, or a script that asks for it (a query's first
  look, ``lua/look.lua``; a refresh, ``lua/refresh_lease.lua``); a caller that was
  refused the lease polls: its next round trip is a lone look at the entry (a ``MGET``,
  or ``lua/look.lua``, which takes the lease if its holder released it unfilled), and
  that is when it has started waiting (whoever got the lease sends its fill instead).

Listeners run in the caller's thread (or greenlet) at that point and may open sessions
of their own; under asyncio the Redis points run in the event loop's task, outside the
session's greenlet, so they may set events but not run sessions.

Example::

    seams = Seams(engine=engine)
    seams.after_database_read(once(lambda: write_price(engine, 2)))
    read_price(factory)  # read before the write, filled after it: the fill is refused
    seams.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection
import redis.connection
import sqlalchemy as sa

from sa_redis_cache.protocol import scripts

Command = tuple[str, ...]
"""One command's words as text, as sent (``("SET", "sarc:...:lease", "tok", "NX", ...)``)."""

RoundTrip = list[Command]
"""The commands one round trip carries, in order (one, or a pipeline's)."""

LEASE_SUFFIX = ":lease"
# the scripts that ask for an entry's lease (KEYS[1] the entry, KEYS[2] its lease)
_LEASE_SCRIPTS = frozenset(scripts.script(name).sha for name in ("look", "refresh_lease"))
_LOOK_SCRIPT = scripts.script("look").sha


def _word(arg: Any) -> str:
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg).decode(errors="replace")
    return str(arg)


class RedisTap:
    """Calls its listeners with the commands of each round trip, before they are sent.

    A tap on the transport, not a mock: clients made by :meth:`client` and
    :meth:`async_client` are ordinary redis-py clients whose connections
    (:class:`TapConnection`, :class:`AsyncTapConnection`) report what they pack.

    Example::

        tap = RedisTap()
        tap.listen(lambda trip: print(trip))
        tap.client("redis://127.0.0.1:6379/0").get("k")  # prints [('GET', 'k')]
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[RoundTrip], None]] = []

    def listen(self, fn: Callable[[RoundTrip], None]) -> None:
        """Call ``fn`` with every round trip from now on."""
        self._listeners.append(fn)

    def remove(self, fn: Callable[[RoundTrip], None]) -> None:
        """Stop calling ``fn``."""
        self._listeners.remove(fn)

    def sent(self, commands: Iterable[Sequence[Any]]) -> None:
        """Report one round trip (called by the connections)."""
        if self._listeners:
            trip = [tuple(_word(arg) for arg in command) for command in commands]
            for fn in list(self._listeners):
                fn(trip)

    def client(self, url: str) -> redis.Redis:
        """A synchronous client on ``url`` whose commands this tap sees."""
        pool = redis.ConnectionPool.from_url(url, connection_class=TapConnection, tap=self)
        return redis.Redis.from_pool(pool)

    def async_client(self, url: str) -> redis.asyncio.Redis:
        """An asyncio client on ``url`` whose commands this tap sees."""
        pool = redis.asyncio.ConnectionPool.from_url(
            url, connection_class=AsyncTapConnection, tap=self
        )
        return redis.asyncio.Redis.from_pool(pool)


class TapConnection(redis.connection.Connection):
    """A redis-py connection that reports each round trip to its :class:`RedisTap`.

    A single command goes out through ``send_command`` (which packs it with or without
    ``pack_command``, depending on the redis-py version) and a pipeline through
    ``pack_commands``: each is reported once, at the outermost of these calls.
    """

    # redis-py's synchronous connection is not annotated: hence the no-untyped-call ignores

    def __init__(self, *, tap: RedisTap, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]  # see above
        self.tap = tap
        self._reported = False

    @contextmanager
    def _report(self, commands: Sequence[Sequence[Any]]) -> Iterator[None]:
        if self._reported:
            yield
            return
        self.tap.sent(commands)
        self._reported = True
        try:
            yield
        finally:
            self._reported = False

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        with self._report([args]):
            super().send_command(*args, **kwargs)  # type: ignore[no-untyped-call]  # see above

    def pack_command(self, *args: Any) -> Any:
        with self._report([args]):
            return super().pack_command(*args)  # type: ignore[no-untyped-call]  # see above

    def pack_commands(self, commands: Any) -> Any:
        commands = [tuple(command) for command in commands]
        with self._report(commands):
            return super().pack_commands(commands)  # type: ignore[no-untyped-call]  # see above


class AsyncTapConnection(redis.asyncio.connection.Connection):
    """:class:`TapConnection` for ``redis.asyncio`` (packing is synchronous there too)."""

    def __init__(self, *, tap: RedisTap, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tap = tap
        self._reported = False

    @contextmanager
    def _report(self, commands: Sequence[Sequence[Any]]) -> Iterator[None]:
        if self._reported:
            yield
            return
        self.tap.sent(commands)
        self._reported = True
        try:
            yield
        finally:
            self._reported = False

    async def send_command(self, *args: Any, **kwargs: Any) -> None:
        with self._report([args]):
            await super().send_command(*args, **kwargs)

    def pack_command(self, *args: Any) -> Any:
        with self._report([args]):
            return super().pack_command(*args)

    def pack_commands(self, commands: Any) -> Any:
        commands = [tuple(command) for command in commands]
        with self._report(commands):
            return super().pack_commands(commands)


def lease_entry(command: Command) -> str | None:
    """The entry key whose fill lease ``command`` asks for, or None.

    A miss asks with ``SET <entry>:lease <token> NX ...`` or, a query's first look, with
    ``lua/look.lua``; a refresh with ``lua/refresh_lease.lua``: ``EVALSHA <sha> <n>
    <entry> <entry>:lease ...``.
    """
    if (
        len(command) >= 4
        and command[0].upper() == "SET"
        and command[1].endswith(LEASE_SUFFIX)
        and "NX" in (word.upper() for word in command[3:])
    ):
        return command[1][: -len(LEASE_SUFFIX)]
    if (
        len(command) >= 5
        and command[0].upper() == "EVALSHA"
        and command[1] in _LEASE_SCRIPTS
        and command[4] == command[3] + LEASE_SUFFIX
    ):
        return command[3]
    return None


def _caller() -> object:
    """Who sends a round trip: the asyncio task, or else the thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        task = None
    return task if task is not None else threading.get_ident()


class _LeaseWaits:
    """Calls ``fn`` each time a caller refused a lease starts waiting (see the module)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.asked: dict[object, str] = {}  # caller -> the entry whose lease it asked for
        self.waiting: dict[object, str] = {}  # caller -> the entry it polls for

    def __call__(self, trip: RoundTrip) -> None:
        caller = _caller()
        entry = self.asked.get(caller)
        if entry is not None and len(trip) == 1 and _looks_at(trip[0], entry):
            del self.asked[caller]
            self.waiting[caller] = entry
            self.fn()
            return
        for command in trip:
            asked = lease_entry(command)
            if asked is not None:
                if len(trip) == 1 and self.waiting.get(caller) == asked:
                    return  # a later poll of the same wait
                self.waiting.pop(caller, None)
                self.asked[caller] = asked
                return
        for held in (entry, self.waiting.get(caller)):
            if held is not None and any(held in word for command in trip for word in command[1:]):
                # it got the lease: this is its fill (or release)
                self.asked.pop(caller, None)
                self.waiting.pop(caller, None)


def _looks_at(command: Command, entry: str) -> bool:
    """Whether ``command`` is a look at ``entry``: a ``MGET`` of it (and its counters), or
    ``lua/look.lua`` on it (which also takes its lease if nobody holds it)."""
    if command[0].upper() == "MGET":
        return command[1:2] == (entry,)
    return lease_entry(command) == entry and command[1] == _LOOK_SCRIPT


def once(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` on the first call only (disarmed before it runs, so it may re-enter the point).

    Example::

        seams.before_post_commit(once(lambda: write_price(engine, 7)))
    """
    lock = threading.Lock()
    fired = False

    def run() -> None:
        nonlocal fired
        with lock:
            if fired:
                return
            fired = True
        fn()

    return run


def _reads(statement: str) -> bool:
    return statement.lstrip().upper().startswith(("SELECT", "WITH"))


class Seams:
    """The points a test forces its interleavings at; :meth:`close` removes them all.

    Each point method returns a function that removes that point alone (for a test that
    reads afterwards without it).

    ``engine`` (a synchronous ``Engine``: ``AsyncEngine.sync_engine`` under asyncio) is the
    reader's, ``session_class`` the event target of the sessions the cache is attached to
    (a ``sessionmaker``, or an ``async_sessionmaker``'s ``sync_session_class``), ``tap``
    the :class:`RedisTap` of the cache's clients. A point whose target was not given
    raises ``ValueError``.

    Example::

        seams = Seams(engine=engine, tap=tap)
        seams.lease_wait(waiting.release)
    """

    def __init__(
        self,
        *,
        engine: sa.Engine | None = None,
        session_class: Any = None,
        tap: RedisTap | None = None,
    ) -> None:
        self.engine = engine
        self.session_class = session_class
        self.tap = tap
        self._undo: list[Callable[[], None]] = []

    def after_database_read(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Run ``fn`` after each SELECT through ``engine`` reached Postgres, before its rows
        are used (a miss's read, before its fill)."""
        if self.engine is None:
            raise ValueError("after_database_read needs Seams(engine=...)")
        engine = self.engine

        def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if _reads(statement):
                fn()

        sa.event.listen(engine, "after_cursor_execute", listener)
        return self._added(lambda: sa.event.remove(engine, "after_cursor_execute", listener))

    def before_post_commit(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Run ``fn`` after each outermost commit reached Postgres, before the cache's
        post-commit work."""
        if self.session_class is None:
            raise ValueError("before_post_commit needs Seams(session_class=...)")
        target = self.session_class

        def listener(session: Any) -> None:
            if not session.in_nested_transaction():
                fn()

        sa.event.listen(target, "after_commit", listener, insert=True)
        return self._added(lambda: sa.event.remove(target, "after_commit", listener))

    def before_lease(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Run ``fn`` before each fill-lease request is sent to Redis."""

        def listener(trip: RoundTrip) -> None:
            if any(lease_entry(command) is not None for command in trip):
                fn()

        return self._tapped(listener)

    def lease_wait(self, fn: Callable[[], object]) -> Callable[[], None]:
        """Run ``fn`` each time a caller that was refused a lease starts waiting for it."""
        return self._tapped(_LeaseWaits(fn))

    def _tapped(self, listener: Callable[[RoundTrip], None]) -> Callable[[], None]:
        tap = self.tap
        if tap is None:
            raise ValueError("the Redis points need Seams(tap=...) and the tap's clients")
        tap.listen(listener)
        return self._added(lambda: tap.remove(listener))

    def _added(self, undo: Callable[[], None]) -> Callable[[], None]:
        def remove() -> None:
            if remove in self._undo:
                self._undo.remove(remove)
                undo()

        self._undo.append(remove)
        return remove

    def close(self) -> None:
        """Remove every point's listener."""
        while self._undo:
            self._undo[-1]()
