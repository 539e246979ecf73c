"""``strategy="write_through"``: a commit writes the rows' new state to their entity entries.

It runs inside the invalidation protocol of :mod:`.cache_aside` (marks at flush, bump at
commit): where cache-aside deletes a written row's entity entry after the commit, a
write-through model's entry is set to the row as the database holds it after the flush,
read back in the writing transaction (:func:`read_back`), unless another writer flushed
the row meanwhile (then it is deleted: the cache is never left older than the database).
This module reads and encodes those states.

A value the codec cannot store exactly deletes the entry instead, as cache-aside would:
counted in ``write_through_fallbacks`` and logged at WARNING once per model and column
(docs/strategies.md).

Example::

    rows = read_back(session.connection(), info, [product])  # {id(product): [...]}
    state = flushed_state(info, rows[id(product)], generation=7, ticket=3)  # bytes or None
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm.attributes import instance_state

from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.policy import Strategy

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy.engine import Connection

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.stats import Stats

log = logging.getLogger(__name__)

# (model, reason) pairs already logged at WARNING: the next ones go to DEBUG
_WARNED: set[tuple[str, str]] = set()
_WARNED_LOCK = threading.Lock()


def is_written_through(info: ModelInfo) -> bool:
    """True for a model whose commits write their rows' state into the cache."""
    return info.policy is not None and info.policy.strategy == Strategy.WRITE_THROUGH


def read_back(
    connection: Connection, info: ModelInfo, objs: Sequence[object]
) -> dict[int, list[Any]]:
    """The rows ``objs`` were flushed to, as the database holds them now, by ``id(obj)``.

    Read inside the writing transaction, after its flush: the transaction holds the rows'
    locks, so no other commit can change them before this one ends. An UPDATE sets only
    the columns this session changed; the object's other attributes may be older than a
    commit made since it was loaded, so the state written through is the row, not the
    object.
    """
    mapper = info.mapper
    positions = info.pk_positions
    wanted: dict[tuple[Any, ...], list[int]] = {}
    for obj in objs:
        attributes = instance_state(obj).dict
        key = tuple(attributes.get(info.column_keys[p]) for p in positions)
        wanted.setdefault(key, []).append(id(obj))
    if not wanted:
        return {}
    columns = [mapper.columns[key] for key in info.column_keys]
    pk_columns = [columns[p] for p in positions]
    statement = select(*columns).select_from(mapper.persist_selectable)
    if len(pk_columns) == 1:
        statement = statement.where(pk_columns[0].in_([key[0] for key in wanted]))
    else:
        statement = statement.where(tuple_(*pk_columns).in_(list(wanted)))
    found: dict[int, list[Any]] = {}
    for row in connection.execute(statement):
        values = list(row)
        for ident in wanted.get(tuple(values[p] for p in positions), ()):
            found[ident] = values
    return found


def flushed_state(
    info: ModelInfo,
    row: list[Any],
    generation: int | None,
    ticket: int,
    counters: Stats | None = None,
) -> bytes | None:
    """The entity entry of a row a flush just wrote, as the database holds it after the
    flush (:func:`read_back`); None when the entry is deleted instead (another strategy, no
    mark, a value the codec cannot store exactly).

    ``generation`` and ``ticket`` are the table's generation and the row's write ticket
    from the flush's mark: the entry is valid while neither moves. A fallback to deleting
    is counted in ``counters`` (``write_through_fallbacks``) and logged.
    """
    if generation is None or not is_written_through(info):
        return None
    assert info.codec is not None
    try:
        body = info.codec.dump_row(row)
    except CodecError as exc:
        _fell_back(info, exc, counters)
        return None
    return pack([[generation, ticket], [body, 0]])


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
