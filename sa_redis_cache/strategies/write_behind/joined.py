"""Write-behind of sessions joined to a transaction the application holds on a connection.

SQLAlchemy's "join a session into an external transaction" recipe (``Session(bind=
connection, join_transaction_mode=...)``, what test suites use to roll back after each
test) gives sessions whose ``commit()`` commits nothing: the database commits when the
application commits the connection's transaction, if it does. Their write-behind
operations follow that transaction, not the session:

* At flush, each operation is tagged with the savepoints open on the connection then
  (:func:`watch`): a rollback to any of them undoes it, before or after the session's
  commit, as it would undo the row's SQL in plain SQLAlchemy.
* At the session's commit they are handed to the connection (:func:`hand_over`); until the
  application's commit, the transaction's other sessions read them by primary key
  (:func:`handed_op`), nobody else does.
* At the application's commit (SQLAlchemy's ``commit`` event, which runs before the
  database's), the database is committed first, then every cache's operations are queued
  (:class:`_Committing`, through :mod:`sa_redis_cache.commit_first`), the order of a
  session's own commit: a COMMIT that fails queues nothing. A rollback drops them.

One participant per engine serves every cache on it, so that one cache's failure does not
keep another's operations from being queued. State is kept by ``Connection`` object,
weakly, and never read from the connection: one the database dropped refuses even a look
at its ``info`` until it is rolled back.

Example::

    conn = joined_connection(session, mapper)          # None unless joined
    op.savepoints = watch(write_behind, conn)          # at flush
    hand_over(write_behind, conn, ops)                 # at the session's commit
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, TwoPhaseTransaction

from sa_redis_cache import commit_first, compat
from sa_redis_cache.errors import CacheUnavailableError, ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Mapper, Session

    from .session import Op, WriteBehind


@dataclass(slots=True)
class _Transaction:
    """What the application's transaction on one connection holds for write-behind."""

    undone: set[str] = field(default_factory=set)  # savepoints rolled back in it
    handed: list[tuple[WriteBehind, list[Op]]] = field(default_factory=list)


