"""Writes outside the unit of work: Core DML on an engine and textual DML anywhere.

ORM flushes and ORM bulk statements are handled by the session hooks in
:mod:`sa_redis_cache.sessions`. Everything else that reaches the database through an
attached engine is seen here, after the cursor ran it, Core DML on a session's own
connection included: a compiled ``insert()``,
``update()`` or ``delete()`` names its table, and so does one in a CTE of any
statement (``select(update(...).returning(...).cte())``); a ``text()`` statement is read with a
regular expression, and when its tables cannot be told, every table the cache knows is
invalidated. The tables are marked at once (before the commit), and the post-commit bump
runs as the connection's commit returns (``Connection.commit()``, the end of
``engine.begin()``, a session's commit), or when the connection goes back to the pool
after a rollback.
"""

from __future__ import annotations

import re
import secrets
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection
from sqlalchemy.schema import ExecutableDDLElement
from sqlalchemy.sql.dml import Delete, Update, UpdateBase
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

from . import commit_first, compat
from .binds import written_through_views
from .models import KnownTables
from .referential import referential_actions
from .schema import is_library_table
from .transaction import peek_transaction_state, transaction_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session
    from sqlalchemy.sql.expression import TableClause

    from .context import CacheContext
    from .strategies.cache_aside import Invalidation

# an identifier: quoted (its case kept, "" an escaped quote) or not (folded to lower case,
# as Postgres folds it)
_PART = r'(?:"(?:[^"]|"")+"|[\w$]+)'
_NAME = rf"{_PART}(?:\s*\.\s*{_PART})?"
_TEXT_DML = re.compile(
    r"^\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|MERGE\s+INTO)"
    rf"\s+(?:ONLY\s+)?(?P<table>{_NAME})",
    re.IGNORECASE,
)
# TRUNCATE [TABLE] [ONLY] name [*] [, ...] [RESTART | CONTINUE IDENTITY] [CASCADE | RESTRICT]
_TRUNCATE = re.compile(
    r"^\s*TRUNCATE(?:\s+TABLE)?\s+"
    rf"(?P<tables>(?:ONLY\s+)?{_NAME}(?:\s*\*)?(?:\s*,\s*(?:ONLY\s+)?{_NAME}(?:\s*\*)?)*)"
    r"(?:\s+(?:RESTART|CONTINUE)\s+IDENTITY)?(?:\s+(?P<how>CASCADE|RESTRICT))?\s*;?\s*$",
    re.IGNORECASE,
)
_TRUNCATED = re.compile(rf"(?:ONLY\s+)?(?P<table>{_NAME})", re.IGNORECASE)
# REFRESH MATERIALIZED VIEW [CONCURRENTLY] name [WITH [NO] DATA]: the view's rows change
# now, and only now (a write to its base tables leaves them as they were)
_REFRESH = re.compile(
    rf"^\s*REFRESH\s+MATERIALIZED\s+VIEW\s+(?:CONCURRENTLY\s+)?(?P<table>{_NAME})"
    r"(?:\s+WITH\s+(?:NO\s+)?DATA)?\s*;?\s*$",
    re.IGNORECASE,
)
_PARTS = re.compile(_PART)
_ANY_DML = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE|TRUNCATE|COPY)\b", re.IGNORECASE)
# a procedure call, an anonymous code block, a prepared statement's execution: what they
# write is in the database, not in the statement (after its comments and any parentheses)
_OPAQUE = re.compile(r"^[\s(]*(?:CALL|DO|EXECUTE)\b", re.IGNORECASE)
# the locking clause of a read (SELECT ... FOR UPDATE, FOR NO KEY UPDATE): not a write
_LOCKING = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+)?UPDATE\b", re.IGNORECASE)
# DDL that changes which tables a view reads (of one statement, its comments blanked out)
_VIEW_WORD = re.compile(r"\bVIEW\b", re.IGNORECASE)
_VIEW_DDL = re.compile(
    r"^\s*(?:CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:TEMP|TEMPORARY)\s+)?(?:RECURSIVE\s+)?VIEW"
    r"|ALTER\s+VIEW|DROP\s+VIEW)\b",
    re.IGNORECASE,
)
# what opens a token statements() must read whole: a comment, a string constant (E'...'
# with backslash escapes), a quoted identifier, a dollar-quoted string ($tag$...$tag$:
# not after an identifier's character, where '$' belongs to the identifier), or a ';'
_LEXEME = re.compile(
    r"--|/\*|(?<![\w$])[Ee]'|'|\"|(?<![\w$])\$(?:[A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?\$|;"
)
_PENDING = "sa_redis_cache.pending"
# a connection's transaction ran view DDL: the pool's database is asked again at its end
_VIEWS_CHANGED = "sa_redis_cache.views_changed"
_HANDED = "sa_redis_cache.handed"


