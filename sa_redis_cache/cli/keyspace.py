"""One pass over a namespace's keys: entries, memory and counters per table, hit counters.

The prefixes are computed from :class:`~sa_redis_cache.protocol.KeyScheme` itself, so the
counts follow the key layout the library writes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table

from sa_redis_cache.counters import parse_counter
from sa_redis_cache.models import all_mappers
from sa_redis_cache.policy import CachePolicy
from sa_redis_cache.protocol.keys import PREFIX, KeyScheme
from sa_redis_cache.protocol.scripts import HOLDER_HORIZON_MS, MARK_HORIZON_MS
from sa_redis_cache.schema import is_library_table
from sa_redis_cache.stats import _with_rate
from sa_redis_cache.stats_publisher import STATS_TTL_MS, TOTAL, group_of

from .badkeys import bad_key, not_a_number, separate_errors

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Mapper

    from sa_redis_cache.redis_io import SyncClient

__all__ = ["MEMORY_SAMPLE", "collect"]

MEMORY_SAMPLE = 200
"""At most this many keys per table and kind are measured with ``MEMORY USAGE``."""

_MARK = "\x00"  # never part of a table name or key prefix: splits KeyScheme's output


def _before(text: str, mark: str = _MARK) -> str:
    return text[: text.index(mark)]


@dataclass
class _Group:
    """Keys of one kind: how many, and the first few (SCAN order is effectively random)."""

    count: int = 0
    sample: list[bytes] = field(default_factory=list)
    memory: int | None = None
    estimated: bool = False

    def add(self, key: bytes) -> None:
        self.count += 1
        if len(self.sample) < MEMORY_SAMPLE:
            self.sample.append(key)


@dataclass
class _TableKeys:
    entities: _Group = field(default_factory=_Group)
    queries: _Group = field(default_factory=_Group)
    row_writes: _Group = field(default_factory=_Group)
    counters: _Group = field(default_factory=_Group)


class _Layout:
    """Classifies the keys of one namespace by kind and table.

    The prefixes are computed from :class:`~sa_redis_cache.protocol.KeyScheme` itself rather
    than written out here, so a change of the key layout cannot silently skew the counts.
    A table's keys are told apart by :meth:`~sa_redis_cache.protocol.KeyScheme.split_key`,
    whatever tag they carry (the table's, its slot group's, a spread entry's); a group
    the scan finds that the models did not declare is learnt from its keys, in this
    layout's own copy of the key scheme (``self.keys``), so that its counters are found.
    """

    def __init__(self, keys: KeyScheme) -> None:
        self.keys = KeyScheme(keys.namespace, dict(keys.groups))
        probe, table = KeyScheme(keys.namespace), _MARK
        start = len(probe.table_prefix(table))
        self.tails = (
            (_before(probe.entity_key(table, _MARK, _MARK, _MARK)[start:]), "entities"),
            (_before(probe.query_key(table, _MARK)[start:]), "queries"),
            (_before(probe.row_write_key(table, _MARK)[start:]), "row_writes"),
        )
        self.counters = frozenset(
            key[start:]
            for key in (
                probe.version_key(table),
                probe.writers_key(table),
                probe.generation_key(table),
            )
        )
        self.function_start = _before(keys.function_key(_MARK, _MARK))
        self.stats_start = _before(keys.stats_key(_MARK))
        self.local_start = _before(keys.local_stats_key(_MARK))
        self.holders_start = _before(keys.holders_key(_MARK))

    def classify(self, key: str) -> tuple[str, str]:
        """``(table, kind)``, ``("", "function:<prefix>")``, ``("", "stats:<scope>")``,
        ``("", "local:<holder>")``, ``("", "holders")`` or ``("", "other")``."""
        found = self.keys.split_key(_raw(key))
        if found is not None:
            table = found.table.decode("utf-8", "surrogateescape")
            tail = found.tail.decode("utf-8", "surrogateescape")
            group = found.group
            if group is not None and b":" not in group and table not in self.keys.groups:
                self.keys.groups[table] = group.decode("utf-8", "surrogateescape")
            for start, kind in self.tails:
                if tail.startswith(start):
                    return table, kind
            if tail in self.counters:
                return table, "counters"
        elif key.startswith(self.function_start):
            prefix = key[len(self.function_start) :].rpartition(":")[0]
            return "", "function:" + prefix
        elif key.startswith(self.stats_start):
            return "", "stats:" + key[len(self.stats_start) :]
        elif key.startswith(self.local_start):
            return "", "local:" + key[len(self.local_start) :]
        elif key.startswith(self.holders_start):
            return "", "holders"
        return "", "other"


def _model_tables(mappers: list[Mapper[Any]]) -> dict[str, list[Mapper[Any]]]:
    """The tables of ``mappers``, each with the mappers that use it."""
    found: dict[str, list[Mapper[Any]]] = defaultdict(list)
    for mapper in mappers:
        for table in mapper.tables:
            if isinstance(table, Table):
                found[table.fullname].append(mapper)
    return found


def _number(raw: bytes | None) -> int | str | None:
    if raw is None:
        return None
    found = parse_counter(raw)
    # not a counter as Redis reads one: shown as is, the cache deletes it
    return raw.decode("utf-8", "replace") if found is None else found


def _raw(key: str) -> bytes:
    # table names come from SCAN, decoded with surrogateescape: this gives back the bytes
    # of a key that is not UTF-8 (redis-py would refuse to encode the surrogates)
    return key.encode("utf-8", "surrogateescape")


def _measure(client: SyncClient, groups: list[_Group]) -> None:
    pipe = client.pipeline(transaction=False)
    for group in groups:
        for key in group.sample:
            pipe.memory_usage(key)
    sizes = iter(pipe.execute())
    for group in groups:
        measured = [size for _ in group.sample if (size := next(sizes)) is not None]
        if group.count == 0:
            group.memory = 0
        elif measured:
            # keys that expired between SCAN and MEMORY USAGE are simply not in the mean
            group.memory = round(sum(measured) / len(measured) * group.count)
            group.estimated = len(measured) < group.count


def collect(
    client: SyncClient, keys: KeyScheme, mappers: list[Mapper[Any]] | None = None
) -> dict[str, Any]:
    """Scan the namespace once and describe it per table (the ``--json`` document).

    The tables found in Redis are listed, and those of ``mappers`` (by default every
    mapped class of the process) even when they hold nothing.

    Example::

        collect(redis.Redis(), KeyScheme("shop"))["tables"][0]["entity_entries"]
    """
    layout = _Layout(keys)
    keys = layout.keys  # with the slot groups the scan found
    per_table: defaultdict[str, _TableKeys] = defaultdict(_TableKeys)
    functions: defaultdict[str, _Group] = defaultdict(_Group)
    stats_scopes: list[tuple[str, bytes]] = []
    local_tiers: list[bytes] = []
    other = _Group()
    total = 0
    # one SCAN over the namespace, not one per table and kind: MATCH filters after the
    # server has walked the whole keyspace, so every extra pattern costs a full walk
    match = keys.namespace_pattern
    for raw in client.scan_iter(match=match, count=1000):
        total += 1
        table, kind = layout.classify(raw.decode("utf-8", "surrogateescape"))
        if table:
            getattr(per_table[table], kind).add(raw)
        elif kind.startswith("function:"):
            functions[kind.partition(":")[2]].add(raw)
        elif kind.startswith("stats:"):
            stats_scopes.append((kind.partition(":")[2], raw))
        elif kind.startswith("local:"):
            local_tiers.append(raw)
        elif kind != "holders":
            other.add(raw)
    model_tables = _model_tables(all_mappers() if mappers is None else mappers)
    # the library's own tables (the worker's offsets) hold no entry of the application's
    tables = sorted(t for t in set(per_table) | set(model_tables) if not is_library_table(t))
    entries = [g for t in tables for g in (per_table[t].entities, per_table[t].queries)]
    _measure(client, [*entries, *functions.values(), other])

    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    pipe = client.pipeline(transaction=False)
    requests: list[tuple[bytes, str]] = []
    for table in tables:
        version_key, generation_key = (
            _raw(keys.version_key(table)),
            _raw(keys.generation_key(table)),
        )
        writers_key = _raw(keys.writers_key(table))
        holders_key = _raw(keys.holders_key(table))
        pipe.get(version_key)
        pipe.get(generation_key)
        # a mark's score is its expiry: marks of crashed writers linger until it passes;
        # one scored beyond any writer's or holder's was planted, and is never honoured
        pipe.zcount(writers_key, now_ms, now_ms + MARK_HORIZON_MS)
        pipe.zcount(holders_key, now_ms, now_ms + HOLDER_HORIZON_MS)  # live local-tier leases
        requests += [
            (version_key, "a string (version counter)"),
            (generation_key, "a string (generation counter)"),
            (writers_key, "a sorted set (writer marks)"),
            (holders_key, "a sorted set (local-tier holders)"),
        ]
    for _scope, stats_key in stats_scopes:
        pipe.hgetall(stats_key)
        pipe.pttl(stats_key)
        requests += [(stats_key, "a hash (published counters)"), (stats_key, "any key")]
    for local_key in local_tiers:
        pipe.hgetall(local_key)
        requests.append((local_key, "a hash (a process's local-tier gauges)"))
    # a key of the wrong type fails its own command only: reported, the others shown
    answers, bad = separate_errors(client, requests, pipe.execute(raise_on_error=False))
    replies = iter(answers)

    rows = []
    for table in tables:
        version, generation, writers, holders = (next(replies) for _ in range(4))
        for key, value, what in (
            (keys.version_key(table), version, "version counter"),
            (keys.generation_key(table), generation, "generation counter"),
        ):
            if value is not None and not isinstance(_number(value), int):
                bad.append(bad_key(_raw(key), not_a_number(value, what)))
        found = per_table[table]
        mappers = model_tables.get(table, [])
        entity_mem, query_mem = found.entities.memory, found.queries.memory
        rows.append(
            {
                "table": table,
                "models": [_model_entry(m) for m in mappers],
                "entity_entries": found.entities.count,
                "query_entries": found.queries.count,
                "row_write_counters": found.row_writes.count,
                "entity_memory_bytes": entity_mem,
                "query_memory_bytes": query_mem,
                "memory_bytes": None
                if entity_mem is None or query_mem is None
                else entity_mem + query_mem,
                "memory_estimated": found.entities.estimated or found.queries.estimated,
                "version": _number(version),
                "generation": _number(generation),
                "writers_in_flight": None if writers is None else int(writers),
                "local_holders": None if holders is None else int(holders),
            }
        )
    counters, age = _counters(stats_scopes, replies, bad)
    tiers = [_local_tier(next(replies)) for _ in local_tiers]
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "namespace": keys.namespace,
        "keys": total,
        "memory_sample_limit": MEMORY_SAMPLE,
        "tables": rows,
        "functions": [
            {
                "prefix": prefix,
                "entries": group.count,
                "memory_bytes": group.memory,
                "memory_estimated": group.estimated,
            }
            for prefix, group in sorted(functions.items())
        ],
        "other_keys": other.count,
        "counters": counters,
        "counters_published_seconds_ago": age,
        "local_tiers": sorted((t for t in tiers if t), key=lambda t: str(t.get("holder"))),
        "bad_keys": bad,
        # where the keys are, when this namespace has none (a misspelt --namespace)
        "namespaces_with_keys": namespaces_with_keys(client) if total == 0 else None,
    }


_LOCAL_TEXT = frozenset(("holder", "consistency"))
_LOCAL_FLAGS = {"True": True, "False": False}  # how the tier publishes a bool (str())


def _local_tier(fields: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """One process's published local-tier gauges (numbers as numbers, ``ready`` a bool as
    in ``cache.stats()["local"]``; None: not a hash)."""
    if not fields:
        return None
    out: dict[str, Any] = {}
    for raw_name, raw in fields.items():
        name = raw_name.decode("utf-8", "replace")
        text = raw.decode("utf-8", "replace")
        if name in _LOCAL_TEXT:
            out[name] = text
            continue
        if name == "ready":
            out[name] = _LOCAL_FLAGS.get(text)
            continue
        try:
            out[name] = float(text) if "." in text else int(text)
        except ValueError:
            out[name] = None
    return out


NAMESPACE_SCAN_LIMIT = 100_000
"""At most this many keys are looked at to find the namespaces that have keys."""


def namespaces_with_keys(client: SyncClient, limit: int = NAMESPACE_SCAN_LIMIT) -> dict[str, int]:
    """The namespaces that have keys on this server, with how many (of the first ``limit``).

    Example::

        namespaces_with_keys(redis.Redis())  # {"shop": 1520, "demo": 239}
    """
    found: dict[str, int] = defaultdict(int)
    start = len(PREFIX) + 1
    for seen, raw in enumerate(client.scan_iter(match=f"{PREFIX}:*", count=1000)):
        if seen >= limit:
            break
        name = raw[start:].partition(b":")[0].decode("utf-8", "replace")
        if name and not name.startswith("{"):
            found[name] += 1
    return dict(sorted(found.items()))


def _counters(
    scopes: list[tuple[str, bytes]], replies: Iterator[Any], bad: list[dict[str, str]]
) -> tuple[dict[str, Any], float | None]:
    """The published counters in the shape of ``cache.stats()``, and the newest publish's age.

    Each publish renews its hashes' TTL to ``STATS_TTL_MS``: what is missing from it is
    the time since the last publish. A field that is no number is left out and reported
    in ``bad``; a scope whose key is no hash (``fields`` None) is left out.
    """
    out: dict[str, Any] = {"total": _with_rate({}), "models": {}, "regions": {}, "functions": {}}
    newest: int | None = None
    for scope, key in scopes:
        fields, pttl = next(replies), next(replies)
        if fields is None:
            continue
        values: dict[str, int] = {}
        for name, raw in fields.items():
            number = _number(raw)
            field_name = name.decode("utf-8", "replace")
            if isinstance(number, int):
                values[field_name] = number
            else:
                bad.append(bad_key(key, f"field {field_name!r} " + not_a_number(raw, "counter")))
        if pttl > 0:
            newest = max(newest or 0, pttl)
        found = group_of(scope)
        if scope == TOTAL:
            out["total"] = _with_rate(values)
        elif found is not None:
            out[found[0]][found[1]] = _with_rate(values)
    age = None if newest is None else max(0.0, (STATS_TTL_MS - newest) / 1000)
    return out, age


def _model_entry(mapper: Mapper[Any]) -> dict[str, Any]:
    policy = getattr(mapper.class_, "__cache__", None)
    if not isinstance(policy, CachePolicy):
        return {"name": mapper.class_.__name__, "strategy": None, "ttl": None}
    return {"name": mapper.class_.__name__, "strategy": policy.strategy, "ttl": policy.ttl}
