"""Exceptions raised by sa_redis_cache.

Every error a user can meet names the problem and the fix. Read paths never raise
Redis errors into the application; these exceptions are for configuration mistakes and
for write paths whose contract is to fail loudly (write-behind commits).
"""

from __future__ import annotations


class SaRedisCacheError(Exception):
    """Base class of every exception this library raises on purpose.

    Example::

        try:
            cache.attach(Session)
        except SaRedisCacheError as exc:
            print(exc)
    """


class ConfigurationError(SaRedisCacheError, ValueError):
    """A model, policy or session factory cannot be used as configured.

    Raised by :meth:`sa_redis_cache.Cache.attach` before any query runs, so a
    misconfigured model never silently serves or loses data.

    Example::

        class Bad(Base):
            __tablename__ = "bad"
            __cache__ = CachePolicy(strategy="write_around")  # unknown strategy
        cache.attach(Session)  # raises ConfigurationError naming Bad and the fix
    """


class CacheUnavailableError(SaRedisCacheError, RuntimeError):
    """Redis could not take an operation whose loss is not acceptable.

    Only write paths that must not degrade silently (write-behind queueing) raise it;
    reads fall back to the database instead.

    Example::

        try:
            session.commit()
        except CacheUnavailableError:
            ...  # its message says whether nothing was queued or whether that is unknown
    """


class NotOnDiskError(CacheUnavailableError):
    """A ``CachePolicy(durable=True)`` commit is queued, but Redis did not confirm writing
    it to disk in time.

    The writes will be flushed like any other; a crash of the Redis host before its next
    fsync would lose them. Do not retry them (they are queued): alert, and check the Redis
    server's disk and ``appendfsync``.

    Example::

        try:
            session.commit()
        except NotOnDiskError:
            log.error("queued, not yet on Redis' disk")
    """


class NotReplicatedError(CacheUnavailableError):
    """A write-behind commit on a Redis Cluster is queued, but not every replica of its
    shard confirmed having it in time.

    The writes will be flushed like any other, unless the shard's primary dies before a
    replica has them: a failover would then lose them. Do not retry them (they are
    queued): alert, and check the shard's replicas (a replica that is down, paused or
    far behind).

    Example::

        try:
            session.commit()
        except NotReplicatedError:
            log.error("queued, not yet on every replica")
    """
