"""``cache.cached``: the recipe's function decorator, without pickle and with safe keys."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from redis.exceptions import RedisError, ResponseError

from .codec import CodecError, dumps_tagged, loads_tagged
from .keys import values_digest
from .policy import is_ttl

if TYPE_CHECKING:
    from collections.abc import Callable

    from .core import CacheCore

log = logging.getLogger("sa_redis_cache")

P = ParamSpec("P")
R = TypeVar("R")

_MAGIC = b"\x01F"
_DIGEST_CHARS = len(values_digest([]))


class CachedFunction(Generic[P, R]):
    """A function whose results are cached in Redis; made by :meth:`Cache.cached`.

    Arguments are bound to the function's signature (so ``f(1)`` and ``f(user_id=1)``
    share an entry), encoded exactly with type tags and hashed: any string, however long
    or full of separators, makes a safe key. Results are stored with the tagged codec;
    a result it cannot encode exactly is returned but not cached.

    Example::

        @cache.cached("user_profile", ttl=600)
        def profile(user_id: int) -> dict: ...
        profile(42)
        profile.invalidate(42)
    """

    # set by functools.update_wrapper, declared for type checkers
    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(
        self, core: CacheCore, prefix: str, ttl: float | None, func: Callable[P, R]
    ) -> None:
        if not prefix or any(ch in prefix for ch in "{}*?[] \n"):
            raise ValueError(
                f"cached({prefix!r}): the prefix names the function in Redis keys; use letters, "
                "digits, '_', '-', '.' or ':'"
            )
        if ttl is not None and not is_ttl(ttl):
            raise ValueError(
                f"cached({prefix!r}, ttl={ttl!r}): ttl must be a positive, finite number of "
                "seconds, or None for the cache's default_ttl"
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
        self._scope = "function:" + prefix
        functools.update_wrapper(self, func)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The Redis key of one call."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if self._var_keyword is not None and arguments[self._var_keyword]:
            # f(a=1, b=2) and f(b=2, a=1) are one call: **kwargs order is not meaningful
            arguments[self._var_keyword] = dict(sorted(arguments[self._var_keyword].items()))
        digest = values_digest([list(arguments.items())])
        return self._core.keys.function_key(self._prefix, digest)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        core = self._core
        stats = core.counters
        try:
            key = self.key_for(*args, **kwargs)
        except (CodecError, TypeError) as exc:
            log.debug("%s: arguments cannot make a key (%s); calling uncached", self._prefix, exc)
            stats.incr(self._scope, "uncacheable")
            return self._func(*args, **kwargs)
        if not core.breaker.allow():
            stats.incr(self._scope, "bypassed")
            return self._func(*args, **kwargs)
        try:
            raw = cast("bytes | None", core.client.get(key))
        except ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                core.redis_failed(exc)
                stats.incr(self._scope, "errors")
                return self._func(*args, **kwargs)
            # a key of another Redis type under our name: unreadable like garbage bytes;
            # the fill's SET replaces it
            log.warning("unreadable cache entry %s replaced: %s", key, exc)
            stats.incr(self._scope, "decode_errors")
            raw = None
        except RedisError as exc:
            core.redis_failed(exc)
            stats.incr(self._scope, "errors")
            return self._func(*args, **kwargs)
        core.breaker.success()  # resets the failure count too
        if raw is not None:
            try:
                value: R = _load(raw)
            except CodecError as exc:
                log.warning("unreadable cache entry %s deleted: %s", key, exc)
                stats.incr(self._scope, "decode_errors")
                self._delete(key)
            else:
                stats.incr(self._scope, "hits")
                return value
        stats.incr(self._scope, "misses")
        result = self._func(*args, **kwargs)
        try:
            blob = _MAGIC + dumps_tagged(result)
        except CodecError as exc:
            log.warning("%s: result not cached: %s", self._prefix, exc)
            stats.incr(self._scope, "uncacheable")
            return result
        if len(blob) > core.max_entry_bytes:
            stats.incr(self._scope, "oversize")
            return result
        ttl = self._ttl if self._ttl is not None else core.default_ttl
        try:
            core.client.set(key, blob, px=core.jittered_ms(ttl))
            stats.incr(self._scope, "fills")
        except RedisError as exc:
            core.redis_failed(exc)
            stats.incr(self._scope, "errors")
        return result

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Forget the cached result of one call; True if there was one."""
        return self._delete(self.key_for(*args, **kwargs))

    def invalidate_all(self) -> int:
        """Forget every cached result of this function; returns how many went."""
        pattern = self._core.keys.function_pattern(self._prefix)
        # match exactly one digest after the prefix, so that prefix "a" leaves "a:b" alone
        assert pattern.endswith("*")
        pattern = pattern[:-1] + "?" * _DIGEST_CHARS
        return self._core.unlink_matching(pattern)

    def _delete(self, key: str) -> bool:
        try:
            return bool(self._core.client.unlink(key))
        except RedisError as exc:
            self._core.redis_failed(exc)
            return False


def _load(raw: bytes) -> Any:
    if not raw.startswith(_MAGIC):
        raise CodecError("not an entry of cache.cached")
    return loads_tagged(raw[len(_MAGIC) :])
