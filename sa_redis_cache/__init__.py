"""sa_redis_cache: a Redis cache in front of Postgres for SQLAlchemy 2.x.

Example::

    from sa_redis_cache import Cache, CachePolicy, FromCache
    cache = Cache("redis://localhost:6379/0", namespace="shop")
    cache.attach(Session)
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .cache import Cache
from .errors import CacheUnavailableError, ConfigurationError, SaRedisCacheError
from .models import PrimaryKeyTypeError, UncacheableModelWarning
from .options import FromCache
from .policy import CachePolicy, Strategy
from .worker import FlushWorker

try:
    __version__ = _metadata.version("sa-redis-cache")
except _metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
    __version__ = "0+unknown"

__all__ = [
    "Cache",
    "CachePolicy",
    "CacheUnavailableError",
    "ConfigurationError",
    "FlushWorker",
    "FromCache",
    "PrimaryKeyTypeError",
    "SaRedisCacheError",
    "Strategy",
    "UncacheableModelWarning",
    "__version__",
]
