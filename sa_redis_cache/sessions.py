"""The one place session events are registered, and the order the strategies run in.

``cache.attach(factory)`` registers each event below once on the factory's session class,
and each calls the read path and the strategies in the order written here:

``do_orm_execute``
    A SELECT: first the autoflush the statement asks for (SQLAlchemy's own comes after
    these hooks, too late for an answer from the cache), then write-behind (a row's
    queued, unflushed state wins over any cached entry or database row), then the read
    path (``FromCache``, the entity cache). ORM bulk
    ``update()``/``delete()``/``insert()``: the cache-aside protocol marks the table.
``after_begin``
    The connection becomes the session's (Core DML on it is the session's business, not
    the engine listeners'); under REPEATABLE READ or SERIALIZABLE the read path pins the
    versions before the transaction's snapshot.
``before_flush``
    Write-behind takes its rows out of the flush (they are queued at commit instead).
``after_flush``
    Cache-aside marks every table and row the flush wrote, before the database commit,
    keeping write-through states for later.
``after_transaction_create``
    A savepoint gets a frame of its own (:mod:`sa_redis_cache.transaction`).
``before_commit``
    The outermost commit began: from here its COMMIT may reach the database even if
    ``commit()`` raises.
``after_commit``
    A savepoint's release merges its frame into its parent. The outermost commit runs
    cache-aside's post-commit work (bumps, write-through, announcements) before
    ``commit()`` returns.
``after_rollback``
    A savepoint's rollback drops its frame: write-through states are forgotten and
    write-behind objects reverted. The transaction's reverts them all (deleted objects
    come back, as SQLAlchemy's snapshot restores them right after).
``after_transaction_end``
    The outermost transaction is over. Committed: write-behind queues its operations,
    after the ordinary rows' cache work (so a commit that mixes both has invalidated the
    ordinary rows first); raised here, when SQLAlchemy has closed the transaction, so the
    session stays usable after :class:`~sa_redis_cache.CacheUnavailableError`. Rolled
    back (or closed without a rollback): the writer marks are released and write-behind
    objects left in the session reverted. A ``commit()`` that began and raised (its
    COMMIT's outcome unknown) releases them with a commit's bump instead.

Example::

    hooks = SessionHooks(core, reads, invalidation, write_behind, engine_writes)
    hooks.register(Session)   # what Cache.attach() does

The session class's ``get``, ``execute``, ``scalars`` and ``scalar`` are also given a fast
path (:meth:`SessionHooks.install_direct_reads`): a plain ``session.get`` whose row the
entity cache holds, or a ``FromCache`` statement whose entry it holds (in the local tier,
or in Redis), is built without SQLAlchemy's execute pipeline; everything else goes on to
SQLAlchemy's method and through the events above.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from . import compat
from .breaker import CLOSED
from .reads import from_cache_in
from .reads.flow import reads_directly
from .transaction import peek_transaction_state, transaction_state

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState, UOWTransaction

    from .context import CacheContext
    from .engine_writes import EngineWrites
    from .reads import ReadPath
    from .strategies.cache_aside import Invalidation
    from .strategies.write_behind.session import WriteBehind

# what AsyncSession adds to the execution options of every execute, scalars and scalar:
# a result served from the cache is buffered already
_ASYNC_EXECUTE_OPTIONS = {"prebuffer_rows": True}
# keyword arguments a plain call may carry at their defaults (None, empty): what
# AsyncSession and scoped_session pass on for the arguments their callers left out
_EXECUTE_KEYWORDS = frozenset(("bind_arguments", "_parent_execute_state", "_add_event"))
_GET_KEYWORDS = frozenset(
    (
        "options",
        "populate_existing",
        "with_for_update",
        "identity_token",
        "execution_options",
        "bind_arguments",
    )
)


def plain_execute(kw: dict[str, Any]) -> bool:
    """Whether ``execute``/``scalars``/``scalar`` keyword arguments leave the read as a
    call with the statement alone would be: none, or the defaults ``AsyncSession`` and
    ``scoped_session`` pass on (no bind arguments, no execution options but
    ``prebuffer_rows``).

    Example::

        >>> plain_execute({"execution_options": {"prebuffer_rows": True}, "bind_arguments": None})
        True
        >>> plain_execute({"execution_options": {"populate_existing": True}})
        False
    """
    for name, value in kw.items():
        if name == "execution_options":
            if value and dict(value) != _ASYNC_EXECUTE_OPTIONS:
                return False
        elif name not in _EXECUTE_KEYWORDS or value:
            return False
    return True


def plain_get(kw: dict[str, Any]) -> bool:
    """Whether ``get`` keyword arguments leave the load as ``session.get(entity, ident)``
    would be: none, or each given as its default (as ``AsyncSession.get`` and
    ``scoped_session.get`` pass them).

    Example::

        >>> plain_get({"options": None, "populate_existing": False, "execution_options": {}})
        True
        >>> plain_get({"populate_existing": True})
        False
    """
    return all(name in _GET_KEYWORDS and not value for name, value in kw.items())


log = logging.getLogger(__name__)

# SQLAlchemy's own, even once a class's methods are replaced
_SESSION_GET = Session.get
_SESSION_EXECUTE = Session.execute
_SESSION_SCALARS = Session.scalars
_SESSION_SCALAR = Session.scalar
_SQLALCHEMY_READS: dict[str, Any] = {
    "get": _SESSION_GET,
    "execute": _SESSION_EXECUTE,
    "scalars": _SESSION_SCALARS,
    "scalar": _SESSION_SCALAR,
}

EVENTS = (
    "do_orm_execute",
    "after_begin",
    "before_flush",
    "after_flush",
    "after_transaction_create",
    "before_commit",
    "after_commit",
    "after_rollback",
    "after_transaction_end",
)
"""The session events the cache listens to, each registered once per session class."""


class SessionHooks:
    """Dispatches one cache's session events to the read path and the strategies."""

    def __init__(
        self,
        core: CacheContext,
        reads: ReadPath,
        invalidation: Invalidation,
        write_behind: WriteBehind,
        engine_writes: EngineWrites,
    ) -> None:
        self.core = core
        self.reads = reads
        self.invalidation = invalidation
        self.write_behind = write_behind
        self.engine_writes = engine_writes
        # (class, method name, the method set) install_direct_reads replaced
        self._replaced: list[tuple[type[Session], str, Any]] = []
        # the application's do_orm_execute listeners found after the cache's (warned once)
        self._warned_listeners: set[object] = set()

    def register(self, session_class: Any) -> None:
        """Listen on ``session_class`` (a sessionmaker or Session subclass), once per event."""
        for name in EVENTS:
            self.core.listen(session_class, name, getattr(self, name))
        self.install_direct_reads(getattr(session_class, "class_", session_class))

    def install_direct_reads(self, session_class: type[Session]) -> None:
        """Give ``session_class`` a ``get``, ``execute``, ``scalars`` and ``scalar`` that
        serve cache hits before SQLAlchemy's execute pipeline.

        ``get``: entity-cache hits (:meth:`EntityReads.direct_get
        <sa_redis_cache.reads.entities.EntityReads.direct_get>`); the others: hits of a
        ``FromCache`` statement (:meth:`ReadPath.direct_read
        <sa_redis_cache.reads.ReadPath.direct_read>`). Only in a session
        :func:`~sa_redis_cache.reads.flow.reads_directly` allows, and only where the
        method is SQLAlchemy's own: an application's override is left alone (its reads
        still use the cache, through the pipeline). A call with parameters or keyword
        arguments that change the read (anything but what ``AsyncSession`` passes by
        default: :func:`plain_execute`, :func:`plain_get`), or that the cache cannot
        answer, is SQLAlchemy's.
        """
        reads = self.reads
        flow = reads.flow
        direct_get = reads.entities.direct_get
        direct_read = reads.direct_read
        serves_queued = self.write_behind.serves_queued

        breaker = reads.core.breaker
        note_bound_writes = self.engine_writes.note_bound_writes

        def read(session: Session, statement: Any) -> Result[Any] | None:
            option = from_cache_in(getattr(statement, "_with_options", ()))
            # while Redis is out the pipeline's read goes to the database: nothing to check
            if option is None or breaker.state is not CLOSED or not reads_directly(session):
                return None
            note_bound_writes(session)
            mapper = compat.statement_subject_mapper(statement)
            if mapper is None or serves_queued(mapper):
                return None  # a write-behind row's queued state comes first
            return direct_read(session, statement, option, mapper)

        def fallback(method: Any, session: Session, *args: Any, **kw: Any) -> Any:
            try:
                return method(session, *args, **kw)
            finally:
                # a look the pipeline did not take (it returned before the read: the
                # breaker opened, another thread left the table undelivered, an error) is
                # a past look: a later read of the key must not start from it
                flow.drop_handed()

        @functools.wraps(Session.get)
        def get(session: Session, entity: Any, ident: Any, **kw: Any) -> Any:
            if kw and not plain_get(kw):
                return _SESSION_GET(session, entity, ident, **kw)
            note_bound_writes(session)
            hit, found = direct_get(session, entity, ident)
            return found if hit else fallback(_SESSION_GET, session, entity, ident, **kw)

        def statement_reader(method: Any, finish: Callable[[Result[Any]], Any]) -> Any:
            """SQLAlchemy's ``method`` (execute, scalars, scalar), a hit answered first;
            ``finish`` turns the hit's result into what ``method`` returns."""

            @functools.wraps(method)
            def reader(session: Session, statement: Any, params: Any = None, **kw: Any) -> Any:
                if params is not None or (kw and not plain_execute(kw)):
                    return method(session, statement, params, **kw)
                result = read(session, statement)
                if result is not None:
                    return finish(result)
                return fallback(method, session, statement, **kw)

            return reader

        execute = statement_reader(_SESSION_EXECUTE, lambda result: result)
        scalars = statement_reader(_SESSION_SCALARS, lambda result: result.scalars())
        scalar = statement_reader(_SESSION_SCALAR, lambda result: result.scalar())

        for name, method in (
            ("get", get),
            ("execute", execute),
            ("scalars", scalars),
            ("scalar", scalar),
        ):
            if getattr(session_class, name) is _SQLALCHEMY_READS[name]:
                setattr(session_class, name, method)
                self._replaced.append((session_class, name, method))

    def uninstall_direct_reads(self) -> None:
        """Give back SQLAlchemy's methods to every class :meth:`install_direct_reads`
        changed."""
        while self._replaced:
            session_class, name, method = self._replaced.pop()
            if vars(session_class).get(name) is not method:
                continue  # replaced again since, by the application: its own now
            if session_class is Session:
                setattr(Session, name, _SQLALCHEMY_READS[name])
            else:
                delattr(session_class, name)

    def do_orm_execute(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """Serve a SELECT from the cache when it may; mark a bulk statement's tables."""
        if orm_context.is_select:
            if compat.refuses_autobegin(orm_context.session):
                # Session(autobegin=False) outside session.begin(): SQLAlchemy raises
                # "Autobegin is disabled" when it goes on to the database, as it must
                # for a read the cache could answer too
                return None
            self.engine_writes.note_bound_writes(orm_context.session)
            listeners = orm_context.session.dispatch.do_orm_execute
            if len(listeners) > 1:
                self._warn_of_later_listeners(listeners)
            if compat.autoflush_requested(orm_context):
                # SQLAlchemy autoflushes only after these hooks, when none answered: an
                # answer from a queued state or an entry must see what the flush would
                # write first (a pending object found, a deleted one gone)
                compat.autoflush_pending(orm_context.session)
            served = self.write_behind.serve_queued(orm_context)
            if served is None:
                served = self.reads.on_execute(orm_context)
            return None if served is None else compat.honour_tuples(served, orm_context)
        if orm_context.is_update or orm_context.is_delete or orm_context.is_insert:
            state = transaction_state(orm_context.session)
            if self.invalidation.mark_bulk_statement(orm_context, state):
                # its Core statement, seen at the engine, is marked already
                orm_context.update_execution_options(**{self.engine_writes.marked_option: True})
        return None

    def _warn_of_later_listeners(self, listeners: Any) -> None:
        """Log, once per listener, an application ``do_orm_execute`` listener that runs after
        the cache's: SQLAlchemy stops at the first listener that returns a result, so it
        does not see a hit, and what it would add to a select (``with_loader_criteria``
        for a tenant) is not in the cache key: a result cached without it is served."""
        ours = self.do_orm_execute
        after_ours = False
        for listener in listeners:
            if not after_ours:
                after_ours = listener == ours
                continue
            code = _listener_code(listener)
            if code in self._warned_listeners or len(self._warned_listeners) >= _MAX_WARNED:
                continue
            self._warned_listeners.add(code)
            name = getattr(listener, "__qualname__", repr(listener))
            module = getattr(listener, "__module__", "")
            described = f"{module}.{name}" if module else name
            log.warning(
                "do_orm_execute listener %s runs after the cache's (registered after "
                "cache.attach(), or on a session): it does not see cached reads, and what "
                "it changes in a select (with_loader_criteria for a tenant, an added "
                "FromCache) does not reach the cache, which may serve a result made "
                "without it. Register it on the session factory or class before "
                "cache.attach()",
                described,
            )

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """The connection is the session's; pin versions before a repeatable snapshot."""
        engine_writes = self.engine_writes
        engine_writes.session_began(session, connection)
        # an engine the factory did not name at attach() (binds=..., configure(bind=...)):
        # its Core, textual and bulk-mapping DML must be seen from this statement on
        engine_writes.register(connection.engine)
        self.reads.on_begin(session, transaction, connection)

    def before_flush(self, session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        """Write-behind rows leave the flush; the marks of what remains are sent."""
        state = transaction_state(session)
        state.flushing = weakref.ref(flush_context)
        self.write_behind.divert(session, state)
        self.invalidation.premark_flush(session, state)

    def after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        """Mark what the flush wrote, before the database commit."""
        state = transaction_state(session)
        state.flushing = None
        self.invalidation.mark_flush(session, state)

    def after_transaction_create(self, session: Session, transaction: Any) -> None:
        """A savepoint gets a frame of its own."""
        if transaction.nested:
            # a state made now counts the savepoints already open, not this new one
            transaction_state(session).push()

    def before_commit(self, session: Session) -> None:
        """The outermost commit begins: see :meth:`after_transaction_end`."""
        state = peek_transaction_state(session)
        if state is not None and not session.in_nested_transaction():
            state.commit_began = True

    def after_commit(self, session: Session) -> None:
        """A savepoint's release merges; the outermost commit applies the invalidations."""
        state = peek_transaction_state(session)
        if state is None:
            return
        if session.in_nested_transaction():
            state.release()
            return
        joined = state.joined
        if joined is not None and not joined.in_transaction():
            # the session began the connection's transaction itself, and its commit was
            # the database's: its write-behind is queued now, as any session's
            state.joined = None
        if state.marked:
            uncommitted = compat.uncommitted_connections(session)
            if uncommitted:
                # joined to the application's transaction: the database has committed
                # nothing yet, and may roll back; the marks hold until that ends, on each
                # connection (each checkin bumps again: the last one is what counts)
                for connection in uncommitted:
                    self.engine_writes.finish_on_checkin(connection, state.token, state.marked)
                state.marked = set()
            else:
                self.invalidation.apply(state)
        state.committed = True

    def after_rollback(self, session: Session) -> None:
        """A rollback reverts the write-behind objects of what it undid: a savepoint's drops
        its frame; the transaction's empties them all (queued nothing at its end)."""
        state = peek_transaction_state(session)
        if state is None:
            return
        if not session.in_nested_transaction():
            # here, where SQLAlchemy restores its own snapshot right after: close() rolls
            # back without this event, having expunged every object, deleted ones included
            for undone in state.frames:
                self.write_behind.revert(
                    session, undone.queued.values(), None, undone.removed, rollback=True
                )
                undone.queued.clear()
                undone.removed.clear()
            return
        frame = state.discard()
        if frame is not None:
            self.write_behind.revert(
                session, frame.queued.values(), state, frame.removed, rollback=True
            )

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        """The outermost transaction is over: queue its write-behind rows, or release."""
        state = peek_transaction_state(session)
        if state is None:
            return
        # a flush ends its own subtransaction here, also when its statements failed
        state.flushing = None
        if transaction.nested or transaction.parent is not None:
            return
        # replies still unread: the post-commit work's (commit() returns after them), and
        # the marks of a flush that failed
        self.invalidation.settle_posted(state)
        self.invalidation.settle_premark(state)
        committed, token, marked = state.committed, state.token, state.marked
        uncertain = state.commit_began and not committed
        queued = list(state.frames[0].queued.values())
        removed = list(state.frames[0].removed)
        joined = state.joined
        state.reset()
        # joined in rollback_only mode and closed without a rollback: the flushed rows stay
        # in the application's transaction, which may commit them yet
        left_open = [] if committed else compat.connections_left_open(transaction)
        if not committed:
            if marked and left_open:
                # the marks hold, and the bump comes, when that transaction ends, as at a
                # joined session's commit (after_commit); released now, a read before the
                # application's commit could fill the rows as they were, served after it
                for connection in left_open:
                    self.engine_writes.finish_on_checkin(connection, token, marked)
            elif marked and uncertain:
                # commit() raised after it began (a connection lost or a task cancelled
                # while Postgres ran the COMMIT, or during the post-commit work): the
                # database may have committed, so the marks go with a commit's bump, not
                # unbumped as a rollback's (a read made before the COMMIT could otherwise
                # be filled as current)
                self.invalidation.finish_uncertain(token, marked)
            elif marked:
                self.invalidation.release(token, marked)
            if queued and joined is not None and joined in left_open:
                # as the flushed rows of the other strategies: the application's commit
                # queues them, its rollback drops them (strategies/write_behind/joined.py)
                self.write_behind.hand_over(joined, queued)
            else:
                self.write_behind.revert(session, queued, None)
        elif queued and joined is not None:
            self.write_behind.hand_over(joined, queued)
            self.write_behind.keep_committed(session, queued)
        elif queued:
            self.write_behind.queue_commit(session, queued, removed)


# listeners warned of at most (by code, so in practice the application's few functions)
_MAX_WARNED = 256


def _listener_code(listener: Any) -> object:
    """What names a ``do_orm_execute`` listener for its one warning: its code, so that a
    listener made per session (a closure, a ``functools.partial`` of one function, a bound
    method or a callable object of one class) is one listener. Keyed by the listener
    object itself, a partial or a callable object registered on each session was warned
    of again and kept alive, with whatever it holds, for every session."""
    seen = 0
    while isinstance(listener, functools.partial) and seen < 8:
        listener = listener.func
        seen += 1
    listener = getattr(listener, "__func__", listener)
    code = getattr(listener, "__code__", None)
    if code is not None:
        return code
    return type(listener)
