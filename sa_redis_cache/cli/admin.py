"""``invalidate``, ``dlq``, ``worker`` and ``demo``: the commands that act rather than look."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.models import ModelRegistry, mapper_of
from sa_redis_cache.protocol import is_queue_key
from sa_redis_cache.redaction import redact_url
from sa_redis_cache.redis_io import unlink_matching
from sa_redis_cache.strategies.write_behind.worker.flush import LEASE_MAX_MS, LEASE_MS

from .common import (
    CliError,
    Settings,
    TranslatedCommand,
    call_factory,
    common_options,
    import_object,
    one_line,
    resolve_model,
)
from .output import Table, echo_json, render
from .values import parse_pk, row_keys

if TYPE_CHECKING:
    from collections.abc import Sequence

    import redis
    from sqlalchemy.engine import Engine

    from sa_redis_cache.strategies.write_behind.worker.replay import Letter, ReplayResult

__all__ = ["demo", "dlq", "invalidate", "worker", "worker_main"]


def _confirm(question: str, *, nothing: str = "nothing was invalidated") -> None:
    """Ask on stderr (stdout stays for results); refuse to go on without a yes."""
    try:
        agreed = click.confirm(question, default=False, err=True)
    except click.Abort:
        click.echo(err=True)  # end the unanswered prompt's line
        # stdin closed or Ctrl-C: a script that forgot --yes must not hang or proceed
        raise CliError(
            "no answer (stdin closed or interrupted): pass --yes to run without asking"
        ) from None
    if not agreed:
        raise CliError(f"not confirmed: {nothing}")


# --------------------------------------------------------------------------- invalidate


@click.command(short_help="Invalidate a row, a model, a table, or the whole namespace.")
@click.argument("model", required=False, metavar="[MODEL]")
@click.argument("pk", nargs=-1, metavar="[PK]...")
@click.option(
    "--table",
    "tables",
    multiple=True,
    metavar="NAME",
    help="A table of the models' MetaData (its fullname, 'schema.name' in a schema), such "
    "as a many-to-many association table: every cached query that read it is retired. "
    "Repeatable.",
)
@click.option(
    "--namespace-wide",
    is_flag=True,
    help="Delete every key of the namespace (SCAN + UNLINK of sarc:NAMESPACE:*; never FLUSH) "
    "but the write-behind queues and what running processes registered; returns once no "
    "local tier serves what went.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@common_options("redis_url", "namespace", "models")
@click.pass_obj
def invalidate(
    settings: Settings,
    model: str | None,
    pk: tuple[str, ...],
    tables: tuple[str, ...],
    namespace_wide: bool,
    yes: bool,
) -> None:
    """Invalidate one row (MODEL PK...), a whole model (MODEL), tables, or the namespace.

    One row: its entity entry is deleted and its table's version bumped, so cached
    queries on the table are retired (cache.invalidate). A model: its table's version
    and entity generation are bumped, so every entry on it becomes a miss and expires
    with its TTL (cache.invalidate_model). --table NAME does the same for a table that
    no model maps alone, such as a many-to-many association table
    (cache.invalidate_table). Each also retires the tables that the foreign keys'
    ON DELETE / ON UPDATE actions write. --namespace-wide deletes every key of the
    namespace, counters included, as a Redis restart without persistence would, and
    returns once no process's local tier serves what went (cache.clear, then the rest).

    \b
    Examples:
      sa-redis-cache --models examples.shop invalidate Product 7
      sa-redis-cache --models examples.shop invalidate --table order_tags --yes
      sa-redis-cache --namespace shop invalidate --namespace-wide --yes
    """
    if namespace_wide:
        if model is not None or tables:
            raise click.UsageError("--namespace-wide takes no MODEL, PK or --table")
        _invalidate_namespace(settings, yes=yes)
        return
    if tables:
        if model is not None:
            raise click.UsageError("--table takes no MODEL or PK: run invalidate once for each")
        _invalidate_tables(settings, tables, yes=yes)
        return
    if model is None:
        raise click.UsageError("give MODEL [PK]... or --namespace-wide")
    settings.load_models()
    cls = resolve_model(model, settings)
    cache = settings.cache()
    mapper = mapper_of(cls)
    assert mapper is not None  # resolve_model returns mapped classes only
    where = f"namespace {settings.namespace!r} on {settings.shown_redis_url}"
    if pk:
        info, values = parse_pk(cache, cls, pk)
        shown = ", ".join(repr(v) for v in values)
        if not yes:
            _confirm(
                f"Invalidate {cls.__name__} {shown} in {where}? (deletes its entry and retires "
                f"the cached queries on {info.table})"
            )
        # this process read nothing: the row's entries of every database and schema are
        # found by SCAN (cache.invalidate's counter bump retires them all the same)
        found = row_keys(cache, info, values).entries
        if found:
            cache.client.unlink(*found)
        cache.invalidate(cls, *values)
        state = "its entity entry was deleted" if found else "it had no entity entry"
        click.echo(
            f"invalidated {cls.__name__} {shown}: {state}; version of {info.table} bumped "
            "(cached queries on it are retired)"
        )
        return
    info = cache.inspector.model(cls)
    if not yes:
        _confirm(f"Invalidate every entry of {cls.__name__} (table {info.table}) in {where}?")
    cache.invalidate_model(cls)
    click.echo(
        f"invalidated {cls.__name__}: version and generation of {info.table} bumped; its "
        "entries are now misses and expire with their TTL"
    )


def _invalidate_tables(settings: Settings, tables: tuple[str, ...], *, yes: bool) -> None:
    settings.load_models()
    cache = settings.cache()
    where = f"namespace {settings.namespace!r} on {settings.shown_redis_url}"
    if not yes:
        _confirm(f"Invalidate every entry that read {', '.join(tables)} in {where}?")
    try:
        retired = cache.invalidate_table(*tables)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from None
    click.echo(
        f"invalidated {', '.join(retired)}: versions and generations bumped; their entries "
        "are now misses and expire with their TTL"
    )


def _invalidate_namespace(settings: Settings, *, yes: bool) -> None:
    cache = settings.cache()
    keys = cache.keys
    pattern = keys.namespace_pattern

    def kept(key: bytes) -> bool:
        # write-behind streams, pending states and leases hold writes not yet in the
        # database; the local tiers' holder sets and the regions' table sets are what
        # running processes registered and will not register again soon
        return is_queue_key(key) or keys.is_registration(key)

    count = sum(1 for key in cache.client.scan_iter(match=pattern, count=1000) if not kept(key))
    if not count:
        click.echo(f"namespace {settings.namespace!r} has no cache keys: nothing to delete")
        return
    if not yes:
        _confirm(
            f"Delete all {count} cache key(s) of namespace {settings.namespace!r} "
            f"({keys.prefix}*, write-behind queues kept) on {settings.shown_redis_url}?"
        )
    # the entries and their counters first, by cache.clear(): it returns once no process's
    # local tier serves them any more. Then what clear() keeps (writer marks, published
    # statistics, worker registries), which no tier serves; entries filled since are
    # left, as clear() leaves them
    removed = cache.clear()
    removed += unlink_matching(
        cache.client, pattern, lambda key: not kept(key) and not keys.clearable(key)
    )
    click.echo(
        f"deleted {removed} key(s) of namespace {settings.namespace!r} (write-behind queues kept)"
    )


# --------------------------------------------------------------------------- write-behind


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse ``nan`` and ``inf``, which click's FloatRange lets through: a backoff of
    ``nan`` retried in a busy loop (and never retried a failed partition again)."""
    del ctx
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", param=param)
    return value


