"""Every private attribute or internal module of SQLAlchemy and redis-py the library uses.

The cache builds objects straight into instance state and the identity map (as
SQLAlchemy's own loader does), keys statements by SQLAlchemy's structural cache key, and
hooks redis-py's connect step to notice a restarted server. None of that has public API.
Each such use is one function here, and :data:`PROBES` names every internal symbol they
touch: ``tests/unit/test_compat.py`` checks each against the installed release and fails
naming the symbol and the version when a release moves it. Nothing outside this module
touches a private name of either library. CI runs the whole suite on SQLAlchemy 2.0 and
2.1.

Example::

    from sa_redis_cache import compat
    compat.statement_cache_key(select(Product))      # SQLAlchemy's CacheKey, or None
    [name for name, found in compat.probe() if not found]   # [] when everything is there
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

import hiredis
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.connection
import redis.crc
import redis.exceptions
import sqlalchemy
from sqlalchemy.engine import NestedTransaction
from sqlalchemy.engine import base as engine_base
from sqlalchemy.engine import cursor as engine_cursor
from sqlalchemy.engine import default as engine_default
from sqlalchemy.engine import result as engine_result
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import context as orm_context
from sqlalchemy.orm import interfaces as orm_interfaces
from sqlalchemy.orm import mapperlib
from sqlalchemy.orm import properties as orm_properties
from sqlalchemy.orm import session as orm_session
from sqlalchemy.orm import strategy_options as orm_strategy_options
from sqlalchemy.orm.base import PassiveFlag
from sqlalchemy.sql import selectable
from sqlalchemy.util import concurrency

try:  # SQLAlchemy 2.1
    from sqlalchemy.util import await_ as _await
except ImportError:  # pragma: no cover - SQLAlchemy 2.0
    from sqlalchemy.util import await_only as _await

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from sqlalchemy.engine import Connection, Engine, Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session
    from sqlalchemy.orm.identity import IdentityMap
    from sqlalchemy.orm.state import InstanceState

__all__ = [
    "PROBES",
    "autoflush_pending",
    "autoflush_requested",
    "await_",
    "begin_as_the_database_read_would",
    "bind_mapper",
    "canonical_statement",
    "commit_loaded",
    "commit_new",
    "dml_table",
    "get_clause_pk",
    "has_net_change",
    "identity_key",
    "identity_map_adder",
    "in_greenlet",
    "install_connect_hook",
    "is_locking",
    "is_refresh",
    "is_textual",
    "joined_a_begun_transaction",
    "make_result",
    "pool_option",
    "pool_options_without",
    "probe",
    "refreshed_whole",
    "registered_classes",
    "statement_cache_key",
    "statement_mapper",
    "statement_options",
    "type_variants",
]

in_greenlet: Callable[[], bool] = concurrency.in_greenlet
"""True inside a greenlet SQLAlchemy spawned (a session run by ``AsyncSession``)."""

await_: Callable[[Any], Any] = _await
"""SQLAlchemy's greenlet bridge: await a coroutine from code such a greenlet runs."""

log = logging.getLogger(__name__)

_NO_CHANGE = PassiveFlag.NO_CHANGE

_COMPILE_STATE: Any = getattr(orm_context, "_ORMCompileState", None) or getattr(
    orm_context, "ORMCompileState", None
)


# -- statements ----------------------------------------------------------------------------


def is_textual(statement: Any) -> bool:
    """Whether a compiled statement is SQL text, or SQL no construct explains: a
    ``text()``, a ``text().columns(...)`` (``TextualSelect``, typed rows of ``UPDATE ...
    RETURNING``), an ORM ``select(Model).from_statement(text(...))``, or an
    application's own ``@compiles`` construct. What it does is read from its SQL."""
    if isinstance(statement, orm_context.FromStatement):
        statement = statement.element
    if isinstance(statement, selectable.TextualSelect):
        statement = statement.element
    if isinstance(statement, sqlalchemy.TextClause):
        return True
    # a construct of the application's own, compiled by a @compiles function (a custom
    # UPSERT, MERGE or DELETE ... USING): its SQL is all there is to read. Not a select,
    # a DML construct, or DDL, which say what they do
    return not isinstance(
        statement,
        selectable.SelectBase
        | sqlalchemy.sql.dml.UpdateBase
        | orm_context.FromStatement
        | sqlalchemy.schema.ExecutableDDLElement,
    )


def dml_table(statement: Any) -> sqlalchemy.TableClause | None:
    """The table an ``insert()``/``update()``/``delete()`` writes: a ``Table``, or a
    lightweight ``table("products", column("price"))`` (Alembic's data migrations write
    through those), also when the statement names an alias of it
    (``update(table.alias("p"))``: ``UPDATE products AS p``); None for anything else."""
    target = getattr(statement, "table", None)
    if isinstance(target, sqlalchemy.Alias):
        target = target.original
    return target if isinstance(target, sqlalchemy.TableClause) else None


def statement_cache_key(statement: Any) -> Any:
    """SQLAlchemy's structural cache key of ``statement`` (``.key``, ``.bindparams``), or
    None when the statement cannot be cached by SQLAlchemy either."""
    return statement._generate_cache_key()


def canonical_statement(statement: Any) -> Any:
    """``statement`` with the compile options it had before its first execution.

    Compiling a select in a Session replaces its ``_compile_options`` in place with the
    ORM's defaults, so a statement derived from it afterwards has another structural key
    than the same statement derived before: the cache key must not depend on that.
    """
    options = getattr(statement, "_compile_options", None)
    defaults = _COMPILE_STATE.default_compile_options
    if isinstance(options, defaults) and not vars(options):
        statement = statement._clone()
        statement._compile_options = selectable.SelectState.default_select_compile_options
    return statement


def is_locking(statement: Any) -> bool:
    """True for ``SELECT ... FOR UPDATE`` (and its variants): a cached row takes no lock."""
    # a FromStatement (select().from_statement(...)) carries none
    return getattr(statement, "_for_update_arg", None) is not None


def statement_options(statement: Any) -> Sequence[Any]:
    """The loader and user-defined options of ``statement``, as given to ``.options()``."""
    options: Sequence[Any] = statement._with_options
    return options


def propagated_options(statement: Any) -> tuple[Any, ...]:
    """The options of ``statement`` that SQLAlchemy keeps on each object it loads
    (``state.load_options``) and replays in that object's lazy loads and refreshes:
    ``with_loader_criteria()``, loader options; those of the statement as executed, with
    their current values (``QueryContext.propagated_loader_options``)."""
    return tuple(opt for opt in statement._with_options if opt.propagate_to_loaders)


def loaded_path(statement: Any, entity: Any) -> Any:
    """The load path SQLAlchemy gives the objects of ``entity`` (a statement's inspected
    entity): below the statement's current path, which a lazy load's statement carries
    (its parent's path and relationship), as ``_instance_processor`` sets it."""
    path = entity._path_registry
    # a select no ORM option touched carries Core's compile options, with no such path
    current = getattr(statement._compile_options, "_current_path", None)
    return current + path if current is not None and current.path else path


def stamp_load(state: InstanceState[Any], options: tuple[Any, ...], path: Any) -> None:
    """Give a new object the options and load path SQLAlchemy's loading gives one it
    builds (``_instance`` in ``orm/loading.py``), so that its lazy loads apply them."""
    state.load_options = options
    state.load_path = path


def statement_mapper(statement: Any) -> Mapper[Any] | None:
    """The mapper an ORM statement selects from (``session.get``, lazy loads), or None."""
    mapper: Mapper[Any] | None = statement._propagate_attrs.get("plugin_subject")
    return mapper


def session_connection(session: Session, bind: Any) -> Connection | None:
    """The connection ``session``'s transaction already holds for ``bind``, if any (never
    a new one): made by ``session.connection(execution_options=...)`` or an earlier
    statement, it carries the execution options the session's statements run under."""
    if session._transaction is None:
        return None  # not begun: its next statement takes a connection of the bind's
    transaction = session.get_transaction()
    if transaction is None:
        return None
    found = transaction._connections.get(bind)
    return None if found is None else found[0]


def isolation_level_of(bind: Any) -> str | None:
    """The isolation level a transaction begun on ``bind`` (an engine or a connection)
    gets unless the session asks another: its ``isolation_level`` execution option, else
    ``create_engine(isolation_level=...)``, else the server's default (known once the
    engine has connected)."""
    level: str | None = bind.get_execution_options().get("isolation_level")
    if level:
        return level
    dialect = bind.dialect
    found: str | None = dialect._on_connect_isolation_level or dialect.default_isolation_level
    return found