_transactions: weakref.WeakKeyDictionary[Connection, _Transaction] = weakref.WeakKeyDictionary()
# the caches that follow transactions on each engine; its listeners go with the last one
_users: weakref.WeakKeyDictionary[Engine, weakref.WeakSet[WriteBehind]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()
_EVENTS = ("rollback", "rollback_savepoint")


def joined_connection(session: Session, mapper: Mapper[Any]) -> Connection | None:
    """The connection ``mapper``'s rows of ``session`` are written through when it is one
    the application holds in a transaction (the session's commit commits nothing there);
    None otherwise, and for an AUTOCOMMIT connection, whose statements commit each.

    Raises :class:`~sa_redis_cache.errors.ConfigurationError` for a two-phase transaction
    (``connection.begin_twophase()``): its commit (``COMMIT PREPARED``) gives no point at
    which the database has committed and the operations could still be queued, and queued
    before it they would be written for a transaction that may yet roll back."""
    bind = session.get_bind(mapper=mapper)
    if isinstance(bind, Connection) and bind.in_transaction() and not compat.is_autocommit(bind):
        if isinstance(bind.get_transaction(), TwoPhaseTransaction):
            raise ConfigurationError(
                f"write-behind: {mapper.class_.__name__} rows were flushed by a session "
                "joined to a two-phase transaction (connection.begin_twophase()), whose "
                "commit leaves no moment to queue them after the database commits; nothing "
                "was flushed or queued. Write these rows from a session with its own "
                "transaction, or give the "
                "model write_through or cache_aside"
            )
        return bind
    return None


def watch(write_behind: WriteBehind, connection: Connection) -> frozenset[str]:
    """Follow ``connection``'s transaction for ``write_behind``; the savepoints open on
    it now, the tags of the operations a flush diverts now."""
    engine = connection.engine
    with _lock:
        users = _users.get(engine)
        if users is None:
            users = _users[engine] = weakref.WeakSet()
            for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
                event.listen(engine, name, listener)
            commit_first.join(engine, _COMMITTING)
        users.add(write_behind)
        _transactions.setdefault(connection, _Transaction())
    return compat.enclosing_savepoints(connection)


def hand_over(write_behind: WriteBehind, connection: Connection, ops: list[Op]) -> None:
    """A joined session committed ``ops``: queue them at the application's commit, but
    not those a savepoint rollback undid since their flush."""
    with _lock:
        transaction = _transactions.setdefault(connection, _Transaction())
        kept = [found for op in ops if (found := surviving(op, transaction.undone))]
        if kept:
            transaction.handed.append((write_behind, kept))


def surviving(op: Op, undone: set[str] | frozenset[str]) -> Op | None:
    """What the transaction keeps of a row's write ``op`` once the savepoints ``undone``
    are rolled back: ``op``, or the newest write it replaced (:attr:`Op.earlier`) that no
    such rollback undoes, or None."""
    found: Op | None = op
    while found is not None and found.savepoints & undone:
        found = found.earlier
    return found


def handed_op(write_behind: WriteBehind, bind: Any, table: str, pk: str) -> Op | None:
    """The newest operation of a row that a session joined to ``bind``'s transaction
    committed for ``write_behind``, or None."""
    transaction = _transactions.get(bind) if isinstance(bind, Connection) else None
    if transaction is None:
        return None
    for owner, ops in reversed(transaction.handed):
        if owner is write_behind:
            for op in reversed(ops):
                if op.pk == pk and op.info.table == table:
                    return op
    return None


def any_handed() -> bool:
    """Whether any transaction holds handed-over operations (a cheap first look)."""
    # no copy of the values (another thread may change them) while none is followed
    return bool(_transactions) and any(t.handed for t in list(_transactions.values()))


def pending(write_behind: WriteBehind) -> int:
    """How many operations of ``write_behind`` wait for an application's commit."""
    with _lock:
        return sum(
            len(ops)
            for transaction in _transactions.values()
            for owner, ops in transaction.handed
            if owner is write_behind
        )


def forget(write_behind: WriteBehind) -> None:
    """``write_behind``'s cache is detached: it follows no transaction any more."""
    with _lock:
        for engine, users in list(_users.items()):
            users.discard(write_behind)
            if not users:
                del _users[engine]
                for name, listener in zip(_EVENTS, _LISTENERS, strict=True):
                    if event.contains(engine, name, listener):
                        event.remove(engine, name, listener)
                commit_first.leave(engine, _COMMITTING)


class _Committing:
    """The application commits a connection's transaction: its handed operations are
    let go of now, and queued once the database committed (:mod:`.commit_first`)."""

    def commit_work(self, connection: Connection) -> Callable[[], None] | None:
        with _lock:
            transaction = _transactions.pop(connection, None)
        if transaction is None or not transaction.handed:
            return None
        by_cache: dict[WriteBehind, list[Op]] = {}
        for owner, ops in transaction.handed:
            by_cache.setdefault(owner, []).extend(ops)
        # every cache is tried before one failure is raised: none keeps another's back
        return lambda: commit_first.raise_first(
            [exc for owner, ops in by_cache.items() if (exc := _queue(owner, ops))]
        )


_COMMITTING = _Committing()


def _queue(owner: WriteBehind, ops: list[Op]) -> CacheUnavailableError | None:
    try:
        owner.queue_handed(ops)
    except CacheUnavailableError as exc:
        return exc
    return None


def _rolled_back(connection: Connection) -> None:
    with _lock:
        _transactions.pop(connection, None)


def _rolled_back_to(connection: Connection, name: str, context: Any) -> None:
    with _lock:
        transaction = _transactions.get(connection)
        if transaction is None:
            return
        transaction.undone.add(name)
        undone = frozenset((name,))
        transaction.handed = [
            (owner, kept)
            for owner, ops in transaction.handed
            if (kept := [found for op in ops if (found := surviving(op, undone))])
        ]


_LISTENERS: tuple[Callable[..., Any], ...] = (_rolled_back, _rolled_back_to)