WORKER_PROG = "python -m sa_redis_cache.worker"
"""The standalone name of the ``worker`` command (its usage line when run that way)."""


@click.command(
    cls=TranslatedCommand,  # python -m sa_redis_cache.worker runs it outside the group
    short_help="Run the write-behind flush worker.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    metavar="MODULE:CLASS",
    help="Write-behind model to flush (or module:function returning classes); repeatable. "
    "Default: the write-behind models of the --models modules.",
)
@click.option(
    "--consumer",
    metavar="NAME",
    help="This worker's name in the partition leases. Give a replacement the name of the "
    "worker it replaces: it takes that one's partitions at once, not after --lease-ms. "
    "Two live workers must not share a name. [default: HOST:PID:RANDOM]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 5000),
    default=500,
    show_default=True,
    metavar="N",
    help="Stream entries applied per database transaction.",
)
@click.option(
    "--lease-ms",
    type=click.IntRange(min=200, max=LEASE_MAX_MS),
    default=LEASE_MS,
    show_default=True,
    metavar="MS",
    help="How long a partition lease lasts unrenewed: a dead or stopped worker's partitions "
    "are taken over by the others within this time.",
)
@click.option(
    "--heartbeat-ms",
    type=click.IntRange(min=1),
    metavar="MS",
    help="How often the held leases are renewed, at most half of --lease-ms. "
    "[default: a fifth of --lease-ms]",
)
@click.option(
    "--max-backoff",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    callback=_finite,
    metavar="SECONDS",
    help="Longest wait between retries while the database or Redis fails.",
)
@click.option(
    "--timeout-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    metavar="N",
    help="Times one operation may exceed the database's statement_timeout, or raise an "
    "error outside the database, on its own before it is dead-lettered (a batch that "
    "fails so is first retried smaller).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Follow a backlog found at start with a progress bar (--progress), or not at all "
    "(--no-progress). [default: a bar on a terminal, log lines otherwise]",
)
@click.option(
    "--progress-threshold",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    metavar="N",
    help="Entries queued at start above which their draining is followed.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    callback=_finite,
    metavar="SECONDS",
    help="Time between backlog log lines when no bar is shown.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help="Serve the worker's Prometheus metrics on this port (needs the prometheus extra).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    metavar="ADDRESS",
    help="Address to serve --metrics-port on.",
)
@common_options("redis_url", "namespace", "database_url", "models")
@click.pass_obj
def worker(
    settings: Settings,
    model_specs: tuple[str, ...],
    consumer: str | None,
    batch_size: int,
    lease_ms: int,
    heartbeat_ms: int | None,
    max_backoff: float,
    timeout_attempts: int,
    progress: bool | None,
    progress_threshold: int,
    progress_interval: float,
    metrics_port: int | None,
    metrics_addr: str,
) -> None:
    """Run the write-behind flush worker until SIGTERM or SIGINT.

    It applies the queued writes of the write-behind models to the database, in batches,
    and logs one JSON line per batch on stderr. On SIGTERM it finishes and acknowledges
    the batch in flight, releases its partition leases and exits 0. Run several (one
    per host or container): they share the partitions; see docs/write-behind.md,
    "Scaling".

    Before it starts it checks that Redis and the database answer and that the
    library's tables are migrated. While the database cannot be reached later on, it
    retries with backoff and says so in a log line every 15 seconds (and in the
    sarc_wb_database_up metric).

    Exit status: 0 stopped by a signal, 1 a service unreachable or not ready, 2 bad usage.

    \b
    Example:
      sa-redis-cache --database-url postgresql+psycopg://app@db/shop \\
          --redis-url redis://cache:6379/0 --namespace shop \\
          worker --model myapp.models:PageView --consumer worker-1
    """
    from sa_redis_cache.strategies.write_behind.worker.flush import FlushWorker
    from sa_redis_cache.strategies.write_behind.worker.progress import choose_mode
    from sa_redis_cache.strategies.write_behind.worker.runner import log_as_json, serve

    if heartbeat_ms is not None and heartbeat_ms > lease_ms // 2:
        raise click.BadParameter(
            f"{heartbeat_ms} is more than half of --lease-ms {lease_ms}: one late renewal "
            f"would lose the leases; give at most {lease_ms // 2}",
            param_hint="--heartbeat-ms",
        )
    addr_source = click.get_current_context().get_parameter_source("metrics_addr")
    if metrics_port is None and addr_source is not click.core.ParameterSource.DEFAULT:
        # an address alone would serve nothing, silently: the operator meant metrics
        raise click.BadParameter(
            f"{metrics_addr!r} is given without --metrics-port, so nothing would be served "
            "on it; add --metrics-port PORT",
            param_hint="--metrics-addr",
        )
    if not settings.database_url:
        raise click.UsageError(
            "the worker needs a database: pass --database-url URL (or set DATABASE_URL)"
        )
    engine = settings.engine(pool=True)  # a URL that cannot be parsed is refused here
    try:
        # one clear line when Redis does not answer
        settings.redis()
        models = _write_behind_models(settings, model_specs, purpose="flush")
        _check_worker_database(engine, models)
        client = _worker_client(settings, lease_ms)
        try:
            flush_worker = FlushWorker(
                engine,
                client,
                namespace=settings.namespace,
                models=models,
                consumer=consumer,
                batch_size=batch_size,
                lease_ms=lease_ms,
                heartbeat_ms=heartbeat_ms,
                max_backoff=max_backoff,
                timeout_attempts=timeout_attempts,
            )
        except ConfigurationError as exc:
            raise click.UsageError(str(exc)) from exc
        log_as_json()
        mode = choose_mode(forced=progress is True, disabled=progress is False)
        try:
            serve(
                flush_worker,
                progress=mode,
                threshold=progress_threshold,
                interval=progress_interval,
                metrics_port=metrics_port,
                metrics_addr=metrics_addr,
            )
        except ImportError as exc:
            raise CliError(
                "--metrics-port needs prometheus-client: pip install "
                f"'sa-redis-cache[prometheus]' ({exc})"
            ) from exc
        except OSError as exc:
            raise CliError(
                f"--metrics-port {metrics_port}: cannot serve on {metrics_addr}: {one_line(exc)}"
            ) from exc
        finally:
            client.close()
    finally:
        engine.dispose()


