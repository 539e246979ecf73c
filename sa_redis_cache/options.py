"""The ``FromCache`` query option."""

from __future__ import annotations

from sqlalchemy.orm.interfaces import UserDefinedOption

from .policy import is_ttl


class FromCache(UserDefinedOption):
    """Serve an ORM ``select()`` from Redis (cache-aside), filling the cache on a miss.

    A hit returns what the uncached statement returns (equal objects of equal types,
    eager-loaded relationships included) and emits no SQL. ``ttl`` (seconds) overrides the
    model's and the cache's default; ``region`` groups statements in ``cache.stats()``.

    Stampede control (see :mod:`sa_redis_cache.stampede`): on a miss one caller fills
    while the others wait up to ``lease_wait`` seconds for its entry (``lease=False``
    turns this off); ``xfetch_beta`` scales the probabilistic early refresh (0 turns it
    off); ``stale_ttl`` keeps an entry that many seconds past its TTL, served while one
    caller refreshes it. None of these ever serves a value a committed write invalidated.

    ``local=False`` keeps this statement out of the cache's local tier
    (``Cache(local=True)``): it is always looked up in Redis.

    ``spread=True`` keys the entry by its own digest rather than its first table, so that
    one table's statements spread over the slots (and shards) of a Redis Cluster; each
    look then reads the table's counters from the table's slot too (docs/cluster.md,
    "Spreading one hot table"). ``None``: the first table's model decides
    (``CachePolicy(spread_queries=True)``). No effect on what is served.

    Example::

        stmt = select(Product).where(Product.category_id == 3).options(FromCache(ttl=60))
        products = session.scalars(stmt).all()
    """

    # eager loaders run their own statements; only the top-level statement is cached,
    # with the whole eager-loaded graph inside its entry
    propagate_to_loaders = False

    def __init__(
        self,
        ttl: float | None = None,
        *,
        region: str = "default",
        lease: bool = True,
        lease_wait: float = 0.5,
        xfetch_beta: float = 1.0,
        stale_ttl: float = 0,
        local: bool = True,
        spread: bool | None = None,
    ) -> None:
        if ttl is not None and not is_ttl(ttl):
            raise ValueError(
                f"FromCache(ttl={ttl!r}): ttl must be a positive number of seconds (at most 1e9), "
                "or None for the model's or the cache's default"
            )
        for name, value in (
            ("lease_wait", lease_wait),
            ("xfetch_beta", xfetch_beta),
            ("stale_ttl", stale_ttl),
        ):
            if value != 0 and not is_ttl(value):
                raise ValueError(
                    f"FromCache({name}={value!r}): give a finite number >= 0 (at most 1e9)"
                )
        for name, flag in (("lease", lease), ("local", local)):
            if not isinstance(flag, bool):
                # bool("no") is True: a string here would turn on what it meant to turn off
                raise ValueError(f"FromCache({name}={flag!r}): give True or False")  # noqa: TRY004  # as every FromCache argument
        if not isinstance(region, str) or not region:
            raise ValueError(
                f"FromCache(region={region!r}): give a non-empty name, or leave the default "
                "'default'"
            )
        super().__init__(payload=None)
        self.ttl = ttl
        self.region = region
        self.lease = lease
        self.lease_wait = float(lease_wait)
        self.xfetch_beta = float(xfetch_beta)
        self.stale_ttl = float(stale_ttl)
        self.local = local
        if spread is not None and not isinstance(spread, bool):
            raise ValueError(f"FromCache(spread={spread!r}): give True, False or None")
        self.spread = spread

    def __repr__(self) -> str:
        return f"FromCache(ttl={self.ttl!r}, region={self.region!r})"