def bind_mapper(execute_state: Any) -> Mapper[Any] | None:
    """``orm_context.bind_mapper`` as a ``Mapper``: the application may give
    ``bind_arguments={"mapper": Model}`` with the class, which SQLAlchemy's ``get_bind``
    accepts and passes on as given."""
    found = execute_state.bind_mapper
    if found is None or isinstance(found, mapperlib.Mapper):
        return found
    mapper = getattr(sqlalchemy.inspect(found, raiseerr=False), "mapper", None)
    return mapper if isinstance(mapper, mapperlib.Mapper) else None


def statement_subject_mapper(statement: Any) -> Mapper[Any] | None:
    """The mapper an ORM ``select()`` is about, which the session asks its binds for (as
    ``bind_arguments["mapper"]``); None for anything else (Core, DML, text, UNION)."""
    if not isinstance(statement, selectable.Select):
        return None  # a compound select (UNION) asks the session for no mapper's bind
    attrs = statement._propagate_attrs
    if attrs.get("compile_state_plugin") != "orm":
        return None
    subject = attrs.get("plugin_subject")
    return None if subject is None else subject.mapper  # a mapper, or an alias's


def get_clause_pk(statement: Any, mapper: Mapper[Any], params: Any) -> tuple[Any, ...] | None:
    """The primary key of a ``session.get``/many-to-one lazy load statement, else None.

    Recognised by the ORM's own primary-key criterion object, which both paths reuse.
    Only a ``Select`` is one: a ``select(Model).from_statement(...)`` or a ``UNION``
    names the model too, and has no WHERE criteria of its own.
    """
    if not isinstance(statement, selectable.Select):
        return None
    where = statement._where_criteria
    if len(where) != 1 or params is None:
        return None
    get_clause, get_params = mapper._get_clause
    clause = where[0]
    # SQLAlchemy 2.1 reuses the criterion; 2.0 uses an annotated copy of it
    if clause is not get_clause and getattr(clause, "_Annotated__element", None) is not get_clause:
        return None
    try:
        return tuple(params[get_params[col].key] for col in mapper.primary_key)
    except (KeyError, TypeError):
        return None


def autoflush_requested(orm_context: ORMExecuteState) -> bool:
    """Whether the statement being executed would autoflush the session first."""
    return bool(orm_context.load_options._autoflush)


def refreshed_whole(orm_context: ORMExecuteState) -> InstanceState[Any] | None:
    """The object ``session.refresh(obj)`` (no attribute names) is loading, else None.

    Such a refresh expires every attribute, relationships included, and loads the
    columns (and eager relationships) at once; a lazy relationship is loaded at its next
    access, by a lazy load of its own that carries nothing of the refresh.
    """
    options: Any = orm_context.load_options
    if not options._is_user_refresh or options._refresh_state is None:
        return None
    compile_options = getattr(orm_context.statement, "_compile_options", None)
    if getattr(compile_options, "_only_load_props", None):
        return None  # refresh(obj, [names]): a named relationship loads inside it
    state: InstanceState[Any] = options._refresh_state
    return state


def is_refresh(orm_context: ORMExecuteState) -> bool:
    """True when the statement refreshes the attributes of an object already loaded."""
    return orm_context.load_options._refresh_state is not None


def populates_existing(orm_context: ORMExecuteState) -> bool:
    """True when the statement must overwrite objects already in the identity map.

    ``Session.get(populate_existing=True)`` says so in the load options on SQLAlchemy 2.0
    and in the execution options on 2.1; ``Query.populate_existing()`` and the execution
    option, in the execution options on both.
    """
    return bool(
        orm_context.execution_options.get("populate_existing")
        or orm_context.load_options._populate_existing
    )


def loads_for_refresh(orm_context: ORMExecuteState) -> bool:
    """True when a relationship load runs inside ``session.refresh(obj, ["tags"])``: a
    refresh loads the collections it names at once, each by a lazy load whose top-level
    context (the ``sa_top_level_orm_context`` execution option) is the refresh's, which
    asks for the database's current rows."""
    top = orm_context.execution_options.get("sa_top_level_orm_context")
    return getattr(top, "refresh_state", None) is not None


def is_sharded(session: Session) -> bool:
    """Whether ``session`` is a horizontal-sharding session
    (``sqlalchemy.ext.horizontal_shard.ShardedSession``): its own ``do_orm_execute``
    listener, which runs after the cache's, picks the shard a read goes to, so the
    database the cache would key the read by (``get_bind``) may not be the one read."""
    return isinstance(session, horizontal_shard.ShardedSession)


def is_autocommit(connection: Connection) -> bool:
    """Whether each statement on ``connection`` commits by itself (AUTOCOMMIT isolation,
    set on the connection or the engine: :func:`isolation_level_of`)."""
    return isolation_level_of(connection) == "AUTOCOMMIT"


def root_engine(engine: Engine) -> Engine:
    """The engine that owns ``engine``'s pool and whose connection events its connections
    dispatch too: ``engine.execution_options(...)`` makes a copy that proxies it."""
    while (proxied := getattr(engine, "_proxied", None)) is not None:
        engine = proxied
    return engine


def commit_now(connection: Connection) -> None:
    """Commit ``connection``'s database transaction now, from SQLAlchemy's ``commit`` event
    (which runs before SQLAlchemy's own commit, then a no-op), failing as that commit
    fails: the driver's error wrapped, a lost connection invalidated."""
    try:
        connection.dialect.do_commit(connection.connection)
    except BaseException as exc:  # noqa: BLE001 - re-raised by SQLAlchemy, as its own commit does
        connection._handle_dbapi_exception(exc, None, None, None, None)


def enclosing_savepoints(connection: Connection) -> frozenset[str]:
    """The names of the savepoints open on ``connection`` now: rolling back any of them
    undoes what its transaction did since."""
    names = set()
    nested = connection._nested_transaction
    while nested is not None:
        names.add(nested._savepoint)
        nested = nested._previous_nested
    return frozenset(names)


def uncommitted_connections(session: Session) -> list[Connection]:
    """In ``after_commit`` of ``session``'s outermost transaction: its connections whose
    database transaction that commit did not commit. A session joined to a transaction
    the application began on the connection (``Session(bind=connection)``,
    ``join_transaction_mode``) releases a savepoint (``create_savepoint``, and
    ``conditional_savepoint`` inside a savepoint) or commits nothing (``rollback_only``,
    and ``conditional_savepoint`` otherwise): the database commits when the application
    commits the connection's transaction, if it does.
    """
    transaction = session._transaction
    if transaction is None:
        return []
    return [
        connection
        for connection, database_transaction, should_commit, _ in set(
            transaction._connections.values()
        )
        if not should_commit or isinstance(database_transaction, NestedTransaction)
    ]


def joined_a_begun_transaction(transaction: Any, connection: Connection) -> bool:
    """In ``after_begin`` of a session transaction on ``connection``: whether the session
    joined a transaction the application had begun on the connection
    (``Session(bind=connection)``) rather than beginning one: it made a savepoint in it
    (``create_savepoint``, ``conditional_savepoint`` inside a savepoint), may not commit
    it (``rollback_only``, ``conditional_savepoint`` otherwise), or may have joined it in
    ``control_fully`` mode, where SQLAlchemy records no difference. Such a transaction's
    statements may have run before the session's first."""
    found = transaction._connections.get(connection)
    if found is None:
        return False
    _, database_transaction, should_commit, autoclose = found
    if autoclose:
        return False  # the session took the connection from an engine: it began it
    return (
        not should_commit
        or isinstance(database_transaction, NestedTransaction)
        or transaction.session.join_transaction_mode == "control_fully"
    )


def connections_left_open(transaction: Any) -> list[Connection]:
    """In ``after_transaction_end`` of a session's outermost transaction that did not
    commit: its connections whose database transaction, or savepoint, the session's end
    left open, with what the session flushed in it. A session joined to the application's
    transaction in ``rollback_only`` mode (``conditional_savepoint`` outside a savepoint,
    the default) closed without a rollback rolls nothing back: its flushed rows are the
    application's, committed if it commits (SQLAlchemy's ``SessionTransaction.close``
    closes only the transactions the session may commit; its rollback rolls them all back).
    Not a connection ``session.invalidate()`` dropped: its transaction is gone with it (and
    the connection refuses even a look at its ``info`` until rolled back).
    """
    return [
        connection
        for connection, database_transaction, should_commit, _ in set(
            transaction._connections.values()
        )
        if not should_commit and database_transaction.is_active and not connection.invalidated
    ]


class _RowContext:
    """What a lazy loader's ``create_row_processor`` reads of a query's context when no
    refresh is under way: with it, the loader builds the per-object loader it would give
    an object of that query."""

    __slots__ = ()
    load_options = orm_context.QueryContext.default_load_options
    populate_existing = False


def loader_compile_state(statement: Any) -> Any:
    """The ORM compile state of a select, on which its loader options are looked up per
    load path (:func:`loader_at`)."""
    return statement.compile().compile_state