def statements(sql: str) -> list[str] | None:
    """``sql`` as the statements Postgres runs, comments blanked out (each becomes one
    space); None when it cannot be read so (an unterminated string, identifier or
    comment), which callers take for "it may write anything".

    The one place SQL text is cut: a comment may hide what a statement is (``-- note``
    before a ``CALL``), a ``;`` in a string or a comment ends no statement, and one
    inside a dollar-quoted body (``DO $$ ... $$``) neither. Block comments nest, as in
    Postgres. A plain string's backslash is taken as a character
    (``standard_conforming_strings``, on by default since Postgres 9.1).

    Example::

        >>> statements("/* x */ CALL p(); UPDATE t SET a = ';' -- done")
        ['  CALL p()', " UPDATE t SET a = ';'  "]
        >>> statements("SELECT 'open") is None
        True
    """
    out: list[str] = []
    current: list[str] = []
    at = 0
    size = len(sql)
    while True:
        found = _LEXEME.search(sql, at)
        if found is None:
            current.append(sql[at:])
            break
        start, lexeme = found.start(), found.group()
        current.append(sql[at:start])
        if lexeme == ";":
            out.append("".join(current))
            current = []
            at = start + 1
            continue
        if lexeme == "--":
            end = sql.find("\n", start)
            current.append(" ")
            at = size if end < 0 else end
            continue
        if lexeme == "/*":
            depth, at = 1, start + 2
            while depth:
                opened, closed = sql.find("/*", at), sql.find("*/", at)
                if closed < 0:
                    return None
                if 0 <= opened < closed:
                    depth, at = depth + 1, opened + 2
                else:
                    depth, at = depth - 1, closed + 2
            current.append(" ")
            continue
        end = _closing(sql, found.end(), lexeme)
        if end < 0:
            return None
        current.append(sql[start:end])
        at = end
    out.append("".join(current))
    return out


def _closing(sql: str, at: int, opener: str) -> int:
    """Where the string, identifier or dollar-quoted body ``opener`` began ends (just
    after its closing quote); -1 when it never does."""
    if opener.startswith("$"):
        end = sql.find(opener, at)
        return -1 if end < 0 else end + len(opener)
    quote = opener[-1]
    backslash = opener != quote  # E'...': a backslash escapes the next character
    while at < len(sql):
        char = sql[at]
        if backslash and char == "\\":
            at += 2
        elif char == quote:
            if sql.startswith(quote, at + 1):  # '' or "": the quote itself
                at += 2
            else:
                return at + 1
        else:
            at += 1
    return -1