def worker_main(argv: Sequence[str] | None = None, prog_name: str = WORKER_PROG) -> int:
    """Run the ``worker`` command on its own (``python -m sa_redis_cache.worker``).

    The global options of ``sa-redis-cache`` are the command's own options here, with the
    same environment variables (``REDIS_URL``, ``DATABASE_URL``, ``SARC_NAMESPACE``,
    ``SARC_MODELS``) and defaults; returns the exit status.

    Example::

        worker_main(["--database-url", url, "--namespace", "shop", "--model", "app:View"])
    """
    from .app import cli

    # the group's own parsing of no arguments: its defaults and environment variables
    group = cli.make_context(prog_name, [], resilient_parsing=True)
    with group:
        group.invoke(cast("Any", cli.callback), **group.params)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        worker.main(args=args, prog_name=prog_name, obj=group.obj)  # always exits
    except SystemExit as exc:
        code = exc.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def _worker_client(settings: Settings, lease_ms: int) -> redis.Redis:
    """The worker's own Redis client: a call that hangs must not outlast half a lease."""
    from sa_redis_cache.redis_io import client_from_url

    client = client_from_url(
        settings.redis_url,
        socket_timeout=max(1.0, lease_ms / 2000),
        socket_connect_timeout=2,
        health_check_interval=30,
    )
    # a cluster client shares redis.Redis's key commands (FlushWorker takes either)
    return cast("redis.Redis", client)


