"""``inspect``: what the cache stores for one row or one statement, decoded.

Keys are computed by the library's own functions (``KeyScheme``, ``pk_text``, the read
path's ``plan`` and ``entry_key``) and values decoded by its codec, so what is shown is
what a read in the application would find.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from sa_redis_cache.codec import CodecError
from sa_redis_cache.models import mapper_name
from sa_redis_cache.protocol import pk_text
from sa_redis_cache.reads import entity_entry
from sa_redis_cache.strategies.write_behind.columns import is_write_behind

from .badkeys import (
    MISSES,
    NO_ENTRY,
    bad_key,
    bad_keys_blocks,
    not_a_number,
    printable_key,
    separate_errors,
    undecodable,
)
from .common import Settings, common_options, resolve_model
from .output import Block, Table, echo_json, human_ttl, int_or_none, render, text_or_dash
from .statement import inspect_statement, statement_blocks
from .values import RowKeys, parse_pk, row_key_in, row_keys

if TYPE_CHECKING:
    from sa_redis_cache.binds import Database
    from sa_redis_cache.models import ModelInfo

__all__ = ["inspect_command", "inspect_row", "row_blocks"]


@click.command("inspect", short_help="Show the stored entry of a row or a statement, decoded.")
@click.argument("model", required=False, metavar="[MODEL]")
@click.argument("pk", nargs=-1, metavar="[PK]...")
@click.option(
    "--statement",
    metavar="MODULE:ATTR",
    help="A select() object, or a function of no arguments returning one, to inspect "
    "instead of a row.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="An execute-time parameter of --statement (bindparam NAME); repeatable.",
)
@click.option(
    "--bind-url",
    metavar="URL",
    help="URL of the engine the application runs --statement on (or reads the row "
    "through), with the application's driver: the database it reaches and the driver are "
    "part of the key (it connects once to ask the database). Default: --database-url.",
)
@click.option(
    "--schema",
    metavar="NAME",
    help="For a row: the schema it lives in when the application maps the table through "
    "a schema_translate_map (one schema per tenant). Default: the table's own schema.",
)
@click.option(
    "--rows",
    "max_rows",
    type=click.IntRange(min=0),
    metavar="N",
    default=5,
    show_default=True,
    help="How many decoded rows of a statement's entry to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@common_options("redis_url", "namespace", "database_url", "models")
@click.pass_obj
def inspect_command(
    settings: Settings,
    model: str | None,
    pk: tuple[str, ...],
    statement: str | None,
    params: tuple[str, ...],
    bind_url: str | None,
    schema: str | None,
    max_rows: int,
    as_json: bool,
) -> None:
    """Show what is stored for one row (MODEL PK...) or one statement (--statement).

    MODEL is module:Class, or a class name among the models imported with --models.
    PK gives each primary key column's value, in the mapper's order. The output shows
    the key, its TTL, the decoded entry, and whether a read would use it (valid) or
    miss (stale: the table was written since).

    \b
    Examples:
      sa-redis-cache --models examples.shop inspect Product 7
      sa-redis-cache inspect --statement app.queries:books --param category=3
    """
    if statement is not None:
        if model is not None:
            raise click.UsageError("give MODEL PK... or --statement, not both")
        settings.load_models()
        document = inspect_statement(settings, statement, params, bind_url, max_rows)
        if as_json:
            echo_json(document)
        else:
            render(statement_blocks(document))
        return
    if model is None:
        raise click.UsageError("give MODEL PK... (e.g. examples.shop:Product 7) or --statement")
    if params:
        raise click.UsageError("--param goes with --statement")
    settings.load_models()
    document = inspect_row(settings, resolve_model(model, settings), pk, bind_url, schema)
    if as_json:
        echo_json(document)
    else:
        render(row_blocks(document))


# --------------------------------------------------------------------------- one row


def _why_not_entity_cached(info: ModelInfo) -> str | None:
    if info.entity_cached:
        return None
    name = info.mapper.class_.__name__
    if info.policy is None:
        return f"{name} has no __cache__ policy: session.get() does not use the entity cache"
    if not info.policy.entity_cache:
        return f"{name} has CachePolicy(entity_cache=False)"
    if info.codec is None:
        return info.uncacheable_reason or f"{name} has a column the codec cannot store"
    if info.entity_unfit is not None:
        return f"{name} {info.entity_unfit}, which the entity cache skips"
    return f"{name} uses inheritance or a polymorphic mapping, which the entity cache skips"


def inspect_row(
    settings: Settings,
    cls: type,
    texts: tuple[str, ...],
    bind_url: str | None = None,
    schema: str | None = None,
) -> dict[str, Any]:
    """Describe the entity entry of one row, and of a write-behind row its pending state
    (the ``--json`` document).

    Entity entries are kept per database and schema: ``bind_url`` (default
    ``--database-url``) names the database, ``schema`` the schema the row lives in when
    the application translates the table's schema. Without a database URL, the row's
    entries are looked for in every database and schema (SCAN), and the first is shown.
    Whatever the keys hold, this returns: an entry that does not decode is
    ``undecodable`` with what is wrong with it, a key of the wrong type or a counter that
    is no number is listed in ``bad_keys``. ``state`` says what ``session.get()`` does:
    ``pending`` when a write-behind write of the row is queued and not flushed yet (it
    returns the queued row, or None for a queued delete, whatever the entry holds);
    ``entry_state`` is the entity entry's own.

    Example::

        inspect_row(settings, Product, ("7",))["state"]  # "valid", "stale", "absent"...
    """
    cache = settings.cache()
    info, pk = parse_pk(cache, cls, texts)
    keys = cache.keys
    text = pk_text(pk)
    others: list[str] = []
    database = None
    found = RowKeys([], [])
    if bind_url or settings.database_url:
        database = settings.database(bind_url, option="--bind-url")
        key = row_key_in(cache, info, pk, database, schema)
    else:
        found = row_keys(cache, info, pk)
        entries = found.entries
        key = entries[0] if entries else keys.row_pattern(info.table, info.schema_hash, text)
        others = entries[1:]
    pending_key, other_pending = _pending_keys(
        settings, cls, info, pk, key, database, schema, found.pending
    )
    version_key, generation_key = keys.version_key(info.table), keys.generation_key(info.table)
    writes_key = keys.row_write_key(info.table, text)
    pipe = cache.client.pipeline(transaction=False)
    pipe.get(key)
    pipe.pttl(key)
    pipe.get(version_key)
    pipe.get(generation_key)
    pipe.get(writes_key)
    requests: list[tuple[str | bytes, str]] = [
        (key, "a string (entity entry)"),
        (key, "any key"),
        (version_key, "a string (version counter)"),
        (generation_key, "a string (generation counter)"),
        (writes_key, "a string (row write counter)"),
    ]
    if pending_key is not None:
        pipe.get(pending_key)
        requests.append((pending_key, "a string (pending write-behind state)"))
    replies, bad = separate_errors(cache.client, requests, pipe.execute(raise_on_error=False))
    raw, pttl, version, generation, row_writes = replies[:5]
    for counter_key, value, what in (
        (version_key, version, "version counter"),
        (generation_key, generation, "generation counter"),
        (writes_key, row_writes, "row write counter"),
    ):
        if value is not None and int_or_none(value) is None:
            bad.append(bad_key(counter_key, not_a_number(value, what)))
    wrong_type = next((b["problem"] for b in bad if b["key"] == printable_key(key)), None)
    exists = raw is not None or wrong_type is not None
    document: dict[str, Any] = {
        "model": mapper_name(info.mapper),
        "table": info.table,
        "pk": list(pk),
        "key": key,
        "entity_cached": info.entity_cached,
        "not_cached_because": _why_not_entity_cached(info),
        "exists": exists,
        "ttl_ms": pttl if exists else None,
        "current_version": int_or_none(version),
        "current_generation": int_or_none(generation),
        "stored_generation": None,
        "current_row_writes": int_or_none(row_writes),
        "stored_row_writes": None,
        "row": None,
        "not_loaded": [],
        # entries of the same row in other databases or schemas (found without a URL)
        "other_keys": others,
        "bad_keys": bad,
        "pending": None,
    }
    state, detail = _entry_state(document, info, raw, pk, wrong_type)
    document.update(state=state, detail=detail, entry_state=state, entry_detail=detail)
    if pending_key is not None:
        pending = _pending(settings, cls, pk, pending_key, replies[5], bad)
        pending["other_keys"] = other_pending
        document["pending"] = pending
        if pending["op"] is not None:
            document.update(state="pending", detail=pending["detail"])
    return document


def _pending_keys(
    settings: Settings,
    cls: type,
    info: ModelInfo,
    pk: tuple[Any, ...],
    entry_key: str,
    database: Database | None,
    schema: str | None,
    found: list[str],
) -> tuple[str | None, list[str]]:
    """The pending key of a write-behind row in the database and schema of the entity
    entry shown (None: not a write-behind model, or none found without a database URL),
    and the row's pending keys in other databases and schemas (``found``, the row's
    pending keys the SCAN without a database found)."""
    if not is_write_behind(info):
        return None, []
    cache = settings.cache()
    if database is not None:
        return cache.inspector.pending_key(cls, pk, database=database, schema=schema), []
    keys = cache.keys
    chosen = next(
        (k for k in found if keys.pending_entity_key(info.table, info.schema_hash, k) == entry_key),
        found[0] if found else None,
    )
    return chosen, [k for k in found if k != chosen]


def _pending(
    settings: Settings,
    cls: type,
    pk: tuple[Any, ...],
    key: str,
    raw: bytes | None,
    bad: list[dict[str, str]],
) -> dict[str, Any]:
    """The pending state under ``key``, as ``session.get()`` reads it."""
    pending: dict[str, Any] = {
        "key": key,
        "stream_id": None,
        "op": None,
        "row": None,
        "detail": "no queued write: session.get() reads the entity entry",
    }
    wrong_type = next((b["problem"] for b in bad if b["key"] == printable_key(key)), None)
    if wrong_type is not None:
        pending["detail"] = f"the key {wrong_type}: session.get() finds no queued write in it"
        return pending
    if raw is None:
        return pending
    try:
        state = settings.cache().inspector.pending_state(key, raw, cls, pk)
    except Exception as exc:  # noqa: BLE001 - planted bytes may break any step of decoding
        pending["detail"] = f"{undecodable(exc)}: session.get() skips it"
        return pending
    pending.update(stream_id=state.stream_id, row=state.row)
    if state.row is None:
        pending["op"] = "delete"
        pending["detail"] = (
            f"a write-behind delete is queued (stream entry {state.stream_id}) and not "
            "flushed yet: session.get() returns None"
        )
    else:
        pending["op"] = "upsert"
        pending["detail"] = (
            f"a write-behind write is queued (stream entry {state.stream_id}) and not "
            "flushed yet: session.get() returns the queued row, whatever the entity entry holds"
        )
    return pending


def _entry_state(
    document: dict[str, Any],
    info: ModelInfo,
    raw: bytes | None,
    pk: tuple[Any, ...],
    wrong_type: str | None,
) -> tuple[str, str]:
    """What a read does with the entity entry ``raw``; fills in what it stores."""
    if raw is None and wrong_type is None:
        return "absent", "no entry: the next session.get() reads the database"
    if raw is None:
        return "undecodable", f"the key {wrong_type}: {NO_ENTRY}"
    if info.codec is None:
        return "undecodable", "the model has no codec in this process"
    try:
        stored_generation, stored_writes, _timing, body = entity_entry(raw)
        document["stored_generation"] = stored_generation
        document["stored_row_writes"] = stored_writes
        if body is not None:
            document.update(_entity_row(info, body, pk))
    except Exception as exc:  # noqa: BLE001 - planted bytes may break any step of decoding
        return "undecodable", f"{undecodable(exc)}: {MISSES}"
    state, detail = _entity_state(document)
    if body is None:
        detail += "; the entry records that no such row exists"
    return state, detail


def _entity_row(info: ModelInfo, body: Any, pk: tuple[Any, ...]) -> dict[str, Any]:
    """The stored column values; CodecError when they belong to another row."""
    assert info.codec is not None
    if type(body) is not list or len(body) != 2:
        raise CodecError("the entry's body is not [row, columns not loaded]")
    values = info.codec.load_row(body[0])
    if tuple(values[p] for p in info.pk_positions) != pk:
        raise CodecError("the entry holds another row")
    missing = set(body[1]) if isinstance(body[1], list) else set()
    row = {
        k: v
        for i, (k, v) in enumerate(zip(info.column_keys, values, strict=True))
        if i not in missing
    }
    return {"row": row, "not_loaded": [info.column_keys[i] for i in sorted(missing)]}


def _entity_state(document: dict[str, Any]) -> tuple[str, str]:
    # mirrors the read path: the counters must exist and parse, the generation and the
    # row's write counter match
    stored, current = document["stored_generation"], document["current_generation"]
    writes = document["current_row_writes"]
    if document["current_version"] is None or current is None or writes is None:
        return "stale", "a counter is missing or unreadable: the next read misses and refills"
    if stored != current:
        return (
            "stale",
            f"stored under generation {stored}, current is {current}: the next read misses",
        )
    if document["stored_row_writes"] != writes:
        return "stale", "the row was written since it was stored: the next read misses"
    return "valid", "a session.get() of this row is served from this entry"


def row_blocks(document: dict[str, Any]) -> list[Block]:
    """The human-readable form of :func:`inspect_row`'s document."""
    facts = [
        ["model", f"{document['model']} (table {document['table']})"],
        ["primary key", ", ".join(repr(v) for v in document["pk"])],
        ["key", document["key"]],
        ["exists", f"yes, TTL {human_ttl(document['ttl_ms'])}" if document["exists"] else "no"],
        [
            "generation",
            (
                f"stored {text_or_dash(document['stored_generation'])}, current "
                f"{text_or_dash(document['current_generation'])}"
            ),
        ],
        ["version", text_or_dash(document["current_version"])],
    ]
    pending = document["pending"]
    if pending is not None:
        facts.append(["pending key", pending["key"]])
        if document["state"] == "pending":
            facts.append(["entry state", f"{document['entry_state']}: {document['entry_detail']}"])
        else:
            facts.append(["pending", pending["detail"]])
    facts.append(["state", f"{document['state']}: {document['detail']}"])
    if document["not_cached_because"]:
        facts.append(["note", document["not_cached_because"]])
    out: list[Block] = [Table(["", ""], facts, show_header=False)]
    if pending is not None and pending["row"] is not None:
        queued = [[k, repr(v)] for k, v in pending["row"].items()]
        out.append(Table(["column", "value"], queued, title="Queued row (write-behind)"))
    row = document["row"]
    if row is not None:
        columns = [[k, repr(v)] for k, v in row.items()]
        columns += [[k, "(not loaded when cached)"] for k in document["not_loaded"]]
        out.append(Table(["column", "value"], columns, title="Stored row"))
    return out + bad_keys_blocks(document["bad_keys"])
