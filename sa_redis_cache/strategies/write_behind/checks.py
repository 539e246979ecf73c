"""What ``attach()`` checks before it accepts a write-behind model.

The worker inserts rows some time after ``commit()`` returned, so everything a row holds
must be known in Python at flush time, and the Redis server must keep the queue across a
restart (AOF) and never evict it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import Table
from sqlalchemy.sql.schema import ColumnDefault

from sa_redis_cache.redis_io import is_cluster

from .columns import column_of

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy.orm import Mapper

    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.policy import CachePolicy
    from sa_redis_cache.redis_io import SyncClient


def model_problems(mapper: Mapper[Any], info: ModelInfo) -> list[str]:
    """Why ``mapper`` cannot be written behind, each with its fix (empty when it can).

    The worker inserts rows some time after ``commit()`` returned, so everything a row holds
    must be known in Python at flush time: no server-side defaults, identity columns or
    computed columns; a primary key from a Python default or a client-side sequence block.
    """
    name = mapper.class_.__name__
    problems: list[str] = []
    table = mapper.local_table
    # polymorphic_on is a column: its truth value raises, so it is compared with None
    if (
        not isinstance(table, Table)
        or mapper.inherits is not None
        or mapper.polymorphic_on is not None
    ):
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
    if mapper.version_id_col is not None:
        # SQLAlchemy sets the version in its INSERT and checks and bumps it in its UPDATE's
        # WHERE; a queued row runs neither, and the worker's upsert checks nothing
        problems.append(
            f"{name}: version_id_col ({mapper.version_id_col.key}) is set and checked by "
            "SQLAlchemy's own INSERT and UPDATE, which write-behind does not run; remove "
            "version_id_col from __mapper_args__, or use strategy='write_through' for this "
            "model"
        )
    if set(mapper.primary_key) != set(table.primary_key.columns):
        problems.append(
            f"{name}: the mapper's primary key differs from the table's PRIMARY KEY, which "
            "the worker's INSERT ... ON CONFLICT needs; declare the same columns"
        )
    for key, reads in zip(info.column_keys, info.layout, strict=True):
        where = f"{name}.{key}"
        if reads.startswith("="):
            # column_property(...): a queued row's state is built in Python, and the
            # worker's INSERT has no column to write it to
            problems.append(
                f"{where} is a SQL expression (column_property), evaluated only by the "
                "database, which a queued row cannot know; use a Python @property or "
                "hybrid_property, or strategy='write_through' for this model"
            )
            continue
        column = column_of(info, key)
        # Computed and Identity set server_default too: asked first, so that their
        # message, not a server default's, names the problem and its fix
        if column.computed is not None:
            problems.append(
                f"{where} is a computed column (GENERATED ALWAYS), filled only by the "
                "database; compute it in Python (a @property or hybrid_property), or use "
                "strategy='write_through' for this model"
            )
        elif column.identity is not None:
            problems.append(
                f"{where} is an identity column, filled only by the database insert; use a "
                "Python-side default (uuid.uuid4) or Sequence(..., increment=N)"
            )
        elif column.server_default is not None or column.server_onupdate is not None:
            problems.append(
                f"{where} has a server-side default, whose value a queued row cannot know; "
                "use a Python-side default=... (e.g. default=uuid.uuid4) instead"
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


def group_problems(
    policies: Mapping[Mapper[Any], CachePolicy | None],
    groups: Mapping[str, str],
    given: Mapping[str, str],
    *,
    cluster: bool,
) -> list[str]:
    """Why the write-behind models of ``policies`` cannot keep their slot groups.

    The flush worker knows the groups of the models it is given only (their
    ``CachePolicy(slot_group=...)``), not ``Cache(slot_groups=...)`` (``given``); and on a
    Redis Cluster one commit's queued writes must be in one slot (``wb_enqueue.lua`` is
    atomic), so write-behind models related by a foreign key share a group.

    Example::

        group_problems({mapper: policy}, {"orders": "sales"}, {}, cluster=True)
    """
    behind = {
        mapper.local_table.fullname: mapper
        for mapper, policy in policies.items()
        if policy is not None
        and policy.strategy == "write_behind"
        and isinstance(mapper.local_table, Table)
    }
    problems: list[str] = []
    for table, mapper in behind.items():
        policy = policies[mapper]
        if table in given and policy is not None and policy.slot_group != given[table]:
            problems.append(
                f"{mapper.class_.__name__}: Cache(slot_groups=...) puts its table {table!r} in "
                f"slot group {given[table]!r}, which the flush worker does not see (it reads "
                f"the models' policies); write CachePolicy(slot_group={given[table]!r}) on "
                f"{mapper.class_.__name__} instead"
            )
        for fk in mapper.local_table.foreign_keys if cluster else ():
            other = fk.target_fullname.rsplit(".", 1)[0]  # by name, as foreign_key_problems
            if other == table or other not in behind:
                continue
            group = groups.get(table)
            if group is None or group != groups.get(other):
                problems.append(
                    f"{mapper.class_.__name__} and {behind[other].class_.__name__} are "
                    f"write-behind models related by a foreign key ({fk.parent}) in different "
                    "slot groups; on a Redis Cluster a commit's queued writes must be in one "
                    "slot: give both the same CachePolicy(slot_group='...')"
                )
    return problems


def foreign_key_problems(policies: Mapping[Mapper[Any], CachePolicy | None]) -> list[str]:
    """Foreign keys into write-behind tables, from any mapped table (a write-behind
    table's to itself included).

    A write-behind row is in the database only once the worker has applied it, each
    partition's queue in a transaction of its own, in no order across partitions and
    tables. So a row referencing one can reach the database before it (a queued row), or
    be refused at its commit (an ordinary row: ``IntegrityError``), and a delete of a
    referenced row comes before the delete of the row referencing it: the database refuses
    it (SQLSTATE 23503), and the operation is dead-lettered.

    Example::

        foreign_key_problems({line_mapper: wb_policy, order_mapper: wb_policy})
    """
    behind = {
        mapper.local_table.fullname: mapper
        for mapper, policy in policies.items()
        if policy is not None
        and policy.strategy == "write_behind"
        and isinstance(mapper.local_table, Table)
    }
    if not behind:
        return []
    problems: list[str] = []
    for mapper in policies:
        table = mapper.local_table
        if not isinstance(table, Table) or mapper.inherits is not None:
            continue
        for fk in sorted(table.foreign_keys, key=lambda fk: str(fk.parent)):
            # by name: resolving fk.column raises for a table no MetaData here declares
            target = behind.get(fk.target_fullname.rsplit(".", 1)[0])
            if target is None:
                continue
            name, other = mapper.class_.__name__, target.class_.__name__
            if mapper is target or table.fullname in behind:
                why = (
                    "the worker applies each table's (and partition's) queue on its own, so a "
                    "row can reach the database before the row it references, or a delete "
                    "before the delete of a row referencing it, and be dead-lettered"
                )
            else:
                why = (
                    f"a {other} row reaches the database only when the worker applies it, so "
                    f"a {name} referencing one just committed is refused (IntegrityError), "
                    f"and a delete of a {other} row a {name} references is dead-lettered"
                )
            problems.append(
                f"{name}: the foreign key {fk.parent} references {other}'s table, which is "
                f"written behind; {why}. Give {other} strategy='write_through' (its rows are "
                "in the database at commit), or drop the FOREIGN KEY constraint (map the "
                "relationship with primaryjoin=... and foreign())"
            )
    return problems


def redis_problems(client: SyncClient, policy: CachePolicy) -> list[str]:
    """Why ``client``'s server cannot keep write-behind queues (AOF off, an allkeys policy),
    or cannot make ``durable`` commits (a server older than 7.2, ``appendfsync no``).

    Asked at every ``attach()`` (two INFO sections, three with ``durable``): the setting can
    change between attaches. ``CachePolicy(accept_volatile=True)`` skips it, for
    deployments that accept losing queued writes with the Redis server.
    """
    if policy.accept_volatile:
        return []
    if is_cluster(client):
        # each shard keeps its own queues: every primary must keep them (a replica takes
        # its primary's settings when promoted only if configured alike: docs/cluster.md)
        cluster: Any = client
        return [
            f"Redis Cluster node {node.name}: {problem}"
            for node in cluster.get_primaries()
            for problem in redis_problems(cluster.get_redis_connection(node), policy)
        ]
    problems = _check_redis(client)
    if policy.durable and not problems:
        problems += _durable_problems(client)
    return problems


WAITAOF_SINCE = (7, 2)
"""The first Redis version with ``WAITAOF`` (Valkey has it from its first release)."""


def _durable_problems(client: SyncClient) -> list[str]:
    try:
        server = client.info("server")
    except RedisError as exc:
        return [f"cannot tell the Redis version ({exc}); durable=True needs Redis 7.2+"]
    version = str(server.get("redis_version", "0"))
    if _version(version) < WAITAOF_SINCE:
        return [
            (
                f"CachePolicy(durable=True) makes commit() wait until Redis has written the "
                f"queued writes to disk (WAITAOF), which Redis {version} lacks (7.2 and later, "
                "and Valkey, have it). Upgrade the server; or set appendfsync always on it, which "
                "puts every write on disk before Redis replies, and drop durable=True; or drop it "
                "and accept losing up to a second of commits on a crash of the Redis host "
                "(appendfsync everysec)"
            )
        ]
    fsync = _appendfsync(client)
    if fsync == "no":
        return [
            (
                "CachePolicy(durable=True) waits for Redis to write the queue to disk, and this "
                "server has appendfsync no: it leaves the writing to the operating system and "
                "would never confirm it. Set appendfsync everysec (a durable commit then waits "
                "about 0.1 s) or always"
            )
        ]
    return []


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _appendfsync(client: SyncClient) -> str | None:
    """The server's ``appendfsync``, or None when ``CONFIG GET`` is refused or renamed.

    Asked only for ``durable`` models: the application's minimal ACL has no ``CONFIG``
    (docs/security.md), and a refused one only costs the early warning; a commit would
    then fail with :class:`~sa_redis_cache.errors.NotOnDiskError` instead.
    """
    try:
        found: Any = client.config_get("appendfsync")
    except RedisError:
        return None
    value = found.get("appendfsync") if isinstance(found, dict) else None
    if isinstance(value, bytes):
        value = value.decode()
    return value if isinstance(value, str) else None


def _check_redis(client: SyncClient) -> list[str]:
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


def _server_settings(client: SyncClient) -> dict[str, str]:
    # INFO, never CONFIG GET: managed services often rename CONFIG away, and an ACL that
    # grants CONFIG GET also hands out the server's passwords (docs/security.md)
    persistence = client.info("persistence")
    memory = client.info("memory")
    return {
        "appendonly": "yes" if persistence.get("aof_enabled") else "no",
        "maxmemory-policy": str(memory.get("maxmemory_policy", "")),
    }
