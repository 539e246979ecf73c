"""Which tables retire every entry of a ``FromCache`` region: ``cache.invalidate_region``.

A query entry is valid only while the version of every table it read is unchanged, so
bumping the version of one table each of a region's statements reads retires all of the
region's entries, and refuses every fill that read the database before the bump, in every
process, with the guarantees of any other invalidation. The table chosen is the one of
the statement's first entity (its subject mapper, ``orm_context.bind_mapper``); each
process records it in a Redis set per region (``KeyScheme.region_key``) before the
statement's first read, which SQLAlchemy's execute pipeline makes (a read served before
the pipeline is a hit on an entry an earlier read of this process looked at), and again
once a day while it keeps reading it (the set lives 7 days, as the counters). A key of
another Redis type under the set's name is deleted by the scripts that meet it
(``note_region.lua``, ``region_tables.lua``), never reported as Redis failing.

The cost of this coarseness: invalidating a region also retires the entries of other
regions that read those tables (misses, never a wrong value).

Example::

    regions = RegionIndex(core)
    regions.note(orm_context.bind_mapper, option)   # called before each FromCache read
    regions.tables("pages")               # what cache.invalidate_region("pages") bumps
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import Table

from sa_redis_cache.protocol import scripts
from sa_redis_cache.stats import scope

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.options import FromCache

log = logging.getLogger(__name__)

_REFRESH_S = 24 * 3600
_MAX_NOTED = 4096


class RegionIndex:
    """The tables of each ``FromCache`` region, recorded in Redis for every process."""

    def __init__(self, core: CacheContext) -> None:
        self.core = core
        # (region, table) -> when this process last recorded it (monotonic seconds)
        self._noted: dict[tuple[str, str], float] = {}

    def note(self, mapper: Mapper[Any] | None, option: FromCache, *, lookup: bool = True) -> bool:
        """Record the table that retires ``option.region``'s entry of a statement about
        ``mapper`` (its subject; None for none). False when it could not be recorded: the
        read must then not use the cache, since ``invalidate_region`` would not find
        what it fills (the caller reads the database). The read is counted here then:
        ``bypassed`` when the breaker refused Redis, or ``errors`` (and timed as an
        ``error``) when this record, its first round trip, failed: one lookup, counted once.
        ``lookup`` False: the read was served, counted and timed already (a direct hit):
        a refusal of the breaker counts nothing, a failure only ``errors``."""
        table = None if mapper is None else mapper.local_table
        if not isinstance(table, Table):
            return True  # no entity: invalidate_region cannot name it (documented)
        memo = (option.region, table.fullname)
        now = time.monotonic()
        last = self._noted.get(memo)
        if last is not None and now - last < _REFRESH_S:
            return True
        core = self.core
        region = scope("region", option.region)
        # the breaker is asked, not only looked at: a half-open breaker lets this record be
        # its probe, where skipping it would let the read's own look be the probe and fill
        # an entry no record names
        if not core.breaker.allow():
            if lookup:
                core.counters.incr(region, "bypassed")
            return False
        started = time.perf_counter()
        try:
            core.io().run_script(*scripts.note_region(core.keys, option.region, table.fullname))
        except RedisError as exc:
            # a failure of the read's first round trip: counted (and timed) as the read's
            # own would be, and not also as bypassed
            core.redis_failed(exc)
            core.counters.incr(region, "errors")
            if lookup:
                core.counters.observe(region, "error", time.perf_counter() - started)
            return False
        core.breaker.success()
        if len(self._noted) >= _MAX_NOTED:
            self._noted.clear()
        self._noted[memo] = now
        return True

    def tables(self, region: str) -> list[str] | None:
        """The tables recorded for ``region`` by every process; None when the region's key
        held another Redis type (deleted, and logged by Redis): which tables it recorded is
        lost. Raises ``RedisError``."""
        reply: Any = self.core.io().run_script(*scripts.region_tables(self.core.keys, region))
        if not int(reply[0]):
            log.warning("the table set of region %r was not a Redis set: deleted", region)
            # recorded again by this process's next read, not a day later
            for memo in [m for m in self._noted if m[0] == region]:
                del self._noted[memo]
            return None
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in reply[1:])
