"""Which database, and which schema in it, a read or a write touches.

Two sessions that run the same statement on two databases, or on one database through two
``schema_translate_map`` settings (one schema per tenant), read different rows: every key that
holds rows must say which ones. This module names them:

* :class:`Database`: what a connection pool connects to, asked of the server once per pool
  (``current_database()``, ``current_schema()`` and the cluster's ``system_identifier``,
  or its address where that is not readable), so that every process names one database
  alike, whatever URL spelling it used (``localhost`` or ``127.0.0.1``, through a pooler);
  a ``search_path`` given in the connect arguments shows up as the default schema. Other
  dialects are named by their URL (without the password).
* :meth:`Binds.scope`: the row scope of a table, a short digest of the database identity
  and the table's *effective* schema (after ``schema_translate_map``). Entity entries and
  write-behind states carry it in their keys.

Query entries are keyed by :attr:`Database.name`, which adds the dialect and driver: the
Python types a row comes back with may differ between drivers.

The identity query runs on the raw DBAPI connection, so it is invisible to SQLAlchemy's
event listeners (the application's statement counters, the cache's own hooks), and it
cannot fail: it reads functions every role may call. Under REPEATABLE READ it may be the
transaction's first statement; the cache pins its versions before that (``after_begin``),
so the snapshot it takes is still after the pin.

Example::

    binds = Binds()
    database = binds.database_of(session.connection())
    binds.scope(database, None, {None: "tenant_x"})   # the scope of tenant_x's rows
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sa_redis_cache import compat

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import ORMExecuteState, Session

    from sa_redis_cache.models import KnownTables

log = logging.getLogger(__name__)

_SCOPE_MEMO_SIZE = 4096

# every part reads a function PUBLIC may execute, so the statement cannot fail and abort
# the transaction it runs in; pg_control_system() is checked first (some services revoke it)
_POSTGRES_IDENTITY = (
    "SELECT current_database(), current_schema(), "
    "CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE') "
    "THEN (SELECT system_identifier::text FROM pg_control_system()) END, "
    "inet_server_addr()::text, inet_server_port(), "
    # the tables with an enabled AFTER ... FOR EACH ROW trigger on UPDATE: tgtype has the
    # ROW bit (1) and UPDATE (16), neither BEFORE (2) nor INSTEAD OF (64)
    "CASE WHEN has_table_privilege('pg_catalog.pg_trigger', 'SELECT') "
    "AND has_table_privilege('pg_catalog.pg_class', 'SELECT') "
    "THEN (SELECT array_agg(DISTINCT c.relname::text) FROM pg_catalog.pg_trigger t "
    "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal "
    "AND t.tgenabled <> 'D' AND t.tgtype & 83 = 17) END, "
    # every relation each view's rule reads, as 'view<US>schema<US>relation': what the
    # database reads on a view's behalf, which no statement names
    "CASE WHEN has_table_privilege('pg_catalog.pg_rewrite', 'SELECT') "
    "AND has_table_privilege('pg_catalog.pg_depend', 'SELECT') "
    "AND has_table_privilege('pg_catalog.pg_class', 'SELECT') "
    "AND has_table_privilege('pg_catalog.pg_namespace', 'SELECT') "
    "THEN (SELECT array_agg(DISTINCT v.relname::text || chr(31) || bn.nspname::text "
    "|| chr(31) || b.relname::text) FROM pg_catalog.pg_class v "
    "JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace "
    "JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid "
    "JOIN pg_catalog.pg_depend d ON d.objid = r.oid "
    "AND d.classid = 'pg_catalog.pg_rewrite'::regclass "
    "AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid <> v.oid "
    "JOIN pg_catalog.pg_class b ON b.oid = d.refobjid "
    "JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace "
    "WHERE v.relkind = 'v' AND vn.nspname NOT IN ('pg_catalog', 'information_schema')) END"
)


@dataclass(frozen=True, slots=True)
class Database:
    """What one connection pool connects to.

    ``identity`` names the database (the same in every process that reaches it);
    ``default_schema`` is where unqualified tables live for this pool's connections;
    ``name`` adds the dialect and driver, for query keys.

    Example::

        >>> Database("pg:7715512549132433534/shop", "public", "postgresql+psycopg").name
        'postgresql+psycopg:pg:7715512549132433534/shop@public'
    """

    identity: str
    default_schema: str | None
    driver: str
    # tables (by name, in any schema) with an AFTER row trigger on UPDATE when the pool was
    # first used: a row that UPDATE ... RETURNING gives may not be the row it leaves
    after_update_triggers: frozenset[str] = field(default=frozenset(), compare=False)
    # each view (by name, in any schema) when the pool was first used: the (schema, name)
    # of every table it reads, through the views it reads (:func:`view_bases`)
    views: Mapping[str, frozenset[tuple[str, str]]] = field(
        default_factory=dict, compare=False, hash=False
    )
    # the driver-qualified name that query keys carry: formatted once, every read packs it
    name: str = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        name = f"{self.driver}:{self.identity}@{self.default_schema or ''}"
        object.__setattr__(self, "name", name)  # frozen: set once, here


def _url_identity(engine: Engine) -> str:
    url = engine.url
    return f"url:{url.host or ''}:{url.port or ''}/{url.database or ''}"


def view_bases(edges: Iterable[str]) -> dict[str, frozenset[tuple[str, str]]]:
    """Each view's tables, from ``view<US>schema<US>relation`` edges (what each view's
    rule reads): the relations it reads that are no view, and those of the views it reads,
    at any depth. Views are named without their schema (a view of that name in any schema
    counts: extra misses, never a missed table).

    Example::

        >>> edges = ["totals\x1fpublic\x1forders", "report\x1fpublic\x1ftotals"]
        >>> sorted(view_bases(edges)["report"])
        [('public', 'orders')]
    """
    reads: dict[str, set[tuple[str, str]]] = {}
    for edge in edges:
        view, schema, relation = edge.split("\x1f", 2)
        reads.setdefault(view, set()).add((schema, relation))

    def tables_of(view: str, seen: set[str]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for schema, relation in reads[view]:
            if relation not in reads:
                found.add((schema, relation))
            elif relation not in seen:
                seen.add(relation)
                found |= tables_of(relation, seen)
        return found

    return {view: frozenset(tables_of(view, {view})) for view in reads}


def view_table_names(
    views: Mapping[str, frozenset[tuple[str, str]]], tables: Iterable[str], known: KnownTables
) -> set[str]:
    """The names the tables that the views among ``tables`` (``fullname``s) read are
    versioned under: each such table's mapped tables of its name in any schema (a
    ``schema_translate_map`` may put them there), its bare name and its schema-qualified
    name (a Core table's ``fullname`` is either). ``views``: :attr:`Database.views`.

    Example::

        >>> from sa_redis_cache.models import KnownTables
        >>> views = {"listing": frozenset({("public", "products")})}
        >>> sorted(view_table_names(views, ["reports.listing"], KnownTables(["products"])))
        ['products', 'public.products']
    """
    names: set[str] = set()
    if not views:
        return names
    for table in tables:
        for schema, relation in views.get(table.rpartition(".")[2], ()):
            names |= known.named(relation) | {relation, f"{schema}.{relation}"}
    return names


def written_through_views(tables: Iterable[str], known: Callable[[], KnownTables]) -> set[str]:
    """:func:`view_table_names` of the views of every database this process met: what a
    write to ``tables`` writes when one is a view (an ORM model mapped onto an updatable
    view, DML naming it), which the database does on its behalf. The database written is
    not asked: a same-named view of another database costs misses, never a missed table.

    Example::

        written_through_views({"listing"}, models.known)   # the tables listing reads
    """
    views = _VIEWS_MET  # empty unless a database met has a view: nothing to compute
    return view_table_names(views, tables, known()) if views else set()


def reads_a_view(database: Database, table: str) -> bool:
    """Whether ``table`` (a ``fullname``) is a view in ``database``: the rows of a model
    mapped onto it change with the tables it reads, whose writes name no row of it, so no
    entity entry of it is kept.

    Example::

        >>> reads_a_view(Database("pg:1/shop", "public", "pg", views={"totals": frozenset()}),
        ...              "reports.totals")
        True
    """
    return bool(database.views) and table.rpartition(".")[2] in database.views


def _ask_postgres(connection: Connection) -> tuple[str, str | None, frozenset[str], Any] | None:
    """``(identity, default schema, tables with AFTER row triggers on UPDATE, the
    relations views read)`` from the server; None when it did not answer."""
    try:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(_POSTGRES_IDENTITY)
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 - an unknown identity bypasses the cache
        log.warning("cannot tell which database this connection reaches: %s", exc)
        return None
    if row is None:
        return None
    database, schema, system_id, address, port, triggered, view_edges = row
    if system_id:
        where = f"pg:{system_id}"
    elif address:
        where = f"pg@{address}:{port}"
    else:  # a Unix socket, and pg_control_system() refused: the URL is all there is
        where = "pg" + _url_identity(connection.engine)[3:]
    return f"{where}/{database}", schema, frozenset(triggered or ()), view_edges or ()


# what each pool connects to is a fact about the pool, shared by every cache of the process;
# pools are held weakly: a process that makes engines (or per-request connections) as it
# goes does not keep them alive through the cache
_DATABASES: weakref.WeakKeyDictionary[Any, Database] = weakref.WeakKeyDictionary()
_DATABASES_LOCK = threading.Lock()
# the views of every database met, merged by name (replaced, never changed in place)
_VIEWS_MET: dict[str, frozenset[tuple[str, str]]] = {}


def _meet_views(views: Mapping[str, frozenset[tuple[str, str]]]) -> None:
    global _VIEWS_MET  # noqa: PLW0603 - replaced whole: readers hold no lock
    merged = dict(_VIEWS_MET)
    for view, tables in views.items():
        merged[view] = merged.get(view, frozenset()) | tables
    _VIEWS_MET = merged


class Binds:
    """The :class:`Database` of every pool the process has met, and row scopes.

    Example::

        binds = Binds()
        database = binds.database_of(connection)    # asks the server once per pool
        binds.known(engine)                         # the same, without a query, or None
    """

    def __init__(self) -> None:
        self._by_pool = _DATABASES
        self._scopes: dict[tuple[str, str | None], str] = {}

    def known(self, bind: Engine | Connection) -> Database | None:
        """The database of ``bind``'s pool if it was asked already (no I/O)."""
        return self._by_pool.get(bind.engine.pool)

    def forget_pool(self, pool: Any) -> None:
        """Ask the database ``pool`` connects to again on the pool's next use (its views
        changed)."""
        with _DATABASES_LOCK:
            self._by_pool.pop(pool, None)

    def database_of(self, connection: Connection) -> Database | None:
        """The database ``connection`` reaches, asked of the server on a pool's first use.

        None when the server could not say (the caller bypasses the cache; it is asked
        again next time).
        """
        engine = connection.engine
        pool = engine.pool
        found = self._by_pool.get(pool)
        if found is not None:
            return found
        dialect = engine.dialect
        triggered: frozenset[str] = frozenset()
        views: dict[str, frozenset[tuple[str, str]]] = {}
        if dialect.name == "postgresql":
            answer = _ask_postgres(connection)
            if answer is None:
                return None
            identity, schema, triggered, view_edges = answer
            views = view_bases(view_edges)
        else:
            identity, schema = _url_identity(engine), None
        found = Database(identity, schema, f"{dialect.name}+{dialect.driver}", triggered, views)
        with _DATABASES_LOCK:
            self._by_pool[pool] = found
            if views:
                _meet_views(views)
        return found

    def database_for(
        self, session: Session, bind: Engine | Connection, bind_arguments: Mapping[str, Any]
    ) -> Database | None:
        """The database of ``bind``, which ``session`` uses for ``bind_arguments``.

        Known pools cost a lookup; the first use of a pool checks out the session's
        connection (which the read would do anyway on a miss) and asks the server.
        """
        found = self._by_pool.get(bind.engine.pool)
        if found is not None:
            return found
        return self.database_of(session.connection(bind_arguments=dict(bind_arguments)))

    def database_of_engine(self, engine: Engine) -> Database | None:
        """The database of ``engine`` (connects once when its pool was never asked)."""
        found = self.known(engine)
        if found is not None:
            return found
        with engine.connect() as connection:
            return self.database_of(connection)

    def scope(
        self,
        database: Database,
        table_schema: str | None,
        translate: Mapping[str | None, str | None] | None,
    ) -> str:
        """The row scope of a table: its database and effective schema, as 16 hex digits.

        ``translate`` is the ``schema_translate_map`` in effect; an unqualified table (or
        one translated to None) lives in the pool's default schema.

        Example::

            >>> db = Database("pg:1/shop", "public", "postgresql+psycopg")
            >>> Binds().scope(db, None, None) == Binds().scope(db, "public", None)
            True
        """
        schema = translate.get(table_schema, table_schema) if translate else table_schema
        if schema is None:
            schema = database.default_schema
        memo = (database.identity, schema)
        found = self._scopes.get(memo)
        if found is None:
            text = f"{database.identity}\x00{schema or ''}".encode()
            found = hashlib.blake2b(text, digest_size=8).hexdigest()
            if len(self._scopes) >= _SCOPE_MEMO_SIZE:
                self._scopes.clear()
            self._scopes[memo] = found
        return found


_TRANSLATE = "schema_translate_map"


def session_translate_map(
    session: Session,
    bind: Engine | Connection,
    call_options: Mapping[str, Any] | None = None,
    statement_options: Mapping[str, Any] | None = None,
) -> Any:
    """The ``schema_translate_map`` a statement of ``session`` on ``bind`` runs under, as
    SQLAlchemy resolves it (``Connection._execute_clauseelement`` merges the statement's
    options, then the connection's over them, then the execute call's over both): the
    call's options (``session.get(..., execution_options=...)``, ``session.execute(stmt,
    execution_options=...)``: ``ORMExecuteState.local_execution_options``) first, then
    those of the connection the session runs it on (the one its transaction holds for
    ``bind``, with ``session.connection(execution_options={...})``'s, else the one it
    will make: the bind's, under ``Session(execution_options=...)``'s), and only then the
    statement's own (``stmt.execution_options(...)``), which a tenant's engine or
    connection overrides. A map given as None translates nothing, and counts as given.

    Example::

        session.connection(execution_options={"schema_translate_map": {None: "t1"}})
        session_translate_map(session, engine)   # {None: "t1"}
    """
    if call_options is not None and _TRANSLATE in call_options:
        return call_options[_TRANSLATE]
    connection = compat.session_connection(session, bind)
    if connection is None:
        # SQLAlchemy 2.1 gives the session's own options to each connection it makes
        session_wide: Mapping[str, Any] | None = getattr(session, "execution_options", None)
        if session_wide and _TRANSLATE in session_wide:
            return session_wide[_TRANSLATE]
    options = (bind if connection is None else connection).get_execution_options()
    if _TRANSLATE in options:
        return options[_TRANSLATE]
    return None if statement_options is None else statement_options.get(_TRANSLATE)


def statement_translate_map(orm_context: ORMExecuteState, bind: Engine | Connection) -> Any:
    """:func:`session_translate_map` for the statement ``orm_context`` executes on
    ``bind``: its call's options, the connection's, then the statement's own.

    Example::

        @event.listens_for(Session, "do_orm_execute")
        def tenant_of(orm_context):
            bind = orm_context.session.get_bind(**orm_context.bind_arguments)
            statement_translate_map(orm_context, bind)   # {None: "t1"}
    """
    return session_translate_map(
        orm_context.session,
        bind,
        orm_context.local_execution_options,
        orm_context.statement._execution_options,
    )


def translate_map_of(bind: Engine | Connection) -> Any:
    """The ``schema_translate_map`` of ``bind`` (an engine or a connection).

    Example::

        translate_map_of(engine.execution_options(schema_translate_map={None: "t1"}))
    """
    return bind.get_execution_options().get(_TRANSLATE)