def entity_load_path(entity: Any) -> Any:
    """The load path of an entity of a statement (a mapper or an alias of one)."""
    return entity._path_registry


def relationship_load_path(path: Any, relationship: Any) -> Any:
    """The load path of ``relationship``'s objects below ``path``."""
    return path[relationship][relationship.mapper]


def is_query_expression(prop: Any) -> bool:
    """Whether a column property is a ``query_expression()``: SQLAlchemy's loader leaves
    it alone when a row does not hold it (it reads as its default, with no SQL), never
    expired (``_ExpressionColumnLoader.create_row_processor``)."""
    return ("query_expression", True) in prop.strategy_key


def loader_at(prop: Any, compile_state: Any, path: Any) -> tuple[Any, Any]:
    """The loader strategy a statement uses for ``prop`` (a column or relationship
    property) at load path ``path``, and the option that chose it (None: the property's
    own): SQLAlchemy's own lookup (``StrategizedProperty.create_row_processor``)."""
    option = prop._get_context_loader(compile_state, path)
    if option is not None and option.strategy:
        return prop._get_strategy(option.strategy), option
    return prop.strategy, option


def loader_settings(strategy: Any) -> dict[str, Any]:
    """What a loader strategy was chosen by: ``{"deferred": True, "raiseload": True}``,
    ``{"lazy": "selectin"}``..."""
    return dict(strategy.strategy_key)


def is_class_level(strategy: Any) -> bool:
    """True when the strategy's attribute loads through its class's loader, which every
    object has (a class-level deferred column, the mapping's own lazy relationship)."""
    return bool(strategy.is_class_level)


def per_object_column_loader(prop: Any, *, raiseload: bool) -> Any:
    """SQLAlchemy's setter ``(state, dict_, row)`` of a per-object loader for a column a
    query option deferred: one that loads it on access, or raises (``raiseload=True``)."""
    return prop._raise_column_loader if raiseload else prop._deferred_column_loader


def option_has_criteria(option: Any) -> bool:
    """True for a loader option with criteria (``A.bs.and_(...)``): they hold the values
    of one statement."""
    return bool(option._extra_criteria)


def per_object_lazy_loaders(
    strategy: Any, path: Any, option: Any, mapper: Any, compile_state: Any = None
) -> list[Any]:
    """The setters ``(key, (state, dict_, row))`` of the per-object lazy loader a
    relationship's ``strategy`` gives an object the statement loads at ``path`` (one
    that raises for ``raiseload``). With ``compile_state`` (:func:`loader_compile_state`
    of the statement being executed), an option with criteria (``A.bs.and_(...)``) gives
    a loader holding that statement's values of them."""
    populators: collections.defaultdict[str, list[Any]] = collections.defaultdict(list)
    context: Any = _RowContext if compile_state is None else _CriteriaContext(compile_state)
    strategy.create_row_processor(context, None, path, option, mapper, None, None, populators)
    return populators["new"]


class _CriteriaContext(_RowContext):
    """:class:`_RowContext` with the statement whose option criteria a loader takes
    (``_generate_extra_criteria`` reads ``compile_state`` and ``query``)."""

    __slots__ = ("compile_state", "query")

    def __init__(self, compile_state: Any) -> None:
        self.compile_state = compile_state
        self.query = compile_state.select_statement


def lazy_select_strategy(relationship: Any) -> Any:
    """The plain lazy loader of ``relationship`` (``lazy="select"``), whichever strategy
    its mapping or an option chose: given a loader option with criteria, its
    ``create_row_processor`` gives an object the per-object loader holding them."""
    return relationship._get_strategy((("lazy", "select"),))


def is_flushing(session: Session) -> bool:
    """True while ``session`` runs a flush, or a bulk operation that runs the unit of
    work's statements without flush events (``bulk_save_objects``, bulk mappings)."""
    return bool(session._flushing)


def expunge_alone(session: Session, obj: object) -> None:
    """``session.expunge(obj)`` without its cascade: the objects its relationships'
    ``expunge`` cascade reaches (``cascade="all"``) stay in the session as they are (new,
    changed or deleted), as SQLAlchemy's rollback expunges its new objects one by one."""
    state = sqlalchemy.inspect(obj)
    if state.session_id is not session.hash_key:
        raise sqlalchemy.exc.InvalidRequestError(f"{obj!r} is not present in this Session")
    session._expunge_states([state])


def add_alone(session: Session, obj: object) -> None:
    """``session.add(obj)`` without its ``save-update`` cascade: an object related to
    ``obj`` that is not in the session (the application expunged it) stays out, as the
    flush that :func:`expunge_alone` took ``obj`` out of would have left it."""
    state = sqlalchemy.inspect(obj)
    state._orphaned_outside_of_session = False
    session._save_or_update_impl(state)


def is_clean(session: Session) -> bool:
    """True when ``session`` has nothing new, changed or deleted to flush."""
    return bool(session._is_clean())


def refuses_autobegin(session: Session) -> bool:
    """True when ``session`` has no transaction and may not begin one by itself
    (``Session(autobegin=False)`` before ``session.begin()``, or after its end): any read
    SQLAlchemy sends to the database then raises ``InvalidRequestError`` ("Autobegin is
    disabled"), and a read the cache answers must raise it too, not answer."""
    return session._transaction is None and not session.autobegin


def begin_as_the_database_read_would(session: Session) -> None:
    """Autobegin ``session``'s transaction (no connection is taken) when it has none, as
    the read the cache answers would have on its way to the database. Its end then
    expires what the read loaded, as SQLAlchemy's does: ``rollback()`` with no
    transaction does nothing, so an object a hit built would otherwise outlive it
    unexpired, and the session's next read of it (a ``get``, a query without
    ``populate_existing``) would keep the values from before any commit since."""
    if session._transaction is None and session.autobegin:
        session._autobegin_t()


def has_net_change(state: InstanceState[Any]) -> bool:
    """``Session.is_modified(obj)`` for the object of ``state``, without visiting every
    attribute: only an attribute whose previous value the state recorded
    (``committed_state``: every change event records it) can have added or deleted
    history under ``NO_CHANGE``; the others report none, a collection's pending
    mutations included (``NO_CHANGE`` leaves them out). ``is_modified`` asks each
    attribute of the class, through its loader for an unloaded relationship.
    """
    if not state.modified:
        return False
    committed = state.committed_state
    if not committed:
        return False
    manager = state.manager
    attributes = state.dict
    for key in list(committed):
        attribute = manager.get(key)
        if attribute is None:
            continue  # not an attribute is_modified would look at
        added, _, deleted = attribute.impl.get_history(state, attributes, passive=_NO_CHANGE)
        if added or deleted:
            return True
    return False


def autoflush_pending(session: Session) -> None:
    """Flush pending changes the way the ORM would before the statement runs."""
    if session.autoflush and not session._is_clean():
        session._autoflush()


def type_variants(sqltype: Any) -> dict[str, Any]:
    """The ``with_variant()`` types of a column type, by dialect name (empty: none)."""
    variants: dict[str, Any] = getattr(sqltype, "_variant_mapping", None) or {}
    return variants


# -- building objects as the ORM's loader does ---------------------------------------------


def identity_key(mapper: Mapper[Any], pk: tuple[Any, ...]) -> Any:
    """The identity-map key of the object of ``mapper`` with primary key ``pk``."""
    return (mapper._identity_class, pk, None)


def identity_map_adder(identity_map: IdentityMap) -> Callable[[InstanceState[Any], Any], None]:
    """What puts a new object's state into ``identity_map`` under a key it is not under yet:
    ``adder(state, key)``."""
    adder: Callable[[InstanceState[Any], Any], None] = identity_map._add_unpresent
    return adder


def identity_map_states(identity_map: IdentityMap) -> Mapping[Any, InstanceState[Any]]:
    """The states ``identity_map`` holds, by identity key: a key absent from it is absent
    from the map, told without a call of the map's Python ``get()``."""
    states: Mapping[Any, InstanceState[Any]] = identity_map._dict
    return states


def commit_new(state: InstanceState[Any], identity_map: IdentityMap) -> None:
    """Mark every attribute of a freshly built state as loaded from the database."""
    state._commit_all(state.dict, identity_map)


def commit_loaded(state: InstanceState[Any], keys: Iterable[str]) -> None:
    """Mark ``keys`` of a state as loaded (the others keep their state)."""
    state._commit(state.dict, list(keys))


_CREATES_UNIQUE_FILTERS = (
    "_create_unique_filters"
    in inspect.signature(engine_result.SimpleResultMetaData.__init__).parameters
)


