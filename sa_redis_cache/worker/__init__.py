"""The write-behind flush worker: :class:`FlushWorker`, and ``python -m sa_redis_cache.worker``.

Example::

    from sa_redis_cache import FlushWorker
    FlushWorker(engine, redis.Redis(), namespace="shop", models=[PageView]).run(stop_event)
"""

from __future__ import annotations

from .flush import FlushWorker

__all__ = ["FlushWorker"]
