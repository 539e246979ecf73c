"""Per-session transaction state: what the open transaction wrote, queued until commit.

One object per session, shared by every strategy (:mod:`sa_redis_cache.sessions` drives
it). Cache work for a transaction is split in two. At flush, before the database commit,
the written tables are marked and their versions bumped (``lua/flush_mark.lua``), so no
fill that read the old rows can land, and write-behind rows are taken out of the flush.
The rest (write-through states, the final version bump, releasing the marks, queueing the
write-behind operations) waits here until the outermost commit.

Savepoints get a frame of their own: released, the frame merges into its parent; rolled
back, its write-through states and its write-behind operations are dropped (the rows were
never committed), while its marks stay until the transaction ends.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

_INFO_KEY = "sa_redis_cache.tx"


@dataclass(slots=True)
class RowWrite:
    """One written row: its write ticket and, for write-through, its new encoded state."""

    ticket: int
    state: bytes | None
    ttl: float


@dataclass(slots=True)
class TableWrites:
    """What one transaction frame wrote to one table (its invalidation and write-through)."""

    rows: dict[str, RowWrite] = field(default_factory=dict)
    bulk: bool = False
    # the database and schema the rows' entity entries live in (sa_redis_cache.binds)
    scope: str = ""

    def merge(self, newer: TableWrites) -> None:
        """Take ``newer``'s rows over ours: a later flush of a row supersedes an earlier one."""
        self.rows.update(newer.rows)
        self.bulk = self.bulk or newer.bulk
        self.scope = newer.scope or self.scope


@dataclass(slots=True)
class Frame:
    """What the transaction, or one of its savepoints, wrote.

    ``tables``: per table, for the invalidation protocol and write-through;
    ``queued``: write-behind operations by ``(table, pk text)``, the newest per row;
    ``removed``: every write-behind delete of the frame, also one a later write of its row
    replaced in ``queued`` (a rollback gives each deleted object back to the session).
    """

    tables: dict[str, TableWrites] = field(default_factory=dict)
    queued: dict[tuple[str, str], Any] = field(default_factory=dict)
    removed: list[Any] = field(default_factory=list)

    def table(self, name: str) -> TableWrites:
        """The writes of table ``name`` in this frame, created on first use."""
        found = self.tables.get(name)
        if found is None:
            found = self.tables[name] = TableWrites()
        return found


@dataclass(slots=True)
class TransactionState:
    """What one session's open transaction has written.

    ``marked`` holds the tables this transaction has flushed: reads of them go to the
    database until the transaction ends, so a transaction always sees its own writes,
    and their writer marks are released when it ends. ``dml`` holds the tables that Core,
    textual or bulk-mapping DML wrote on the session's connection: their marks are the
    connection's (:mod:`~sa_redis_cache.engine_writes`), their reads go to the database
    likewise.
    """

    token: str = field(default_factory=lambda: secrets.token_hex(8))
    marked: set[str] = field(default_factory=set)
    dml: set[str] = field(default_factory=set)
    frames: list[Frame] = field(default_factory=lambda: [Frame()])
    # REPEATABLE READ / SERIALIZABLE: the table versions captured when the transaction
    # began, before its snapshot; fills must compare against these, not later ones
    snapshot: dict[str, bytes | None] | None = None
    committed: bool = False
    # the outermost commit() began (before_commit): from then on, until after_commit, its
    # COMMIT may reach the database even if commit() raises
    commit_began: bool = False
    # Redis calls sent and not yet read (strategies/cache_aside.py): the marks sent before
    # a flush's statements ran, the post-commit work sent after the database commit
    premark: Any = None
    posted: Any = None
    # the plan of the flush running now, made before its statements, when no marks were
    # sent with it (strategies/cache_aside.py: after_flush reuses it if it still holds)
    plan: Any = None
    # the flush's write-through rows, captured from its UPDATEs (strategies/write_through)
    captures: Any = None
    # the flush between its before_flush and after_flush, weakly (a flush that its
    # before_flush listeners emptied never reaches after_flush, and is gone when it
    # returns): its unit of work's statements are the hooks' (engine_writes.py)
    flushing: Any = None
    # the connection the application holds in a transaction that the write-behind rows
    # were flushed on (a joined session, strategies/write_behind/joined.py): found at the
    # flush, kept at the commit if that left its transaction open; queued when it commits
    joined: Any = None

    @property
    def written_tables(self) -> set[str]:
        """The tables this transaction has written: flushed (``marked``), or by DML on
        its connection (``dml``)."""
        return self.marked | self.dml if self.dml else self.marked

    def frame(self) -> Frame:
        """The innermost open frame (the current savepoint's, or the transaction's)."""
        return self.frames[-1]

    def find_queued(self, table: str, pk: str) -> Any:
        """The newest write-behind operation of a row in any open frame, or None."""
        for frame in reversed(self.frames):
            op = frame.queued.get((table, pk))
            if op is not None:
                return op
        return None

    def push(self) -> None:
        """A savepoint began."""
        self.frames.append(Frame())

    def release(self) -> None:
        """The innermost savepoint was released: its writes join its parent's."""
        if len(self.frames) > 1:
            top = self.frames.pop()
            parent = self.frames[-1]
            for name, writes in top.tables.items():
                parent.table(name).merge(writes)
            parent.queued.update(top.queued)
            parent.removed.extend(top.removed)

    def discard(self) -> Frame | None:
        """The innermost savepoint was rolled back: forget its write-through states and
        return its frame (its write-behind operations are reverted by the caller).

        Its rows keep a delete at commit (harmless, and they were deleted at flush).
        """
        if len(self.frames) <= 1:
            return None
        top = self.frames.pop()
        parent = self.frames[-1]
        for name, writes in top.tables.items():
            target = parent.table(name)
            target.bulk = target.bulk or writes.bulk
            target.scope = target.scope or writes.scope
            for pk, row in writes.rows.items():
                target.rows.setdefault(pk, RowWrite(row.ticket, None, row.ttl))
        return top

    def reset(self) -> None:
        """The transaction ended; start afresh with a new token."""
        self.token = secrets.token_hex(8)
        self.marked = set()
        self.dml = set()
        self.frames = [Frame()]
        self.snapshot = None
        self.committed = False
        self.commit_began = False
        self.premark = None
        self.posted = None
        self.plan = None
        self.captures = None
        self.joined = None


def transaction_state(session: Session) -> TransactionState:
    """The state of ``session``'s current transaction, created on first use.

    Created inside savepoints (the cache was attached meanwhile), it opens a frame per
    savepoint, so that releases and rollbacks still pair up.

    Example::

        transaction_state(session).written_tables  # set() in a fresh session
    """
    info = session.info
    state: TransactionState | None = info.get(_INFO_KEY)
    if state is None:
        state = info[_INFO_KEY] = TransactionState()
        nested = session.get_nested_transaction()
        while nested is not None and nested.nested:
            state.push()
            nested = nested.parent
    return state


def peek_transaction_state(session: Session) -> TransactionState | None:
    """The state of ``session`` if any cache work happened in it, else None."""
    state: TransactionState | None = session.info.get(_INFO_KEY)
    return state
