"""``inspect --statement``: the query entry of one statement with its parameters.

The key is computed the way the read path computes it (``plan`` and ``entry_key`` of the
cache's read path), with an engine made from the application's URL that never connects.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.sql.expression import ClauseElement

from sa_redis_cache import compat
from sa_redis_cache.codec import CodecError, unpack
from sa_redis_cache.protocol import KeyScheme
from sa_redis_cache.protocol.cluster import join_mget, split_mget
from sa_redis_cache.protocol.keys import query_digest
from sa_redis_cache.redaction import redact_url
from sa_redis_cache.redis_io import is_cluster

from .badkeys import (
    MISSES,
    NO_ENTRY,
    bad_key,
    bad_keys_blocks,
    not_a_number,
    separate_errors,
    undecodable,
    wrong_type,
)
from .common import Settings, call_factory, import_object
from .output import Block, Table, human_ttl, int_or_none, text_or_dash
from .values import parse_value

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sa_redis_cache.cache import Cache
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.protocol.scripts import Command
    from sa_redis_cache.reads import StatementPlan
    from sa_redis_cache.redis_io import SyncClient

__all__ = ["inspect_statement", "statement_blocks"]

_REPR_WIDTH = 160


def _load_statement(spec: str) -> Any:
    obj: Any = import_object(spec, param_hint="--statement")
    if not isinstance(obj, ClauseElement) and callable(obj):
        obj = call_factory(spec, obj, param_hint="--statement", wanted="a select()")
    if not isinstance(obj, ClauseElement) or not getattr(obj, "is_select", False):
        raise click.BadParameter(
            f"{spec} is {type(obj).__name__}, not a select() statement", param_hint="--statement"
        )
    return obj


def _parse_params(pairs: tuple[str, ...], bindparams: list[Any]) -> dict[str, Any]:
    named = {bp.key: bp for bp in bindparams if not str(bp.key).startswith("%(")}
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--param")
        bp = named.get(name)
        if bp is None:
            known = ", ".join(sorted(named)) or "none (give values with bindparam('name'))"
            raise click.BadParameter(
                f"the statement has no parameter {name!r}; its named parameters: {known}",
                param_hint="--param",
            )
        values[name] = parse_value(text, bp.type, f"parameter {name}", param_hint="--param")
    for name, bp in named.items():
        if bp.required and name not in values:
            raise click.BadParameter(
                f"the statement needs a value for {name!r}: add --param {name}=VALUE",
                param_hint="--param",
            )
    return values


def inspect_statement(
    settings: Settings,
    spec: str,
    pairs: tuple[str, ...],
    bind_url: str | None,
    max_rows: int,
) -> dict[str, Any]:
    """Describe the query entry of one statement with its parameters (the ``--json`` document).

    Example::

        inspect_statement(settings, "app.queries:books", ("category=3",), None, 5)["state"]
    """
    statement = _load_statement(spec)
    cache = settings.cache()
    cache_key = compat.statement_cache_key(statement)
    params = _parse_params(pairs, [] if cache_key is None else list(cache_key.bindparams))
    # the database (as it names itself) and the URL's dialect and driver are part of the
    # key: the URL is used as the application writes it (no driver added)
    engine = settings.engine(bind_url, option="--bind-url", exact=True)
    shown = redact_url(engine.url.render_as_string(hide_password=False))
    document: dict[str, Any] = {"statement": spec, "bind": shown}
    engine.dispose()
    if cache_key is None:
        document.update(state="uncacheable", detail="SQLAlchemy gives it no cache key")
        return document
    with _library_log() as reasons:
        plan = cache.inspector.statement_plan(statement)
    if plan is None:
        # the library's own words, e.g. "statement runs uncached: textual SQL names..."
        why = "; ".join(reasons) or "the read path refuses it"
        document.update(state="uncacheable", detail=why)
        return document
    database = settings.database(bind_url, option="--bind-url")
    # as the read path reads it there: with the tables its views read
    plan = cache.inspector.statement_plan(statement, database) or plan
    key = cache.inspector.statement_key(statement, params, database=database)
    if key is None:
        document.update(state="uncacheable", detail="a parameter value cannot be encoded exactly")
        return document
    raw, pttl, current, invalidated, bad = _fetch(cache.client, plan, key)
    entry_problem = next((b["problem"] for b in bad if b["key"] == key), None)
    exists = raw is not None or entry_problem is not None
    document.update(
        key=key,
        tables=list(plan.table_names),
        exists=exists,
        ttl_ms=pttl if exists else None,
        current_versions=[int_or_none(v) for v in current],
        stored_versions=None,
        invalidated=bool(invalidated),
        bad_keys=bad,
    )
    if not exists:
        detail = "no entry: the next execution reads the database"
        if invalidated:
            detail += (
                " (cache.invalidate_query() removed it recently: a fill whose read began "
                "before that is refused)"
            )
        document.update(state="absent", detail=detail)
        return document
    if entry_problem is not None:
        document.update(state="undecodable", detail=f"the key {entry_problem}: {NO_ENTRY}")
        return document
    assert raw is not None  # it exists, and is a string
    try:
        stored, body = _query_payload(raw, query_digest(key), len(plan.table_names))
        document["stored_versions"] = stored
        document.update(_describe_body(cache, plan, body, max_rows))
    except _UnknownModel as exc:
        document["rows_error"] = str(exc)  # the versions still tell valid from stale
    except Exception as exc:  # noqa: BLE001 - planted bytes may break any step of decoding
        document.update(state="undecodable", detail=f"{undecodable(exc)}: {MISSES}")
        return document
    versions = list(
        zip(
            plan.table_names, document["stored_versions"], document["current_versions"], strict=True
        )
    )
    unreadable = [t for t, _s, c in versions if c is None]
    moved = [t for t, s, c in versions if c is not None and s != c]
    if unreadable:
        document.update(
            state="stale",
            detail=f"the version counter of {', '.join(unreadable)} is missing or unreadable: "
            "the next execution misses",
        )
    elif moved:
        document.update(state="stale", detail=f"written since it was stored: {', '.join(moved)}")
    else:
        document.update(state="valid", detail="the next execution is served from this entry")
    return document


def _fetch(
    client: SyncClient, plan: StatementPlan, key: str
) -> tuple[bytes | None, int | None, list[Any], bool, list[dict[str, str]]]:
    """The entry, its PTTL, the current versions, whether it was invalidated, bad keys.

    A key of the wrong type answers None and is reported in the bad keys, as is a
    version that is no number; nothing is raised.
    """
    commands: list[Command] = [
        ("GET", key),
        ("PTTL", key),
        ("MGET", *plan.version_keys),
        ("EXISTS", KeyScheme.invalidations_key(key)),
        # MGET answers nil for a key of another type: TYPE tells
        *(("TYPE", version_key) for version_key in plan.version_keys),
    ]
    replies, bad = separate_errors(
        client,
        [
            (key, "a string (query entry)"),
            (key, "any key"),
            (plan.version_keys[0], "strings (version counters)"),
            (KeyScheme.invalidations_key(key), "any key"),
        ]
        + [(version_key, "any key") for version_key in plan.version_keys],
        _send(client, commands),
    )
    raw, pttl, current, invalidated, *kinds = replies
    if current is None:  # MGET itself was refused: reported, every version unknown
        current = [None] * len(plan.version_keys)
    for version_key, value, kind in zip(plan.version_keys, current, kinds, strict=True):
        if kind not in (b"string", b"none"):
            bad.append(bad_key(version_key, wrong_type(kind, "a string (version counter)")))
        elif value is not None and int_or_none(value) is None:
            bad.append(bad_key(version_key, not_a_number(value, "version counter")))
    return raw, pttl, current, bool(invalidated), bad


def _send(client: SyncClient, commands: list[Command]) -> list[Any]:
    """``commands`` in one pipeline, errors as replies; on a Redis Cluster, a statement's
    ``MGET`` over several tables' slots is sent as one ``MGET`` per slot (a cluster refuses
    a multi-slot one) and its replies are put back in order."""
    sent, where = split_mget(commands) if is_cluster(client) else (commands, None)
    pipe = client.pipeline(transaction=False)
    for command in sent:
        pipe.execute_command(*command)
    replies = pipe.execute(raise_on_error=False)
    if where is None:
        return list(replies)
    # a part that failed makes the whole MGET fail, as one MGET would, for the report
    failed = {
        given: next(
            reply for reply in replies[at : at + len(groups)] if isinstance(reply, Exception)
        )
        for given, (at, groups) in enumerate(where)
        if groups is not None
        and any(isinstance(reply, Exception) for reply in replies[at : at + len(groups)])
    }
    if not failed:
        return join_mget(commands, where, replies)
    kept = [(at, None) if i in failed else (at, groups) for i, (at, groups) in enumerate(where)]
    joined = join_mget(commands, kept, replies)
    return [failed.get(i, reply) for i, reply in enumerate(joined)]


class _UnknownModel(Exception):
    """The entry holds objects of a model this process has not imported."""


@contextmanager
def _library_log() -> Iterator[list[str]]:
    """The messages the library logs meanwhile (why a statement runs uncached, at INFO)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("sa_redis_cache")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the library logs the reason at INFO, quiet by default
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _query_payload(raw: bytes, owner: str, tables: int) -> tuple[list[Any], list[Any]]:
    """``(versions, body)`` of a query entry: ``[[owner, ..., *versions], body]``.

    The stamp opens with the statement's digest and ends with one version per table; what
    the read path keeps in between (timing for stampede control) is not needed here, so
    it is skipped rather than parsed.
    """
    payload = unpack(raw)
    if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not list:
        raise CodecError("not a query entry of this cache")
    stamp, body = payload
    if not stamp or stamp[0] != owner:
        raise CodecError("the entry of another statement")
    versions = stamp[len(stamp) - tables :]
    if len(stamp) < tables + 1 or not all(type(v) is int for v in versions):
        raise CodecError("the entry's versions do not match the statement's tables")
    return versions, body


