"""``cache.inspector``: what a cache knows and where its entries live, for tools.

The command line, the Prometheus collector and an application's own tooling (a health
endpoint, an admin page) read the cache through this object rather than its internals:
the models it knows, the keys a row or a statement is stored under, the circuit breaker,
the tables whose invalidations wait for Redis, the restarts it noticed, its latency
histograms. Everything here reads; nothing changes what the cache does.

Example::

    inspector = cache.inspector
    inspector.model(Product).table                       # 'products'
    inspector.statement_key(stmt, database=inspector.database_of(engine))
    inspector.breaker_state()                             # 'closed'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import compat
from .binds import translate_map_of
from .breaker import CLOSED, HALF_OPEN, OPEN
from .codec import CodecError
from .errors import ConfigurationError
from .models import mapper_of
from .options import FromCache
from .protocol import pk_text
from .strategies.write_behind.states import pending_state

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .binds import Database
    from .context import CacheContext
    from .local import LocalTier
    from .models import ModelInfo
    from .protocol import KeyScheme
    from .reads import ReadPath
    from .reads.queries import StatementPlan

__all__ = ["CacheInspector", "PendingState"]


@dataclass(frozen=True, slots=True)
class PendingState:
    """A write-behind row's queued, unflushed state, as its pending key holds it.

    ``row`` is the queued row by attribute name, or None for a queued delete: what
    ``session.get`` of the row returns until the worker has flushed it.

    Example::

        PendingState("1700000000000-0", None)
    """

    stream_id: str
    row: dict[str, Any] | None


class CacheInspector:
    """A read-only view of one :class:`~sa_redis_cache.Cache` (its ``inspector``).

    Example::

        cache.inspector.undelivered_tables()   # frozenset() while Redis takes every write
    """

    def __init__(self, context: CacheContext, reads: ReadPath) -> None:
        self._context = context
        self._reads = reads

    @property
    def keys(self) -> KeyScheme:
        """The key layout of the cache's namespace."""
        return self._context.keys

    # -- models --------------------------------------------------------------------------

    def model(self, cls: type) -> ModelInfo:
        """What the cache knows of mapped class ``cls`` (its table, columns, codec, policy).

        Raises :class:`~sa_redis_cache.ConfigurationError` for a class that is not mapped.
        """
        mapper = mapper_of(cls)
        if mapper is None:
            raise ConfigurationError(f"{cls!r} is not a mapped class")
        return self._context.models.info_of(mapper)

    def model_named(self, name: str) -> ModelInfo | None:
        """The model whose mapper is called ``name`` (``module.Class``), if it exists here."""
        return self._context.models.info_by_name(name)

    # -- where entries live --------------------------------------------------------------

    def database_of(self, engine: Engine) -> Database | None:
        """The database ``engine`` reaches, as keys name it (connects once per pool)."""
        return self._context.binds.database_of_engine(engine)

    def row_key(
        self, cls: type, pk: tuple[Any, ...], *, database: Database, schema: str | None = None
    ) -> str:
        """The entity key of one row in ``database``; ``schema`` is the schema the table is
        translated to (``schema_translate_map``), if it is.

        Example::

            cache.inspector.row_key(Product, (7,), database=inspector.database_of(engine))
        """
        info = self.model(cls)
        scope = self._row_scope(info, database, schema)
        return self.keys.entity_key(info.table, info.schema_hash, scope, pk_text(pk))

    def pending_key(
        self, cls: type, pk: tuple[Any, ...], *, database: Database, schema: str | None = None
    ) -> str:
        """The pending key of one write-behind row in ``database`` (its queued, unflushed
        state, which ``session.get`` reads before the entity entry); ``schema`` as in
        :meth:`row_key`.

        Example::

            cache.inspector.pending_key(PageView, (view_id,), database=database)
        """
        info = self.model(cls)
        scope = self._row_scope(info, database, schema)
        return self.keys.pending_key(info.table, info.schema_hash, scope, pk_text(pk))

    def pending_state(self, key: str, raw: bytes, cls: type, pk: tuple[Any, ...]) -> PendingState:
        """What the value ``raw`` of the pending key ``key`` of row ``pk`` says, decoded as
        ``session.get`` decodes it (size and signature checked as this cache checks them).

        Raises :class:`~sa_redis_cache.codec.CodecError` (or the codec's ``ValueError``,
        ``TypeError``, ``IndexError``) when it holds no queued state the reads would serve:
        they skip it and read the entity entry.

        Example::

            state = cache.inspector.pending_state(key, client.get(key), PageView, (view_id,))
            state.row is None  # a queued delete: session.get() returns None
        """
        info = self.model(cls)
        if info.codec is None:
            raise CodecError("the model has no codec in this process")
        # signed as the row's entity entry is, as session.get opens it
        entity = self.keys.pending_entity_key(info.table, info.schema_hash, key)
        if entity is None:
            raise CodecError(f"{key} is no pending key of {cls.__name__}")
        stream_id, values = pending_state(
            info, self._context.opened(entity, raw, scripted=True), pk_text(pk)
        )
        row = None if values is None else dict(zip(info.column_keys, values, strict=True))
        return PendingState(stream_id, row)

    def _row_scope(self, info: ModelInfo, database: Database, schema: str | None) -> str:
        translate = None if schema is None else {info.table_schema: schema}
        return self._context.binds.scope(database, info.table_schema, translate)

    def statement_plan(
        self, statement: Any, database: Database | None = None
    ) -> StatementPlan | None:
        """What the read path knows of a statement's shape (its tables, their version
        keys); None when the statement is not cached. With ``database``, as read there:
        with the tables its views read.

        The ``FromCache`` option is added when missing: an option changes SQLAlchemy's
        cache key, and the entry is keyed as the statement is executed, with it.
        """
        statement = _with_option(statement)
        cache_key = compat.statement_cache_key(statement)
        if cache_key is None:
            return None
        queries = self._reads.queries
        plan = queries.plan(cache_key.key, statement)
        if plan is None or database is None or not database.views:
            return plan
        return queries.over_views(plan, database)

    def statement_key(
        self,
        statement: Any,
        params: dict[str, Any] | None = None,
        *,
        database: Database,
        translate: Any = None,
        spread: bool | None = None,
    ) -> str | None:
        """The entry key of ``statement`` run with ``params`` on ``database``; None when it
        is not cached, or a value cannot be encoded exactly.

        ``translate`` is the bind's ``schema_translate_map``; the statement's own wins.
        ``spread`` picks the key tagged by its digest (``FromCache(spread=True)``); None:
        as the statement's ``FromCache`` and its first table's model say.
        """
        statement = _with_option(statement)
        cache_key = compat.statement_cache_key(statement)
        plan = None if cache_key is None else self._reads.queries.plan(cache_key.key, statement)
        if cache_key is None or plan is None:
            return None
        own = statement.get_execution_options().get("schema_translate_map")
        if spread is None:
            option = _option_of(statement)
            spread = plan.spread if option.spread is None else option.spread
        return self._reads.queries.entry_key(
            plan, cache_key.bindparams, params, database, own or translate, spread
        )

    def translate_map_of(self, bind: Any) -> Any:
        """The ``schema_translate_map`` a bind applies (None: none)."""
        return translate_map_of(bind)

    # -- health --------------------------------------------------------------------------

    def breaker_state(self) -> str:
        """``"closed"`` (Redis used), ``"half-open"`` (one trial call is due, or under way)
        or ``"open"`` (Redis skipped until ``breaker_reset`` has passed)."""
        state = self._context.breaker.observed_state()
        return {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}[state]

    def breaker_openings(self) -> int:
        """How many times the circuit breaker opened since the cache was made."""
        return self._context.breaker.opened

    def undelivered_tables(self) -> frozenset[str]:
        """Tables whose invalidations wait for Redis (the cache is not used for them)."""
        return frozenset(self._context.undelivered)

    def restarts_seen(self) -> int:
        """How many restarts of the Redis server this process noticed (run id changes)."""
        return self._context.restarts_seen

    @property
    def local_tier(self) -> LocalTier | None:
        """The cache's local tier (``Cache(local=True)``), or None.

        Example::

            tier = cache.inspector.local_tier
            ready = tier is not None and tier.wait_ready(5.0)
        """
        return self._context.local

    def decoded(self) -> dict[str, int]:
        """How many query and entity entries this process keeps decoded for hits on the
        same bytes, and the memory they are estimated at (``DecodedEntries``; bounded at
        8 MiB).

        Example::

            cache.inspector.decoded()   # {"entries": 12, "bytes": 18000}
        """
        return self._reads.queries.decoded.gauges()

    def latency(self) -> dict[str, Any]:
        """The latency histograms, by group and scope then operation (``total`` first)."""
        histograms: dict[str, Any] = self._context.counters.histograms()
        return histograms


def _with_option(statement: Any) -> Any:
    if not any(isinstance(o, FromCache) for o in compat.statement_options(statement)):
        return statement.options(FromCache())
    return statement


def _option_of(statement: Any) -> FromCache:
    """The statement's ``FromCache`` (one is there: :func:`_with_option` added it)."""
    return next(o for o in compat.statement_options(statement) if isinstance(o, FromCache))