def text_dml_tables(sql: str, known: KnownTables | Iterable[str]) -> set[str]:
    """The tables a textual statement writes: parsed, or all of ``known`` when unsure.

    A single ``INSERT INTO``/``UPDATE``/``DELETE FROM``/``MERGE INTO`` names the table it
    writes, a ``TRUNCATE`` the tables it empties, a ``REFRESH MATERIALIZED VIEW`` the
    view it fills again: the known tables each name may be
    (``s.t`` and ``t`` are any schema's ``t``, which a ``schema_translate_map`` may put
    there; an unquoted name in any case, as Postgres folds it, a quoted one exactly), or
    the name alone when no model maps it, exactly as Core DML on that table invalidates
    that table only. A statement that writes some other way (a CTE, a function call
    beside such a word, ``COPY``, several statements, ``TRUNCATE ... CASCADE``, which
    empties the tables that refer to these), and a ``CALL`` of a procedure, a ``DO``
    block or an ``EXECUTE`` of a prepared statement, is unknowable, and gives every known
    table; so does text that cannot be read (an unterminated string or comment). A
    read's locking clause (``FOR UPDATE``, ``FOR NO KEY UPDATE``) writes nothing. The
    text is read without its comments (:func:`statements`): a ``CALL`` after ``-- note``
    or ``/* tag */`` is still one, and a ``;`` in a comment or a string ends nothing.

    Example::

        >>> text_dml_tables("UPDATE Products SET price = 1", ["products", "orders"])
        {'products'}
        >>> text_dml_tables("INSERT INTO audit_log VALUES (1)", ["products", "orders"])
        {'audit_log'}
        >>> text_dml_tables("UPDATE tenant_a.accounts SET x = 1", ["per_tenant.accounts"])
        {'per_tenant.accounts'}
        >>> sorted(text_dml_tables("TRUNCATE products, orders", ["products", "orders"]))
        ['orders', 'products']
        >>> text_dml_tables("SELECT id FROM products FOR UPDATE", ["products", "orders"])
        set()
        >>> sorted(text_dml_tables("CALL archive_orders(7)", ["products", "orders"]))
        ['orders', 'products']
        >>> sorted(text_dml_tables("/* job 7 */ CALL archive(7)", ["products", "orders"]))
        ['orders', 'products']
        >>> text_dml_tables("REFRESH MATERIALIZED VIEW CONCURRENTLY sales", ["products"])
        {'sales'}
    """
    if not isinstance(known, KnownTables):
        known = KnownTables(known)
    parts = statements(sql)
    if parts is not None:
        parts = [part for part in parts if part.strip()]
    if parts is None or len(parts) > 1:
        # unreadable (a statement may hide anywhere in it), or several statements: which
        # cached tables changed is not told from text that a splitting error would
        # misread (a backslash in a string under standard_conforming_strings off)
        return set(known.names)
    return _statement_writes(parts[0], known) if parts else set()


def _statement_writes(sql: str, known: KnownTables) -> set[str]:
    """:func:`text_dml_tables` of one statement, its comments blanked out."""
    found = _TEXT_DML.match(sql)
    if found is not None:
        return _named(found.group("table"), known)
    truncate = _TRUNCATE.match(sql)
    if truncate is not None and (truncate.group("how") or "").upper() != "CASCADE":
        tables: set[str] = set()
        for name in _TRUNCATED.finditer(truncate.group("tables")):
            tables |= _named(name.group("table"), known)
        return tables
    refresh = _REFRESH.match(sql)
    if refresh is not None:
        return _named(refresh.group("table"), known)
    if _OPAQUE.match(sql) or _ANY_DML.search(_LOCKING.sub(" ", sql)):
        # a CTE, a procedure, COPY, TRUNCATE ... CASCADE: which cached tables changed is
        # unknowable
        return set(known.names)
    return set()


def _named(written: str, known: KnownTables) -> set[str]:
    """The known tables a table name as written in SQL may be; the name itself (as the
    database reads it) when it is none of them."""
    parts = _PARTS.findall(written)
    schema = _part(parts[0]) if len(parts) == 2 else None
    name, quoted = _part(parts[-1])
    # whatever schema a statement names (or the connection's default schema, when it names
    # none), a schema_translate_map may put any model's table there, a model declared
    # without a schema or in a placeholder schema (schema="per_tenant", translated to each
    # tenant's). An unquoted name is any case of the model's: a mixed-case name SQLAlchemy
    # quotes. Retiring a same-named table of another schema costs misses; missing the
    # tenant's would serve its rows as they were before the write.
    matched = known.named(name, fold_case=not quoted)
    # no model's table: that table alone, as Core DML on it is (a FromCache statement may
    # read a Core table, versioned under its name)
    return set(matched) or {name if schema is None else f"{schema[0]}.{name}"}