def _describe_body(cache: Cache, plan: StatementPlan, body: Any, max_rows: int) -> dict[str, Any]:
    """The columns, counts and first rows of a query entry's body.

    Raises CodecError for a body that is not of the read path's shape, and _UnknownModel
    for objects of a model this process has not imported.
    """
    if type(body) is not list or len(body) != 5:
        raise CodecError("the entry's body is not [columns, single, models, objects, rows]")
    keys, single, mapper_names, objects, rows = body
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise CodecError("the entry's column names are not a list of text")
    if type(single) is not bool or type(objects) is not list or type(rows) is not list:
        raise CodecError("the entry's objects or rows are not lists")
    if type(mapper_names) is not list or not all(type(n) is str for n in mapper_names):
        raise CodecError("the entry's model names are not a list of text")
    infos = []
    for name in mapper_names:
        info = cache.inspector.model_named(name)
        if info is None or info.codec is None:
            raise _UnknownModel(
                f"its rows hold {name}, which this process has not imported: pass --models"
            )
        infos.append(info)
    for obj in objects:
        if (
            type(obj) is not list
            or len(obj) != 4
            or type(obj[0]) is not int
            or not 0 <= obj[0] < len(infos)
        ):
            raise CodecError("an object of the entry is not [model, row, not loaded, related]")
    decoded = [_object(infos[o[0]], o) for o in objects[: _needed(objects, rows, single, max_rows)]]
    shown = []
    for row in rows[:max_rows]:
        if single:
            shown.append({keys[0]: decoded[row]})
            continue
        entities, scalars = row
        values: list[Any] = [None] * len(keys)
        for pos, idx in zip(plan.shape.entity_positions, entities, strict=True):
            values[pos] = None if idx is None else decoded[idx]
        for pos, value in zip(
            plan.shape.scalar_positions, plan.shape.scalar_codec.load_row(scalars), strict=True
        ):
            values[pos] = value
        shown.append(dict(zip(keys, values, strict=True)))
    counts = Counter(infos[o[0]].mapper.class_.__name__ for o in objects)
    return {"columns": list(keys), "row_count": len(rows), "objects": dict(counts), "rows": shown}


