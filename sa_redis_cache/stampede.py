"""Stampede control: one caller fills a missing entry; the others wait for it.

On a miss, a caller takes the entry's fill lease (``SET NX PX`` beside the entry, in the
same round trip as a second look at the entry). The holder reads the database and fills;
the fill script releases the lease. The others poll the entry for a bounded time and
then read the database themselves: a lease never blocks a read for longer than that.

Entries also record how long their database read took (``delta``) and when they expire
logically. A hit may refresh early, with a probability that grows as expiry nears
(XFetch: Vattani, Chierichetti, Lowenstein, VLDB 2015), and an entry kept past its
logical expiry (``stale_ttl``) is served while one caller refreshes it. Neither ever
serves a value a committed write has invalidated: version checks come first.
"""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

_FIRST_POLL = 0.002
_MAX_POLL = 0.05


class Timing(NamedTuple):
    """How long an entry's read took, when it expires logically, and when it was filled.

    ``filled_ms`` is 0 for an entry stamped before fills recorded it (unknown age).
    """

    delta_ms: int
    expires_ms: int
    filled_ms: int = 0


def now_ms() -> int:
    """Wall-clock milliseconds; entries carry absolute expiry times across processes."""
    return time.time_ns() // 1_000_000


def due(timing: Timing, beta: float, now: int | None = None) -> bool:
    """Should this hit refresh the entry (past its logical expiry, or XFetch says so)?

    An entry younger than its own database read (``delta``) is never refreshed early.

    Example::

        >>> due(Timing(delta_ms=5, expires_ms=0), beta=1.0, now=1)
        True
        >>> due(Timing(delta_ms=80, expires_ms=200, filled_ms=100), beta=50.0, now=150)
        False
    """
    now = now_ms() if now is None else now
    if now >= timing.expires_ms:
        return True
    if timing.delta_ms <= 0 or beta <= 0:
        return False
    if now < timing.filled_ms + timing.delta_ms:
        # When delta is a large share of the TTL, XFetch's draw would refresh a fresh
        # entry at once, often while the refresher that filled it is still returning:
        # two database reads for one expiry. Waiting delta after the fill keeps refreshes
        # at most one per read time and still starts one before expiry when TTL > delta.
        return False
    # -log(u) for u in (0, 1] is an exponential draw: rarely large, so refreshes cluster
    # just before expiry and almost never happen long before it
    return now - timing.delta_ms * beta * math.log(1.0 - random.random()) >= timing.expires_ms


def new_token() -> str:
    """A lease token unique to one caller's attempt.

    Made for every query read that may miss (its first look carries it), so it is drawn
    from :mod:`random` (64 bits, reseeded in each forked process) rather than from the
    operating system: it tells callers apart, it guards nothing.
    """
    return f"{random.getrandbits(64):016x}"


class Poller:
    """Bounded waiting with growing intervals, for callers that lost the lease race.

    ``sleep`` pauses the caller: :func:`time.sleep` by default; the read path passes its
    Redis I/O's ``sleep``, which under ``AsyncSession`` lets the event loop run meanwhile.

    Example::

        poller = Poller(0.5)
        while poller.wait():
            ...  # look again
    """

    def __init__(self, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._deadline = time.monotonic() + seconds
        self._delay = _FIRST_POLL
        self._sleep = sleep

    def wait(self) -> bool:
        """Sleep a little; False when the time is up (then read the database)."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return False
        # the filler is reading the database; polling Redis is cheaper than a second read
        self._sleep(min(self._delay, remaining))
        self._delay = min(self._delay * 2, _MAX_POLL)
        return True
