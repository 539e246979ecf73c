"""The read-through flow every cached read shares: look, serve, wait for a filler, or fill.

Protocol (docs/guarantees.md): one MGET reads an entry together with the current counters
it is validated against. The entry is a hit only if the counters stored in it equal the
current ones. On a miss those counters are the ones captured *before* the database read,
and the fill is a Lua compare-and-set that stores only if they have not moved and no writer
is in flight. The fill lease, the bounded wait and the early refresh (stampede control) are
written here once, for query entries (:mod:`.queries`) and entity entries
(:mod:`.entities`) alike. Any Redis error degrades to the database; nothing here raises a
Redis error into the application.

Every Redis call goes through ``core.io()``: the asyncio client when the session is run
by ``AsyncSession`` (the event loop keeps running meanwhile), the synchronous one otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from redis.exceptions import RedisError
from sqlalchemy.orm import Session

from sa_redis_cache import compat, hydrate, stampede
from sa_redis_cache.breaker import CLOSED
from sa_redis_cache.codec import CodecError
from sa_redis_cache.counters import parse_counter
from sa_redis_cache.local.store import estimated_size
from sa_redis_cache.protocol import scripts
from sa_redis_cache.protocol.scripts import COUNTER_TTL_MS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.local import Mark
    from sa_redis_cache.tracing import Measurement

log = logging.getLogger(__name__)

_PLAIN_GET_BIND = Session.get_bind


def reads_directly(session: Session) -> bool:
    """Whether a read in ``session`` may be served before SQLAlchemy's execute pipeline
    (``session.get``, ``session.execute`` of a ``FromCache`` statement: see
    :meth:`ReadThrough.hand`), the session being one the pipeline would bring to the cache
    and to nothing else: nothing to autoflush, no ``do_orm_execute`` listener but the
    cache's (another could change what the read returns), no ``get_bind`` override, no
    session-wide execution options (``Session(execution_options=...)``: they may bypass
    the cache or translate schemas, which the pipeline's read sees), and a transaction
    open or allowed to begin (``Session(autobegin=False)`` outside ``session.begin()``
    raises in the pipeline, :func:`~sa_redis_cache.compat.refuses_autobegin`).

    Example::

        if reads_directly(session):
            ...  # the cache may answer before the pipeline runs
    """
    return (
        len(session.dispatch.do_orm_execute) == 1
        and type(session).get_bind is _PLAIN_GET_BIND
        and not getattr(session, "execution_options", None)
        and compat.is_clean(session)
        and not compat.refuses_autobegin(session)
    )


_SNAPSHOT_LEVELS = frozenset(("REPEATABLE READ", "SERIALIZABLE"))


def start_snapshot(
    session: Session,
    bind: Any,
    bind_arguments: dict[str, Any] | None = None,
    *,
    mapper: Any = None,
    clause: Any = None,
) -> bool:
    """Begin ``session``'s transaction and take its snapshot when a read would otherwise
    come before it; True when it did.

    Under REPEATABLE READ and SERIALIZABLE a transaction's snapshot is taken at its first
    statement. A read the cache serves before the transaction holds a connection of
    ``bind`` begins nothing, so the snapshot would come at a later statement and the
    transaction would read two moments. Such a read first runs ``SELECT 1`` on the
    session's connection: the transaction begins (:meth:`ReadPath.on_begin
    <sa_redis_cache.reads.ReadPath.on_begin>` pins the versions) and its snapshot is
    taken, and the read is then checked against the pins. ``bind_arguments``: what the
    read would ask the session's binds with (else ``mapper`` and ``clause``, made into
    them only then).

    Example::

        if start_snapshot(session, bind, mapper=mapper):
            tx = peek_transaction_state(session)   # now pinned
    """
    if compat.isolation_level_of(bind) not in _SNAPSHOT_LEVELS:
        return False
    if compat.session_connection(session, bind) is not None:
        return False
    if bind_arguments is None:
        bind_arguments = {"mapper": mapper, "clause": clause}
    session.connection(bind_arguments=bind_arguments).exec_driver_sql("SELECT 1")
    return True


@dataclass(slots=True)
class Look:
    """What one look at an entry found: a valid entry, or the versions a fill needs.

    ``found`` is ``(timing, body)``, the body decoded and checked (a query entry's against
    its statement, an entity entry's against its primary key); timing is None for an
    entity entry a writer stored (write-through, write-behind): no read time is known, so
    it is never refreshed early.
    """

    found: tuple[stampede.Timing | None, Any] | None
    captured: list[bytes] | None
    leased: bool = False
    # the entry's invalidate_query() counter as read (None: absent); the fill compares it
    invalidations: bytes | None = None
    # for a found entry: the counters it was valid under, as read (the local tier keeps
    # the entry under them)
    valid_under: list[tuple[str, bytes]] | None = None
    # bytes of the entry as stored (the local tier's size estimate starts from it)
    size: int = 0
    # the entry as stored, for a found entry: a refresh's lease request compares it
    raw: bytes | None = None
    # for a found entry: whether it is due for an early refresh, once drawn (due_now)
    due: bool | None = None

    def due_now(self, beta: float, now: int | None = None) -> bool:
        """Whether the entry this look found is due for a refresh (past its logical
        expiry, or XFetch's draw says so: :func:`~sa_redis_cache.stampede.due`).

        Drawn once per look: a read served before the pipeline that hands its look on
        (:meth:`ReadThrough.hand`) hands its draw with it, so one read is one draw, and
        early refreshes keep the rate XFetch gives them.
        """
        if self.due is None:
            timing = None if self.found is None else self.found[0]
            self.due = timing is not None and stampede.due(timing, beta, now)
        return self.due


class LookAt(Protocol):
    """How a :class:`Target` looks at its entry (see there)."""

    def __call__(self, lease: str, *, if_absent: bool = False) -> Look | None: ...


@dataclass(slots=True)
class Target:
    """One entry on the read path: how to look at it, serve it and fill it.

    ``look(token)`` reads the entry and its counters, asking for the fill lease in the
    same round trip when given a token (with ``if_absent``, only if the entry is absent:
    the read's first look, given a token only with ``lease_in_look``); ``serve(look)``
    turns the entry a look found, already decoded and checked, into the result (the flow
    counts the hit);
    ``fill(data, preexisting, look, delta_ms, token)`` stores what the database returned:
    True stored, False refused or failed, None not tried (the caller still holds its lease).
    """

    key: str
    scope: str
    also: tuple[str, ...]
    look: LookAt
    serve: Callable[[Look], Result[Any]]
    fill: Callable[[Any, Any, Look, int, str], bool | None]
    lease: bool
    lease_wait: float
    xfetch_beta: float
    stale_ttl: float
    # the first look asks for the lease when the entry is absent: a miss then needs no
    # second round trip before its database read
    lease_in_look: bool = False


class ReadThrough:
    """The shared flow of one cache's cached reads (see the module docstring).

    Example::

        flow = ReadThrough(core)
        flow.read_through(orm_context, target)   # a result, or None to read the database
    """

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        # (session, key, look): a direct read's look, handed to the pipeline's read it
        # falls back to (see hand())
        self._handed = threading.local()

    def hand(
        self, session: Session, key: str, look: Look | None, started: float | None = None
    ) -> None:
        """Hand a look that was no hit to the pipeline's read of ``key`` in ``session``.

        A direct read (``session.get``, ``session.execute`` of a ``FromCache`` statement,
        served before SQLAlchemy's execute pipeline) that is not a hit falls back to the
        pipeline. Its look (a miss, an entry due for an early refresh, None for a Redis
        error) was read before any database read, so its counters are a capture like any
        other: the pipeline's read takes it as its first look (:meth:`take_handed`), and
        a miss costs no second round trip, a Redis error no second timeout.

        ``started``: the ``time.perf_counter()`` the direct read began at; for a look
        that failed (None), :meth:`bypassed` times the error from it.
        """
        self._handed.look = (session, key, look, started)

    def take_handed(self, session: Session, key: str) -> tuple[bool, Look | None]:
        """``(True, look)`` when a direct read handed ``key``'s look in ``session`` (taken
        once), else ``(False, None)``."""
        handed = getattr(self._handed, "look", None)
        if handed is None:
            return False, None
        self._handed.look = None
        if handed[0] is not session or handed[1] != key:
            return False, None
        return True, handed[2]

    def bypassed(self, session: Session, scope: str) -> None:
        """Count a read of ``session`` that does not ask Redis (the breaker open, writes
        undelivered) as ``bypassed`` in ``scope``; unless it is the pipeline's half of a
        direct read whose Redis look failed (and opened the breaker): that lookup was
        counted in ``errors`` already, and is timed here as an ``error``. One lookup,
        counted once."""
        handed = getattr(self._handed, "look", None)
        core = self.core
        if handed is None or handed[0] is not session or handed[2] is not None:
            core.counters.incr(scope, "bypassed")
            return
        self._handed.look = None
        started = handed[3]
        if started is not None:
            core.counters.observe(scope, "error", time.perf_counter() - started)

    def drop_handed(self) -> None:
        """Forget a handed look no read took: the pipeline returned before reading (the
        breaker opened, another thread left the table undelivered, an error). A later
        read of the key must not start from a past look."""
        self._handed.look = None

    def read_through(self, orm_context: ORMExecuteState, target: Target) -> Result[Any] | None:
        """Serve the entry, refresh it early, wait for its filler, or read and fill.

        One flow for query entries and entity entries (docs/design.md, "Consistency" and "Failure
        and bad input").
        """
        # a latency histogram under the read's outcome, and a span when traced; leaving by
        # an exception records an error and ends the span
        with self.core.measure(target.scope, also=target.also) as measured:
            return self._serve_or_fill(orm_context, target, measured)

    def _serve_or_fill(
        self, orm_context: ORMExecuteState, target: Target, measured: Measurement
    ) -> Result[Any] | None:
        core = self.core
        stats = core.counters
        first = stampede.new_token() if target.lease_in_look else ""
        look = target.look(first, if_absent=True)
        if look is None:
            measured.done("error")
            return None
        # a lease the first look took is held from here: released by the fill, or below
        token = first if look.leased else ""
        if look.found is not None:
            timing = look.found[0]
            refresh = False
            now = stampede.now_ms()
            if timing is not None and look.due_now(target.xfetch_beta, now):
                # due for a refresh: one caller refreshes, the others serve this value
                token = self._take_lease(target.key, look.raw) if target.lease else ""
                refresh = bool(token) or not target.lease
                if refresh:
                    stats.incr(target.scope, "early_refreshes")
                elif timing.expires_ms <= now and target.stale_ttl:
                    stats.incr(target.scope, "stale_served")
            if not refresh:
                served = target.serve(look)
                measured.hit()
                return served
        if look.found is None and look.captured is not None and target.lease and not token:
            token, waited, look = self._lease_or_wait(target, look)
            if waited is not None:
                measured.hit()
                return waited
        stats.incr(target.scope, "misses", also=target.also)
        # counted as a miss: a database error from here on is timed as one too
        measured.failing_as("miss")
        preexisting = hydrate.identity_snapshot(orm_context.session)
        started = stampede.now_ms()
        tried: bool | None = None
        try:
            frozen = orm_context.invoke_statement().freeze()
            if look.captured is not None:
                try:
                    delta = stampede.now_ms() - started
                    tried = target.fill(frozen.data, preexisting, look, delta, token)
                except (hydrate.NotCacheable, CodecError, ValueError) as exc:
                    log.debug("not caching %s: %s", target.key, exc)
                    stats.incr(target.scope, "uncacheable")
        finally:
            if tried is None:
                # fill.lua releases the lease whenever it runs (stored, refused or failed
                # mid-call); when it did not run, the lease is released here
                self._release(target.key, token)
        measured.done("miss")
        return frozen()

    def keep_local(
        self, key: str, value: Any, look: Look, ttl: float, mark: Mark, objects: int = 1
    ) -> bool:
        """Keep a prepared entry a Redis look found valid in the local tier, for ``ttl`` s.

        Under the counters the look read (:attr:`Look.valid_under`); refused when an
        invalidation of one of them, or of ``key``, arrived since ``mark``. True when kept:
        the value is then shared, and must be built with ``shared=True``. ``objects``:
        how many objects the value builds (its memory estimate counts them).
        """
        local = self.core.local
        if local is None or look.valid_under is None or ttl <= 0:
            return False
        return local.store.put(
            key,
            value,
            look.valid_under,
            size=estimated_size(look.size, objects),
            ttl=ttl,
            mark=mark,
        )

    def fetch(
        self,
        keys: list[str],
        tables: Iterable[str],
        scope: str,
        lease: str,
        *,
        if_absent: bool = False,
    ) -> tuple[list[Any], bool] | None:
        """MGET ``keys`` (an entry first, of ``tables``), asking for its fill lease in the
        same round trip; with ``if_absent``, only when the entry is absent
        (``lua/look.lua``).

        Returns the values and whether the lease was granted; None when Redis failed, or
        when the reply may come from a node that took the tables' slots over with an old
        state (:meth:`~sa_redis_cache.outages.RedisOutages.answered_across_a_move`): the
        caller reads the database and does not fill.
        """
        core = self.core
        leased = False
        bumps = core.pending_bumps
        epoch = bumps.changes  # core.trust_epoch(), read as an attribute: every look pays it
        try:
            if lease and if_absent:
                raw, leased = core.io().look(keys, core.keys.lease_key(keys[0]), lease)
            elif lease:
                got, raw = core.io().pipeline(
                    [
                        scripts.take_lease(core.keys.lease_key(keys[0]), lease),
                        ("MGET", *keys),
                    ]
                )
                leased = bool(got)
            else:
                raw = core.io().mget(keys)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr(scope, "errors")
            return None
        core.breaker.success()  # resets the failure count too
        if (
            core.slot_map_refreshes or bumps.changes != epoch or core.undelivered
        ) and core.answered_across_a_move(tables, epoch):
            # counted as a look that failed; the caller fills nothing
            core.counters.incr(scope, "errors")
            if leased:
                self._release(keys[0], lease)
            return None
        return list(raw), leased

    def _take_lease(self, entry_key: str, seen: bytes | None) -> str:
        """The fill lease's token when this caller got it to refresh the entry it saw
        (``seen``, as stored), else '': another caller holds the lease, or already stored
        a newer entry since this caller's look (it is not refreshed twice)."""
        core = self.core
        token = stampede.new_token()
        try:
            got = core.io().run_script(
                *scripts.refresh_lease(core.keys, entry_key, token, seen or b"")
            )
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            return ""
        return token if got == 1 else ""

    def _lease_or_wait(self, target: Target, look: Look) -> tuple[str, Result[Any] | None, Look]:
        """Take the fill lease, or wait for whoever holds it to fill.

        The lease is asked for in the same round trip as a second look at the entry: a
        caller whose first look missed just before another caller's fill landed must not
        take the lease that fill released and read the database again.
        Returns (token, None, look) to go to the database (token '' when the wait timed
        out), or ('', result, look) when the entry appeared.
        """
        core = self.core
        token = stampede.new_token()
        again = target.look(token)
        if again is None:
            return "", None, look
        if again.found is not None:
            if again.leased:
                self._release(target.key, token)
            served = target.serve(again)
            return "", served, again
        if again.leased:
            return token, None, again
        core.counters.incr(target.scope, "lease_waits", also=target.also)
        poller = stampede.Poller(target.lease_wait, sleep=core.io().sleep)
        while poller.wait():
            # each look asks for the lease too: a holder that failed or whose fill was
            # refused released it, and one waiter (not every one, at the end of its
            # lease_wait) then reads the database and fills for the others
            seen = target.look(token, if_absent=True)
            if seen is None:
                break
            if seen.found is not None:
                if seen.leased:  # a look that cannot ask only if absent (never on one slot)
                    self._release(target.key, token)
                return "", target.serve(seen), seen
            if seen.leased:
                return token, None, seen
        return "", None, again

    def _release(self, entry_key: str, token: str) -> None:
        if not token:
            return
        core = self.core
        try:
            core.io().run_script(*scripts.release_lease(core.keys.lease_key(entry_key), token))
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")

    def counters(self, keys: Sequence[str], values: Sequence[Any], scope: str) -> list[int] | None:
        """Parse version counters as Redis does; one it could not INCR is deleted (a miss,
        no fill).

        A value ``int()`` would take but ``INCR`` refuses (``b" 7 "``) must not be trusted:
        every writer's script would reseed it, and a reader that trusted it would keep
        serving entries stored under it. A deleted counter comes back at a random value,
        so no entry stored under the garbage can ever match it.
        """
        numbers = [parse_counter(v) for v in values]
        if None not in numbers:
            return cast("list[int]", numbers)
        bad = [(k, v) for k, v, n in zip(keys, values, numbers, strict=True) if n is None]
        exc = ValueError(f"not a counter: {bad[0][1]!r:.60}")
        self._corrupt_keys([k for k, _ in bad], scope, exc)
        return None

    def corrupt(self, key: str, scope: str, exc: Exception) -> None:
        self._corrupt_keys([key], scope, exc)

    def _corrupt_keys(self, keys: Sequence[str], scope: str, exc: Exception) -> None:
        core = self.core
        log.warning("unreadable cache keys %s deleted: %s", ", ".join(keys), exc)
        core.counters.incr(scope, "decode_errors")
        try:
            core.io().unlink(*keys)
        except RedisError as err:
            core.redis_failed(err)
            core.counters.incr_total("errors")

    def trusted_quietly(self, tables: Iterable[str]) -> bool:
        """:meth:`trusted`, without changing anything: the breaker closed and no write of
        ``tables`` waiting for delivery.

        For a read served before SQLAlchemy's pipeline, which may still leave the read to
        the pipeline after this check: taking the breaker's half-open probe (or delivering
        writes) there would leave the pipeline's read without it, and a probe taken and
        never used keeps the breaker shut until it goes stale.
        """
        return self.core.breaker.state is CLOSED and not self.core.undelivered_in(tables)

    def trusted(self, tables: Iterable[str]) -> bool:
        """May the cache be used for ``tables`` now? (breaker closed, writes delivered)"""
        core = self.core
        if not core.breaker.allow():
            return False
        if core.undelivered_in(tables):
            return core.deliver_undelivered()
        return True

    def captured(
        self,
        current: Sequence[bytes | None],
        keys: Sequence[str],
        ttls_ms: Sequence[int] | None = None,
    ) -> list[bytes] | None:
        """Counters as they were before the database read; creates missing ones.

        ``ttls_ms`` gives each counter's TTL (the counters' TTL by default).
        """
        if None not in current:
            return list(current)  # type: ignore[arg-type]
        core = self.core
        ttls = ttls_ms or [COUNTER_TTL_MS] * len(keys)
        try:
            got = core.io().run_script(*scripts.capture_versions(keys, ttls))
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            return None
        return list(got)
