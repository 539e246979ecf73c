"""Lazy loads of collections (one-to-many, many-to-many), served from query entries.

``category.products`` and ``user.groups`` run one SELECT per parent object the first
time they are touched. When the collection's model has a ``CachePolicy`` (with
``entity_cache``, the default), that SELECT is read through the ``FromCache`` machinery
(:mod:`.queries`): its entry is keyed by the statement and the parent's key values, and
validated against the version of every table it reads, the target's and, for a
many-to-many, the association table's. So a write to either side (a new product, a
moved product, a row added to or removed from the association table) invalidates it,
with the guarantees of every cached query. Many-to-one lazy loads by primary key stay
with the entity cache (:mod:`.entities`). SQLAlchemy's ``RelationshipCache`` recipe is
the peer: it caches per relationship path with a user-managed invalidation; here the
table versions do it.

Each relationship counts in its own region of ``cache.stats()``, named
``<Parent>.<relationship>`` (``Category.products``).

Example::

    relationships = RelationshipReads(core)
    relationships.option_for(orm_context)   # a FromCache for a collection's lazy load
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import RelationshipProperty

from sa_redis_cache.options import FromCache

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

    from sa_redis_cache.context import CacheContext


class RelationshipReads:
    """Decides which lazy loads of collections are cached, and under which region."""

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        # per relationship, held weakly: a registry disposed of takes its entries along
        self._options: weakref.WeakKeyDictionary[RelationshipProperty[Any], FromCache | None] = (
            weakref.WeakKeyDictionary()
        )

    def option_for(self, orm_context: ORMExecuteState) -> FromCache | None:
        """A ``FromCache`` for the lazy load of a cached collection, else None."""
        path = orm_context.loader_strategy_path
        prop = getattr(path, "prop", None)
        if not isinstance(prop, RelationshipProperty):
            return None
        try:
            return self._options[prop]
        except KeyError:
            pass
        option = None
        if prop.uselist:
            info = self.core.models.infos.get(prop.mapper)
            policy = None if info is None else info.policy
            if policy is not None and policy.entity_cache:
                region = f"{prop.parent.class_.__name__}.{prop.key}"
                option = FromCache(
                    region=region, lease_wait=policy.lease_wait, xfetch_beta=policy.xfetch_beta
                )
        self._options[prop] = option
        return option

    def clear(self) -> None:
        """Forget the decisions (models are registered again by the next ``attach()``)."""
        self._options.clear()
