"""``cache.cached``: the recipe's function decorator, without pickle and with safe keys.

:class:`CachedFunction` wraps a plain function, :class:`AsyncCachedFunction` an ``async
def``; both share the key, codec, counter and breaker steps and differ only in how they
call Redis (the synchronous client, or ``await`` on the asyncio one).
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from redis.exceptions import RedisError, ResponseError
from sqlalchemy.util import greenlet_spawn

from .codec import CodecError, dumps_tagged, loads_tagged
from .fingerprint import values_digest
from .policy import is_ttl
from .protocol import scripts
from .stats import scope
from .undelivered import EVERY_NAME, MAX_REMEMBERED, Undelivered

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterable

    from .context import CacheContext

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_HIT = object()
_MISS = object()
_CORRUPT = object()
_RETIRED = object()  # found, but retired while the look was on its way: not served
_mark_coroutine: Callable[[Any], Any] | None = getattr(inspect, "markcoroutinefunction", None)

# A value under a function's key: an entry, b"\x01G" + generation + the tagged result
# (sealed when the cache signs), or a tombstone that invalidate() left, b"\x01T" +
# generation. The generation (16 bytes) is what a fill compares (lua/function_fill.lua):
# invalidate() puts a new random one in place, so a call that read before it cannot
# store after it. Entries of earlier releases (b"\x01F" + tagged result) are still read.
_MAGIC = b"\x01G"
_TOMBSTONE = b"\x01T"
_LEGACY_MAGIC = b"\x01F"
_GENERATION_BYTES = 16
_ABSENT = b"0" * _GENERATION_BYTES  # the generation of an absent key
_FOREIGN = b"?"  # the generation of anything else: garbage, another Redis type
_UNREADABLE = object()  # GET answered WRONGTYPE
# a call that started before invalidate() and takes longer than this (or than the TTL,
# whichever is longer) can still store its result: docs/guarantees.md, Limits
_TOMBSTONE_MIN_MS = 30_000


class CachedFunction(Generic[P, R]):
    """A function whose results are cached in Redis; made by :meth:`Cache.cached`.

    Arguments are bound to the function's signature (so ``f(1)`` and ``f(user_id=1)``
    share an entry), encoded exactly with type tags and hashed: any string, however long
    or full of separators, makes a safe key. Results are stored with the tagged codec;
    a result it cannot encode exactly is returned but not cached.

    ``ignore`` names parameters left out of the key (a database session, a request);
    ``key`` is a function of the same arguments whose result (anything the codec encodes
    exactly: str, int, tuple...) is the key instead. When the arguments of a call cannot
    make a key, the call runs uncached (counted in ``uncacheable``) and a WARNING names
    the argument and the fix, once per function.

    Example::

        @cache.cached("user_profile", ttl=600)
        def profile(user_id: int) -> dict: ...
        profile(42)
        profile.invalidate(42)

        @cache.cached("user_page", ignore=("db", "request"))
        async def user_page(user_id: int, db: AsyncSession, request: Request) -> dict: ...
    """

    # set by functools.update_wrapper, declared for type checkers
    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(
        self,
        core: CacheContext,
        prefix: str,
        ttl: float | None,
        func: Callable[P, R],
        *,
        key: Callable[..., Any] | None = None,
        ignore: Iterable[str] = (),
    ) -> None:
        if isinstance(func, classmethod | staticmethod):
            kind = type(func).__name__
            raise TypeError(
                f"cached({prefix!r}) on a {kind}: put @{kind} above @cache.cached, which "
                "wraps the function itself"
            )
        if not prefix or any(ch in prefix for ch in "{}*?[] \n"):
            raise ValueError(
                f"cached({prefix!r}): the prefix names the function in Redis keys; use letters, "
                "digits, '_', '-', '.' or ':'"
            )
        if ttl is not None and not is_ttl(ttl):
            raise ValueError(
                f"cached({prefix!r}, ttl={ttl!r}): ttl must be a positive, finite number of "
                "seconds (at most 1e9), or None for the cache's default_ttl"
            )
        self._core = core
        self._prefix = prefix
        self._ttl = ttl
        self._func = func
        self._signature = inspect.signature(func)
        self._var_keyword = next(
            (
                p.name
                for p in self._signature.parameters.values()
                if p.kind is inspect.Parameter.VAR_KEYWORD
            ),
            None,
        )
        self._scope = scope("function", prefix)
        self._ignore = _ignored(prefix, self._signature, ignore)
        if key is not None and self._ignore:
            raise ValueError(
                f"cached({prefix!r}): give key= or ignore=, not both (key= decides the whole key)"
            )
        if key is not None and not callable(key):
            raise ValueError(f"cached({prefix!r}, key={key!r}): key must be a function")
        self._key = key
        # what key_for() and invalidate() cannot do without (ignore's may be left out)
        self._required = tuple(
            name
            for name, parameter in self._signature.parameters.items()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
            and name not in self._ignore
        )
        self._warned = False  # the arguments that make no key, once per function
        self._warned_result = False  # a result the codec refuses, once per function
        # keys whose invalidate() did not reach Redis (and EVERY_NAME past MAX_REMEMBERED
        # of them, after a failed invalidate_all(), or after Redis restarted or a slot
        # changed hands, which may have lost tombstones): until it is delivered, their
        # calls run uncached, as a query of an undelivered table reads the database
        self._undelivered = Undelivered()
        self._delivering_all = threading.Lock()
        core.watch_function(self._undelivered)
        functools.update_wrapper(self, func)
        if not hasattr(self, "__qualname__"):
            # a functools.partial or a callable object has none to copy; the warnings name it
            self.__qualname__ = self.__name__ = callable_name(func)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """As a method: ``obj.method(x)`` is ``method(obj, x)``, as without the decorator.

        Without this, ``obj.method`` was the wrapper itself and ``obj.method(x)`` called
        the function without ``obj`` (a ``TypeError``). The bound wrapper's ``invalidate``
        and ``key_for`` (``ainvalidate`` too for an ``async def``) take the same call as
        the method: ``shop.price.invalidate(7)``. Leave ``self`` out of the key with
        ``ignore=("self",)`` when the result does not depend on the instance (an instance
        makes no key: such calls run uncached, with the usual WARNING).

        Example::

            class Shop:
                @cache.cached("price", ignore=("self",))
                def price(self, pid: int) -> str: ...

            Shop().price(7)
        """
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key of one call; ``ignore``'s parameters may be left out.

        Example::

            @cache.cached("team_size", ignore=("session",))
            def team_size(team_id: int, session: Session) -> int: ...
            team_size.key_for(3) == team_size.key_for(3, session)
        """
        return self._key_of(args, kwargs, partial=True)

    def _key_of(self, args: Any, kwargs: Any, *, partial: bool) -> str:
        """The key of a call (``partial``: the ignored parameters may be missing)."""
        if self._key is not None:
            digest = values_digest(["key=", self._key(*args, **kwargs)])
            return self._core.keys.function_key(self._prefix, digest)
        digest = values_digest([list(self._arguments(args, kwargs, partial=partial).items())])
        return self._core.keys.function_key(self._prefix, digest)

    def _arguments(self, args: Any, kwargs: Any, *, partial: bool = False) -> dict[str, Any]:
        """The call's arguments by name, defaults applied, ``ignore`` left out; with
        ``partial``, the ignored parameters may be missing (they are no part of the key)."""
        signature = self._signature
        bound = (
            signature.bind_partial(*args, **kwargs) if partial else signature.bind(*args, **kwargs)
        )
        if partial:
            missing = [name for name in self._required if name not in bound.arguments]
            if missing:
                raise TypeError(f"missing a required argument: {missing[0]!r}")
        bound.apply_defaults()
        arguments = bound.arguments
        if self._var_keyword is not None and arguments[self._var_keyword]:
            # f(a=1, b=2) and f(b=2, a=1) are one call: **kwargs order is not meaningful
            arguments[self._var_keyword] = dict(sorted(arguments[self._var_keyword].items()))
        for name in self._ignore:
            arguments.pop(name, None)
        return dict(arguments)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self._lookup_key(args, kwargs)
        if key is None:
            return self._func(*args, **kwargs)
        if self._undelivered.names and self._still_undelivered(key):
            return self._func(*args, **kwargs)
        # a latency histogram under the call's outcome, and a span when traced
        with self._core.measure(self._scope) as measured:
            io = self._core.io()
            epoch = self._trust_epoch()
            raw: Any
            try:
                raw = io.get(key)
            except RedisError as exc:
                if not self._read_failed(key, exc):
                    measured.done("error")
                    return self._func(*args, **kwargs)
                raw = _UNREADABLE
            outcome, value = self._decode(key, raw, epoch)
            if outcome is _HIT:
                measured.done("hit")
                return cast("R", value)
            if outcome is _RETIRED and self._still_undelivered(key):
                measured.done("miss")
                return self._func(*args, **kwargs)
            result = self._func(*args, **kwargs)
            self._fill(key, result, generation_of(raw), corrupt=outcome is _CORRUPT)
            measured.done("miss")
            return result

    # -- the steps both wrappers share; only their Redis calls differ ---------------------

    def _lookup_key(self, args: Any, kwargs: Any) -> str | None:
        """The call's key, or None to call the function uncached (counted)."""
        core = self._core
        try:
            key = self._key_of(args, kwargs, partial=False)
        except (CodecError, TypeError) as exc:
            self._uncacheable(args, kwargs, exc)
            return None
        if not core.breaker.allow():
            core.counters.incr(self._scope, "bypassed")
            return None
        return key

    def _uncacheable(self, args: Any, kwargs: Any, exc: Exception) -> None:
        """Count a call whose arguments make no key; say why, once per function."""
        self._core.counters.incr(self._scope, "uncacheable")
        if self._warned:
            log.debug("%s: arguments cannot make a key (%s); calling uncached", self._prefix, exc)
            return
        self._warned = True
        culprit = None if self._key is not None else _culprit(self._arguments_or_none(args, kwargs))
        if culprit is not None:
            name, value = culprit
            why = (
                f"argument {name!r} ({type(value).__name__}) cannot be part of a key; pass "
                f"ignore=({name!r},) if it does not change the result, or key=..."
            )
        else:
            why = f"{exc}; pass key=... returning a str, int or tuple of them"
        log.warning(
            "cached(%r) on %s: calls run uncached: %s (logged once; counted in uncacheable)",
            self._prefix,
            self.__qualname__,
            why,
            extra={"sarc_scope": self._scope},
        )

    def _arguments_or_none(self, args: Any, kwargs: Any) -> dict[str, Any] | None:
        try:
            return self._arguments(args, kwargs)
        except TypeError:
            return None

    def _fill(self, key: str, result: Any, generation: bytes, *, corrupt: bool) -> None:
        """Store ``result`` unless ``invalidate()`` moved the key's generation since the
        look that read ``generation`` (counted in ``fill_refused``); a ``corrupt`` value
        that nothing replaces is retired."""
        blob = self._blob(key, result, generation)
        if blob is None:
            if corrupt:
                self._retire(key)
            return
        core = self._core
        filling = core.measure(self._scope, "fill")
        try:
            stored = core.io().run_script(
                *scripts.function_fill(key, blob, self._ttl_ms(), generation)
            )
        except RedisError as exc:
            filling.done("error")
            self._failed(exc)
            return
        if stored == 1:
            filling.done("stored")
            core.counters.incr(self._scope, "fills")
        else:
            filling.done("refused")
            core.counters.incr(self._scope, "fill_refused")

    def _read_failed(self, key: str, exc: RedisError) -> bool:
        """The GET failed: True to go on as after a miss, False to call uncached."""
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            # a key of another Redis type under our name: unreadable like garbage bytes;
            # the fill's SET replaces it
            log.warning("unreadable cache entry %s replaced: %s", key, exc)
            self._core.counters.incr(self._scope, "decode_errors")
            return True
        self._failed(exc)
        return False

    def _decode(self, key: str, raw: Any, epoch: int) -> tuple[object, Any]:
        """``(_HIT, value)``, ``(_MISS, None)``, ``(_CORRUPT, None)`` (the fill replaces
        it) or ``(_RETIRED, None)`` (:meth:`_retired_meanwhile`: counted a miss, the fill
        compares the generation the look read); ``raw`` is what GET returned, or
        ``_UNREADABLE``; ``epoch``, :meth:`_trust_epoch` before the GET."""
        core = self._core
        core.breaker.success()  # resets the failure count too
        stats = core.counters
        outcome = _CORRUPT if raw is _UNREADABLE else _MISS
        if isinstance(raw, bytes) and not _is_tombstone(raw):
            try:
                value = _load(core.opened(key, raw))
            except CodecError as exc:
                log.warning("unreadable cache entry %s deleted: %s", key, exc)
                stats.incr(self._scope, "decode_errors")
                outcome = _CORRUPT
            else:
                if self._retired_meanwhile(key, epoch):
                    outcome = _RETIRED
                else:
                    stats.incr(self._scope, "hits")
                    return _HIT, value
        stats.incr(self._scope, "misses")
        return outcome, None

    def _blob(self, key: str, result: Any, generation: bytes) -> bytes | None:
        """The entry for ``result`` under ``key``, filled under ``generation``; None when it
        cannot or must not be stored (counted)."""
        core = self._core
        stamp = _ABSENT if generation == _FOREIGN else generation
        try:
            blob = core.sealed(key, _MAGIC + stamp + dumps_tagged(result))
        except CodecError as exc:
            core.counters.incr(self._scope, "uncacheable")
            if self._warned_result:
                log.debug("%s: result not cached: %s", self._prefix, exc)
                return None
            self._warned_result = True
            log.warning(
                "cached(%r) on %s: results not cached: %s; return plain data (dict, list, "
                "str, numbers, dates...) rather than ORM objects (logged once; counted in "
                "uncacheable)",
                self._prefix,
                self.__qualname__,
                exc,
                extra={"sarc_scope": self._scope},
            )
            return None
        if len(blob) > core.max_entry_bytes:
            core.counters.incr(self._scope, "oversize")
            return None
        return blob

    def _ttl_ms(self) -> int:
        ttl = self._ttl if self._ttl is not None else self._core.default_ttl
        return self._core.jittered_ms(ttl)

    def _failed(self, exc: RedisError) -> None:
        self._core.redis_failed(exc)
        self._core.counters.incr(self._scope, "errors")

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget the cached result of one call; True if there was one. ``ignore``'s
        parameters may be left out (``team_size.invalidate(3)`` without the session).

        A call of the function that started before this one (it may have read the
        database before a write this invalidation follows) does not store its result
        after it: a tombstone with a new generation takes the entry's place, and fills
        compare the generation they read (``lua/function_fill.lua``).
        """
        return self._retire(self.key_for(*args, **kwargs))

    def _retire(self, key: str) -> bool:
        """Put a tombstone of a new generation under ``key``; True if a result was there.
        When Redis fails, the key is remembered as undelivered (:meth:`_still_undelivered`)."""
        core = self._core
        try:
            return self._send_tombstone(key)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            undelivered = self._undelivered
            if len(undelivered) >= MAX_REMEMBERED:
                undelivered.keep((EVERY_NAME,))  # the keys named already stay bounded
            elif EVERY_NAME not in undelivered:
                undelivered.keep((key,))
            return False

    def _send_tombstone(self, key: str) -> bool:
        # as long as the entry would live, and long enough for a slow call to finish
        ttl_ms = max(self._ttl_ms(), _TOMBSTONE_MIN_MS)
        generation = f"{secrets.randbits(64) | 1:016x}"  # never the absent key's zeros
        script = scripts.function_invalidate(key, ttl_ms, generation)
        return bool(self._core.io().run_script(*script))

    def _trust_epoch(self) -> int:
        """A number that moves whenever this function's results are made undelivered or
        delivered, or a slot map refresh begins: taken before a look."""
        return self._undelivered.changes + self._core.pending_bumps.changes

    def _retired_meanwhile(self, key: str, epoch: int) -> bool:
        """Whether what a look of ``key`` found may have been retired while the look was
        on its way (its :meth:`_trust_epoch` was ``epoch``): a restart seen by the look's
        own new connection (its check runs inside the look), a slot map refresh (redis-py
        sends the look again by the new map), another thread's failed ``invalidate()``,
        or another thread's delivery that landed after the look was answered. The value
        it found is not served."""
        if self._core.slot_map_refreshes or self._trust_epoch() != epoch:
            return True
        names = self._undelivered.names
        return bool(names) and (EVERY_NAME in names or key in names)

    def _still_undelivered(self, key: str) -> bool:
        """Deliver this process's failed invalidation of ``key`` (or of every key) first;
        True when it still cannot be: the call then runs uncached and stores nothing
        (counted ``bypassed``), so that the result the invalidation retires is not served
        once Redis answers again (docs/guarantees.md, "Redis outages")."""
        core = self._core
        undelivered = self._undelivered
        try:
            if EVERY_NAME in undelivered:
                # one SCAN per function at a time (after a restart every thread's first
                # call gets here); the others run uncached meanwhile, without waiting
                if not self._delivering_all.acquire(blocking=False):
                    core.counters.incr(self._scope, "bypassed")
                    return True
                try:
                    if EVERY_NAME in undelivered:
                        self.invalidate_all()
                finally:
                    self._delivering_all.release()
            if key in undelivered:
                marks = undelivered.marks((key,))
                self._send_tombstone(key)
                undelivered.forget_delivered(marks)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr(self._scope, "bypassed")
            return True
        return False

    def invalidate_all(self) -> int:
        """Forget every cached result of this function; returns how many keys went (the
        tombstones of recent :meth:`invalidate` calls count too).

        It deletes keys and leaves no tombstone: a call that began before it can still
        store its result after it (docs/guarantees.md, Limits). Follow a write with
        :meth:`invalidate` of the calls it changes where that matters.
        """
        pattern = self._core.keys.function_pattern(self._prefix)
        # not a key whose invalidate() fails meanwhile
        marks = self._undelivered.marks()
        try:
            gone = self._core.unlink_matching(pattern)
        except RedisError:
            # raised to the caller, and remembered: until a later one lands, calls run
            # uncached (the keys may be partly deleted)
            self._undelivered.keep((EVERY_NAME,))
            raise
        self._undelivered.forget_delivered(marks)
        return gone


class AsyncCachedFunction(CachedFunction[P, "Coroutine[Any, Any, T]"]):
    """:class:`CachedFunction` for an ``async def``: awaiting it awaits the asyncio client.

    Keys, codec, counters and the breaker are those of the synchronous wrapper; the
    Redis calls await the cache's ``redis.asyncio`` client for the running event loop, so
    a lookup never blocks the loop. ``ainvalidate`` is the awaitable ``invalidate``.

    Example::

        @cache.cached("exchange_rate", ttl=60)
        async def rate(currency: str) -> Decimal: ...
        await rate("EUR")
        await rate.ainvalidate("EUR")
    """

    def __init__(
        self,
        core: CacheContext,
        prefix: str,
        ttl: float | None,
        func: Callable[P, Coroutine[Any, Any, T]],
        *,
        key: Callable[..., Any] | None = None,
        ignore: Iterable[str] = (),
    ) -> None:
        super().__init__(core, prefix, ttl, func, key=key, ignore=ignore)
        if _mark_coroutine is not None:  # Python 3.12+: inspect.iscoroutinefunction says so
            _mark_coroutine(self)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        key = self._lookup_key(args, kwargs)
        if key is None:
            return await self._func(*args, **kwargs)
        undelivered = bool(self._undelivered.names)
        if undelivered and await greenlet_spawn(self._still_undelivered, key):
            return await self._func(*args, **kwargs)
        # a latency histogram under the call's outcome, and a span when traced
        with self._core.measure(self._scope) as measured:
            client = self._core.async_client()
            epoch = self._trust_epoch()
            raw: Any
            try:
                raw = await client.get(key)
            except RedisError as exc:
                if not self._read_failed(key, exc):
                    measured.done("error")
                    return await self._func(*args, **kwargs)
                raw = _UNREADABLE
            outcome, value = self._decode(key, raw, epoch)
            if outcome is _HIT:
                measured.done("hit")
                return cast("T", value)
            if outcome is _RETIRED and await greenlet_spawn(self._still_undelivered, key):
                measured.done("miss")
                return await self._func(*args, **kwargs)
            result = await self._func(*args, **kwargs)
            # the fill script runs through context.io(), which in a greenlet awaits the
            # asyncio client: the same steps as the synchronous wrapper's, written once
            await greenlet_spawn(
                self._fill, key, result, generation_of(raw), corrupt=outcome is _CORRUPT
            )
            measured.done("miss")
            return result

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """As a method (see :meth:`CachedFunction.__get__`), with an ``async`` call."""
        if instance is None:
            return self
        return AsyncBoundCachedFunction(self, instance)

    async def ainvalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget the cached result of one call without blocking; True if there was one.
        As :meth:`invalidate`, a call that started before it does not store after it."""
        key = self.key_for(*args, **kwargs)
        return cast("bool", await greenlet_spawn(self._retire, key))

    async def ainvalidate_all(self) -> int:
        """:meth:`invalidate_all` without blocking: its SCAN and UNLINKs await the asyncio
        client; how many results went.

        Example::

            await rate.ainvalidate_all()
        """
        return await greenlet_spawn(self.invalidate_all)


