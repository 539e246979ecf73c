"""``stats``: hits, misses and entries per model and region, and what Redis holds per table.

The hit and miss counters of ``cache.stats()`` are counted in each application process;
every attached cache publishes them into Redis (:mod:`sa_redis_cache.stats_publisher`), and this
command shows their sums over every process, next to what Redis itself can tell: entries
and their memory, the version counters and entity generations, the writers in flight.
"""

from __future__ import annotations

import sys
import time
from contextlib import suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import click
import redis

from .badkeys import bad_keys_blocks
from .common import Settings, common_options, one_line
from .keyspace import collect
from .output import Block, Table, console, echo_json, has_rich, human_bytes, render, to_rich
from .output import text_or_dash as _text

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

__all__ = ["blocks_for", "published_text", "scope_blocks", "stats"]


def _memory(size: int | None, estimated: bool) -> str:
    text = human_bytes(size)
    return "≈ " + text if estimated else text


def _model_text(models: list[dict[str, Any]]) -> str:
    parts = []
    for model in models:
        if model["strategy"] is None:
            parts.append(f"{model['name']} (no policy)")
        else:
            ttl = "" if model["ttl"] is None else f", ttl {model['ttl']:g} s"
            parts.append(f"{model['name']} ({model['strategy']}{ttl})")
    return ", ".join(parts) or "-"


def _counter_cells(counters: dict[str, Any] | None) -> list[str]:
    """hits, misses, hit rate, errors; dashes for a scope nothing was published for."""
    if counters is None:
        return ["-", "-", "-", "-"]
    rate = counters["hit_rate"]
    return [
        f"{counters['hits']:,}",
        f"{counters['misses']:,}",
        "-" if rate is None else f"{rate:.1%}",
        f"{counters['errors']:,}",
    ]


def _scope_table(document: dict[str, Any], memory: int) -> Table:
    """Per model, region and cached function: the published counters, entries and memory."""
    counters = document["counters"]
    tables = document["tables"]
    by_model = {m["name"]: t for t in tables for m in t["models"]}
    functions = {f["prefix"]: f for f in document["functions"]}
    rows: list[list[str]] = []
    for name in sorted(set(by_model) | set(counters["models"])):
        t = by_model.get(name)
        stored = ["-", "-"]
        if t is not None:
            stored = [
                str(t["entity_entries"] + t["query_entries"]),
                _memory(t["memory_bytes"], t["memory_estimated"]),
            ]
        rows.append([f"model {name}", *_counter_cells(counters["models"].get(name)), *stored])
    rows += [
        [f"region {name}", *_counter_cells(values), "-", "-"]
        for name, values in sorted(counters["regions"].items())
    ]
    for prefix in sorted(set(functions) | set(counters["functions"])):
        f = functions.get(prefix)
        stored = (
            ["0", "-"]
            if f is None
            else [
                str(f["entries"]),
                _memory(f["memory_bytes"], f["memory_estimated"]),
            ]
        )
        rows.append(
            [f"function {prefix}", *_counter_cells(counters["functions"].get(prefix)), *stored]
        )
    entries = sum(t["entity_entries"] + t["query_entries"] for t in tables)
    entries += sum(f["entries"] for f in document["functions"])
    rows.append(["total", *_counter_cells(counters["total"]), str(entries), human_bytes(memory)])
    return Table(
        ["scope", "hits", "misses", "hit rate", "errors", "entries", "memory"],
        rows,
        right={1, 2, 3, 4, 5, 6},
    )


def published_text(age: float | None) -> str:
    """What the hit counters of a :func:`collect` document are, and how fresh."""
    if age is None:
        return (
            "hits, misses, errors: none published yet. Each process with an attached Cache "
            "publishes its counters every stats_publish_interval seconds (default 1)."
        )
    return (
        "hits, misses, errors: summed over every process with an attached Cache since the "
        f"counters were first published (last publish {age:.1f} s ago); they expire 7 days "
        "after the last one. A FromCache lookup counts in its region and in each model it "
        "reads; total counts it once."
    )


