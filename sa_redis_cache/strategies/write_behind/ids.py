"""Primary keys for write-behind inserts, reserved in blocks from a Postgres sequence."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Sequence
    from sqlalchemy.engine import Connection


class IdBlocks:
    """Primary keys reserved in blocks from a Postgres sequence, for write-behind inserts.

    A model declares ``mapped_column(Sequence("page_views_id_seq", increment=100),
    primary_key=True)``; one ``nextval`` then reserves ``increment`` ids, handed out in
    Python without touching the database again. Ids are unique, not gap-free (a process
    that exits loses the rest of its block), as with any sequence.

    Example::

        ids = IdBlocks()
        ids.next(connection, Sequence("page_views_id_seq", increment=100))
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # per database and sequence, the reserved ids not handed out yet: [next, end) pairs
        self._blocks: dict[tuple[str, str], list[list[int]]] = {}

    def next(self, connection: Connection, sequence: Sequence) -> int:
        """The next reserved id; reserves a new block when every block is used up.

        The lock is never held across the ``nextval``: under ``AsyncSession`` that call
        suspends the task until the database answers, and another task of the same thread
        waiting for the lock would stop the event loop, the first task with it. Tasks
        that find no id left each reserve a block; the ids of all of them are used.
        """
        where = (connection.engine.url.render_as_string(), sequence.name)
        with self._lock:
            blocks = self._blocks.setdefault(where, [])
            while blocks:
                block = blocks[0]
                if block[0] < block[1]:
                    block[0] += 1
                    return block[0] - 1
                blocks.pop(0)
        start = int(connection.scalar(sequence.next_value()))
        step = sequence.increment or 1
        with self._lock:
            if step > 1:
                self._blocks.setdefault(where, []).append([start + 1, start + step])
        return start

    def clear(self) -> None:
        """Forget every reserved block: their ids are never handed out (a gap, as a process
        that exits leaves).

        Example::

            ID_BLOCKS.clear()  # the next id of every sequence comes from a new nextval
        """
        with self._lock:
            self._blocks.clear()


ID_BLOCKS = IdBlocks()
