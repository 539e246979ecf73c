"""Caching every eligible select: ``cache.attach(factory, cache_queries=FromCache(...))``
and ``CachePolicy(cache_queries=True)``.

Applications that cache every query used to add ``FromCache()`` in a ``do_orm_execute``
hook of their own; registered after ``attach()`` it ran after the cache's hook and cached
nothing, silently, and leaving primary-key loads to the entity cache took a private
SQLAlchemy attribute. Here the choice is made inside the cache's own dispatch
(:meth:`sa_redis_cache.reads.ReadPath.on_execute`, called by the one ``do_orm_execute``
listener of :mod:`sa_redis_cache.sessions`), so no registration order can break it.

A select is *eligible* when it is an ORM ``select()`` that

* is not a primary-key load (``session.get``, many-to-one lazy loads): the entity cache
  serves those, row by row;
* is not a relationship load (lazy, selectin, subquery loaders) nor a refresh of loaded
  objects (``session.refresh``, expired or deferred attributes);
* is not ``select().from_statement(text(...))`` and not ``with_for_update()``;
* was not opted out with ``.execution_options(cache_queries=False)``;

and the session's factory was attached with ``cache_queries=``, or the statement's first
entity is a model whose policy says ``cache_queries=True``. A statement that carries its
own ``FromCache`` keeps it.

Example::

    cache.attach(Session, cache_queries=FromCache(ttl=60))
    session.scalars(select(User).where(User.email == email)).one()  # cached
    session.get(User, user_id)                                      # entity cache
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.sql import Select

from sa_redis_cache import compat
from sa_redis_cache.options import FromCache

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

    from sa_redis_cache.context import CacheContext

OPT_OUT = "cache_queries"
"""The execution option that, set to False, keeps a statement out of automatic caching."""

_MODEL_DEFAULT = FromCache()


class AutoQueries:
    """Which selects without ``FromCache`` are cached anyway, and with which option.

    Example::

        auto = AutoQueries(core)
        auto.set(SessionClass, FromCache(ttl=60))
        auto.option_for(orm_context)   # a FromCache, or None
    """

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        self.by_class: dict[type, FromCache] = {}

    def set(self, session_class: type, option: FromCache | None) -> None:
        """Cache every eligible select of ``session_class``'s sessions with ``option``
        (None: stop)."""
        if option is None:
            self.by_class.pop(session_class, None)
        else:
            self.by_class[session_class] = option

    def clear(self) -> None:
        """Forget every factory's option (``cache.detach()``)."""
        self.by_class.clear()

    def option_for(self, orm_context: ORMExecuteState) -> FromCache | None:
        """The option to read an eligible select with; None leaves it uncached."""
        statement: Any = orm_context.statement
        if not isinstance(statement, Select) or orm_context.is_from_statement:
            return None
        by_class = self.by_class
        option = None
        if by_class:
            for cls in type(orm_context.session).__mro__:
                option = by_class.get(cls)
                if option is not None:
                    break
        if option is None:
            mapper = compat.bind_mapper(orm_context)
            info = None if mapper is None else self.core.models.infos.get(mapper)
            if info is None or info.policy is None or not info.policy.cache_queries:
                return None
            option = _MODEL_DEFAULT
        if (
            orm_context.execution_options.get(OPT_OUT) is False
            or orm_context.is_column_load
            or compat.is_refresh(orm_context)
            or compat.is_locking(statement)
            or self._primary_key_load(orm_context)
        ):
            return None
        return option

    def _primary_key_load(self, orm_context: ORMExecuteState) -> bool:
        mapper = compat.statement_mapper(orm_context.statement)
        return (
            mapper is not None
            and compat.get_clause_pk(orm_context.statement, mapper, orm_context.parameters)
            is not None
        )