def _check_worker_database(engine: Engine, models: list[type]) -> None:
    """The database answers, the library's tables are migrated, the models' tables exist."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    from sa_redis_cache.schema import wb_offsets

    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            missing = [t for t in (_table_of(m) for m in models) if not inspector.has_table(t)]
            offsets = (
                {c["name"] for c in inspector.get_columns(wb_offsets.name)}
                if inspector.has_table(wb_offsets.name)
                else set()
            )
    except DBAPIError as exc:
        raise _database_error(engine, exc) from exc
    if not {c.name for c in wb_offsets.columns} <= offsets:
        raise CliError(
            f"the library's tables in {_shown(engine)} are missing or out of date "
            f"({wb_offsets.name} needs the write-behind migrations): run "
            "sa_redis_cache.schema.upgrade(URL) (or alembic upgrade sa_redis_cache@head) first"
        )
    if missing:
        raise CliError(
            f"the table(s) {', '.join(missing)} of the write-behind models do not exist in "
            f"{_shown(engine)}: create them (your migrations) before starting the worker"
        )


@click.group(short_help="Dead letters of write-behind: list and replay them.")
def dlq() -> None:
    """Dead letters: write-behind operations that failed on every attempt."""


@dlq.command("list")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    metavar="N",
    help="Rows to show.",
)
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed dead letters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@common_options("namespace", "database_url")
@click.pass_obj
def dlq_list(settings: Settings, limit: int, include_replayed: bool, as_json: bool) -> None:
    """List the dead letters of the namespace, oldest first, from sarc_dead_letters.

    \b
    Example:
      sa-redis-cache --database-url postgresql+psycopg://app@db/shop dlq list
    """
    engine = settings.engine()
    try:
        rows = _dead_letters(engine, settings.namespace, limit, include_replayed=include_replayed)
    finally:
        engine.dispose()
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no dead letters in namespace {settings.namespace!r}")
        return
    render(
        [
            Table(
                ["id", "table", "op", "pk", "attempts", "failed at", "replayed", "error"],
                [
                    [
                        str(r["id"]),
                        r["table_name"],
                        r["op"] or "-",
                        _short(r["pk"]),
                        str(r["attempts"]),
                        r["failed_at"].isoformat(timespec="seconds"),
                        r["replayed_at"].isoformat(timespec="seconds") if r["replayed_at"] else "-",
                        _short(one_line(r["error"]), 60),
                    ]
                    for r in rows
                ],
                right={0, 4},
                title=f"Dead letters of namespace {settings.namespace!r}",
            ),
            f"{len(rows)} shown (at most {limit}; --limit N for more)",
        ]
    )


def _short(value: Any, width: int = 40) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _dead_letters(
    engine: Engine, namespace: str, limit: int, *, include_replayed: bool
) -> list[dict[str, Any]]:
    from sqlalchemy import select
    from sqlalchemy.exc import DBAPIError

    from sa_redis_cache.schema import dead_letters

    _check_table(engine)
    try:
        with engine.connect() as conn:
            stmt = select(dead_letters).where(dead_letters.c.namespace == namespace)
            if not include_replayed:
                stmt = stmt.where(dead_letters.c.replayed_at.is_(None))
            stmt = stmt.order_by(dead_letters.c.id).limit(limit)
            return [dict(row) for row in conn.execute(stmt).mappings()]
    except DBAPIError as exc:
        raise _database_error(engine, exc) from exc


def _check_table(engine: Engine) -> None:
    """Refuse, with the fix, a database without ``sarc_dead_letters`` or out of reach."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import DBAPIError

    from sa_redis_cache.schema import dead_letters

    try:
        with engine.connect() as conn:
            present = inspect(conn).has_table(dead_letters.name)
    except DBAPIError as exc:
        raise _database_error(engine, exc) from exc
    if not present:
        raise CliError(
            f"table {dead_letters.name} does not exist in {_shown(engine)}: run "
            "sa_redis_cache.schema.upgrade(URL) (or alembic upgrade "
            "sa_redis_cache@head) first"
        )