@functools.lru_cache(maxsize=1024)
def _result_metadata(keys: tuple[str, ...], positions: frozenset[int]) -> Any:
    """The metadata of a built result, made once per shape: results only read it (the
    ORM shares its own results' metadata through its compiled cache too)."""
    filters = [id if i in positions else None for i in range(len(keys))]
    return _metadata(keys, None, filters if positions else None)


def _metadata(
    keys: Sequence[str],
    extra: Sequence[Any] | None,
    filters: Sequence[Callable[[Any], Any] | None] | None,
) -> Any:
    if filters is None:
        return engine_result.SimpleResultMetaData(list(keys), extra)
    if _CREATES_UNIQUE_FILTERS:  # SQLAlchemy 2.1: made when unique() is asked for
        return engine_result.SimpleResultMetaData(
            list(keys), extra, _create_unique_filters=lambda _result: filters
        )
    return engine_result.SimpleResultMetaData(  # SQLAlchemy 2.0
        list(keys),
        extra,
        _unique_filters=filters,  # type: ignore[call-arg]  # its name in SQLAlchemy 2.0
    )


def statement_result_metadata(statement: Any, keys: Sequence[str]) -> Any:
    """The metadata of the results a hit of ``statement`` (an ORM select) builds, as the
    ORM makes its own (``loading.instances``): each column is also found by the objects
    that name it (``row._mapping[Product]``, ``row._mapping[Product.name]``, an
    ``aliased()`` entity), and ``unique()`` refuses a column whose type gives
    unhashable values (JSONB) with the ORM's error. None when the statement's compile
    state does not say (the caller falls back to names alone)."""
    try:
        # compiled without a dialect, once per statement shape, as loading_of compiles
        entities = getattr(loader_compile_state(statement), "_entities", None)
        if entities is None or len(entities) != len(keys):
            return None
        extra = [entity._extra_entities for entity in entities]
        filters = [_unique_filter(entity) for entity in entities]
    except (AttributeError, sqlalchemy.exc.SQLAlchemyError):
        return None
    return _metadata(keys, extra, filters)


def entity_result_metadata(cls: type) -> Any:
    """The metadata of a primary-key load's result of ``cls`` (``select(cls)``): its one
    column found by the class too (``row._mapping[cls]``), its objects told apart by
    identity in ``unique()``."""
    return _metadata([cls.__name__], [(cls,)], [id])


def _unique_filter(entity: Any) -> Callable[[Any], Any] | None:
    """What ``unique()`` tells a column's values apart by, as the ORM's 2.0-style results
    do: objects by identity, hashable values by value, and a type whose values may not
    be hashable refused with the ORM's error."""
    if entity.use_id_for_hash:
        return id
    uncertain = entity._null_column_type
    if not (entity._non_hashable_value or uncertain):
        return None
    datatype = entity.column.type
    said = "the values returned appear to be" if uncertain else "this datatype produces"

    def refuse(value: Any) -> Any:
        if uncertain:
            try:
                return hash(value)
            except TypeError:
                pass
        raise sqlalchemy.exc.InvalidRequestError(
            "Can't apply uniqueness to row tuple containing value of "
            f"type {datatype!r}; {said} non-hashable values"
        )

    return refuse


def make_result(
    keys: Sequence[str],
    data: list[Any],
    *,
    single: bool,
    entity_positions: Sequence[int] | None = None,
    metadata: Any = None,
) -> Result[Any]:
    """A result that behaves like the ORM's own for ``scalars()``, ``all()``, ``unique()``.

    Objects are told apart by identity in ``unique()``, as the ORM does: a mapped class
    may be unhashable (SQLModel's, pydantic models). ``entity_positions`` are the columns
    holding objects (all of them, for a ``single`` result, by default). ``metadata``: the
    statement's own (:func:`statement_result_metadata`), which replaces both.
    """
    if metadata is None:
        if entity_positions is None:
            entity_positions = range(len(keys)) if single else ()
        metadata = _result_metadata(tuple(keys), frozenset(entity_positions))
    made: Any = engine_result.IteratorResult(
        metadata,
        iter(data),
    )
    made._source_supports_scalars = single
    # what loading.instances tells the legacy Query, which reads it to return objects
    # rather than rows (is_single_entity) and to de-duplicate them (filtered)
    made._attributes = made._attributes.union(
        {"filtered": single or bool(entity_positions), "is_single_entity": single}
    )
    result: Result[Any] = made
    return result


def returns_tuples(orm_context: ORMExecuteState) -> bool:
    """Whether a legacy ``Query`` asked for rows even of a single entity
    (``Query.only_return_tuples(True)``, ``Query.tuples()``): the ORM's result then holds
    one-object rows, not objects."""
    return bool(orm_context.load_options._only_return_tuples)


def honour_tuples(result: Result[Any], orm_context: ORMExecuteState) -> Result[Any]:
    """``result`` as the ORM gives it to a query that :func:`returns_tuples`: rows."""
    if returns_tuples(orm_context):
        result._attributes = result._attributes.union({"is_single_entity": False})
    return result


def registered_classes() -> tuple[list[Mapper[Any]], list[type]]:
    """Every mapper of every declarative registry, and the registered classes with none.

    A registry holds a class without a mapper in ordinary programs (a DeferredReflection
    class before ``prepare()``, the remains of a class whose mapping raised), where
    ``registry.mappers`` raises: the managers are walked instead.
    """
    mappers: list[Mapper[Any]] = []
    unmapped: list[type] = []
    for registry in list(mapperlib._mapper_registries):  # no public list of registries
        for manager in list(registry._managers):
            if manager.is_mapped:
                mappers.append(manager.mapper)
            else:
                unmapped.append(manager.class_)
    return mappers, unmapped


# -- redis-py ------------------------------------------------------------------------------


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (its hash tag's, when it has one).

    Example::

        >>> key_slot("sarc:shop:{shop:products}:v") == key_slot("{shop:products}")
        True
    """
    return int(redis.crc.key_slot(key.encode()))


_CONNECT_HOOK = "redis_connect_func"
_CLUSTER_CONNECT_HOOK = "user_on_connect_func"


def pool_option(client: Any, name: str) -> Any:
    """An option the client makes its connections with (None: not set).

    A Redis Cluster client has one pool per node, all made from the same options, which
    ``get_connection_kwargs()`` returns.
    """
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        return client.get_connection_kwargs().get(name)
    return client.connection_pool.connection_kwargs.get(name)


def pool_options_without(pool: Any, *names: str) -> dict[str, Any]:
    """The options ``pool`` makes connections with, less ``names`` and the connect hook."""
    dropped = {*names, _CONNECT_HOOK}
    return {k: v for k, v in pool.connection_kwargs.items() if k not in dropped}


class _Callbacks:
    """The callbacks that caches registered on one client, held weakly where they are
    bound methods: a cache that is gone (detached, then dropped) leaves no check on every
    new connection, and no watcher of every slot map change, of a client that outlives it.

    Each entry is a tuple of callbacks, registered and dropped together.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[Callable[[], Any], ...]] = []
        self._lock = threading.Lock()

    def add(self, *callbacks: Callable[..., Any]) -> None:
        refs = tuple(_weakly(callback) for callback in callbacks)
        with self._lock:
            self._entries.append(refs)

    def live(self) -> list[tuple[Any, ...]]:
        """The entries whose callbacks are all alive, in the order they were added."""
        with self._lock:
            found: list[tuple[Any, ...]] = []
            kept: list[tuple[Callable[[], Any], ...]] = []
            for refs in self._entries:
                callbacks = tuple(ref() for ref in refs)
                if all(callback is not None for callback in callbacks):
                    found.append(callbacks)
                    kept.append(refs)
            self._entries = kept
        return found


def _weakly(callback: Callable[..., Any]) -> Callable[[], Any]:
    """A reference to ``callback``: weak for a bound method of a Python object, whose
    object the caller keeps alive; strong for anything else (a function, a builtin's
    method), which nothing else might hold."""
    if inspect.ismethod(callback):
        return weakref.WeakMethod(callback)
    return lambda: callback


# per client: the checks install_connect_hook runs, the watchers of watch_slot_map
_CONNECT_CHECKS: weakref.WeakKeyDictionary[Any, _Callbacks] = weakref.WeakKeyDictionary()
_SLOT_WATCHERS: weakref.WeakKeyDictionary[Any, _Callbacks] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _registered(
    registry: weakref.WeakKeyDictionary[Any, _Callbacks], client: Any, *callbacks: Any
) -> _Callbacks | None:
    """Add ``callbacks`` to ``client``'s entry of ``registry``: the new entry when the
    client had none (the caller installs what calls it), else None."""
    with _REGISTRY_LOCK:
        known = registry.get(client)
        made = known is None
        if known is None:
            known = registry[client] = _Callbacks()
    known.add(*callbacks)
    return known if made else None


