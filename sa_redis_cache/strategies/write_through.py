"""``strategy="write_through"``: a commit writes the rows' new state to their entity entries.

It runs inside the invalidation protocol of :mod:`.cache_aside` (marks at flush, bump at
commit): where cache-aside deletes a written row's entity entry after the commit, a
write-through model's entry is set to the state the flush wrote, normalised as Postgres
will return it, unless another writer flushed the row meanwhile (then it is deleted: the
cache is never left older than the database). This module encodes those states.

When the value Postgres will return cannot be predicted (a REAL, a padded CHAR, a JSONB
float in exponent form, a TypeDecorator with low-level processors of its own), the entry
is deleted instead, as cache-aside would: counted in ``write_through_fallbacks`` and
logged at WARNING once per model and column (docs/strategies.md).

Example::

    state = flushed_state(info, obj, generation=7, ticket=3, tz=None)  # bytes or None
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from sa_redis_cache import hydrate
from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.models import Inexact
from sa_redis_cache.policy import Strategy

if TYPE_CHECKING:
    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.stats import Stats

log = logging.getLogger(__name__)

# (model, reason) pairs already logged at WARNING: the next ones go to DEBUG
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def flushed_state(
    info: ModelInfo,
    obj: object | None,
    generation: int | None,
    ticket: int,
    tz: Any,
    counters: Stats | None = None,
) -> bytes | None:
    """The entity entry for the state a flush just wrote; None when the entry is deleted
    instead (another strategy, a deleted row, a value Postgres would return otherwise).

    ``generation`` and ``ticket`` are the table's generation and the row's write ticket
    from the flush's mark: the entry is valid while neither moves. ``tz`` is the
    connection's time zone (timestamptz values come back in it). A fallback to deleting
    is counted in ``counters`` (``write_through_fallbacks``) and logged.
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
    except (hydrate.NotCacheable, CodecError, Inexact) as exc:
        # Postgres would return something we cannot predict: delete, never guess
        _fell_back(info, exc, counters)
        return None
    if body is None or body[1]:
        # columns the database filled in (server defaults) are not known here; a partial
        # state would cost SQL on the next hit, so the entry is deleted instead
        return None
    return pack([[generation, ticket], body])


def _fell_back(info: ModelInfo, exc: Exception, counters: Stats | None) -> None:
    """Count a write-through state deleted instead of written; WARNING once per reason."""
    if counters is not None:
        counters.incr(info.scope, "write_through_fallbacks")
    name = info.mapper.class_.__name__
    # the column (Inexact names it first) or the kind of problem, not the value
    reason = str(exc).partition(":")[0]
    with _WARNED_LOCK:
        first = (name, reason) not in _WARNED and len(_WARNED) < 4096
        if first:
            _WARNED.add((name, reason))
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "write_through: %s rows are deleted from the cache at commit instead of written "
        "(as cache_aside does): %s. Later occurrences are logged at DEBUG and counted in "
        "write_through_fallbacks",
        name,
        exc,
        extra={"sarc_scope": info.scope},
    )


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