def scope_blocks(document: dict[str, Any], redis_url: str) -> list[Block]:
    """The headline and the table per model, region and function of a :func:`collect` document.

    The first part of :func:`blocks_for`, for programs that show only that (the demo).

    Example::

        render(scope_blocks(collect(client, KeyScheme("shop")), "redis://localhost"))
    """
    tables = document["tables"]
    memory = sum(t["memory_bytes"] or 0 for t in tables) + sum(
        f["memory_bytes"] or 0 for f in document["functions"]
    )
    headline = (
        f"Namespace {document['namespace']!r} on {redis_url}: {document['keys']} keys, "
        f"entries ≈ {human_bytes(memory)} ({document['time']})"
    )
    return [headline, _scope_table(document, memory)]


def blocks_for(document: dict[str, Any], redis_url: str) -> list[Block]:
    """The human-readable form of a :func:`collect` document."""
    tables = document["tables"]
    out = scope_blocks(document, redis_url)
    others = document.get("namespaces_with_keys")
    if others is not None:
        where = (
            "; namespaces with keys there: "
            + ", ".join(f"{name} ({count} keys)" for name, count in others.items())
            + ". Pass --namespace NAME (or set SARC_NAMESPACE)"
            if others
            else "; no namespace has keys there (nothing attached a Cache to this Redis yet?)"
        )
        out.append(
            f"! Namespace {document['namespace']!r} has no keys on {redis_url}: nothing is "
            f"cached under it{where}."
        )
    if tables:
        out.append(
            Table(
                [
                    "table",
                    "model (strategy, ttl)",
                    "entities",
                    "queries",
                    "memory",
                    "version",
                    "generation",
                    "writers",
                    "local holders",
                ],
                [
                    [
                        t["table"],
                        _model_text(t["models"]),
                        str(t["entity_entries"]),
                        str(t["query_entries"]),
                        _memory(t["memory_bytes"], t["memory_estimated"]),
                        _text(t["version"]),
                        _text(t["generation"]),
                        _text(t["writers_in_flight"]),
                        _text(t["local_holders"]),
                    ]
                    for t in tables
                ],
                right={2, 3, 4, 7, 8},
            )
        )
    else:
        out.append(
            "No cache keys in this namespace, and no models imported (pass --models MODULE "
            "to list your models' tables even when they hold no entries)."
        )
    if document["local_tiers"]:
        out.append(_local_table(document["local_tiers"]))
    if document["other_keys"]:
        out.append(f"{document['other_keys']} other key(s) under the namespace's prefix.")
    out += bad_keys_blocks(document["bad_keys"])
    out.append(
        published_text(document["counters_published_seconds_ago"]) + "\n"
        "entries, memory: a model's are those of its table (entity entries, and the query "
        "entries stored under the table).\n"
        f"≈: estimated from MEMORY USAGE of up to {document['memory_sample_limit']} keys per "
        "table and kind.\n"
        "version, generation: the counters entries are checked against; writers: "
        "transactions between flush and commit; local holders: processes whose local tier "
        "holds a live lease on the table (its commits wait for them)."
    )
    return out


def _local_table(tiers: list[dict[str, Any]]) -> Table:
    """One row per process with a local tier (``Cache(local=True)``), as it last published."""
    rows = []
    for tier in tiers:
        looked = (tier.get("hits") or 0) + (tier.get("misses") or 0)
        rate = "-" if not looked else f"{(tier.get('hits') or 0) / looked:.1%}"
        since = tier.get("seconds_since_invalidation")
        rows.append(
            [
                _text(tier.get("holder")),
                "yes" if tier.get("ready") is True else "no",
                _text(tier.get("entries")),
                human_bytes(tier.get("bytes")),
                f"{tier.get('hits') or 0:,}",
                f"{tier.get('misses') or 0:,}",
                rate,
                _text(tier.get("evictions")),
                _text(tier.get("invalidations")),
                "-" if since is None else f"{since:.1f} s",
                _text(tier.get("lapses")),
                _text(tier.get("reconnects")),
            ]
        )
    return Table(
        [
            "local tier (host:pid:id)",
            "ready",
            "entries",
            "bytes",
            "hits",
            "misses",
            "hit rate",
            "evictions",
            "invalidations",
            "last invalidation",
            "lapses",
            "reconnects",
        ],
        rows,
        right=set(range(2, 12)),
    )


