"""A circuit breaker in front of Redis: after repeated failures, stop asking for a while.

While Redis is down or slow, every cached read would otherwise wait for its socket
timeout before falling back to the database. The breaker opens after ``threshold``
consecutive failures; reads then go straight to the database. After ``reset_after``
seconds one call is let through (half-open): success closes the breaker, failure opens
it again.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed, open, half-open; thread-safe; free on the closed fast path.

    Example::

        breaker = CircuitBreaker(threshold=3, reset_after=2.0)
        if breaker.allow():
            try:
                client.get(key)
            except RedisError:
                breaker.failure()
            else:
                breaker.success()
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        reset_after: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.reset_after = reset_after
        self.clock = clock
        self.state = CLOSED
        self.opened = 0  # how many times it opened, for stats and tests
        self._failures = 0
        self._open_until = 0.0
        self._probing = False
        self._probe_started = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May the caller use Redis now?"""
        if self.state is CLOSED:
            return True
        with self._lock:
            now = self.clock()
            if self.state is OPEN and now >= self._open_until:
                self.state = HALF_OPEN
                self._probing = False
            # a probe whose caller never reported back must not keep the breaker shut
            stale_probe = self._probing and now - self._probe_started > self.reset_after
            if self.state is HALF_OPEN and (not self._probing or stale_probe):
                self._probing = True
                self._probe_started = now
                return True
            return self.state is CLOSED

    def refusing(self) -> bool:
        """Whether :meth:`allow` would say no now, asked without changing anything: open,
        and not yet due for its half-open probe. For a caller with work to skip before it
        asks :meth:`allow` (a read computing its entry key); lock-free, so a read that
        races the breaker's change is told what the read before it was.

        Example::

            if breaker.refusing():
                return read_the_database()
        """
        return self.state is OPEN and self.clock() < self._open_until

    def observed_state(self) -> str:
        """The state an observer should report: :data:`HALF_OPEN` once an open breaker is
        due for its probe, although :attr:`state` turns half-open only when the next call
        asks :meth:`allow` (a process with no Redis traffic would otherwise show open
        long after its reset time). Changes nothing.

        Example::

            gauge.set({CLOSED: 0.0, HALF_OPEN: 0.5, OPEN: 1.0}[breaker.observed_state()])
        """
        return HALF_OPEN if self.state is OPEN and not self.refusing() else self.state

    def success(self) -> None:
        """A Redis call succeeded."""
        if self.state is CLOSED and not self._failures:
            return
        with self._lock:
            self.state = CLOSED
            self._failures = 0
            self._probing = False

    def failure(self) -> None:
        """A Redis call failed (connection error, timeout, server error)."""
        with self._lock:
            self._failures += 1
            if self.state is HALF_OPEN or self._failures >= self.threshold:
                if self.state is not OPEN:
                    self.opened += 1
                self.state = OPEN
                self._open_until = self.clock() + self.reset_after
                self._probing = False
