"""The read path: ``do_orm_execute`` serving ``FromCache`` statements and primary-key loads.

* :mod:`.flow`: the read-through flow both share (look, serve, lease, wait, fill);
* :mod:`.queries`: ``FromCache`` (plans, entry keys, query entries);
* :mod:`.entities`: the entity cache (``session.get``, many-to-one lazy loads);
* :mod:`.relationships`: lazy loads of collections, through query entries;
* :mod:`.auto`: every eligible select without ``FromCache`` (``cache_queries``);
* :mod:`.regions`: the tables of each ``FromCache`` region (``cache.invalidate_region``).

Example::

    reads = ReadPath(core)
    reads.on_execute(orm_context)   # called by sa_redis_cache.sessions for a SELECT
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from sa_redis_cache import compat
from sa_redis_cache.counters import parse_counter
from sa_redis_cache.options import FromCache
from sa_redis_cache.transaction import transaction_state

from .auto import AutoQueries
from .entities import EntityReads, entity_entry
from .flow import ReadThrough
from .queries import DecodedEntries, QueryReads, StatementPlan
from .regions import RegionIndex
from .relationships import RelationshipReads

if TYPE_CHECKING:
    from collections.abc import Iterable

    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session
    from sqlalchemy.orm.state import InstanceState

    from sa_redis_cache.context import CacheContext

__all__ = ["ReadPath", "StatementPlan", "entity_entry", "from_cache_in"]


def from_cache_in(options: Iterable[Any]) -> FromCache | None:
    """The ``FromCache`` among a statement's options (the last one given), else None.

    Example::

        from_cache_in(select(Product).options(FromCache(ttl=60))._with_options)
    """
    found = None
    for option in options:
        if type(option) is FromCache:
            found = option
    return found


class ReadPath:
    """Serves cached reads for one :class:`~sa_redis_cache.Cache`."""

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        self.flow = ReadThrough(core)
        # one bound for the decodings that query and entity hits keep
        decoded = DecodedEntries()
        self.queries = QueryReads(core, self.flow, decoded)
        self.entities = EntityReads(core, self.flow, decoded)
        self.relationships = RelationshipReads(core)
        self.auto = AutoQueries(core)
        self.regions = RegionIndex(core)
        # objects session.refresh(obj) reloaded whole: the relationships whose next lazy
        # load reads the database (held weakly, as the session holds its objects)
        self._refreshed: weakref.WeakKeyDictionary[InstanceState[Any], set[str]] = (
            weakref.WeakKeyDictionary()
        )

    def on_execute(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """Serve a SELECT from the cache; returns a result to short-circuit the database."""
        refreshed = compat.refreshed_whole(orm_context)
        if refreshed is not None:
            # session.refresh(obj) expired its relationships too: a plain session reads
            # the lazy ones from the database at their next access, so must the cache
            self._refreshed[refreshed] = set(refreshed.mapper.relationships.keys())
        option = from_cache_in(orm_context.user_defined_options)
        chosen = option is not None  # by the statement; else by the cache itself
        if option is None:
            if orm_context.is_relationship_load and (
                not orm_context.lazy_loaded_from
                or compat.loads_for_refresh(orm_context)
                or self._first_since_refresh(orm_context)
            ):
                # an eager load's, or one a refresh asked for (session.refresh(obj,
                # ["tags"]), or session.refresh(obj) and then the attribute): the
                # database's rows
                return None
            # a collection's lazy load, or any eligible select under cache_queries
            option = (
                self.relationships.option_for(orm_context)
                if orm_context.is_relationship_load
                else self.auto.option_for(orm_context)
            )
            if option is None:
                return self.entities.read(orm_context)
        elif orm_context.is_relationship_load:
            return None
        if not self.regions.note(compat.bind_mapper(orm_context), option):
            # its region is not recorded: invalidate_region would miss what it filled
            # (note() counted the read: bypassed, or its Redis error)
            return None
        return self.queries.read(orm_context, option, volatile_ok=chosen)

    def _first_since_refresh(self, orm_context: ORMExecuteState) -> bool:
        """Whether this lazy load is the first of its relationship since
        ``session.refresh(obj)`` reloaded its object whole (it then reads the database)."""
        keys = self._refreshed.get(orm_context.lazy_loaded_from)  # type: ignore[arg-type]
        if not keys:
            return False
        prop = getattr(orm_context.loader_strategy_path, "prop", None)
        key = getattr(prop, "key", None)
        if key not in keys:
            return False
        keys.discard(key)
        return True

    def direct_read(
        self, session: Session, statement: Any, option: FromCache, mapper: Mapper[Any]
    ) -> Result[Any] | None:
        """The result of ``session.execute(statement)``, a ``FromCache`` statement about
        ``mapper``, when it is a hit the cache can serve before SQLAlchemy's execute
        pipeline, else None (the pipeline runs: :meth:`QueryReads.direct_read
        <.queries.QueryReads.direct_read>`).

        Example::

            result = reads.direct_read(session, statement, option, mapper)
            if result is None:
                result = Session.execute(session, statement)
        """
        result = self.queries.direct_read(session, statement, option, mapper)
        if result is not None:
            self.regions.note(mapper, option, lookup=False)  # the hit is counted
        return result

    def on_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """Under REPEATABLE READ or SERIALIZABLE, pin the versions before the snapshot.

        Such a transaction reads one snapshot, taken at its first statement; a fill must
        be validated against the versions as they were before it, or a value older than
        a write committed since could be stored as current.
        """
        isolation = (
            connection.get_execution_options().get("isolation_level")
            or connection.default_isolation_level
        )
        if isolation not in ("REPEATABLE READ", "SERIALIZABLE"):
            return
        core = self.core
        tables = core.models.known_tables()
        tx = transaction_state(session)
        if compat.joined_a_begun_transaction(transaction, connection):
            # the application's transaction on the connection may have taken its snapshot
            # before any commit since: versions read now would pin what that snapshot never
            # saw, and a fill under them would store its older rows as current. Nothing is
            # pinned: no hit, no fill, for the rest of the transaction
            tx.snapshot = dict.fromkeys(tables)
            return
        keys = [core.keys.version_key(t) for t in tables]
        values: list[bytes | None]
        try:
            values = core.io().mget(keys)
        except RedisError as exc:
            core.redis_failed(exc)
            core.counters.incr_total("errors")
            values = [None] * len(tables)
        else:
            # missing counters are made, as a look makes them: a pin of an absent counter
            # pins nothing and forbids fills, and a transaction that reads only from its
            # pins would never make them
            made = self.flow.captured(values, keys)
            if made is not None:
                values = list(made)
        # a pin that is not a counter pins nothing: such a table is not filled this time
        tx.snapshot = {
            t: v if parse_counter(v) is not None else None
            for t, v in zip(tables, values, strict=True)
        }
