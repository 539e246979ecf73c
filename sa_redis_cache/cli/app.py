"""The ``sa-redis-cache`` command group: global options, error translation, entry point."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from sa_redis_cache import __version__

from .admin import demo, dlq, invalidate, worker
from .common import DEFAULT_REDIS_URL, Settings, cli_errors
from .inspection import inspect_command
from .stats import stats

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turns Redis failures raised anywhere in a command into one clear message, exit 1.

    Every error message leaves through here, and loses the credentials of the URLs the
    command was given on its way (``Settings.redact``; :func:`.common.cli_errors`).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cli_errors(ctx):
                return super().invoke(ctx)
        finally:
            used = ctx.find_object(Settings)
            if used is not None:
                used.close()


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=DEFAULT_REDIS_URL,
    show_default=True,
    metavar="URL",
    help="Redis the cache uses [env: REDIS_URL].",
)
@click.option(
    "--namespace",
    envvar="SARC_NAMESPACE",
    default="default",
    show_default=True,
    metavar="NAME",
    help="Cache namespace, as given to Cache(namespace=...) [env: SARC_NAMESPACE].",
)
@click.option(
    "--database-url",
    envvar="DATABASE_URL",
    metavar="URL",
    help="Postgres URL, for dlq, demo and inspect --statement [env: DATABASE_URL].",
)
@click.option(
    "--models",
    envvar="SARC_MODELS",
    multiple=True,
    metavar="MODULE",
    help="Dotted module to import so its mapped models are known (e.g. examples.shop); "
    "repeatable [env: SARC_MODELS, space-separated].",
)
@click.option(
    "--slot-group",
    "slot_groups",
    envvar="SARC_SLOT_GROUPS",
    multiple=True,
    metavar="GROUP=TABLE,...",
    help="A slot group of the application's Cache(slot_groups=...), e.g. "
    "orders=orders,order_tags; repeatable [env: SARC_SLOT_GROUPS, space-separated]. The "
    "models' CachePolicy(slot_group=...) are read from --models.",
)
@click.version_option(__version__, "-V", "--version", prog_name="sa-redis-cache")
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str,
    namespace: str,
    database_url: str | None,
    models: tuple[str, ...],
    slot_groups: tuple[str, ...],
) -> None:
    """Look into and manage a sa_redis_cache Redis cache.

    Global options may also be given after the command name. Exit status: 0 done,
    1 the operation failed or Redis/Postgres could not be reached, 2 bad usage.

    \b
    Examples:
      sa-redis-cache --models examples.shop stats --watch 2
      sa-redis-cache --models examples.shop inspect Product 7
      sa-redis-cache --namespace shop invalidate examples.shop:Product --yes
    """
    ctx.obj = Settings(
        redis_url=redis_url,
        namespace=namespace,
        database_url=database_url or None,
        models=list(models),
        slot_groups=_slot_groups(slot_groups),
    )


cli.add_command(stats)
cli.add_command(inspect_command)
cli.add_command(invalidate)
cli.add_command(worker)
cli.add_command(dlq)
cli.add_command(demo)


def main(argv: Sequence[str] | None = None, prog_name: str = "sa-redis-cache") -> None:
    """Run the command line (the ``sa-redis-cache`` console script); exits the process.

    Example::

        main(["--namespace", "shop", "stats", "--json"])
    """
    cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name=prog_name)


def _slot_groups(texts: tuple[str, ...]) -> dict[str, list[str]]:
    """``--slot-group orders=orders,order_tags`` options as group -> tables."""
    groups: dict[str, list[str]] = {}
    for text in texts:
        group, sep, tables = text.partition("=")
        names = [t for t in tables.split(",") if t]
        if not sep or not group or not names:
            raise click.BadParameter(
                f"{text!r}: write GROUP=TABLE[,TABLE...], e.g. orders=orders,order_tags",
                param_hint="--slot-group",
            )
        groups.setdefault(group, []).extend(names)
    return groups
