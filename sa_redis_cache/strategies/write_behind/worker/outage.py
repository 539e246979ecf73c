"""Whether a flush worker reaches its database, and what it says while it does not.

A worker whose database is away retries with backoff and applies nothing; it must never
look idle. :class:`DatabaseOutage` logs one warning when the outage starts, then one every
``every`` seconds while it lasts (how long, how many attempts, the last error), and one
line when the database answers again; :meth:`FlushWorker.stats
<sa_redis_cache.worker.FlushWorker.stats>` reports it (``database_up``,
``database_down_seconds``), and the worker's Prometheus collector publishes it as
``sarc_wb_database_up`` and ``sarc_wb_database_down_seconds``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from sa_redis_cache.redaction import redact_text

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

OUTAGE_LOG_SECONDS = 15.0
"""How often a worker repeats that it still cannot reach its database."""


_UNREACHABLE_STATES = ("08", "57P", "53300")
"""SQLSTATEs of a server that cannot be talked to: connection exceptions, a server shutting
down or starting (``57P01`` is also ``pg_terminate_backend``), too many connections."""


def is_unreachable(exc: BaseException) -> bool:
    """True for a database error that says the server could not be reached or talked to.

    Example::

        is_unreachable(OperationalError("connect", {}, Exception("refused")))  # True
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = str(getattr(exc.orig, "sqlstate", None) or "")
    if state and not state.startswith(_UNREACHABLE_STATES):
        # the server answered: psycopg raises a serialization failure, a deadlock, a
        # statement or lock timeout as OperationalError, but calling them an outage would
        # report the database down (sarc_wb_database_up 0) while it works
        return False
    return isinstance(exc, OperationalError | InterfaceError)


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return redact_text(" ".join(text.split()))


class DatabaseOutage:
    """The database outage a worker is in, if any; logs it while it lasts.

    Example::

        outage = DatabaseOutage()
        outage.failed(exc, retry_in=5.0)   # a warning; another every 15 s while it lasts
        outage.up, outage.down_seconds()   # False, 0.0...
        outage.answered()                  # "reaches the database again after ..."
    """

    def __init__(
        self, *, every: float = OUTAGE_LOG_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self._clock = clock
        self.since: float | None = None
        self.attempts = 0
        self._logged_at = 0.0

    @property
    def up(self) -> bool:
        """False from the first failure to reach the database until it answers again."""
        return self.since is None

    def down_seconds(self) -> float:
        """How long the database has been out of reach (0 when it answers)."""
        return 0.0 if self.since is None else max(0.0, self._clock() - self.since)

    def failed(self, exc: BaseException, *, retry_in: float | None = None) -> None:
        """One more attempt failed to reach the database."""
        now = self._clock()
        self.attempts += 1
        retry = "" if retry_in is None else f", retrying with backoff (at most {retry_in:g} s)"
        if self.since is None:
            self.since = now
            self._logged_at = now
            log.warning(
                "write-behind worker cannot reach the database: %s%s; nothing is applied "
                "until it answers",
                _short(exc),
                retry,
                extra={"wb_database_up": False, "wb_database_down_s": 0.0},
            )
        elif now - self._logged_at >= self.every:
            self._logged_at = now
            down = now - self.since
            log.warning(
                "write-behind worker still cannot reach the database after %.0f s "
                "(%d attempts): %s%s",
                down,
                self.attempts,
                _short(exc),
                retry,
                extra={"wb_database_up": False, "wb_database_down_s": round(down, 1)},
            )

    def answered(self) -> None:
        """The database answered: the outage, if any, is over."""
        if self.since is None:
            return
        down = self._clock() - self.since
        log.warning(
            "write-behind worker reaches the database again after %.1f s (%d failed attempts)",
            down,
            self.attempts,
            extra={"wb_database_up": True, "wb_database_down_s": round(down, 1)},
        )
        self.since = None
        self.attempts = 0