class BoundCachedFunction:
    """A :class:`CachedFunction` read from an instance (or, under ``@classmethod``, a
    class): calls, keys and invalidations take ``instance`` as the first argument.

    Example::

        shop.price(7); shop.price.invalidate(7); shop.price.key_for(7)
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, cached: CachedFunction[..., Any], instance: object) -> None:
        self.__func__ = cached
        self.__self__ = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """:meth:`CachedFunction.key_for` of the call with the instance first."""
        return self.__func__.key_for(self.__self__, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """:meth:`CachedFunction.invalidate` of the call with the instance first."""
        return self.__func__.invalidate(self.__self__, *args, **kwargs)

    def invalidate_all(self) -> int:
        """:meth:`CachedFunction.invalidate_all`: every result, of every instance."""
        return self.__func__.invalidate_all()

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's signature without its first parameter, as a bound method's:
        what ``inspect.signature`` (and frameworks reading parameters) see."""
        signature = inspect.signature(self.__func__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __getattr__(self, name: str) -> Any:
        # __name__, __wrapped__...: those of the wrapper, as a bound method has
        if name in BoundCachedFunction.__slots__:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.__func__, name)

    def __repr__(self) -> str:
        return f"<bound cached {self.__func__.__qualname__} of {self.__self__!r}>"


