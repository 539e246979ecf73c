"""sa_redis_cache: a Redis cache in front of Postgres for SQLAlchemy 2.x.

Example::

    from sa_redis_cache import Cache, CachePolicy, FromCache
    cache = Cache("redis://localhost:6379/0", namespace="shop")
    cache.attach(Session)
"""

from __future__ import annotations

from .cache import Cache
from .errors import CacheUnavailableError, ConfigurationError, SaRedisCacheError
from .options import FromCache
from .policy import CachePolicy
from .worker import FlushWorker

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CachePolicy",
    "CacheUnavailableError",
    "ConfigurationError",
    "FlushWorker",
    "FromCache",
    "SaRedisCacheError",
    "__version__",
]
