"""Work that must follow a connection's database commit before its ``commit()`` returns.

SQLAlchemy sends its ``commit`` event before its own COMMIT, and no event after it. Work
that needs the database committed first (the post-commit bump of Core DML and the local
tiers' fences, :mod:`~sa_redis_cache.engine_writes`; the write-behind operations of joined
sessions, :mod:`~sa_redis_cache.strategies.write_behind.joined`) therefore commits the
database itself from that event (:func:`~sa_redis_cache.compat.commit_now`); SQLAlchemy's
COMMIT that follows finds nothing to commit.

One listener per engine commits once for every participant, then runs each one's work. Two
listeners would not do: the first one's failed COMMIT is raised before the second runs,
and the second would keep what it gathered for a transaction that never committed. Here a
participant gathers its work (and lets go of its state) before the COMMIT, and a COMMIT
that fails runs none of it. The listener sits on the engine that owns the pool, so that
connections of an ``engine.execution_options(...)`` copy reach the same one.

Example::

    commit_first.join(engine, participant)   # participant.commit_work(connection)
    ...
    commit_first.leave(engine, participant)
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import event

from . import compat

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Connection, Engine


class Participant(Protocol):
    """Something with work to run once a connection's database commit succeeded."""

    def commit_work(self, connection: Connection) -> Callable[[], None] | None:
        """The work to run after ``connection``'s database commit, or None; called before
        the COMMIT, once per commit (state kept for the transaction is let go of here)."""
        ...


_participants: weakref.WeakKeyDictionary[Engine, list[Participant]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def join(engine: Engine, participant: Participant) -> None:
    """Run ``participant``'s work after each commit of ``engine``'s connections."""
    root = compat.root_engine(engine)
    with _lock:
        joined = _participants.get(root)
        if joined is None:
            joined = _participants[root] = []
            event.listen(root, "commit", _committing)
        if participant not in joined:
            joined.append(participant)


def leave(engine: Engine, participant: Participant) -> None:
    """Stop running ``participant``'s work; the listener goes with the last one."""
    root = compat.root_engine(engine)
    with _lock:
        joined = _participants.get(root)
        if joined is None or participant not in joined:
            return
        joined.remove(participant)
        if not joined:
            del _participants[root]
            if event.contains(root, "commit", _committing):
                event.remove(root, "commit", _committing)


def _committing(connection: Connection) -> None:
    with _lock:
        joined = list(_participants.get(compat.root_engine(connection.engine), ()))
    work = [found for participant in joined if (found := participant.commit_work(connection))]
    if not work:
        return
    # the database first; SQLAlchemy's own COMMIT that follows finds nothing to commit
    compat.commit_now(connection)
    # every participant's work is run before one failure is raised: none keeps another's back
    raise_first([exc for run in work if (exc := _run(run)) is not None])


def raise_first(failed: list[Exception]) -> None:
    """Raise the first of ``failed``, if any (each was tried before any is raised).

    Example::

        raise_first([exc for owner in owners if (exc := queue(owner))])
    """
    if failed:
        error = failed[0]
        failed.clear()
        try:
            raise error
        finally:
            # no cycle through this frame: its traceback holds the Redis connections of
            # the failed call, whose sockets would wait for the garbage collector
            del error


def _run(work: Callable[[], None]) -> Exception | None:
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - raised by the caller, after the others ran
        return exc
    return None
