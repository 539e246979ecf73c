"""Who served each slot of a Redis Cluster, as this process last saw it.

On a single server a restart is a new run id. On a cluster a slot can change hands while
no server restarts: a replica promoted by a failover (which may lack writes its old
primary acknowledged), or a resharding. Each process remembers, per slot, the
``(node id, run id)`` of the primary it last saw serving it; a slot now served by another
one is treated like a restart of that slot: the tables whose keys live there are bumped
before the cache is trusted for them again (docs/guarantees.md, "Redis Cluster").

Two places report owners (:mod:`sa_redis_cache.outages`): every new connection to a node
(``INFO server``, ``CLUSTER MYID``, ``CLUSTER SLOTS`` on it, before it serves a command),
and every refresh of the client's slot map (a ``MOVED`` or a failed node), by address.

Example::

    owners = SlotOwners()
    owners.claim(("node-a", "run-1"), [(0, 5460)])      # set(): first sight records only
    owners.claim(("node-b", "run-7"), [(0, 5460)])      # {0, ..., 5460}: changed hands
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .compat import key_slot

if TYPE_CHECKING:
    from collections.abc import Iterable

SLOTS = 16384
"""The hash slots of every Redis Cluster."""

OWNER_QUERY: tuple[tuple[str, ...], ...] = (
    ("INFO", "server"),
    ("CLUSTER", "MYID"),
    ("CLUSTER", "SLOTS"),
)
"""What a new connection to a cluster node asks before its first command (one round trip)."""


class SlotOwners:
    """The owner of every slot as last seen, and which slots changed hands.

    An owner is any hashable value: ``(node id, run id)`` from a connection, or the
    node's address from the client's slot map (kept apart, in two instances).

    Example::

        owners = SlotOwners()
        owners.claim("127.0.0.1:7000", [(0, 99)])
        owners.claim("127.0.0.1:7001", [(50, 60)])  # {50, ..., 60}
    """

    def __init__(self) -> None:
        self._owners: list[Any] = [None] * SLOTS
        self._lock = threading.Lock()

    def claim(
        self, owner: Any, ranges: Iterable[tuple[int, int]], *, record: bool = True
    ) -> set[int]:
        """Record ``owner`` for the slots of ``ranges`` (inclusive); the slots that had
        another known owner. A slot seen for the first time is only recorded. With
        ``record=False``, only which slots would change hands (nothing is recorded)."""
        changed: set[int] = set()
        owners = self._owners
        with self._lock:
            for start, end in ranges:
                for slot in range(max(0, start), min(SLOTS - 1, end) + 1):
                    before = owners[slot]
                    if before is not None and before != owner:
                        changed.add(slot)
                    if record:
                        owners[slot] = owner
        return changed

    def claim_map(self, slots: dict[int, Any]) -> set[int]:
        """:meth:`claim` for a whole slot map (slot -> owner); the slots that changed hands."""
        changed: set[int] = set()
        owners = self._owners
        with self._lock:
            for slot, owner in slots.items():
                before = owners[slot]
                if before is not None and before != owner:
                    changed.add(slot)
                owners[slot] = owner
        return changed


def own_ranges(slots_reply: Any, node_id: Any) -> list[tuple[int, int]]:
    """The slot ranges a ``CLUSTER SLOTS`` reply gives to the node ``node_id`` as primary.

    Example::

        >>> own_ranges([[0, 99, [b"127.0.0.1", 7000, b"aa"]]], b"aa")
        [(0, 99)]
    """
    mine = _text(node_id)
    ranges: list[tuple[int, int]] = []
    for entry in slots_reply or ():
        primary = entry[2]
        if len(primary) > 2 and _text(primary[2]) == mine:
            ranges.append((int(entry[0]), int(entry[1])))
    return ranges


def tables_in(slots: set[int], tables: Iterable[str], slot_key: Any) -> list[str]:
    """The ``tables`` whose keys live in one of ``slots``; ``slot_key(table)`` names one
    of a table's keys (all share its hash tag).

    Example::

        tables_in({key_slot("{s:t}")}, ["t", "u"], lambda t: "{s:" + t + "}")  # ['t']
    """
    if not slots:
        return []
    return sorted(t for t in tables if key_slot(slot_key(t)) in slots)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