@click.command(short_help="Hits, misses, entries and memory per model and region, live.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    metavar="SECONDS",
    help="Refresh every SECONDS until Ctrl-C (with --json: one JSON document per line).",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    metavar="N",
    help="With --watch: stop after N refreshes.",
)
@common_options("redis_url", "namespace", "models")
@click.pass_obj
def stats(settings: Settings, as_json: bool, watch: float | None, count: int | None) -> None:
    """Show hits, misses and entries per model and region, and what Redis holds per table.

    Per model, FromCache region and cached function: hits, misses, hit rate and errors,
    summed over every process with an attached cache (each publishes its counters into
    Redis every second), with the entries and their memory (sampled). Then, for every
    table that has keys in the namespace, and every table of the models imported with
    --models: the entity and query entries, their memory, the version counter and entity
    generation that entries are checked against, and the writers in flight.

    \b
    Example:
      sa-redis-cache --models examples.shop stats --watch 2
    """
    settings.load_models()
    cache = settings.cache()
    client, keys = cache.client, cache.keys
    mappers = settings.model_mappers()
    document = collect(client, keys, mappers)
    if watch is None:
        if count is not None:
            raise click.UsageError("--count needs --watch")
        if as_json:
            echo_json(document)
        else:
            render(blocks_for(document, settings.shown_redis_url))
        return
    with suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends: not an error
        _watch(settings, document, mappers, as_json=as_json, interval=watch, count=count)


def _watch(
    settings: Settings,
    document: dict[str, Any],
    mappers: list[Mapper[Any]],
    *,
    as_json: bool,
    interval: float,
    count: int | None,
) -> None:
    client, keys = settings.cache().client, settings.cache().keys
    refreshes = 1
    if as_json:
        echo_json(document, compact=True)
        while count is None or refreshes < count:
            time.sleep(interval)
            refreshes += 1
            try:
                echo_json(collect(client, keys, mappers), compact=True)
            except redis.RedisError as exc:
                error = settings.redact(one_line(exc))
                echo_json(
                    {"time": datetime.now(timezone.utc).isoformat(), "error": error},
                    compact=True,
                )
        return
    blocks = blocks_for(document, settings.shown_redis_url)
    live_console = console() if has_rich() else None
    if live_console is not None and live_console.is_terminal:
        from rich.live import Live

        with Live(to_rich(blocks), console=live_console, auto_refresh=False) as live:
            while count is None or refreshes < count:
                time.sleep(interval)
                refreshes += 1
                blocks = _refresh(settings, mappers, blocks)
                live.update(to_rich(blocks), refresh=True)
        return
    # no terminal (a pipe, a log file) or no rich: a full report per refresh, so that
    # each one reaches the reader when it is made, not when the watch ends
    tty = sys.stdout.isatty()
    render(blocks)
    while count is None or refreshes < count:
        time.sleep(interval)
        refreshes += 1
        blocks = _refresh(settings, mappers, blocks)
        if tty:
            click.clear()
        else:
            click.echo()
        render(blocks)


def _refresh(settings: Settings, mappers: list[Mapper[Any]], previous: list[Block]) -> list[Block]:
    """New blocks; on a Redis error, the last good ones with the error on top.

    A watch survives a Redis restart: it says so and keeps trying, as ``watch`` does.
    """
    cache, url = settings.cache(), settings.shown_redis_url
    try:
        return blocks_for(collect(cache.client, cache.keys, mappers), url)
    except redis.RedisError as exc:
        kept = [b for b in previous if not (isinstance(b, str) and b.startswith("! "))]
        return [f"! Redis at {url} failed: {settings.redact(one_line(exc))}; retrying", *kept]
