"""The ``FromCache`` query option."""

from __future__ import annotations

from sqlalchemy.orm.interfaces import UserDefinedOption

from .policy import is_ttl


class FromCache(UserDefinedOption):
    """Serve an ORM ``select()`` from Redis (cache-aside), filling the cache on a miss.

    A hit returns what the uncached statement returns (equal objects of equal types,
    eager-loaded relationships included) and emits no SQL. ``ttl`` (seconds) overrides the
    model's and the cache's default; ``region`` groups statements in ``cache.stats()``.

    Example::

        stmt = select(Product).where(Product.category_id == 3).options(FromCache(ttl=60))
        products = session.scalars(stmt).all()
    """

    # eager loaders run their own statements; only the top-level statement is cached,
    # with the whole eager-loaded graph inside its entry
    propagate_to_loaders = False

    def __init__(self, ttl: float | None = None, *, region: str = "default") -> None:
        if ttl is not None and not is_ttl(ttl):
            raise ValueError(
                f"FromCache(ttl={ttl!r}): ttl must be a positive number of seconds, "
                "or None for the model's or the cache's default"
            )
        super().__init__(payload=None)
        self.ttl = ttl
        self.region = region

    def __repr__(self) -> str:
        return f"FromCache(ttl={self.ttl!r}, region={self.region!r})"
