"""The local tier: decoded entries kept in each process, dropped by invalidations Redis pushes.

* :mod:`.store`: the entries, the counters they are valid under, LRU and byte limits;
* :mod:`.tier`: when a local entry may be served (tracking on, lease held, socket drained);
* :mod:`.listener`: the thread that keeps the invalidation and control connections;
* :mod:`.fences`: the writer's side, a commit that waits for the holders' acknowledgements.

docs/guarantees.md ("The local tier") states what it promises and why it holds.

Example::

    cache = Cache("redis://localhost:6379/0", namespace="shop", local=True)
"""

from __future__ import annotations

from .fences import Fences
from .store import LocalEntry, LocalStore, Mark
from .tier import Consistency, LocalTier

__all__ = ["Consistency", "Fences", "LocalEntry", "LocalStore", "LocalTier", "Mark"]
