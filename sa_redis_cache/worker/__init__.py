"""The write-behind flush worker's public names (it lives in
:mod:`sa_redis_cache.strategies.write_behind.worker`, with the rest of write-behind).

``python -m sa_redis_cache.worker`` runs it as ``sa-redis-cache worker`` does.

Example::

    from sa_redis_cache.worker import FlushWorker, replay_dead_letters
    FlushWorker(engine, redis.Redis(), namespace="shop", models=[PageView]).run(stop_event)
"""

from __future__ import annotations

from sa_redis_cache.strategies.write_behind import worker as _worker
from sa_redis_cache.strategies.write_behind.worker import *  # noqa: F403 - the same names

__all__ = _worker.__all__