def _part(written: str) -> tuple[str, bool]:
    """An identifier as the database reads it, and whether it was quoted (case kept)."""
    if written.startswith('"'):
        return written[1:-1].replace('""', '"'), True
    return written.lower(), False


class EngineWrites:
    """Engine listeners that invalidate after Core and textual DML.

    Example::

        engine_writes = EngineWrites(core, invalidation)
        engine_writes.register(engine)   # done by Cache.attach()
    """

    def __init__(self, core: CacheContext, invalidation: Invalidation) -> None:
        self.core = core
        self.invalidation = invalidation
        # the connections sessions of attached factories run their transactions on
        self.session_connections: weakref.WeakKeyDictionary[Connection, weakref.ref[Session]] = (
            weakref.WeakKeyDictionary()
        )
        # one slot per cache: several caches (namespaces) may watch the same engine
        self._pending_key = (_PENDING, id(self))
        # the execution option the session hooks give an ORM statement they marked
        self.marked_option = f"sa_redis_cache_marked_{id(self)}"
        self._handed_key = (_HANDED, id(self))
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()

    def register(self, engine: Engine) -> None:
        """Listen on ``engine`` (once): on the engine that owns its pool, whose listeners
        every ``engine.execution_options(...)`` copy of it dispatches to as well. A factory
        bound to one tenant's copy (``schema_translate_map``) thus also sees DML run on the
        engine itself or on another tenant's copy, which write the same database."""
        engine = compat.root_engine(engine)
        if engine in self._engines:
            return
        self._engines.add(engine)
        listen = self.core.listen
        listen(engine, "after_cursor_execute", self.after_cursor_execute)
        append_returning = self.invalidation.returning.before_cursor_execute
        listen(engine, "before_cursor_execute", append_returning, retval=True)
        commit_first.join(engine, self)
        listen(engine.pool, "checkin", self.checkin)

    def forget_engines(self) -> list[Engine]:
        """The listeners were removed; a later ``register`` must add them again. The
        engines forgotten."""
        engines = list(self._engines)
        for engine in engines:
            commit_first.leave(engine, self)
        self._engines = weakref.WeakSet()
        return engines

    def after_cursor_execute(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        """Mark the tables a DML statement wrote, before its transaction commits; read the
        row of a flush's UPDATE given RETURNING (one listener per engine and cache)."""
        returned = self.invalidation.returning.read_returned(conn, cursor, context)
        compiled = getattr(context, "compiled", None)
        element = getattr(compiled, "statement", None)
        if compiled is None or compat.is_textual(element):
            tables = self._text_writes(statement)
            self._note_view_ddl(conn, statement)
        elif isinstance(element, ExecutableDDLElement):
            self._note_view_ddl(conn, statement)
            return
        else:
            # the INSERTs, UPDATEs and DELETEs in its CTEs write too, whatever the
            # statement is: a SELECT of a data-modifying CTE, or DML with a CTE added that
            # writes another table (no session hook sees those)
            tables = self._cte_writes(compiled)
            if context.isinsert or context.isupdate or context.isdelete:
                # unless the session's own hooks know the rows
                target = compat.dml_table(element)
                if target is not None and not self._seen_by_session(
                    conn, context, element, returned
                ):
                    tables |= self._dml_writes(target, context.isdelete, context.isupdate)
            if not tables:
                return
        # a write through a view writes the tables it reads
        tables |= written_through_views(tables, self.core.models.known)
        # the worker's offsets and dead letters: no cache entry reads them
        tables = {t for t in tables if not is_library_table(t)}
        if not tables:
            return
        info = conn.info
        pending: tuple[str, set[str]] | None = info.get(self._pending_key)
        if pending is None:
            pending = info[self._pending_key] = (secrets.token_hex(8), set())
        token, marked = pending
        self.invalidation.mark_bulk(token, tables)
        marked.update(tables)
        session = self._session_of(conn)
        if session is not None and session.in_transaction():
            # the session reads its own write from now on: from the database, as after a
            # flush, not from an entry of this process's local tier that the mark's
            # report, on another connection than the mark's reply, has not reached yet
            transaction_state(session).dml.update(tables)
        if compat.is_autocommit(conn):
            self._finish(info)

    def _note_view_ddl(self, conn: Connection, statement: str) -> None:
        """A view made, changed or dropped: the pool's database is asked again on its next
        use, reading the tables its views read (``Database.views``) as they are now."""
        if _VIEW_WORD.search(statement) is None:
            return  # the common case: no statement about a view, nothing to read
        parts = statements(statement)
        if parts is None or any(_VIEW_DDL.match(part) for part in parts):
            pool = conn.engine.pool
            self.core.binds.forget_pool(pool)
            # and again once its transaction is over: a connection that asked before the
            # commit saw the views as they were
            conn.info[_VIEWS_CHANGED] = pool

    def _dml_writes(self, target: TableClause, deletes: bool, updates: bool) -> set[str]:
        """The tables an ``INSERT``/``UPDATE``/``DELETE`` of ``target`` may write, its
        foreign keys' actions included."""
        tables = self.core.models.written_as(target)
        return tables | referential_actions().written_by(tables, deletes=deletes, updates=updates)

    def _cte_writes(self, compiled: Any) -> set[str]:
        """The tables the data-modifying CTEs of a compiled statement write (an alias of a
        table or a lightweight ``table()`` by the table it names; a ``text()`` CTE as
        :func:`text_dml_tables` reads it); every known table for one whose target is none
        of these."""
        ctes = getattr(compiled, "ctes", None)
        if not ctes:
            return set()
        tables: set[str] = set()
        for cte in ctes:
            inner = getattr(cte, "element", None)
            if isinstance(inner, UpdateBase):
                target = compat.dml_table(inner)
                if target is not None:
                    tables |= self._dml_writes(
                        target, isinstance(inner, Delete), isinstance(inner, Update)
                    )
                else:
                    tables |= set(self.core.models.known().names)
            elif isinstance(inner, TextualSelect | TextClause):
                text = inner.element if isinstance(inner, TextualSelect) else inner
                if isinstance(text, TextClause):
                    tables |= self._text_writes(text.text)
        return tables

    def _text_writes(self, sql: str) -> set[str]:
        """The tables SQL text may write (:func:`text_dml_tables`), and those any
        foreign-key action may follow to: what it does is not parsed."""
        tables = text_dml_tables(sql, self.core.models.known())
        return tables | referential_actions().written_by(tables, deletes=True, updates=True)

    def _seen_by_session(
        self,
        conn: Connection,
        context: Any,
        statement: Any,
        returned: list[tuple[Any, ...]] | None,
    ) -> bool:
        """Whether a session's hooks already know the rows a DML statement on ``conn``
        wrote: an ORM statement ``do_orm_execute`` marked (it carries
        :attr:`marked_option`), or, while a flush runs in the session that holds
        ``conn`` (between its ``before_flush`` and ``after_flush``), a statement of its
        unit of work (persistence.py gives each a ``compiled_cache`` option) or an
        ``UPDATE`` a mapper event runs that wrote only rows the flush writes, as the
        write-through capture read them back (``returned``: their primary keys; the
        captured row replaces the flush's). Anything else is marked here as on any other
        connection, and finished when the connection goes back to the pool: Core DML the
        application runs on the session's connection (also of ``update(Model)``),
        ``bulk_save_objects`` and bulk mappings (no flush events), and DML a mapper event
        runs during a flush on rows the flush's hooks cannot name (another table, another
        row of the same table, or rows no capture read)."""
        options = context.execution_options
        if options.get(self.marked_option):
            return True
        session = self._session_of(conn)
        if session is None:
            return False
        state = peek_transaction_state(session)
        flush = None if state is None or state.flushing is None else state.flushing()
        # a bulk operation runs the same statements, with no flush: its rows are not known
        if flush is None or not compat.is_flushing(session):
            return False
        if options.get("compiled_cache") is not None:
            return True
        assert state is not None
        target = compat.dml_table(statement)
        return (
            returned is not None
            and target is not None
            and self.invalidation.flush_writes_rows(state, target.fullname, returned)
        )

    def session_began(self, session: Session, conn: Connection) -> None:
        """``session``'s transaction runs on ``conn`` from now on. What the connection's
        open transaction wrote before (Core DML, an earlier session joined to it) is a
        write of the session's transaction too: its reads see it in the database."""
        self.session_connections[conn] = weakref.ref(session)
        info = conn.info
        pending: tuple[str, set[str]] | None = info.get(self._pending_key)
        written = set() if pending is None else set(pending[1])
        for _, tables in info.get(self._handed_key, ()):
            written |= tables
        if written:
            transaction_state(session).dml.update(written)

    def note_bound_writes(self, session: Session) -> None:
        """Before a read of ``session``, bound to a connection (``Session(bind=connection)``,
        the recipe that joins sessions to the application's transaction): what that
        connection's open transaction wrote is a write of the session's transaction, also
        when the session has not begun on it yet (its reads so far were cache hits, which
        take no connection), as :meth:`session_began` makes it once it has.

        A session that has not begun on it begins now, as the read would on a miss: its
        lookup must already know (on a miss, its database read sees the uncommitted rows,
        and its fill would be kept out only by the writer mark, which an application
        transaction longer than the mark's life, 60 s, outlives)."""
        bind = session.bind
        if not isinstance(bind, Connection) or bind.closed or bind.invalidated:
            return
        info = bind.info
        pending: tuple[str, set[str]] | None = info.get(self._pending_key)
        handed = info.get(self._handed_key)
        if pending is None and not handed:
            return
        if session.in_transaction():
            written = transaction_state(session).dml
            if pending is not None:
                written.update(pending[1])
            for _, tables in handed or ():
                written.update(tables)
        elif not compat.refuses_autobegin(session):
            session.connection()  # after_begin: session_began takes the tables

    def _session_of(self, conn: Connection) -> Session | None:
        """The session whose transaction runs on ``conn``, if any."""
        found = self.session_connections.get(conn)
        return None if found is None else found()

    def finish_on_checkin(self, conn: Connection, token: str, tables: set[str]) -> None:
        """Finish a session's writes of ``tables`` (marked under ``token``) as Core DML on
        ``conn`` is finished: when the connection goes back to the pool, after the
        transaction the application holds on it committed or rolled back. For a session
        joined to that transaction, whose commit committed nothing
        (:func:`~sa_redis_cache.compat.uncommitted_connections`)."""
        self.register(conn.engine)  # its pool's checkin must reach this cache
        handed: list[tuple[str, set[str]]] = conn.info.setdefault(self._handed_key, [])
        handed.append((token, set(tables)))

    def commit_work(self, conn: Connection) -> Callable[[], None] | None:
        """The connection commits: the post-commit bump, the marks' release and the local
        tiers' fences run once the database committed, before ``commit()`` returns
        (:mod:`~sa_redis_cache.commit_first`), not when the connection goes back to the
        pool. With commit-as-you-go (``conn.commit()`` on a connection kept open) the
        pool may get it back much later, and until then another process's local tier
        could serve the rows as they were before the commit. A COMMIT that fails leaves
        them to the pool's checkin, as a rollback does."""
        info = conn.info
        if self._pending_key not in info and not info.get(self._handed_key):
            return None
        return lambda: self._finish(info)

    def checkin(self, dbapi_connection: Any, connection_record: Any) -> None:
        """The connection's transaction is over: bump the versions, release the marks."""
        self._finish(connection_record.info)

    def _finish(self, info: dict[Any, Any]) -> None:
        changed_views = info.pop(_VIEWS_CHANGED, None)
        if changed_views is not None:
            self.core.binds.forget_pool(changed_views)
        pending = info.pop(self._pending_key, None)
        if pending is not None:
            token, marked = pending
            self.invalidation.finish_bulk(token, marked)
        for token, tables in info.pop(self._handed_key, ()):
            self.invalidation.finish_bulk(token, tables)
