"""The one place session events are registered, and the order the strategies run in.

``cache.attach(factory)`` registers each event below once on the factory's session class,
and each calls the read path and the strategies in the order written here:

``do_orm_execute``
    A SELECT: write-behind first (a row's queued, unflushed state wins over any cached
    entry or database row), then the read path (``FromCache``, the entity cache). ORM bulk
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
``after_commit``
    A savepoint's release merges its frame into its parent. The outermost commit runs
    cache-aside's post-commit work (bumps, write-through, announcements) before
    ``commit()`` returns.
``after_rollback``
    A savepoint's rollback drops its frame: write-through states are forgotten and
    write-behind objects reverted.
``after_transaction_end``
    The outermost transaction is over. Committed: write-behind queues its operations,
    after the ordinary rows' cache work (so a commit that mixes both has invalidated the
    ordinary rows first); raised here, when SQLAlchemy has closed the transaction, so the
    session stays usable after :class:`~sa_redis_cache.CacheUnavailableError`. Rolled
    back: the writer marks are released and write-behind objects reverted.

Example::

    hooks = SessionHooks(core, reads, invalidation, write_behind, engine_writes)
    hooks.register(Session)   # what Cache.attach() does

The session class's ``get`` is also given a fast path (:meth:`SessionHooks.install_get`):
a plain ``session.get`` whose row the entity cache holds (in the local tier, or in Redis)
is built without SQLAlchemy's execute pipeline; everything else goes on to ``Session.get``
and through the events above.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from .transaction import peek_transaction_state, transaction_state

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState, UOWTransaction

    from .context import CacheContext
    from .engine_writes import EngineWrites
    from .reads import ReadPath
    from .strategies.cache_aside import Invalidation
    from .strategies.write_behind.session import WriteBehind

_SESSION_GET = Session.get  # SQLAlchemy's own, even once a class's get is replaced

EVENTS = (
    "do_orm_execute",
    "after_begin",
    "before_flush",
    "after_flush",
    "after_transaction_create",
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
        self._gets: list[type[Session]] = []

    def register(self, session_class: Any) -> None:
        """Listen on ``session_class`` (a sessionmaker or Session subclass), once per event."""
        for name in EVENTS:
            self.core.listen(session_class, name, getattr(self, name))
        self.install_get(getattr(session_class, "class_", session_class))

    def install_get(self, session_class: type[Session]) -> None:
        """Give ``session_class`` a ``get`` that serves entity-cache hits directly.

        Only a class whose ``get`` is SQLAlchemy's own: an application's override is left
        alone (its gets still use the cache, through the execute pipeline). A call with
        any keyword argument, or that the cache cannot answer, is ``Session.get``'s
        (:meth:`~sa_redis_cache.reads.entities.EntityReads.direct_get`).
        """
        if session_class.get is not _SESSION_GET:
            return
        entities = self.reads.entities
        direct_get = entities.direct_get

        @functools.wraps(Session.get)
        def get(session: Session, entity: Any, ident: Any, **kw: Any) -> Any:
            if kw:
                return _SESSION_GET(session, entity, ident, **kw)
            hit, found = direct_get(session, entity, ident)
            if hit:
                return found
            try:
                return _SESSION_GET(session, entity, ident)
            finally:
                # a look the pipeline did not take (it returned before the read: the
                # breaker opened, another thread left the table undelivered, an error) is
                # a past look: a later read of the key must not start from it
                entities.drop_handed()

        setattr(session_class, "get", get)  # noqa: B010 - a method, replaced on purpose
        self._gets.append(session_class)

    def uninstall_gets(self) -> None:
        """Give back SQLAlchemy's ``get`` to every class :meth:`install_get` changed."""
        while self._gets:
            session_class = self._gets.pop()
            if session_class is Session:
                Session.get = _SESSION_GET  # type: ignore[method-assign]
            elif "get" in vars(session_class):
                delattr(session_class, "get")

    def do_orm_execute(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """Serve a SELECT from the cache when it may; mark a bulk statement's tables."""
        if orm_context.is_select:
            queued = self.write_behind.serve_queued(orm_context)
            if queued is not None:
                return queued
            return self.reads.on_execute(orm_context)
        if orm_context.is_update or orm_context.is_delete or orm_context.is_insert:
            state = transaction_state(orm_context.session)
            self.invalidation.mark_bulk_statement(orm_context, state)
        return None

    def after_begin(self, session: Session, transaction: Any, connection: Any) -> None:
        """The connection is the session's; pin versions before a repeatable snapshot."""
        self.engine_writes.session_connections.add(connection)
        self.reads.on_begin(session, transaction, connection)

    def before_flush(self, session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        """Write-behind rows leave the flush; the marks of what remains are sent."""
        state = transaction_state(session)
        self.write_behind.divert(session, state)
        self.invalidation.premark_flush(session, state)

    def after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        """Mark what the flush wrote, before the database commit."""
        self.invalidation.mark_flush(session, transaction_state(session))

    def after_transaction_create(self, session: Session, transaction: Any) -> None:
        """A savepoint gets a frame of its own."""
        if transaction.nested:
            # a state made now counts the savepoints already open, not this new one
            transaction_state(session).push()

    def after_commit(self, session: Session) -> None:
        """A savepoint's release merges; the outermost commit applies the invalidations."""
        state = peek_transaction_state(session)
        if state is None:
            return
        if session.in_nested_transaction():
            state.release()
            return
        if state.marked:
            self.invalidation.apply(state)
        state.committed = True

    def after_rollback(self, session: Session) -> None:
        """A savepoint's rollback drops its frame and reverts its write-behind objects."""
        state = peek_transaction_state(session)
        if state is None or not session.in_nested_transaction():
            return
        frame = state.discard()
        if frame is not None:
            self.write_behind.revert(session, frame.queued.values(), state)

    def after_transaction_end(self, session: Session, transaction: Any) -> None:
        """The outermost transaction is over: queue its write-behind rows, or release."""
        if transaction.nested or transaction.parent is not None:
            return
        state = peek_transaction_state(session)
        if state is None:
            return
        # replies still unread: the post-commit work's (commit() returns after them), and
        # the marks of a flush that failed
        self.invalidation.settle_posted(state)
        self.invalidation.settle_premark(state)
        committed, token, marked = state.committed, state.token, state.marked
        queued = list(state.frames[0].queued.values())
        state.reset()
        if not committed:
            if marked:
                self.invalidation.release(token, marked)
            self.write_behind.revert(session, queued, None)
        elif queued:
            self.write_behind.queue_commit(session, queued)