def install_connect_hook(client: Any, check: Callable[[Any], Any]) -> None:
    """Run ``check(connection)`` on each new connection of ``client``, once it is ready.

    "Ready" is after the connection's own handshake (``AUTH``, ``SELECT``, ``HELLO``) and
    after any hook installed before (a cluster client's ``READONLY``, the application's
    own ``redis_connect_func``). For an asyncio client ``check`` is a coroutine function.
    Every connection the client makes from now on runs it: for a Redis Cluster client,
    those to every node, including nodes it discovers later (a promoted replica, a node
    added by resharding); connections made already run it when they reconnect.

    One hook is installed per client; the checks of every cache made on it run in the
    order they were installed. A check that is a bound method is held weakly: it stops
    running once its object is gone.

    Where redis-py keeps the hook:

    * ``redis.Redis`` and ``redis.asyncio.Redis``: the pool's ``redis_connect_func``
      connection option, called *instead of* ``on_connect``;
    * ``redis.cluster.RedisCluster``: every node's connections call the cluster's own
      ``on_connect``, which calls ``user_on_connect_func`` last;
    * ``redis.asyncio.cluster.RedisCluster``: ``redis_connect_func`` in the nodes
      manager's connection options, which each node copies when it is made (so every
      node made already, and its connections, get it too).
    """
    checks = _registered(_CONNECT_CHECKS, client, check)
    if checks is None:
        return  # the client's hook runs it
    if isinstance(client, redis.cluster.RedisCluster):
        previous = getattr(client, _CLUSTER_CONNECT_HOOK, None)

        def after_cluster(connection: Any) -> None:
            if previous is not None:
                previous(connection)
            for (each,) in checks.live():
                each(connection)

        setattr(client, _CLUSTER_CONNECT_HOOK, after_cluster)
        return
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        options = client.nodes_manager.connection_kwargs
        hook = _async_hook(options.get(_CONNECT_HOOK), checks)
        options[_CONNECT_HOOK] = hook
        for node in client.nodes_manager.nodes_cache.values():
            node.connection_kwargs[_CONNECT_HOOK] = hook
            for connection in list(node._connections):
                setattr(connection, _CONNECT_HOOK, hook)
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_kwargs[_CONNECT_HOOK] = hook
        return
    pool = client.connection_pool
    previous = pool.connection_kwargs.get(_CONNECT_HOOK)
    made: Any
    if isinstance(client, redis.asyncio.Redis):
        made = _async_hook(previous, checks)
    else:

        def made(connection: Any) -> None:
            if previous is not None:
                previous(connection)
            else:
                connection.on_connect()
            for (each,) in checks.live():
                each(connection)

    pool.connection_kwargs[_CONNECT_HOOK] = made
    for name in ("_available_connections", "_in_use_connections"):
        for connection in list(getattr(pool, name, ())):
            setattr(connection, _CONNECT_HOOK, made)


def drop_idle_connections(client: Any) -> None:
    """Close the idle connections a synchronous ``client`` opened before a connect hook
    was installed (:func:`install_connect_hook`), so that each runs the hook as it
    reconnects, on its next use. A cluster client connects to its seed node as it is
    made; an application may have used its client before handing it to the cache. A
    connection in use by another thread meanwhile is left open, unchecked until it
    reconnects.

    An asyncio client's connections are closed by awaiting: they are left, and checked
    when they reconnect.
    """
    if isinstance(client, redis.cluster.RedisCluster):
        servers = [node.redis_connection for node in client.nodes_manager.nodes_cache.values()]
    elif isinstance(client, redis.Redis):
        servers = [client]
    else:
        return
    for server in servers:
        if server is not None:
            server.connection_pool.disconnect(inuse_connections=False)


def watch_slot_map(
    client: Any,
    seen: Callable[[dict[int, str]], None],
    refreshing: Callable[[int], None] = lambda step: None,
) -> bool:
    """Call ``seen(slot -> primary address)`` with a cluster client's slot map now and
    after every change redis-py makes to it: a refresh (on a node that failed, every few
    ``MOVED``) and the one slot a ``MOVED`` moves, both inside the command that met
    them, which redis-py then sends again by the new map. ``refreshing(1)`` is called as
    a change starts and ``refreshing(-1)`` once ``seen`` has had it: another thread or
    task may send a command by the new map before ``seen`` runs. False for a client that
    is not a cluster client. An exception ``seen`` raises is logged, not raised into
    redis-py's refresh.

    The client's map is watched once, for every cache made on it; ``seen`` and
    ``refreshing``, where they are bound methods, are held weakly (as the checks of
    :func:`install_connect_hook`).

    redis-py keeps the map in ``nodes_manager.slots_cache`` (slot -> nodes, the primary
    first), refreshes it in ``nodes_manager.initialize()`` and moves one slot in
    ``nodes_manager.move_slot(error)`` (``_update_moved_slots()`` in older releases;
    coroutines on the asyncio client, where redis-py made them so). The asyncio
    nodes manager has ``__slots__``, so its methods cannot be replaced on the instance:
    the instance is given a subclass of its own class (no new slots, the same layout)
    whose methods report.
    """
    if not isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        return False
    manager: Any = client.nodes_manager
    watchers = _registered(_SLOT_WATCHERS, client, seen, refreshing)
    if watchers is not None:
        _report_slot_map_changes(client, manager, watchers)
    if manager.slots_cache:
        _report_slot_map(manager, [(seen, refreshing)])
    return True


def _report_slot_map(
    manager: Any, watchers: Sequence[tuple[Any, ...]], slot: int | None = None
) -> None:
    """Tell each of ``watchers`` (``(seen, refreshing)``) the whole map, or ``slot``'s
    primary."""
    cache = manager.slots_cache
    if slot is None:
        part = {number: nodes[0].name for number, nodes in cache.items() if nodes}
    elif cache.get(slot):
        part = {slot: cache[slot][0].name}
    else:
        return
    for seen, _ in watchers:
        _tell(seen, part)


def _tell(seen: Callable[[dict[int, str]], None], part: dict[int, str]) -> None:
    try:
        seen(part)
    except Exception:  # a bug of ours must not fail the application's command
        log.exception("the slot map watch failed")


def _report_slot_map_changes(client: Any, manager: Any, watchers: _Callbacks) -> None:
    """Make ``manager``'s changes of the map report to ``watchers`` (see watch_slot_map)."""

    def moved_slot(args: tuple[Any, ...]) -> int | None:
        # move_slot(error) (redis-py 8) or _update_moved_slots() with the error kept
        error = args[0] if args else getattr(manager, "_moved_exception", None)
        return getattr(error, "slot_id", None)

    @contextlib.contextmanager
    def changing(slot: int | None) -> Iterator[None]:
        """Around one change of the map: counted as under way, then reported."""
        current = watchers.live()
        # the first map (an asyncio client maps on its first command) moves nothing: no
        # command was sent by an older one
        counted = bool(manager.slots_cache)
        if counted:
            for _, refreshing in current:
                refreshing(1)
        try:
            yield
            _report_slot_map(manager, current, slot)
        finally:
            if counted:
                for _, refreshing in current:
                    refreshing(-1)

    def reporting(method: Callable[..., Any], whole_map: bool, unbound: bool) -> Any:
        """``method`` (``unbound``: a function of the asyncio manager's subclass, called
        with the manager first), then a report."""

        def slot_of(args: tuple[Any, ...]) -> int | None:
            return None if whole_map else moved_slot(args[1:] if unbound else args)

        if inspect.iscoroutinefunction(method):

            async def async_reporting(*args: Any, **kwargs: Any) -> Any:
                with changing(slot_of(args)):
                    return await method(*args, **kwargs)

            return async_reporting

        def sync_reporting(*args: Any, **kwargs: Any) -> Any:
            with changing(slot_of(args)):
                return method(*args, **kwargs)

        return sync_reporting

    # a refresh reports the whole map; a MOVED, its one slot
    changes = {"initialize": True, "move_slot": False, "_update_moved_slots": False}
    if isinstance(client, redis.cluster.RedisCluster):
        for name, whole_map in changes.items():
            method = getattr(manager, name, None)
            if method is not None:
                setattr(manager, name, reporting(method, whole_map, unbound=False))
        return
    base = type(manager)
    methods: dict[str, Any] = {"__slots__": ()}
    for name, whole_map in changes.items():
        method = getattr(base, name, None)
        if method is not None:
            methods[name] = reporting(method, whole_map, unbound=True)
    manager.__class__ = type(f"Watched{base.__name__}", (base,), methods)