def _check_database(engine: Engine) -> None:
    """Connect once: an unreachable database, or refused credentials, is one clear line."""
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise _database_error(engine, exc) from exc
    finally:
        engine.dispose()


def _database_error(engine: Engine, exc: Any) -> CliError:
    from sa_redis_cache.schema import dead_letters

    if exc.connection_invalidated or _is_connect_error(exc):
        return CliError(
            f"cannot reach the database at {_shown(engine)}: {one_line(exc.orig)}; start it "
            "or pass --database-url (or set DATABASE_URL)"
        )
    return CliError(f"reading {dead_letters.name} failed: {one_line(exc.orig)}")


def _is_connect_error(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError)


@dlq.command("replay")
@click.option(
    "--id",
    "ids",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="N",
    help="Replay this dead letter (repeatable); default: every open one.",
)
@click.option("--table", metavar="T", help="Only the dead letters of table T.")
@click.option(
    "--model",
    "model_specs",
    multiple=True,
    metavar="MODULE:CLASS",
    help="Write-behind model whose letters may be replayed (or module:function returning "
    "classes); repeatable. Default: the write-behind models of the --models modules.",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@common_options("redis_url", "namespace", "database_url", "models")
@click.pass_obj
def dlq_replay(
    settings: Settings,
    ids: tuple[int, ...],
    table: str | None,
    model_specs: tuple[str, ...],
    yes: bool,
    as_json: bool,
) -> None:
    """Apply dead letters to the database again, once their cause is fixed.

    Each open dead letter (replayed_at not set) of the namespace is, oldest first per
    partition: replayed (its operation applied, replayed_at set); superseded (a newer
    write of the same row exists, so it is never applied; it is marked and leaves
    `dlq list`); or failed (the database refuses it again: it stays open with the new
    error). Cached copies of replayed rows are invalidated, so Redis must be reachable.
    A second replay finds nothing left to do.

    Exit status: 0 done (also when nothing was left), 1 some letters failed or a service
    could not be reached, 2 bad usage.

    \b
    Examples:
      sa-redis-cache --database-url postgresql+psycopg://app@db/shop --namespace shop \\
          dlq replay --model myapp.models:PageView
      sa-redis-cache ... dlq replay --model myapp.models:PageView --id 12 --id 13 --yes
    """
    from sa_redis_cache.strategies.write_behind.worker.replay import replay_dead_letters

    engine = settings.engine()
    try:
        models = _write_behind_models(settings, model_specs)
        tables = {_table_of(m) for m in models}
        if table is not None and table not in tables:
            raise click.BadParameter(
                f"no write-behind model given for table {table!r}; the models given write "
                f"{', '.join(sorted(tables))}",
                param_hint="--table",
            )
        letters = _open_letters(engine, settings.namespace, ids=ids or None, table=table)
        replayable = [letter for letter in letters if letter.table in tables]
        if not replayable:
            _nothing_to_replay(settings, letters, ids, as_json=as_json)
            return
        if not yes:
            names = ", ".join(sorted({letter.table for letter in replayable}))
            _confirm(
                f"Replay {len(replayable)} dead letter(s) of namespace {settings.namespace!r} "
                f"(tables: {names}) into {_shown(engine)}?",
                nothing="nothing was replayed",
            )
        # a cluster client shares redis.Redis's key commands (the replay takes either)
        client = cast("redis.Redis", settings.redis())
        result = replay_dead_letters(
            engine, client, settings.namespace, models, ids=ids or None, table=table
        )
    finally:
        engine.dispose()
    _report_replay(result, as_json=as_json)
    if not result.ok:
        click.get_current_context().exit(1)


def _write_behind_models(
    settings: Settings, specs: tuple[str, ...], *, purpose: str = "replay"
) -> list[type]:
    """The classes named by ``--model``, else the write-behind models of ``--models``."""
    from sa_redis_cache.strategies.write_behind.columns import is_write_behind

    found: list[type] = []
    for spec in specs:
        obj = import_object(spec, param_hint="--model")
        if not isinstance(obj, type) and callable(obj):
            obj = call_factory(spec, obj, param_hint="--model", wanted="a mapped class")
        for cls in obj if isinstance(obj, list | tuple) else [obj]:
            if not (isinstance(cls, type) and _is_write_behind_class(cls)):
                raise click.BadParameter(
                    f"{spec!r}: {cls!r} is not a mapped class with "
                    "__cache__ = CachePolicy(strategy='write_behind')",
                    param_hint="--model",
                )
            found.append(cls)
    if not specs:
        registry = ModelRegistry()
        found = [
            m.class_
            for m in settings.model_mappers()
            if _is_write_behind_class(m.class_)
            and is_write_behind(registry.register(m, m.class_.__cache__))
        ]
    if not found:
        raise click.UsageError(
            f"no write-behind model to {purpose}: pass --model module:Class (repeatable), "
            "or --models MODULE defining them"
        )
    return found


def _is_write_behind_class(cls: type) -> bool:
    policy = getattr(cls, "__cache__", None)
    return mapper_of(cls) is not None and getattr(policy, "strategy", None) == "write_behind"


def _table_of(cls: type) -> str:
    mapper = mapper_of(cls)
    assert mapper is not None
    return str(mapper.local_table.name)  # type: ignore[attr-defined]


def _shown(engine: Engine) -> str:
    return redact_url(engine.url.render_as_string(hide_password=False))


def _open_letters(
    engine: Engine, namespace: str, *, ids: tuple[int, ...] | None, table: str | None
) -> list[Letter]:
    from sqlalchemy.exc import DBAPIError

    from sa_redis_cache.strategies.write_behind.worker.replay import open_dead_letters

    _check_table(engine)
    try:
        return open_dead_letters(engine, namespace, ids=ids, table=table)
    except DBAPIError as exc:
        raise _database_error(engine, exc) from exc


def _nothing_to_replay(
    settings: Settings, letters: list[Letter], ids: tuple[int, ...], *, as_json: bool
) -> None:
    others = sorted({letter.table for letter in letters})
    if as_json:
        echo_json({"replayed": [], "superseded": {}, "failed": {}, "skipped": {}})
        return
    message = f"no open dead letters to replay in namespace {settings.namespace!r}"
    if ids:
        message += f" among --id {', '.join(map(str, ids))}"
    if others:
        message += f" (open ones of tables without a --model: {', '.join(others)})"
    click.echo(message)


def _report_replay(result: ReplayResult, *, as_json: bool) -> None:
    if as_json:
        echo_json(
            {
                "replayed": result.replayed,
                "superseded": {str(k): v for k, v in result.superseded.items()},
                "failed": {str(k): v for k, v in result.failed.items()},
                "skipped": {str(k): v for k, v in result.skipped.items()},
                "cache_error": result.cache_error,
            }
        )
        return
    for letter_id in result.replayed:
        click.echo(f"replayed    {letter_id}")
    for letter_id, why in sorted(result.superseded.items()):
        click.echo(f"superseded  {letter_id}: {why}")
    for letter_id, why in sorted(result.skipped.items()):
        click.echo(f"skipped     {letter_id}: {why}")
    for letter_id, why in sorted(result.failed.items()):
        click.echo(f"failed      {letter_id}: {one_line(why)}")
    if result.cache_error:
        click.echo(f"cache: {result.cache_error}", err=True)
    click.echo(
        f"{len(result.replayed)} replayed, {len(result.superseded)} superseded, "
        f"{len(result.failed)} failed (left open), {len(result.skipped)} skipped"
    )


# --------------------------------------------------------------------------- demo


def _demo_checkout() -> Path | None:
    """The source checkout holding ``examples/demo.py`` (it is not in the wheel)."""
    try:
        spec = importlib.util.find_spec("examples.demo")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parents[1]
    package_root = Path(__file__).resolve().parents[2]  # an editable install's checkout
    for root in (Path.cwd(), package_root):
        if (root / "examples" / "demo.py").is_file():
            return root
    return None


@click.command(short_help="Run the example shop's demo (source checkout only).")
@click.option("--small", is_flag=True, help="Small counts (a few seconds; what the tests run).")
@common_options("redis_url", "database_url")
@click.pass_obj
def demo(settings: Settings, small: bool) -> None:
    """Run the example shop's story: with and without the cache, writes seen at once, a
    write-behind burst drained by a worker, and the stats table.

    Needs the source checkout (examples/ is not in the wheel) and a Postgres server:
    --database-url is a server-level URL on which the demo drops and recreates its own
    database, sarc_demo. It uses its own Redis namespace, demo (SARC_DEMO_NAMESPACE
    changes it), never --namespace; its write-behind part starts a redis-server with AOF
    on a free port when that Redis has AOF off. `make demo` finds or starts both services.

    \b
    Example:
      sa-redis-cache demo --database-url postgresql+psycopg://postgres@127.0.0.1/postgres
    """
    root = _demo_checkout()
    if root is None:
        raise CliError(
            "the demo is not installed: it lives in examples/ of the source checkout; run "
            "this command from the checkout, or `make demo` there"
        )
    if not settings.database_url:
        raise click.UsageError(
            "the demo needs a Postgres server: pass --database-url URL or set DATABASE_URL "
            "(it creates its own database, sarc_demo, there), or run `make demo`"
        )
    # fail here, with our message, rather than with a traceback deep in the demo
    settings.redis()
    _check_database(settings.engine())
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    if small:
        env["SARC_DEMO_SMALL"] = "1"
    # a child process: the demo starts its own reader processes from the checkout, and
    # its exit status is passed on unchanged
    done = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=root, env=env, check=False)
    if done.returncode:
        click.get_current_context().exit(1 if done.returncode < 0 else done.returncode)
