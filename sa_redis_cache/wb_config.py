"""Write-behind facts shared by the session side and the flush worker.

The keys (streams, partition leases, pending states) are described and built by
:class:`sa_redis_cache.protocol.KeyScheme`. The *pending key* of a row holds
``pack([stream_id, body])``: the newest queued state of a row (body ``None`` for a queued
delete) and the id of the stream entry that carries it. It has no TTL, no generation and
nothing but the worker removes it, and only when the entry it names has been applied: a
generation bump, ``cache.invalidate()`` or an eviction of the entity entry can therefore
never make an unflushed state unreadable. Identity reads consult it before anything else.

This module also checks, at ``attach()``, that a model can be written behind at all.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import Sequence, Table
from sqlalchemy.sql.schema import ColumnDefault

from .codec import RowCodec

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Column
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper

    from .models import ModelInfo
    from .policy import CachePolicy


def is_write_behind(info: ModelInfo | None) -> bool:
    """True when ``info`` is a model with ``strategy="write_behind"``."""
    return info is not None and info.policy is not None and info.policy.strategy == "write_behind"


def column_of(info: ModelInfo, key: str) -> Column[Any]:
    """The table column mapped by attribute ``key``."""
    column: Column[Any] = info.mapper.get_property(key).columns[0]
    return column


def pk_codec(info: ModelInfo) -> RowCodec:
    """A codec for the primary key values alone (what a queued delete carries)."""
    return RowCodec([column_of(info, info.column_keys[p]).type for p in info.pk_positions])


# -- validation at attach() ---------------------------------------------------------------


def model_problems(mapper: Mapper[Any], info: ModelInfo) -> list[str]:
    """Why ``mapper`` cannot be written behind, each with its fix (empty when it can).

    The worker inserts rows some time after ``commit()`` returned, so everything a row holds
    must be known in Python at flush time: no server-side defaults, identity columns or
    computed columns; a primary key from a Python default or a client-side sequence block.
    """
    name = mapper.class_.__name__
    problems: list[str] = []
    table = mapper.local_table
    if not isinstance(table, Table) or mapper.inherits is not None or mapper.polymorphic_on:
        return [
            (
                f"{name}: strategy='write_behind' needs a plain single-table model (no "
                "inheritance); use 'write_through' for this one"
            )
        ]
    if info.codec is None:
        return [
            (
                f"{name}: strategy='write_behind' needs every column encodable exactly "
                f"({info.uncacheable_reason}); change that column's type or the strategy"
            )
        ]
    if info.policy is not None and not info.policy.entity_cache:
        problems.append(
            f"{name}: strategy='write_behind' serves unflushed rows from the entity cache; "
            "remove entity_cache=False"
        )
    if set(mapper.primary_key) != set(table.primary_key.columns):
        problems.append(
            f"{name}: the mapper's primary key differs from the table's PRIMARY KEY, which "
            "the worker's INSERT ... ON CONFLICT needs; declare the same columns"
        )
    for key in info.column_keys:
        column = column_of(info, key)
        where = f"{name}.{key}"
        if column.server_default is not None or column.server_onupdate is not None:
            problems.append(
                f"{where} has a server-side default, whose value a queued row cannot know; "
                "use a Python-side default=... (e.g. default=uuid.uuid4) instead"
            )
        elif column.identity is not None or column.computed is not None:
            problems.append(
                f"{where} is an identity or computed column, filled only by the database "
                "insert; use a Python-side default (uuid.uuid4) or Sequence(..., increment=N)"
            )
        for label, default in (("default", column.default), ("onupdate", column.onupdate)):
            if isinstance(default, ColumnDefault) and default.is_clause_element:
                problems.append(
                    f"{where} has a SQL expression {label}, evaluated only by the database; "
                    "give it a Python callable instead"
                )
    for pk_column in mapper.primary_key:
        if pk_column.default is not None or pk_column.server_default is not None:
            continue
        if pk_column is table.autoincrement_column:
            problems.append(
                f"{name}.{pk_column.key} is an autoincrementing primary key that only the "
                "database insert fills; give it default=uuid.uuid4, a client-side "
                f"Sequence('{table.name}_id_seq', increment=100) (ids are reserved in "
                "blocks), or autoincrement=False when the application sets the key"
            )
    return problems


def redis_problems(client: redis.Redis, policy: CachePolicy) -> list[str]:
    """Why ``client``'s server cannot keep write-behind queues (AOF off, an allkeys policy).

    Asked at every ``attach()`` (two INFO sections): the setting can change between attaches.
    ``CachePolicy(accept_volatile=True)`` skips it, for deployments that accept losing
    queued writes with the Redis server.
    """
    if policy.accept_volatile:
        return []
    return _check_redis(client)


def _check_redis(client: redis.Redis) -> list[str]:
    try:
        settings = _server_settings(client)
    except RedisError as exc:
        return [
            (
                f"cannot tell whether Redis keeps data across a restart ({exc}); write-behind "
                "needs AOF: make Redis reachable, or accept_volatile=True to accept losing "
                "queues"
            )
        ]
    problems = []
    if settings.get("appendonly") != "yes":
        problems.append(
            "strategy='write_behind' queues writes in Redis, and this Redis server has AOF "
            "off (appendonly no): a restart would lose them. Turn it on (CONFIG SET "
            "appendonly yes, appendfsync always or everysec), or set "
            "CachePolicy(accept_volatile=True) to accept that loss"
        )
    if settings.get("maxmemory-policy", "").startswith("allkeys-"):
        problems.append(
            f"this Redis server evicts any key under memory pressure (maxmemory-policy "
            f"{settings['maxmemory-policy']}), the write-behind queues included; use "
            "noeviction or a volatile-* policy, or accept_volatile=True"
        )
    return problems


def _server_settings(client: redis.Redis) -> dict[str, str]:
    # INFO, never CONFIG GET: managed services often rename CONFIG away, and an ACL that
    # grants CONFIG GET also hands out the server's passwords (docs/security.md)
    persistence = client.info("persistence")
    memory = client.info("memory")
    return {
        "appendonly": "yes" if persistence.get("aof_enabled") else "no",
        "maxmemory-policy": str(memory.get("maxmemory_policy", "")),
    }


# -- primary keys from a client-side sequence ----------------------------------------------


class IdBlocks:
    """Primary keys reserved in blocks from a Postgres sequence, for write-behind inserts.

    A model declares ``mapped_column(Sequence("page_views_id_seq", increment=100),
    primary_key=True)``; one ``nextval`` then reserves ``increment`` ids, handed out in
    Python without touching the database again. Ids are unique, not gap-free (a process
    that exits loses the rest of its block), as with any sequence.

    Example::

        ids = IdBlocks()
        ids.next(connection, Sequence("page_views_id_seq", increment=100))
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[tuple[str, str], tuple[int, int]] = {}

    def next(self, connection: Connection, sequence: Sequence) -> int:
        """The next reserved id; reserves a new block when this one is used up."""
        where = (connection.engine.url.render_as_string(), sequence.name)
        with self._lock:
            low, high = self._blocks.get(where, (0, 0))
            if low >= high:
                start = int(connection.scalar(sequence.next_value()))
                step = sequence.increment or 1
                low, high = start, start + step
            self._blocks[where] = (low + 1, high)
            return low


ID_BLOCKS = IdBlocks()
