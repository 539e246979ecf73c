"""Per-model cache policy: which write strategy a model uses and how long entries live."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from .protocol.keys import group_name_problem


class Strategy(str, enum.Enum):
    """What a committed write of a model does to the cache (``CachePolicy(strategy=...)``).

    Members are strings: ``CachePolicy(strategy="write_through")`` and
    ``CachePolicy(strategy=Strategy.WRITE_THROUGH)`` are the same policy.

    Example::

        >>> Strategy("write_behind") is Strategy.WRITE_BEHIND, Strategy.CACHE_ASIDE == "cache_aside"
        (True, True)
    """

    CACHE_ASIDE = "cache_aside"
    WRITE_THROUGH = "write_through"
    WRITE_BEHIND = "write_behind"


StrategyName = Literal["cache_aside", "write_through", "write_behind"]
STRATEGIES: tuple[str, ...] = tuple(s.value for s in Strategy)


MAX_SECONDS = 1e9
"""The longest TTL (or other duration) taken, about 31 years. Redis refuses an expiry in
milliseconds that overflows with the server's clock added, and Lua scripts pass numbers as
doubles: a TTL of 1e17 s failed every write of a cached function (Redis errors, which open
the breaker), and left reads uncached."""


def is_ttl(value: object) -> bool:
    """True for a positive number of seconds up to :data:`MAX_SECONDS` (not a bool).

    Example::

        >>> is_ttl(60), is_ttl(0), is_ttl(float("inf")), is_ttl(1e17)
        (True, False, False, False)
    """
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and value <= MAX_SECONDS
    )


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How one mapped model is cached; declared as ``__cache__`` on the model class.

    ``strategy`` decides what a committed write does to the cache:

    * ``"cache_aside"`` (default): the write invalidates; the next read fills.
    * ``"write_through"``: the committed state is written to the entity key.
    * ``"write_behind"``: the flush is queued in Redis and applied to the database
      later by the flush worker.

    ``ttl`` (seconds) bounds every entry of the model; ``None`` uses the cache's
    ``default_ttl``.

    Stampede control of the entity cache (``session.get``), as ``FromCache`` has for
    queries: on a miss one caller fills while the others wait up to ``lease_wait``
    seconds for its entry; ``xfetch_beta`` scales the probabilistic early refresh of
    entries a read filled (0 turns it off).

    ``cache_queries=True`` caches every eligible select whose first entity is this model
    as if it carried ``FromCache()`` (:mod:`sa_redis_cache.reads.auto`); primary-key
    loads stay with the entity cache.

    ``local=False`` keeps the model out of the cache's local tier (``Cache(local=True)``):
    its rows, and every cached query that reads its table, are always looked up in
    Redis. Write-behind models are never in the local tier.

    ``durable`` (write-behind only): ``commit()`` returns only once Redis has written
    the queued writes to its append-only file on disk (``WAITAOF``, Redis 7.2+). Without
    it, a crash of the Redis host can lose what the last fsync did not cover: about a
    second of commits with ``appendfsync everysec`` (docs/write-behind.md, "What commit()
    promises").

    ``slot_group`` puts the model's table in a named slot group: every table of a group
    shares one Redis Cluster hash tag, so statements and commits over them touch one slot
    (docs/cluster.md, "Slot groups"). ``None``: the table is its own group.

    ``spread_queries=True`` makes ``FromCache`` entries of statements whose first table is
    this model's spread over the cluster by their digest, as ``FromCache(spread=True)``.

    Example::

        class Product(Base):
            __tablename__ = "products"
            __cache__ = CachePolicy(strategy="write_through", ttl=600)

        class OrderLine(Base):
            __tablename__ = "order_lines"
            __cache__ = CachePolicy(slot_group="orders")
    """

    strategy: StrategyName | Strategy = "cache_aside"
    ttl: float | None = None
    entity_cache: bool = True
    accept_volatile: bool = False
    partitions: int = 8
    lease_wait: float = 0.5
    xfetch_beta: float = 1.0
    cache_queries: bool = False
    local: bool = True
    durable: bool = False
    slot_group: str | None = None
    spread_queries: bool = False

    def problems(self) -> list[str]:
        """Return what is wrong with this policy, each with its fix (empty when valid).

        Example::

            >>> CachePolicy(ttl=0).problems()[0].startswith("ttl=0 is not a positive")
            True
        """
        found: list[str] = []
        if self.strategy not in STRATEGIES:
            found.append(
                f"strategy={self.strategy!r} is not one of {', '.join(map(repr, STRATEGIES))}; "
                "pick one of those"
            )
        if self.ttl is not None and not is_ttl(self.ttl):
            found.append(
                f"ttl={self.ttl!r} is not a positive, finite number of seconds (at most "
                "1e9); give ttl a value > 0, or None to use the cache default_ttl"
            )
        if self.slot_group is not None and (problem := group_name_problem(self.slot_group)):
            found.append(f"{problem} (CachePolicy(slot_group=...))")
        for name in (
            "entity_cache",
            "accept_volatile",
            "cache_queries",
            "local",
            "durable",
            "spread_queries",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                found.append(f"{name}={value!r} is not a bool; write {name}=True or False")
        if (
            not isinstance(self.partitions, int)
            or isinstance(self.partitions, bool)
            or not (1 <= self.partitions <= 1024)
        ):
            found.append(
                f"partitions={self.partitions!r} is not a whole number from 1 to 1024; "
                "the default of 8 suits most tables"
            )
        if self.durable is True and self.strategy != "write_behind":
            found.append(
                "durable=True applies to strategy='write_behind' (it waits for Redis to write "
                "the queued writes to disk); remove it or use write_behind"
            )
        if self.durable is True and self.accept_volatile is True:
            found.append(
                "durable=True and accept_volatile=True contradict each other: durable waits for "
                "Redis to write the queue to disk, accept_volatile accepts a Redis without AOF; "
                "keep one"
            )
        for name in ("lease_wait", "xfetch_beta"):
            value = getattr(self, name)
            if value != 0 and not is_ttl(value):
                found.append(
                    f"{name}={value!r} is not a finite number >= 0 (at most 1e9); give one, or 0"
                )
        return found
