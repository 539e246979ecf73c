"""``invalidate``, ``dlq``, ``worker`` and ``demo``: the commands that act rather than look."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sa_redis_cache.keys import pk_text
from sa_redis_cache.models import mapper_of
from sa_redis_cache.wb_config import is_queue_key

from .common import CliError, Settings, common_options, one_line, resolve_model
from .keyspace import escape_glob
from .output import Table, echo_json, render
from .values import parse_pk

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from sa_redis_cache.cache import Cache
    from sa_redis_cache.models import ModelInfo

__all__ = ["demo", "dlq", "invalidate", "worker"]

_PLANNED = "not available in this version: dead-letter replay is planned"


def _confirm(question: str) -> None:
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
        raise CliError("not confirmed: nothing was invalidated")


# --------------------------------------------------------------------------- invalidate


@click.command(short_help="Invalidate a row, a model, or the whole namespace.")
@click.argument("model", required=False, metavar="[MODEL]")
@click.argument("pk", nargs=-1, metavar="[PK]...")
@click.option(
    "--namespace-wide",
    is_flag=True,
    help="Delete every key of the namespace (SCAN + UNLINK of sarc:NAMESPACE:*; never FLUSH).",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@common_options("redis_url", "namespace", "models")
@click.pass_obj
def invalidate(
    settings: Settings, model: str | None, pk: tuple[str, ...], namespace_wide: bool, yes: bool
) -> None:
    """Invalidate one row (MODEL PK...), a whole model (MODEL), or the namespace.

    One row: its entity entry is deleted and its table's version bumped, so cached
    queries on the table are retired (cache.invalidate). A model: its table's version
    and entity generation are bumped, so every entry on it becomes a miss and expires
    with its TTL (cache.invalidate_model). --namespace-wide deletes every key of the
    namespace, counters included, as a Redis restart without persistence would.

    \b
    Examples:
      sa-redis-cache --models examples.shop invalidate Product 7
      sa-redis-cache --namespace shop invalidate --namespace-wide --yes
    """
    if namespace_wide:
        if model is not None:
            raise click.UsageError("--namespace-wide takes no MODEL or PK")
        _invalidate_namespace(settings, yes=yes)
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
        existed = bool(cache.client.exists(_entity_key(cache, info, values)))
        cache.invalidate(cls, *values)
        state = "its entity entry was deleted" if existed else "it had no entity entry"
        click.echo(
            f"invalidated {cls.__name__} {shown}: {state}; version of {info.table} bumped "
            "(cached queries on it are retired)"
        )
        return
    info = cache._core.models.info_of(mapper)
    if not yes:
        _confirm(f"Invalidate every entry of {cls.__name__} (table {info.table}) in {where}?")
    cache.invalidate_model(cls)
    click.echo(
        f"invalidated {cls.__name__}: version and generation of {info.table} bumped; its "
        "entries are now misses and expire with their TTL"
    )


def _entity_key(cache: Cache, info: ModelInfo, values: tuple[Any, ...]) -> str:
    return cache.keys.entity_key(info.table, info.schema_hash, pk_text(values))


def _invalidate_namespace(settings: Settings, *, yes: bool) -> None:
    cache = settings.cache()
    prefix = cache.keys.prefix
    pattern = escape_glob(prefix) + "*"
    # write-behind streams and pending states hold writes not yet in the database
    keys = [k for k in cache.client.scan_iter(match=pattern, count=1000) if not is_queue_key(k)]
    if not keys:
        click.echo(f"namespace {settings.namespace!r} has no cache keys: nothing to delete")
        return
    if not yes:
        _confirm(
            f"Delete all {len(keys)} cache key(s) of namespace {settings.namespace!r} "
            f"({prefix}*, write-behind queues kept) on {settings.shown_redis_url}?"
        )
    removed = sum(int(cache.client.unlink(*keys[i : i + 500])) for i in range(0, len(keys), 500))
    click.echo(
        f"deleted {removed} key(s) of namespace {settings.namespace!r} (write-behind queues kept)"
    )


# --------------------------------------------------------------------------- write-behind

_PASS_THROUGH: dict[str, Any] = {"ignore_unknown_options": True, "allow_extra_args": True}


@click.command(
    context_settings={**_PASS_THROUGH, "help_option_names": []},
    short_help="Run the write-behind flush worker.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run the write-behind flush worker until SIGTERM (python -m sa_redis_cache.worker).

    Its options: --database-url, --redis-url, --namespace, --model module:Class
    (repeatable), --consumer, --batch-size, --lease-ms, --claim-idle-ms; --help lists them.

    Example:

      sa-redis-cache worker --database-url postgresql+psycopg://... \\
          --redis-url redis://... --namespace shop --model examples.telemetry:PageView
    """
    from sa_redis_cache.worker.runner import main as run_worker

    raise SystemExit(run_worker(list(args)))


@click.group(short_help="Dead letters of write-behind: list (replay is planned).")
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
    from sqlalchemy import inspect, select
    from sqlalchemy.exc import DBAPIError

    from sa_redis_cache.devservices import redact
    from sa_redis_cache.schema import dead_letters

    shown = redact(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(dead_letters.name):
                raise CliError(
                    f"table {dead_letters.name} does not exist in {shown}: run "
                    "sa_redis_cache.schema.upgrade(URL) (or alembic upgrade "
                    "sa_redis_cache@head) first"
                )
            stmt = select(dead_letters).where(dead_letters.c.namespace == namespace)
            if not include_replayed:
                stmt = stmt.where(dead_letters.c.replayed_at.is_(None))
            stmt = stmt.order_by(dead_letters.c.id).limit(limit)
            return [dict(row) for row in conn.execute(stmt).mappings()]
    except DBAPIError as exc:
        if exc.connection_invalidated or _is_connect_error(exc):
            raise CliError(
                f"cannot reach the database at {shown}: {one_line(exc.orig)}; start it or pass "
                "--database-url (or set DATABASE_URL)"
            ) from exc
        raise CliError(f"reading {dead_letters.name} failed: {one_line(exc.orig)}") from exc


def _is_connect_error(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError)


@dlq.command("replay", context_settings=_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def dlq_replay(args: tuple[str, ...]) -> None:
    """Apply dead letters to the database again (planned; not in this version).

    Until then, fix the cause and re-queue the operation from the sarc_dead_letters row.
    """
    del args
    raise CliError(_PLANNED)


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
    """Run the example shop's story: with and without the cache, writes seen at once.

    Needs the source checkout (examples/ is not in the wheel) and a Postgres server:
    --database-url is a server-level URL on which the demo drops and recreates its own
    database, sarc_demo. It uses its own Redis namespace, demo (SARC_DEMO_NAMESPACE
    changes it), never --namespace. `make demo` finds or starts both services for you.

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
    settings.redis()  # fail here, with our message, rather than deep in the demo
    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    if small:
        env["SARC_DEMO_SMALL"] = "1"
    # a child process: the demo starts its own reader processes from the checkout, and
    # its exit status is passed on unchanged
    done = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=root, env=env, check=False)
    if done.returncode:
        click.get_current_context().exit(1 if done.returncode < 0 else done.returncode)
