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
        self._blocks: dict[tuple[str, str], tuple[int, int]] = {}

    def next(self, connection: Connection, sequence: Sequence) -> int:
        """The next reserved id; reserves a new block when this one is used up."""
        where = (connection.engine.url.render_as_string(), sequence.name)
        with self._lock:
            low, high = self._blocks.get(where, (0, 0))
            if low >= high:
                start = int(connection.scalar(sequence.next_value()))
                step = sequence.increment or 1
                low, high = start, start + step
            self._blocks[where] = (low + 1, high)
            return low


ID_BLOCKS = IdBlocks()
