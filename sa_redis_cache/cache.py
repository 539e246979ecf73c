"""The ``Cache`` front end: the one object most users touch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, Session, sessionmaker

from .core import CacheCore
from .errors import ConfigurationError
from .events import WritePath
from .functions import CachedFunction
from .keys import KeyScheme, pk_text
from .models import ModelInfo, all_mappers, mapper_of
from .policy import CachePolicy
from .reads import ReadPath

log = logging.getLogger("sa_redis_cache")

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULT_TIMEOUT = 0.25


class Cache:
    """A Redis cache for SQLAlchemy sessions.

    ``redis`` is a ``redis.Redis`` client or a URL; a URL gets short socket timeouts so
    that a slow Redis degrades reads to the database instead of stalling them.
    ``namespace`` separates applications sharing one Redis; ``default_ttl`` (seconds)
    bounds every entry whose model or option gives no TTL; ``ttl_jitter`` shortens each
    TTL by up to that fraction so entries written together do not expire together;
    ``max_entry_bytes`` is the size above which a result is not cached.

    Example::

        cache = Cache("redis://localhost:6379/0", namespace="shop", default_ttl=300)
        Session = sessionmaker(engine)
        cache.attach(Session)
        with Session() as s:
            s.scalars(select(Product).options(FromCache())).all()
    """

    def __init__(
        self,
        redis_client: redis.Redis | str,
        *,
        namespace: str = "default",
        default_ttl: float = 300,
        ttl_jitter: float = 0.1,
        max_entry_bytes: int = 1 << 20,
    ) -> None:
        if isinstance(redis_client, str):
            redis_client = redis.Redis.from_url(
                redis_client,
                socket_timeout=_DEFAULT_TIMEOUT,
                socket_connect_timeout=_DEFAULT_TIMEOUT,
            )
        if not isinstance(redis_client, redis.Redis):
            raise ConfigurationError(
                f"Cache() needs a redis.Redis client or a redis:// URL, got "
                f"{type(redis_client).__name__}; pass redis.Redis.from_url(...) or the URL"
            )
        if not namespace or any(ch in namespace for ch in "{}:*?[] \n"):
            raise ConfigurationError(
                f"namespace={namespace!r} must be a non-empty name without spaces, ':', "
                "braces or glob characters; use something like 'shop' or 'shop_v2'"
            )
        if not default_ttl > 0:
            raise ConfigurationError(
                f"default_ttl={default_ttl!r}: every entry needs a positive TTL in seconds"
            )
        if not 0 <= ttl_jitter < 1:
            raise ConfigurationError(f"ttl_jitter={ttl_jitter!r} must be in [0, 1)")
        self._core = CacheCore(
            redis_client,
            namespace=namespace,
            default_ttl=default_ttl,
            ttl_jitter=ttl_jitter,
            max_entry_bytes=max_entry_bytes,
        )
        self._writes = WritePath(self._core)
        self._reads = ReadPath(self._core, self._writes)
        self._attached: list[Any] = []

    @property
    def client(self) -> redis.Redis:
        """The Redis client the cache uses."""
        return self._core.client

    @property
    def namespace(self) -> str:
        """The namespace every key of this cache starts with (after ``sarc:``)."""
        return self._core.namespace

    @property
    def keys(self) -> KeyScheme:
        """The key layout of this cache's namespace."""
        return self._core.keys

    @property
    def default_ttl(self) -> float:
        """TTL in seconds of entries whose model and option give none."""
        return self._core.default_ttl

    # -- attaching ------------------------------------------------------------------------

    def attach(self, target: Any) -> None:
        """Enable caching for sessions made by ``target`` and check every model's policy.

        ``target`` is a ``sessionmaker``, a ``Session`` subclass, an
        ``async_sessionmaker`` or an ``AsyncSession`` subclass; the engine a session
        factory is bound to is instrumented too, so Core and textual DML on it invalidate.
        An ``Engine`` alone may be attached for applications that write through Core.
        Every mapped class with a ``__cache__`` attribute is validated; all problems are
        reported at once, each naming the model and the fix, and nothing is attached when
        any is found.

        Example::

            Session = sessionmaker(engine)
            cache.attach(Session)
        """
        if isinstance(target, Engine):
            self._load_models()
            self._writes.core_dml.register(target)
            return
        session_class = self._session_class_of(target)
        self._load_models()
        bind = getattr(target, "kw", {}).get("bind")
        if isinstance(bind, AsyncEngine):
            bind = bind.sync_engine
        if isinstance(bind, Engine):
            self._writes.core_dml.register(bind)
        event.listen(session_class, "do_orm_execute", self._reads.on_execute)
        event.listen(session_class, "after_begin", self._reads.on_begin)
        self._writes.register(session_class)
        self._attached.append(session_class)

    def _session_class_of(self, target: Any) -> type[Session]:
        if isinstance(target, sessionmaker):
            return target  # type: ignore[return-value]  # sessionmaker is an event target
        if isinstance(target, async_sessionmaker):
            sync_class = target.kw.get("sync_session_class", Session)
            # a subclass of our own scopes the listeners to this factory's sessions
            scoped = type(f"Cached{sync_class.__name__}", (sync_class,), {})
            target.kw["sync_session_class"] = scoped
            return scoped
        if isinstance(target, type) and issubclass(target, AsyncSession):
            return target.sync_session_class
        if isinstance(target, type) and issubclass(target, Session):
            return target
        raise ConfigurationError(
            f"attach() got {target!r}; pass a sessionmaker, a Session subclass, an "
            "async_sessionmaker or an AsyncSession subclass"
        )

    def _load_models(self) -> None:
        problems: list[str] = []
        found: dict[Mapper[Any], CachePolicy | None] = {}
        for mapper in all_mappers():
            policy = getattr(mapper.class_, "__cache__", None)
            if policy is not None and not isinstance(policy, CachePolicy):
                problems.append(
                    f"{mapper.class_.__name__}.__cache__ is {policy!r}, not a CachePolicy; "
                    "write __cache__ = CachePolicy(...)"
                )
                continue
            if policy is not None:
                problems.extend(
                    f"{mapper.class_.__name__}: {problem}" for problem in policy.problems()
                )
                if policy.strategy == "write_behind":
                    problems.append(
                        f"{mapper.class_.__name__}: strategy='write_behind' is not available "
                        "in this version; use 'write_through' or 'cache_aside'"
                    )
            found[mapper] = policy
        problems.extend(_unmapped_policies(found))
        if problems:
            raise ConfigurationError(
                "cache.attach() refused these models:\n  - " + "\n  - ".join(problems)
            )
        for mapper, policy in found.items():
            self._core.models.register(mapper, policy)

    # -- explicit invalidation ---------------------------------------------------------

    def invalidate(self, model: type, *pk: Any) -> None:
        """Remove the entity entry of one row; ``pk`` is its primary key value(s).

        Example::

            cache.invalidate(Product, 7)
        """
        info = self._model_info(model)
        if len(pk) != len(info.pk_positions):
            raise ValueError(
                f"{model.__name__} has a primary key of {len(info.pk_positions)} column(s); "
                f"got {len(pk)} value(s)"
            )
        self.client.unlink(self.keys.entity_key(info.table, info.schema_hash, pk_text(pk)))
        self._core.counters.incr("model:" + model.__name__, "invalidations")

    def invalidate_model(self, model: type) -> None:
        """Invalidate every cached query that read ``model``'s table, and its entity entries.

        Costs one INCR for the queries, whatever their number, plus a SCAN of the
        model's entity entries.

        Example::

            cache.invalidate_model(Product)
        """
        info = self._model_info(model)
        self.client.incr(self.keys.version_key(info.table))
        self._core.unlink_matching(self.keys.entity_pattern(info.table))
        self._core.counters.incr("model:" + model.__name__, "invalidations")

    def invalidate_query(
        self, statement: Any, params: dict[str, Any] | None = None, *, bind: Any = None
    ) -> int:
        """Remove the entries that ``statement`` (with ``params``) reads; returns how many.

        ``bind`` is the engine the statement runs on; by default every engine the cache
        has served is tried, as an entry's key includes its bind.

        Example::

            stmt = select(Product).where(Product.id < 10).options(FromCache())
            cache.invalidate_query(stmt)
        """
        cache_key = statement._generate_cache_key()
        plan = None if cache_key is None else self._reads.plan(cache_key.key, statement)
        if cache_key is None or plan is None:
            return 0
        binds = [bind] if bind is not None else self._reads.known_binds()
        translate = statement.get_execution_options().get("schema_translate_map")
        keys = [
            key
            for b in binds
            if (key := self._reads.entry_key(plan, cache_key.bindparams, params, b, translate))
        ]
        removed = int(self.client.unlink(*keys)) if keys else 0
        self._core.counters.incr("total", "invalidations")
        return removed

    def cached(self, prefix: str, ttl: float | None = None) -> Callable[[F], F]:
        """Cache a plain function's results under ``prefix`` (the recipe's decorator).

        Example::

            @cache.cached("user_profile", ttl=600)
            def profile(user_id: int) -> dict: ...
            profile.invalidate(42)
        """

        def decorate(func: F) -> F:
            return CachedFunction(self._core, prefix, ttl, func)  # type: ignore[return-value]

        return decorate

    def _model_info(self, model: type) -> ModelInfo:
        mapper = mapper_of(model)
        if mapper is None:
            raise ConfigurationError(f"{model!r} is not a mapped class")
        return self._core.models.info_of(mapper)

    # -- observability -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate, errors, fills... in total, per model and per region.

        Example::

            cache.stats()["models"]["Product"]["hit_rate"]
        """
        return self._core.counters.snapshot()


def _unmapped_policies(found: dict[Mapper[Any], CachePolicy | None]) -> list[str]:
    """Policies declared on classes of a declarative hierarchy that are not mapped."""
    mapped = {m.class_ for m in found}
    roots: set[type] = set()
    for cls in mapped:
        for base in cls.__mro__:
            if "registry" in base.__dict__ and "metadata" in base.__dict__:
                roots.add(base)
    problems = []
    seen: set[type] = set()
    stack = list(roots)
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub in seen:
                continue
            seen.add(sub)
            stack.append(sub)
            if (
                "__cache__" in sub.__dict__
                and sub not in mapped
                and not sub.__dict__.get("__abstract__", False)
            ):
                problems.append(
                    f"{sub.__name__} declares __cache__ but is not mapped; map it (give it a "
                    "__tablename__) or move the policy to the mapped class"
                )
    return problems
