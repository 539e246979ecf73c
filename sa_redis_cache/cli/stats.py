"""``stats``: what Redis holds for one namespace, per table, read live from Redis.

The hit and miss counters of ``cache.stats()`` live in each application process; this
command shows what Redis itself can tell: entries per table, their memory, the version
counters and entity generations, and the writers in flight.
"""

from __future__ import annotations

import sys
import time
from contextlib import suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import click
import redis

from .common import Settings, common_options
from .keyspace import collect
from .output import Block, Table, console, echo_json, has_rich, human_bytes, render, to_rich
from .output import text_or_dash as _text

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from sa_redis_cache.keys import KeyScheme

__all__ = ["blocks_for", "stats"]


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


def blocks_for(document: dict[str, Any], redis_url: str) -> list[Block]:
    """The human-readable form of a :func:`collect` document."""
    tables = document["tables"]
    memory = sum(t["memory_bytes"] or 0 for t in tables) + sum(
        f["memory_bytes"] or 0 for f in document["functions"]
    )
    headline = (
        f"Namespace {document['namespace']!r} on {redis_url}: {document['keys']} keys, "
        f"entries ≈ {human_bytes(memory)} ({document['time']})"
    )
    out: list[Block] = [headline]
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
                        str(t["writers_in_flight"]),
                    ]
                    for t in tables
                ],
                right={2, 3, 4, 7},
            )
        )
    else:
        out.append(
            "No cache keys in this namespace, and no models imported (pass --models MODULE "
            "to list your models' tables even when they hold no entries)."
        )
    if document["functions"]:
        out.append(
            Table(
                ["cached function", "entries", "memory"],
                [
                    [
                        f["prefix"],
                        str(f["entries"]),
                        _memory(f["memory_bytes"], f["memory_estimated"]),
                    ]
                    for f in document["functions"]
                ],
                right={1, 2},
            )
        )
    if document["other_keys"]:
        out.append(f"{document['other_keys']} other key(s) under the namespace's prefix.")
    out.append(
        f"≈: estimated from MEMORY USAGE of up to {document['memory_sample_limit']} keys per "
        "table and kind.\n"
        "version, generation: the counters entries are checked against; writers: "
        "transactions between flush and commit.\n"
        "Hits and misses are counted in each application process: see cache.stats()."
    )
    return out


@click.command(short_help="Entries, memory, versions and writers per table, live.")
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
    """Show what Redis holds for the namespace, per table.

    For every table that has keys in the namespace, and every table of the models
    imported with --models: the number of entity and query entries, their memory
    (sampled), the version counter and entity generation that entries are checked
    against, and the writers in flight. Cached functions are listed too.

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
    url = settings.shown_redis_url
    refreshes = 1
    if as_json:
        echo_json(document, compact=True)
        while count is None or refreshes < count:
            time.sleep(interval)
            refreshes += 1
            try:
                echo_json(collect(client, keys, mappers), compact=True)
            except redis.RedisError as exc:
                echo_json(
                    {"time": datetime.now(timezone.utc).isoformat(), "error": str(exc)},
                    compact=True,
                )
        return
    blocks = blocks_for(document, url)
    live_console = console() if has_rich() else None
    if live_console is not None and live_console.is_terminal:
        from rich.live import Live

        with Live(to_rich(blocks), console=live_console, auto_refresh=False) as live:
            while count is None or refreshes < count:
                time.sleep(interval)
                refreshes += 1
                blocks = _refresh(client, keys, mappers, url, blocks)
                live.update(to_rich(blocks), refresh=True)
        return
    # no terminal (a pipe, a log file) or no rich: a full report per refresh, so that
    # each one reaches the reader when it is made, not when the watch ends
    tty = sys.stdout.isatty()
    render(blocks)
    while count is None or refreshes < count:
        time.sleep(interval)
        refreshes += 1
        blocks = _refresh(client, keys, mappers, url, blocks)
        if tty:
            click.clear()
        else:
            click.echo()
        render(blocks)


def _refresh(
    client: redis.Redis,
    keys: KeyScheme,
    mappers: list[Mapper[Any]],
    url: str,
    previous: list[Block],
) -> list[Block]:
    """New blocks; on a Redis error, the last good ones with the error on top.

    A watch survives a Redis restart: it says so and keeps trying, as ``watch`` does.
    """
    try:
        return blocks_for(collect(client, keys, mappers), url)
    except redis.RedisError as exc:
        kept = [b for b in previous if not (isinstance(b, str) and b.startswith("! "))]
        return [f"! Redis at {url} failed: {exc}; retrying", *kept]
