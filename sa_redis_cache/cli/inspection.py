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
from .values import parse_pk, row_key_in, row_keys, row_pattern

if TYPE_CHECKING:
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
    return f"{name} uses inheritance or a polymorphic mapping, which the entity cache skips"


def inspect_row(
    settings: Settings,
    cls: type,
    texts: tuple[str, ...],
    bind_url: str | None = None,
    schema: str | None = None,
) -> dict[str, Any]:
    """Describe the entity entry of one row (the ``--json`` document).

    Entity entries are kept per database and schema: ``bind_url`` (default
    ``--database-url``) names the database, ``schema`` the schema the row lives in when
    the application translates the table's schema. Without a database URL, the row's
    entries are looked for in every database and schema (SCAN), and the first is shown.
    Whatever the keys hold, this returns: an entry that does not decode is
    ``undecodable`` with what is wrong with it, a key of the wrong type or a counter that
    is no number is listed in ``bad_keys``.

    Example::

        inspect_row(settings, Product, ("7",))["state"]  # "valid", "stale", "absent"...
    """
    cache = settings.cache()
    info, pk = parse_pk(cache, cls, texts)
    keys = cache.keys
    text = pk_text(pk)
    others: list[str] = []
    if bind_url or settings.database_url:
        key = row_key_in(cache, info, pk, settings.database(bind_url, option="--bind-url"), schema)
    else:
        found = row_keys(cache, info, pk)
        key = found[0] if found else row_pattern(cache, info, pk)
        others = found[1:]
    version_key, generation_key = keys.version_key(info.table), keys.generation_key(info.table)
    writes_key = keys.row_write_key(info.table, text)
    pipe = cache.client.pipeline(transaction=False)
    pipe.get(key)
    pipe.pttl(key)
    pipe.get(version_key)
    pipe.get(generation_key)
    pipe.get(writes_key)
    replies, bad = separate_errors(
        cache.client,
        [
            (key, "a string (entity entry)"),
            (key, "any key"),
            (version_key, "a string (version counter)"),
            (generation_key, "a string (generation counter)"),
            (writes_key, "a string (row write counter)"),
        ],
        pipe.execute(raise_on_error=False),
    )
    raw, pttl, version, generation, row_writes = replies
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
    }
    if not exists:
        document.update(
            state="absent", detail="no entry: the next session.get() reads the database"
        )
        return document
    if wrong_type is not None:
        document.update(state="undecodable", detail=f"the key {wrong_type}: {NO_ENTRY}")
        return document
    if info.codec is None:
        document.update(state="undecodable", detail="the model has no codec in this process")
        return document
    try:
        stored_generation, stored_writes, _timing, body = entity_entry(raw)
        document["stored_generation"] = stored_generation
        document["stored_row_writes"] = stored_writes
        if body is not None:
            document.update(_entity_row(info, body, pk))
    except Exception as exc:  # noqa: BLE001 - planted bytes may break any step of decoding
        document.update(state="undecodable", detail=f"{undecodable(exc)}: {MISSES}")
        return document
    state, detail = _entity_state(document)
    if body is None:
        detail += "; the entry records that no such row exists"
    document.update(state=state, detail=detail)
    return document


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
        ["state", f"{document['state']}: {document['detail']}"],
    ]
    if document["not_cached_because"]:
        facts.append(["note", document["not_cached_because"]])
    out: list[Block] = [Table(["", ""], facts, show_header=False)]
    row = document["row"]
    if row is not None:
        columns = [[k, repr(v)] for k, v in row.items()]
        columns += [[k, "(not loaded when cached)"] for k in document["not_loaded"]]
        out.append(Table(["column", "value"], columns, title="Stored row"))
    return out + bad_keys_blocks(document["bad_keys"])