def _async_hook(previous: Any, checks: _Callbacks) -> Callable[[Any], Any]:
    """An asyncio ``redis_connect_func``: the previous one (or ``on_connect``), then each
    of ``checks``."""

    async def on_connect(connection: Any) -> None:
        if previous is not None:
            done = previous(connection)
            if inspect.isawaitable(done):
                await done
        else:
            await connection.on_connect()
        for (each,) in checks.live():
            await each(connection)

    return on_connect


def dedicated_connection(client: Any, **overrides: Any) -> Any:
    """A connection of its own to ``client``'s server, outside its pool, not yet connected.

    Made with the pool's options (address, TLS, credentials, timeouts) and ``overrides``;
    without the connect hook, so that no restart bump runs on it. The local tier's
    invalidation and control connections are made this way: tracking belongs to one
    connection, which must never be handed to anyone else.

    ``client`` is one server's client; on a Redis Cluster, one of :func:`primary_clients`.
    """
    pool = client.connection_pool
    options = pool_options_without(pool)
    options.update(overrides)
    return pool.connection_class(**options)


def primary_clients(client: Any) -> list[tuple[str, Any]]:
    """``(name, redis.Redis)`` of every primary ``client`` talks to: itself for one server.

    For a Redis Cluster the client first asks the cluster for its slots again: the local
    tier connects to each primary after a failover or a resharding, and redis-py otherwise
    learns of them only when a command of the application's is redirected. The pools of
    the seed nodes are kept (other threads may be using them).

    Example::

        for name, node in primary_clients(client):
            connection = dedicated_connection(node, protocol=2)
    """
    if not isinstance(client, redis.cluster.RedisCluster):
        kwargs = client.connection_pool.connection_kwargs
        return [(f"{kwargs.get('host', kwargs.get('path', ''))}:{kwargs.get('port', '')}", client)]
    client.nodes_manager.initialize(disconnect_startup_nodes_pools=False)
    primaries = client.get_primaries()  # type: ignore[no-untyped-call]  # untyped in redis-py
    return [(node.name, client.get_redis_connection(node)) for node in primaries]


def node_name_of(client: Any, key: str) -> str:
    """The name (``host:port``) of the primary ``client`` sends ``key``'s commands to.

    Example::

        node_name_of(cluster_client, "sarc:shop:lh:{shop:products}")   # '10.0.0.2:7001'
    """
    return str(client.get_node_from_key(key).name)


def rows_already_read(context: Any) -> None:
    """Tell SQLAlchemy that the statement of ``context`` (an ``ExecutionContext``) returns
    no rows: a listener appended a RETURNING clause SQLAlchemy did not ask for and read
    the rows itself (:mod:`sa_redis_cache.strategies.write_through`). The result is then
    the plain DML result SQLAlchemy expected (its rowcount, the cursor released).
    """
    context.cursor_fetch_strategy = engine_cursor._NO_CURSOR_DML


# redis-py's own packers: both frame each command as hiredis.pack_command does, after the
# connection's encoder turned every argument into bytes
_STANDARD_PACKERS = tuple(
    packer
    for name in ("HiredisRespSerializer", "PythonRespSerializer")
    if (packer := getattr(redis.connection, name, None)) is not None
)
_PACK_COMMANDS = getattr(
    getattr(redis.connection, "AbstractConnection", None), "pack_commands", None
)
_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})
# per connection class: whether it packs with redis-py's own pack_commands (a subclass that
# overrides it, an application's instrumentation, must see what is sent)
_OWN_PACKING: dict[type, bool] = {}


