"""``strategy="write_through"``: a commit writes the rows' new state to their entity entries.

It runs inside the invalidation protocol of :mod:`.cache_aside` (marks at flush, bump at
commit): where cache-aside deletes a written row's entity entry after the commit, a
write-through model's entry is set to the state the flush wrote, normalised as Postgres
will return it, unless another writer flushed the row meanwhile (then it is deleted: the
cache is never left older than the database). This module encodes those states.

Example::

    state = flushed_state(info, obj, generation=7, ticket=3, tz=None)  # bytes or None
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sa_redis_cache import hydrate
from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.models import Inexact
from sa_redis_cache.policy import Strategy

if TYPE_CHECKING:
    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo


def flushed_state(
    info: ModelInfo, obj: object | None, generation: int | None, ticket: int, tz: Any
) -> bytes | None:
    """The entity entry for the state a flush just wrote; None when the entry is deleted
    instead (another strategy, a deleted row, a value Postgres would return otherwise).

    ``generation`` and ``ticket`` are the table's generation and the row's write ticket
    from the flush's mark: the entry is valid while neither moves. ``tz`` is the
    connection's time zone (timestamptz values come back in it).
    """
    if (
        obj is None
        or generation is None
        or info.policy is None
        or info.policy.strategy != Strategy.WRITE_THROUGH
    ):
        return None
    try:
        body = hydrate.extract_entity(obj, info, frozenset(), allow_modified=True, as_stored=tz)
    except (hydrate.NotCacheable, CodecError, Inexact):
        # Postgres would return something we cannot predict: delete, never guess
        return None
    if body is None or body[1]:
        # columns the database filled in (server defaults) are not known here; a partial
        # state would cost SQL on the next hit, so the entry is deleted instead
        return None
    return pack([[generation, ticket], body])


def sealed_state(core: CacheContext, key: str, state: bytes | None, info: ModelInfo) -> bytes:
    """The value to store under ``key`` (signed if the cache signs), or b"" to delete.

    A state above ``max_entry_bytes`` is deleted instead: reads refuse such values.
    """
    if not state:
        return b""
    sealed = core.sealed(key, state)
    if len(sealed) > core.max_entry_bytes:
        core.counters.incr(info.scope, "oversize")
        return b""
    return sealed
