"""The write strategies, one module each; :mod:`sa_redis_cache.sessions` runs them.

* :mod:`.cache_aside` (the default): a committed write invalidates. Its protocol (marks
  at flush, bumps after commit) runs for every table a transaction writes, whatever the
  model's strategy: cached queries may read any table.
* :mod:`.write_through`: the commit writes the rows' new state to their entity entries,
  inside the cache-aside protocol.
* :mod:`.write_behind`: the flush is taken out of the unit of work and queued in Redis at
  commit; a worker applies it to the database.

The reads (``FromCache``, the entity cache) are the same for every strategy
(:mod:`sa_redis_cache.reads`).
"""

from __future__ import annotations
