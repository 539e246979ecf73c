"""Invalidations Redis did not take, remembered until a later send delivers them.

A table's bump (``outages.py``) and a cached function's tombstone
(``cached_functions.py``) that fail are kept here by name; the cache is not trusted for
those names until a send lands. A send can race a new failure of the same name: the
failure is kept after the send left, and the send, landing, must not forget it, since
the write it stands for may have committed after the send ran. Each keep therefore
numbers the names it keeps, and a delivery forgets a name only if no keep touched it
since the marks the delivery was sent with.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

# past this many names, a keeper stops naming them one by one (every known table, or
# every key of a function, is treated as undelivered instead): memory stays bounded
# however long Redis is away
MAX_REMEMBERED = 10_000
# a name that stands for every name of a keeper (no table or key is spelled so)
EVERY_NAME = "*"


class Undelivered:
    """Names whose invalidation did not reach Redis, each with the keep that last made it
    undelivered.

    ``names`` is read without the lock on hot paths (a read of a set's emptiness or
    membership is atomic in CPython); every change holds it. ``changes`` counts the keeps
    and the deliveries: a reader that took it before asking Redis, and finds it moved once
    the answer came, knows the answer may be one a keep or a delivery was about.

    Example::

        undelivered = Undelivered()
        undelivered.keep({"products"})          # the bump failed
        marks = undelivered.marks()             # taken before the bump is sent again
        send_bumps(marks)
        undelivered.forget_delivered(marks)     # True: nothing left to deliver
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self._kept_by: dict[str, int] = {}
        self._keeps = 0
        self.changes = 0
        self.lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def keep(self, names: Iterable[str]) -> None:
        """Remember ``names`` as undelivered, by a keep newer than every mark taken so far."""
        with self.lock:
            self._keeps += 1
            self.changes += 1
            kept = set(names)
            self.names.update(kept)
            self._kept_by.update(dict.fromkeys(kept, self._keeps))

    def touch(self) -> None:
        """Move ``changes`` for an event a reader must check its answer against though no
        name changed (a cluster slot map change began)."""
        with self.lock:
            self.changes += 1

    def marks(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """``names`` (every undelivered name by default) with the keep that last made each
        undelivered (0: none). Take them before the send that delivers the names, and
        give them to :meth:`forget_delivered` once it landed."""
        with self.lock:
            chosen = self.names if names is None else names
            return {name: self._kept_by.get(name, 0) for name in chosen}

    def forget_delivered(self, marks: dict[str, int]) -> bool:
        """The send of ``marks`` landed: its names are delivered, except those a keep made
        undelivered again while it was on its way. True when no name is left."""
        with self.lock:
            for name, mark in marks.items():
                if self._kept_by.get(name, 0) == mark and name in self.names:
                    self.names.discard(name)
                    self._kept_by.pop(name, None)
                    self.changes += 1
            return not self.names