def _packed(connection: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """``commands`` as the bytes ``connection.pack_commands`` would send.

    Every argument the cache sends is a ``str``, ``bytes`` or ``int``: with redis-py's own
    ``pack_commands`` and packer and a UTF-8 encoder (the defaults), hiredis frames them
    in C, into the bytes redis-py's encoder would have produced (a ``str`` as UTF-8, an
    ``int`` in decimal); redis-py encodes each argument in Python first, several
    microseconds a command. Any other connection (a packer, an encoding or a
    ``pack_commands`` of the application's, client-side caching's proxy) packs its way.
    """
    kind = type(connection)
    own = _OWN_PACKING.get(kind)
    if own is None:
        own = _OWN_PACKING[kind] = _PACK_COMMANDS is not None and (
            getattr(kind, "pack_commands", None) is _PACK_COMMANDS
        )
    encoder = connection.encoder if own else None
    if (
        encoder is not None
        and type(connection._command_packer) in _STANDARD_PACKERS
        and encoder.encoding in _UTF8
        and encoder.encoding_errors == "strict"
    ):
        pack = hiredis.pack_command
        try:
            return [b"".join([pack(tuple(command)) for command in commands])]
        except TypeError:
            pass  # an argument of another type: redis-py says what is wrong with it
    return connection.pack_commands(commands)


def send_now(client: Any, commands: Sequence[Sequence[Any]]) -> Any:
    """Send ``commands`` on a connection taken from ``client``'s pool (a ``redis.Redis``)
    and return it without reading the replies: the caller does other work meanwhile,
    then reads them with :func:`read_replies`, which gives the connection back.

    redis-py's client reads each reply before it returns; its pipelines too. A lost
    connection raises ``ConnectionError`` (the connection is dropped and given back).
    The arguments are ``str``, ``bytes`` or ``int`` (:func:`_packed`).
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        send_on(connection, commands)
    except BaseException:
        pool.release(connection)
        raise
    return connection


def send_on(connection: Any, commands: Sequence[Sequence[Any]]) -> None:
    """Send ``commands`` on ``connection`` without reading the replies (:func:`read_on`
    reads them). A connection that fails while sending is dropped (``ConnectionError``)."""
    try:
        connection.send_packed_command(_packed(connection, commands))
    except BaseException:
        connection.disconnect()
        raise


def read_replies(client: Any, connection: Any, count: int) -> list[Any]:
    """The ``count`` replies to what :func:`send_now` sent on ``connection``, in order; an
    error reply is returned as its exception. The connection goes back to the pool, or is
    dropped first when reading failed (``ConnectionError``, ``TimeoutError``: raised)."""
    try:
        return read_on(connection, count)
    finally:
        client.connection_pool.release(connection)


def read_on(connection: Any, count: int) -> list[Any]:
    """The ``count`` replies to what was sent on ``connection``, in order; an error reply
    is returned as its exception. A connection that fails while reading is dropped
    (``ConnectionError``, ``TimeoutError``: raised): what it still owed is lost with it."""
    try:
        return [_reply(connection) for _ in range(count)]
    except BaseException:
        connection.disconnect()
        raise


def sends_directly(client: Any) -> bool:
    """Whether the cache may send ``client``'s commands past ``execute_command``
    (:func:`call_now`, :func:`send_now`): a plain ``redis.Redis`` with a pool, whose
    ``execute_command`` is redis-py's own.

    Anything that sees commands through ``execute_command`` keeps seeing the cache's: a
    subclass of the application's, a single-connection client, and an instrumentation
    that patches ``redis.Redis.execute_command`` (OpenTelemetry's, Sentry's, ddtrace's),
    checked on every call, since it may be installed after the cache is made.

    Example::

        sends_directly(redis.Redis())   # True, until something patches execute_command
    """
    return (
        type(client) is redis.Redis
        and client.connection is None
        and _is_redis_pys(redis.Redis.execute_command)
    )


@functools.lru_cache(maxsize=8)
def _is_redis_pys(execute_command: Any) -> bool:
    # a wrapper keeps __wrapped__ (functools.wraps, wrapt) or has a name of its own
    return (
        getattr(execute_command, "__wrapped__", None) is None
        and getattr(execute_command, "__module__", None) == "redis.client"
        and getattr(execute_command, "__qualname__", None) == "Redis.execute_command"
    )


def connection_outside_pool(pool: Any) -> Any | None:
    """A new, unconnected connection to ``pool``'s server (a client's
    ``connection_pool``), made as the pool makes them but counted by none: for a thread to
    hold across its calls (:class:`~sa_redis_cache.redis_io.ThreadConnections`). None
    where a pool's own connections are more than that: a pool of another class
    (``BlockingConnectionPool``, one of the application's), client-side caching, RESP3
    (its push messages are the pool's to handle), a credential provider (the pool
    re-authenticates its own).

    Taking one from the pool and giving it back costs ~20 µs a call in redis-py 8 (locks,
    a readiness poll, observability records): a quarter of a loopback round trip.

    Example::

        connection = connection_outside_pool(redis.Redis().connection_pool)   # or None
    """
    if type(pool) is not redis.ConnectionPool or getattr(pool, "cache", None) is not None:
        return None
    kwargs = pool.connection_kwargs
    if str(kwargs.get("protocol") or 2) != "2" or kwargs.get("credential_provider") is not None:
        return None
    return pool.connection_class(**kwargs)


def drop_if_stale(connection: Any) -> None:
    """Drop ``connection`` (it connects again on its next send) when something is waiting
    to be read on it before anything was sent: the server closed it (a restart, its idle
    ``timeout``, ``CLIENT KILL``), or a reply nobody read. A pool checks each connection it
    hands out the same way; a connection held across calls is checked before each one,
    so that a command is never sent on a socket the server already closed (it would fail,
    and a client without retries would report that as an outage).
    """
    if getattr(connection, "_sock", None) is None:
        return  # not connected: it connects on send
    try:
        stale = connection.can_read()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        stale = True
    if stale:
        connection.disconnect()


def call_now(client: Any, command: Sequence[Any]) -> Any:
    """Run one command on a connection of ``client``'s pool (a ``redis.Redis``) and
    return its reply, as ``client.execute_command`` would: the connection's retry policy
    (the connection dropped and made again after a connection error), the connection
    given back to the pool, an error reply raised (``NoScriptError`` for NOSCRIPT).

    What it leaves out is redis-py's per-call layer: the observability records, the
    option parsing and the response callbacks (so: commands whose reply redis-py leaves
    as the server sent it, MGET and EVALSHA), and the argument encoding in Python
    (:func:`_packed`). That layer is ~20 µs of a ~120 µs MGET on loopback, ~15% of a
    cache hit.

    Example::

        call_now(redis.Redis(), ("MGET", "a", "b"))   # [None, None]
    """
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        return call_on(connection, command)
    finally:
        pool.release(connection)


def call_on(connection: Any, command: Sequence[Any]) -> Any:
    """:func:`call_now` on ``connection``, which the caller holds: its reply, an error
    reply raised, the connection's retry policy on a connection error."""
    packed = _packed(connection, (command,))
    return connection.retry.call_with_retry(
        lambda: _send_and_read(connection, packed, 1)[0],
        lambda _error: connection.disconnect(),
    )


def run_on(connection: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` on ``connection`` in one write and read their replies, as a
    pipeline without MULTI would: in order, an error reply returned as its exception; on
    a connection error the connection's retry policy sends them all again (as redis-py's
    pipelines do: every command given must be safe to run twice)."""
    packed = _packed(connection, commands)
    return cast(
        "list[Any]",
        connection.retry.call_with_retry(
            lambda: _send_and_read(connection, packed, len(commands)),
            lambda _error: connection.disconnect(),
        ),
    )


def as_pipelines_return(
    client: Any, commands: Sequence[Sequence[Any]], replies: list[Any]
) -> list[Any]:
    """The replies of :func:`run_on` as ``client``'s own pipeline returns them: each
    through the client's response callback for its command (``SET`` True or None,
    ``SMEMBERS`` a set...), the first error reply raised."""
    callbacks = client.response_callbacks
    parsed: list[Any] = []
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, Exception):
            raise reply
        callback = callbacks.get(command[0])
        parsed.append(reply if callback is None else callback(reply))
    return parsed


def _send_and_read(connection: Any, packed: Any, count: int) -> list[Any]:
    connection.send_packed_command(packed)
    if count == 1:
        return [connection.read_response()]
    return [_reply(connection) for _ in range(count)]


def _reply(connection: Any) -> Any:
    try:
        return connection.read_response()
    except redis.exceptions.ResponseError as exc:
        return exc


def failed_to_connect(exc: BaseException) -> bool:
    """Whether a redis-py error is a connection that was never made (refused, no such
    host, a connect timeout): nothing was sent. Any other connection error may have
    come after the command reached the server.

    Example::

        >>> failed_to_connect(redis.exceptions.TimeoutError("Timeout connecting to server"))
        True
    """
    if isinstance(exc, redis.exceptions.TimeoutError):
        # redis-py's wording for a connect timeout (a read timeout says "reading")
        return str(exc).startswith("Timeout connecting")
    cause = exc.__cause__
    return isinstance(exc, redis.exceptions.ConnectionError) and isinstance(
        cause, ConnectionRefusedError | socket.gaierror
    )


def connection_socket(connection: Any) -> socket.socket:
    """The socket of a connected redis-py connection, read directly by the local tier.

    Raises ``ConnectionError`` when the connection is not connected.
    """
    sock = connection._sock
    if sock is None:
        raise ConnectionError("the connection is closed")
    return sock  # type: ignore[no-any-return]


# -- the probes ----------------------------------------------------------------------------


@functools.cache
def _samples() -> dict[str, Any]:
    """A throwaway mapped class, an instance, a statement and a session to probe.

    Made once and kept: SQLAlchemy registers the class's generated ``__init__`` with
    :mod:`linecache`, and a class collected later would pull that entry from under
    whatever reads the cache then (a debugger, doctest's output capture).
    """
    from sqlalchemy import Column, Integer, MetaData, Table, select
    from sqlalchemy.orm import Session, registry

    mappers = registry()
    table = Table("sarc_compat_probe", MetaData(), Column("id", Integer, primary_key=True))

    class Probe:
        pass

    mapper = mappers.map_imperatively(Probe, table)
    obj = Probe()
    samples = {
        "select": select(Probe).where(table.c.id == 1),
        "mapper": mapper,
        "state": sqlalchemy.inspect(obj),
        "session": Session(),
        "identity_map": Session().identity_map,
        "registry": mappers,
        "result": make_result(["x"], [], single=True),
        "variant": sqlalchemy.Integer().with_variant(sqlalchemy.BigInteger(), "postgresql"),
        "pool": redis.ConnectionPool(),
        "connection": redis.Connection(),  # type: ignore[no-untyped-call]
        "client": redis.Redis(),  # connects on first use
        # made without connecting (an asyncio cluster client connects on first use)
        "async_cluster": (
            async_cluster := redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1)
        ),
        "async_nodes": async_cluster.nodes_manager,
        "async_node": redis.asyncio.cluster.ClusterNode("127.0.0.1", 1),
    }
    mapper._get_clause  # noqa: B018 - configured here, while the registry lives
    mappers.dispose()
    return samples


_PROBED: dict[str, tuple[str, str]] = {
    "sqlalchemy Select._generate_cache_key": ("select", "_generate_cache_key"),
    "sqlalchemy Select._for_update_arg": ("select", "_for_update_arg"),
    "sqlalchemy Select._with_options": ("select", "_with_options"),
    "sqlalchemy Select._propagate_attrs": ("select", "_propagate_attrs"),
    "sqlalchemy Select._where_criteria": ("select", "_where_criteria"),
    "sqlalchemy Select._compile_options": ("select", "_compile_options"),
    "sqlalchemy Select._clone": ("select", "_clone"),
    "sqlalchemy Mapper._identity_class": ("mapper", "_identity_class"),
    "sqlalchemy Mapper._get_clause": ("mapper", "_get_clause"),
    "sqlalchemy InstanceState._commit_all": ("state", "_commit_all"),
    "sqlalchemy InstanceState._commit": ("state", "_commit"),
    "sqlalchemy Session._is_clean": ("session", "_is_clean"),
    "sqlalchemy Session._expunge_states": ("session", "_expunge_states"),
    "sqlalchemy Session._save_or_update_impl": ("session", "_save_or_update_impl"),
    "sqlalchemy InstanceState._orphaned_outside_of_session": (
        "state",
        "_orphaned_outside_of_session",
    ),
    "sqlalchemy Session._autoflush": ("session", "_autoflush"),
    "sqlalchemy Session._transaction": ("session", "_transaction"),
    "sqlalchemy Session._flushing": ("session", "_flushing"),
    "sqlalchemy InstanceState.committed_state": ("state", "committed_state"),
    "sqlalchemy InstanceState.load_options": ("state", "load_options"),
    "sqlalchemy InstanceState.load_path": ("state", "load_path"),
    "sqlalchemy InstanceState.modified": ("state", "modified"),
    "sqlalchemy InstanceState.manager": ("state", "manager"),
    "sqlalchemy Session.identity_map._add_unpresent": ("identity_map", "_add_unpresent"),
    "sqlalchemy Session.identity_map._dict": ("identity_map", "_dict"),
    "sqlalchemy registry._managers": ("registry", "_managers"),
    "sqlalchemy IteratorResult._source_supports_scalars": ("result", "_source_supports_scalars"),
    "sqlalchemy Result._attributes": ("result", "_attributes"),
    "sqlalchemy TypeEngine._variant_mapping": ("variant", "_variant_mapping"),
    "redis ConnectionPool.connection_kwargs": ("pool", "connection_kwargs"),
    "redis ConnectionPool._available_connections": ("pool", "_available_connections"),
    "redis ConnectionPool._in_use_connections": ("pool", "_in_use_connections"),
    "redis Connection.redis_connect_func": ("connection", _CONNECT_HOOK),
    "redis Connection._sock": ("connection", "_sock"),
    "redis ConnectionPool.connection_class": ("pool", "connection_class"),
    "redis ConnectionPool.get_connection": ("pool", "get_connection"),
    "redis ConnectionPool.release": ("pool", "release"),
    "redis Connection.pack_commands": ("connection", "pack_commands"),
    "redis Connection._command_packer": ("connection", "_command_packer"),
    "redis Connection.encoder": ("connection", "encoder"),
    "redis Connection.send_packed_command": ("connection", "send_packed_command"),
    "redis Connection.read_response": ("connection", "read_response"),
    "redis Connection.disconnect": ("connection", "disconnect"),
    "redis Connection.retry": ("connection", "retry"),
    "redis Connection.can_read": ("connection", "can_read"),
    "redis ConnectionPool.max_connections": ("pool", "max_connections"),
    "redis ConnectionPool.cache": ("pool", "cache"),
    "redis Redis.response_callbacks": ("client", "response_callbacks"),
    "redis asyncio RedisCluster.nodes_manager": ("async_cluster", "nodes_manager"),
    "redis asyncio NodesManager.connection_kwargs": ("async_nodes", "connection_kwargs"),
    "redis asyncio NodesManager.nodes_cache": ("async_nodes", "nodes_cache"),
    "redis asyncio NodesManager.startup_nodes": ("async_nodes", "startup_nodes"),
    "redis asyncio NodesManager.slots_cache": ("async_nodes", "slots_cache"),
    "redis asyncio NodesManager.initialize": ("async_nodes", "initialize"),
    "redis asyncio ClusterNode.connection_kwargs": ("async_node", "connection_kwargs"),
    "redis asyncio ClusterNode._connections": ("async_node", "_connections"),
}

_MODULE_PROBES: dict[str, tuple[Any, str]] = {
    "redis NodesManager.initialize": (redis.cluster.NodesManager, "initialize"),
    "sqlalchemy StrategizedProperty._get_context_loader": (
        orm_interfaces.StrategizedProperty,
        "_get_context_loader",
    ),
    "sqlalchemy StrategizedProperty._get_strategy": (
        orm_interfaces.StrategizedProperty,
        "_get_strategy",
    ),
    "sqlalchemy LoaderStrategy.create_row_processor": (
        orm_interfaces.LoaderStrategy,
        "create_row_processor",
    ),
    "sqlalchemy ColumnProperty._deferred_column_loader": (
        orm_properties.ColumnProperty,
        "_memoized_attr__deferred_column_loader",
    ),
    "sqlalchemy ColumnProperty._raise_column_loader": (
        orm_properties.ColumnProperty,
        "_memoized_attr__raise_column_loader",
    ),
    "sqlalchemy Mapper._path_registry": (sqlalchemy.orm.Mapper, "_path_registry"),
    "sqlalchemy strategy_options._LoadElement._extra_criteria": (
        orm_strategy_options._LoadElement,
        "_extra_criteria",
    ),
    "sqlalchemy orm QueryContext.default_load_options": (
        orm_context.QueryContext,
        "default_load_options",
    ),
    "sqlalchemy orm.context.ORMCompileState.default_compile_options": (
        _COMPILE_STATE,
        "default_compile_options",
    ),
    "sqlalchemy sql.selectable.SelectState.default_select_compile_options": (
        selectable.SelectState,
        "default_select_compile_options",
    ),
    "sqlalchemy orm QueryContext.default_load_options._only_return_tuples": (
        orm_context.QueryContext.default_load_options,
        "_only_return_tuples",
    ),
    "sqlalchemy orm QueryContext.default_load_options._autoflush": (
        orm_context.QueryContext.default_load_options,
        "_autoflush",
    ),
    "sqlalchemy orm QueryContext.default_load_options._refresh_state": (
        orm_context.QueryContext.default_load_options,
        "_refresh_state",
    ),
    "sqlalchemy orm QueryContext.default_load_options._is_user_refresh": (
        orm_context.QueryContext.default_load_options,
        "_is_user_refresh",
    ),
    "sqlalchemy orm ORMCompileState.default_compile_options._only_load_props": (
        _COMPILE_STATE.default_compile_options,
        "_only_load_props",
    ),
    "sqlalchemy orm QueryContext.default_load_options._populate_existing": (
        orm_context.QueryContext.default_load_options,
        "_populate_existing",
    ),
    "sqlalchemy orm.mapperlib._mapper_registries": (mapperlib, "_mapper_registries"),
    "sqlalchemy orm.base.PassiveFlag.NO_CHANGE": (PassiveFlag, "NO_CHANGE"),
    "sqlalchemy engine.result.IteratorResult": (engine_result, "IteratorResult"),
    "sqlalchemy engine.result.SimpleResultMetaData": (engine_result, "SimpleResultMetaData"),
    "sqlalchemy util.concurrency.in_greenlet": (concurrency, "in_greenlet"),
    "sqlalchemy engine.cursor._NO_CURSOR_DML": (engine_cursor, "_NO_CURSOR_DML"),
    "redis connection.HiredisRespSerializer": (redis.connection, "HiredisRespSerializer"),
    "redis connection.PythonRespSerializer": (redis.connection, "PythonRespSerializer"),
    "redis connection.AbstractConnection.pack_commands": (
        getattr(redis.connection, "AbstractConnection", None),
        "pack_commands",
    ),
    "sqlalchemy DefaultExecutionContext.cursor_fetch_strategy": (
        engine_default.DefaultExecutionContext,
        "cursor_fetch_strategy",
    ),
    # a hit begins the session's transaction as a database read would
    "sqlalchemy Session._autobegin_t": (orm_session.Session, "_autobegin_t"),
}

_SOURCE_PROBES: dict[str, tuple[Any, str]] = {
    # the legacy Query returns objects and de-duplicates by what a result's _attributes
    # say (make_result sets them as loading.instances does)
    "sqlalchemy Query._iter reads is_single_entity": (
        sqlalchemy.orm.Query._iter,
        "is_single_entity",
    ),
    "sqlalchemy Query._iter reads filtered": (sqlalchemy.orm.Query._iter, '"filtered"'),
    # a joined session's write-behind commits the database first (commit_now), and knows
    # the savepoints around it (enclosing_savepoints)
    "sqlalchemy Connection._commit_impl calls _handle_dbapi_exception": (
        engine_base.Connection._commit_impl,
        "_handle_dbapi_exception",
    ),
    "sqlalchemy NestedTransaction._previous_nested": (
        engine_base.NestedTransaction.__init__,
        "_previous_nested",
    ),
    "sqlalchemy NestedTransaction._savepoint": (
        engine_base.NestedTransaction.__init__,
        "_savepoint",
    ),
    "sqlalchemy DefaultDialect._on_connect_isolation_level": (
        engine_default.DefaultDialect.__init__,
        "_on_connect_isolation_level",
    ),
    "sqlalchemy SessionTransaction._connections": (
        orm_session.SessionTransaction.__init__,
        "_connections",
    ),
    # the loader internals a hit reads once per statement shape (hydrate.loading_of)
    "sqlalchemy LoaderStrategy.strategy_key": (
        orm_interfaces.LoaderStrategy.__init__,
        "strategy_key",
    ),
    "sqlalchemy LoaderStrategy.is_class_level": (
        orm_interfaces.LoaderStrategy.__init__,
        "is_class_level",
    ),
    # a relationship load inside session.refresh(obj, [...]) carries the refresh's
    # QueryContext as its top-level context (loads_for_refresh)
    "sqlalchemy ORM statements read sa_top_level_orm_context": (
        _COMPILE_STATE.orm_pre_session_exec,
        "sa_top_level_orm_context",
    ),
    "sqlalchemy QueryContext.refresh_state": (orm_context.QueryContext.__init__, "refresh_state"),
    # a sync cluster client is made connected, so no sample: its on_connect must call the
    # hook install_connect_hook sets
    "redis cluster.RedisCluster.on_connect calls user_on_connect_func": (
        redis.cluster.RedisCluster.on_connect,
        _CLUSTER_CONNECT_HOOK,
    ),
}

PROBES: tuple[str, ...] = (*_PROBED, *_MODULE_PROBES, *_SOURCE_PROBES)
"""Every internal symbol this module touches (checked by :func:`probe`)."""


def probe() -> Iterator[tuple[str, bool]]:
    """``(symbol, found)`` for every entry of :data:`PROBES`, against the installed releases.

    Example::

        >>> all(found for _, found in probe())
        True
    """
    samples = _samples()
    for name, (sample, attribute) in _PROBED.items():
        yield name, hasattr(samples[sample], attribute)
    for name, (owner, attribute) in _MODULE_PROBES.items():
        yield name, owner is not None and hasattr(owner, attribute)
    for name, (function, word) in _SOURCE_PROBES.items():
        yield name, word in inspect.getsource(function)
