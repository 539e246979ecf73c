"""The in-process store of the local tier: entries, the counters they are valid under, LRU.

An entry is a copy of a Redis entry this process read as valid, decoded and checked once
(ready to build objects from), with the counters (table versions, generations, row write
counters) it was valid under. The store keeps a *mirror* of those counters' current
values; an entry is served only while every counter it names is in the mirror with the
value it was stored under. Invalidations pushed by Redis (:mod:`.listener`) name keys that
changed: each is dropped from the mirror (and from the entries, for an entry key), so the
entries that depend on it are misses until a Redis read stores them again.

The race every client-side cache has: a value read from Redis *before* a key changed may
reach the process *after* the invalidation of that change. Every look notes the store's
sequence number before it is sent (:meth:`LocalStore.mark`); an invalidation records the
sequence number at which it dropped each key; :meth:`LocalStore.put` refuses a value when
any of its keys was dropped after the look was sent, or when the store was emptied since.

Example::

    store = LocalStore(max_entries=10_000, max_bytes=64 << 20)
    mark = store.mark()
    # ... a Redis look that read entry "e" valid under counter "v" = b"7" ...
    store.put("e", prepared, [("v", b"7")], size=500, ttl=60.0, mark=mark)
    store.get("e")           # the entry, until "v" or "e" is invalidated
    store.invalidate([b"v"])
    store.get("e")           # None
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

# how many invalidated keys are remembered for the race above before they are forgotten
# all at once (a look sent before that point is then refused, which is only a miss)
_SEEN_KEYS = 100_000


# what a local entry takes in Python objects: a share per stored byte (the decoded values),
# a fixed part per object built from it (its values tuple, identity key, the body's lists),
# and one for the entry itself (the entry, its key, its counters). Fitted to what
# benchmarks/cases_local.py measures with tracemalloc for a 1-row entity, a 1-row query and
# a 50 + 200 object graph.
_PER_BYTE = 4
_PER_OBJECT = 350
_PER_ENTRY = 200


def estimated_size(stored_bytes: int, objects: int = 1) -> int:
    """The memory a local entry of ``objects`` objects, decoded from ``stored_bytes``
    bytes, is counted at.

    Example::

        >>> estimated_size(100)
        950
        >>> estimated_size(12_000, objects=250)
        135700
    """
    return stored_bytes * _PER_BYTE + objects * _PER_OBJECT + _PER_ENTRY


class Mark(NamedTuple):
    """Where the store stood when a look was sent (:meth:`LocalStore.mark`)."""

    seq: int
    epoch: int


@dataclass(slots=True)
class LocalEntry:
    """One entry of the local tier.

    ``value`` is what the read path builds objects from (a prepared query or entity);
    ``counters`` the ``(key, value)`` pairs it is valid under; ``expires`` the monotonic
    time it lives until (its Redis entry's TTL); ``size`` its estimated bytes.
    """

    value: Any
    counters: tuple[tuple[str, bytes], ...]
    expires: float
    size: int


class LocalStore:
    """Entries and counter mirror of one cache's local tier (thread-safe)."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LocalEntry] = OrderedDict()
        self._mirror: dict[str, bytes] = {}
        # how many entries name each mirrored counter: a counter no entry names any more
        # (its entries evicted, expired or replaced) leaves the mirror, which would
        # otherwise keep one counter per row ever held (a row's write counter) unbounded
        self._uses: dict[str, int] = {}
        self._dropped_at: dict[str, int] = {}
        self._floor = 0
        self._seq = 0
        self._epoch = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.evictions = 0
        self.invalidations = 0
        self.last_invalidation: float | None = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def epoch(self) -> int:
        """How many times the store was emptied (a :class:`Mark` from before is refused)."""
        return self._epoch

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: str) -> LocalEntry | None:
        """The entry under ``key`` if every counter it names still has its stored value."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        mirror = self._mirror
        for counter, value in entry.counters:
            if mirror.get(counter) != value:
                return None
        if entry.expires <= time.monotonic():
            self._drop(key)
            return None
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
        return entry

    def mark(self) -> Mark:
        """Note the store's position before a Redis look is sent (see the module docstring)."""
        return Mark(self._seq, self._epoch)

    # -- writes ----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: Any,
        counters: Sequence[tuple[str, bytes]],
        *,
        size: int,
        ttl: float,
        mark: Mark,
    ) -> bool:
        """Keep ``value`` under ``key``, valid under ``counters`` as a look read them.

        Refused (False) when the store was emptied since the look was sent, when one of
        the keys was invalidated since, or when the entry alone is over the byte limit.
        """
        if ttl <= 0 or size > self.max_bytes:
            return False
        names = [key, *(c for c, _ in counters)]
        with self._lock:
            if mark.epoch != self._epoch or mark.seq < self._floor:
                return False
            dropped = self._dropped_at
            if any(dropped.get(name, -1) > mark.seq for name in names):
                return False
            self._mirror.update(counters)
            uses = self._uses
            for counter, _ in counters:
                uses[counter] = uses.get(counter, 0) + 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
            self._entries[key] = LocalEntry(value, tuple(counters), time.monotonic() + ttl, size)
            self.bytes += size
            self._evict()
        return True

    def _evict(self) -> None:
        entries = self._entries
        while entries and (len(entries) > self.max_entries or self.bytes > self.max_bytes):
            _, entry = entries.popitem(last=False)
            self._forget(entry)
            self.evictions += 1

    def _forget(self, entry: LocalEntry) -> None:
        """Account for ``entry`` leaving the store (under the lock): its bytes, and the
        mirrored counters that no other entry names."""
        self.bytes -= entry.size
        uses = self._uses
        mirror = self._mirror
        for counter, _ in entry.counters:
            left = uses.get(counter, 0) - 1
            if left > 0:
                uses[counter] = left
            else:
                uses.pop(counter, None)
                mirror.pop(counter, None)

    def invalidate(self, keys: Iterable[bytes | str]) -> None:
        """Keys that changed in Redis: drop them from the mirror and the entries."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            dropped = self._dropped_at
            mirror = self._mirror
            entries = self._entries
            for raw in keys:
                key = raw.decode() if isinstance(raw, bytes) else raw
                dropped[key] = seq
                mirror.pop(key, None)
                entry = entries.pop(key, None)
                if entry is not None:
                    self._forget(entry)
            if len(dropped) > _SEEN_KEYS:
                dropped.clear()
                self._floor = seq
            self.invalidations += 1
            self.last_invalidation = time.monotonic()

    def clear(self) -> None:
        """Forget everything (the invalidation stream broke, or the lease lapsed)."""
        with self._lock:
            self._entries.clear()
            self._mirror.clear()
            self._uses.clear()
            self._dropped_at.clear()
            self._seq += 1
            self._floor = self._seq
            self._epoch += 1
            self.bytes = 0

    def _drop(self, key: str) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._forget(entry)