class AsyncBoundCachedFunction(BoundCachedFunction):
    """:class:`BoundCachedFunction` of an :class:`AsyncCachedFunction`: its ``__call__`` is
    an ``async def``, so that frameworks that look for one (FastAPI's
    ``is_coroutine_callable``, :func:`is_async_callable`) await it."""

    __slots__ = ()
    __func__: AsyncCachedFunction[..., Any]

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.__func__(self.__self__, *args, **kwargs)

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> bool:
        """:meth:`AsyncCachedFunction.ainvalidate` of the call with the instance first."""
        return bool(await self.__func__.ainvalidate(self.__self__, *args, **kwargs))

    async def ainvalidate_all(self) -> int:
        """:meth:`AsyncCachedFunction.ainvalidate_all`."""
        return int(await self.__func__.ainvalidate_all())


class CacheDecorator(Protocol):
    """What :meth:`Cache.cached` returns: wraps a function, or an ``async def``."""

    @overload
    def __call__(self, func: Callable[P, Coroutine[Any, Any, T]]) -> AsyncCachedFunction[P, T]: ...
    @overload
    def __call__(self, func: Callable[P, R]) -> CachedFunction[P, R]: ...


def callable_name(func: Callable[..., Any]) -> str:
    """How to name ``func`` in a message: its ``__qualname__``, or, for a
    ``functools.partial`` or a callable object (which have none), what they wrap or are.

    Example::

        callable_name(functools.partial(rate, "EUR"))  # 'partial(rate)'
    """
    name = getattr(func, "__qualname__", None)
    if isinstance(name, str):
        return name
    inner = getattr(func, "func", None)
    if isinstance(func, functools.partial) and inner is not None:
        return f"partial({callable_name(inner)})"
    return type(func).__qualname__


