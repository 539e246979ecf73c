"""Per-session transaction state: what the open transaction wrote, queued until commit.

Cache work for a transaction is split in two. At flush, before the database commit,
the written tables are marked and their versions bumped (see ``lua/flush_mark.lua``),
so no fill that read the old rows can land. The rest (write-through states, the final
version bump, releasing the marks) waits here until the outermost commit. Savepoints
get a frame of their own: released, the frame merges into its parent; rolled back, its
write-through states are dropped (the rows were never committed), while its marks stay
until the transaction ends.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
    """What one transaction frame wrote to one table."""

    rows: dict[str, RowWrite] = field(default_factory=dict)
    bulk: bool = False
    # the database and schema the rows' entity entries live in (sa_redis_cache.binds)
    scope: str = ""

    def merge(self, newer: TableWrites) -> None:
        """Take ``newer``'s rows over ours: a later flush of a row supersedes an earlier one."""
        self.rows.update(newer.rows)
        self.bulk = self.bulk or newer.bulk
        self.scope = newer.scope or self.scope


Frame = dict[str, "TableWrites"]


@dataclass(slots=True)
class TxState:
    """What one session's open transaction has written.

    ``marked`` holds the tables this transaction has flushed: reads of them go to the
    database until the transaction ends, so a transaction always sees its own writes,
    and their writer marks are released when it ends.
    """

    token: str = field(default_factory=lambda: secrets.token_hex(8))
    marked: set[str] = field(default_factory=set)
    frames: list[Frame] = field(default_factory=lambda: [{}])
    # REPEATABLE READ / SERIALIZABLE: the table versions captured when the transaction
    # began, before its snapshot; fills must compare against these, not later ones
    snapshot: dict[str, bytes | None] | None = None

    @property
    def written_tables(self) -> set[str]:
        """The tables this transaction has written (alias of ``marked``)."""
        return self.marked

    def frame(self) -> Frame:
        """The innermost open frame (the current savepoint's, or the transaction's)."""
        return self.frames[-1]

    def push(self) -> None:
        """A savepoint began."""
        self.frames.append({})

    def release(self) -> None:
        """The innermost savepoint was released: its writes join its parent's."""
        if len(self.frames) > 1:
            top = self.frames.pop()
            parent = self.frames[-1]
            for table, writes in top.items():
                parent.setdefault(table, TableWrites()).merge(writes)

    def discard(self) -> None:
        """The innermost savepoint was rolled back: forget its write-through states.

        Its rows keep a delete at commit (harmless, and they were deleted at flush).
        """
        if len(self.frames) > 1:
            top = self.frames.pop()
            parent = self.frames[-1]
            for table, writes in top.items():
                target = parent.setdefault(table, TableWrites())
                target.bulk = target.bulk or writes.bulk
                target.scope = target.scope or writes.scope
                for pk, row in writes.rows.items():
                    target.rows.setdefault(pk, RowWrite(row.ticket, None, row.ttl))

    def reset(self) -> None:
        """The transaction ended; start afresh with a new token."""
        self.token = secrets.token_hex(8)
        self.marked = set()
        self.frames = [{}]
        self.snapshot = None


def tx_state(session: Session) -> TxState:
    """The state of ``session``'s current transaction, created on first use.

    Example::

        tx_state(session).written_tables  # set() in a fresh session
    """
    info = session.info
    state: TxState | None = info.get(_INFO_KEY)
    if state is None:
        state = info[_INFO_KEY] = TxState()
    return state


def peek_tx_state(session: Session) -> TxState | None:
    """The state of ``session`` if any cache work happened in it, else None."""
    state: TxState | None = session.info.get(_INFO_KEY)
    return state