def _needed(objects: list[Any], rows: list[Any], single: bool, max_rows: int) -> int:
    # only the objects the shown rows refer to are decoded (indices are in first-seen order)
    refs = (
        list(rows[:max_rows])
        if single
        else [i for r in rows[:max_rows] for i in r[0] if i is not None]
    )
    return min(len(objects), max(refs, default=-1) + 1)


def _object(info: ModelInfo, obj: list[Any]) -> dict[str, Any]:
    assert info.codec is not None
    values = info.codec.load_row(obj[1])
    missing = set(obj[2]) if isinstance(obj[2], list) else set()
    columns = {
        k: v
        for i, (k, v) in enumerate(zip(info.column_keys, values, strict=True))
        if i not in missing
    }
    related = obj[3] or {}
    if type(related) is not dict:
        raise CodecError("an object's related objects are not a mapping")
    return {"model": info.mapper.class_.__name__, "columns": columns, "relationships": related}


def _objecttext_or_dash(obj: Any) -> str:
    if not isinstance(obj, dict) or "model" not in obj:
        return repr(obj)
    inner = ", ".join(f"{k}={v!r}" for k, v in obj["columns"].items())
    rels = obj["relationships"]
    if rels:
        inner += ", " + ", ".join(f"{k}=<loaded>" for k in rels)
    text = f"{obj['model']}({inner})"
    return text if len(text) <= _REPR_WIDTH else text[: _REPR_WIDTH - 1] + "…"


def statement_blocks(document: dict[str, Any]) -> list[Block]:
    """The human-readable form of :func:`inspect_statement`'s document."""
    facts = [["statement", document["statement"]], ["bind", document["bind"]]]
    if "key" in document:
        versions = "; ".join(
            f"{t}: stored {text_or_dash(s)}, current {text_or_dash(c)}"
            for t, s, c in zip(
                document["tables"],
                document["stored_versions"] or [None] * len(document["tables"]),
                document["current_versions"],
                strict=True,
            )
        )
        facts += [
            ["tables", ", ".join(document["tables"])],
            ["key", document["key"]],
            ["exists", f"yes, TTL {human_ttl(document['ttl_ms'])}" if document["exists"] else "no"],
            ["versions", versions],
        ]
    facts.append(["state", f"{document['state']}: {document['detail']}"])
    if "row_count" in document:
        objects = ", ".join(f"{n} x {name}" for name, n in document["objects"].items()) or "none"
        facts.append(["rows", f"{document['row_count']} row(s); objects: {objects}"])
    if "rows_error" in document:
        facts.append(["rows", f"not decoded: {document['rows_error']}"])
    out: list[Block] = [Table(["", ""], facts, show_header=False)]
    if document.get("rows"):
        columns = document["columns"]
        out.append(
            Table(
                ["#", *columns],
                [
                    [str(i), *(_objecttext_or_dash(r[c]) for c in columns)]
                    for i, r in enumerate(document["rows"])
                ],
                right={0},
                title=f"First {len(document['rows'])} row(s)",
            )
        )
    return out + bad_keys_blocks(document.get("bad_keys", []))