def is_async_callable(func: object) -> bool:
    """Whether calling ``func`` returns a coroutine: an ``async def`` (or a partial of one),
    or an object whose ``__call__`` is an ``async def`` (not a class: calling it makes one).

    Example::

        is_async_callable(rate)  # True for ``async def rate(...)``
    """
    if inspect.iscoroutinefunction(func):
        return True
    return not isinstance(func, type) and inspect.iscoroutinefunction(type(func).__call__)


def _ignored(prefix: str, signature: inspect.Signature, ignore: Iterable[str]) -> tuple[str, ...]:
    """``ignore`` checked against the signature: a misspelt name would ignore nothing."""
    if isinstance(ignore, str):
        ignore = (ignore,)
    names = tuple(ignore)
    unknown = [n for n in names if n not in signature.parameters]
    if unknown:
        raise ValueError(
            f"cached({prefix!r}, ignore={names!r}): {', '.join(map(repr, unknown))} is not a "
            f"parameter of the function; it has {', '.join(signature.parameters) or 'none'}"
        )
    return names


def _culprit(arguments: dict[str, Any] | None) -> tuple[str, Any] | None:
    """The first argument the codec cannot encode exactly, to name it in the warning."""
    for name, value in (arguments or {}).items():
        if not _encodable(value):
            return name, value
    return None


def _encodable(value: Any) -> bool:
    try:
        dumps_tagged(value)
    except CodecError:
        return False
    return True


def generation_of(raw: object) -> bytes:
    """The generation of a value read under a function's key, as ``lua/function_fill.lua``
    reads it: the 16 bytes after an entry's or a tombstone's header; zeros when absent;
    ``b"?"`` for anything else.

    Example::

        generation_of(None)  # b"0000000000000000"
    """
    if raw is None:
        return _ABSENT
    if (
        isinstance(raw, bytes)
        and raw[:2] in (_MAGIC, _TOMBSTONE)
        and len(raw) >= 2 + _GENERATION_BYTES
    ):
        return raw[2 : 2 + _GENERATION_BYTES]
    return _FOREIGN


def _is_tombstone(raw: bytes) -> bool:
    return raw.startswith(_TOMBSTONE) and len(raw) == 2 + _GENERATION_BYTES


def _load(raw: bytes) -> Any:
    if raw.startswith(_MAGIC) and len(raw) > 2 + _GENERATION_BYTES:
        return loads_tagged(raw[2 + _GENERATION_BYTES :])
    if raw.startswith(_LEGACY_MAGIC):
        return loads_tagged(raw[len(_LEGACY_MAGIC) :])
    raise CodecError("not an entry of cache.cached")
