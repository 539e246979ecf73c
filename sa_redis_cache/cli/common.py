"""What every command shares: settings, connections, model lookup and argument parsing.

Errors follow one rule so that scripts can rely on exit codes: a problem with what the
user typed raises a :class:`click.UsageError` (exit 2); a problem with the world (Redis or
Postgres unreachable, a table missing, an operation refused) raises :class:`CliError`
(exit 1). Both print one message on stderr that names the problem and the fix.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import click
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from sa_redis_cache.cache import Cache
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.models import all_mappers, mapper_name, mapper_of
from sa_redis_cache.redaction import redact_text, redact_url
from sa_redis_cache.redis_io import (
    SyncClient,
    client_from_url,
)
from sa_redis_cache.slot_groups import model_groups

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Mapper

    from sa_redis_cache.binds import Database

__all__ = [
    "DEFAULT_REDIS_URL",
    "CliError",
    "Settings",
    "common_options",
    "import_object",
    "normalize_database_url",
    "one_line",
    "resolve_model",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# An operator tool must answer "Redis is down" in about a second, not hang on a
# blackholed host; but a SCAN over a large namespace may take a while per batch.
_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 10.0

F = TypeVar("F", bound="Callable[..., Any]")

_MISSING = object()


class CliError(click.ClickException):
    """The operation failed or its target is unreachable: exit status 1.

    Example::

        raise CliError("cannot reach Redis at redis://127.0.0.1:6379/0: ...")
    """

    exit_code = 1


@dataclass
class Settings:
    """The global options after environment variables, defaults and per-command overrides.

    Built by the top-level group and shared with every command through ``ctx.obj``;
    connections are made on first use, so ``--help`` and usage errors never connect.

    Example::

        settings = Settings(redis_url="redis://127.0.0.1:6379/0", namespace="shop")
        settings.cache().invalidate_model(Product)
    """

    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = "default"
    database_url: str | None = None
    models: list[str] = field(default_factory=list)
    slot_groups: dict[str, list[str]] = field(default_factory=dict)
    _client: SyncClient | None = field(default=None, repr=False)
    _cache: Cache | None = field(default=None, repr=False)
    _models_loaded: bool = field(default=False, repr=False)
    _other_urls: list[str] = field(default_factory=list, repr=False)

    @property
    def shown_redis_url(self) -> str:
        """The Redis URL without its credentials, for messages."""
        return redact_url(self.redis_url)

    def redact(self, text: str) -> str:
        """``text`` without any credential of the URLs this command was given.

        Every message the command prints passes through it (see ``app._Group``), so a
        password cannot reach the terminal even inside a driver's or a parser's error.

        Example::

            settings = Settings(redis_url="redis://:s3cret@cache:6379/0")
            settings.redact("AUTH s3cret refused")  # 'AUTH *** refused'
        """
        return redact_text(text, self.redis_url, self.database_url, *self._other_urls)

    def unreachable(self, exc: Exception) -> CliError:
        """The error for a Redis that does not answer (or refuses the credentials), with the fix."""
        if isinstance(exc, redis.AuthenticationError):
            return CliError(
                f"Redis at {self.shown_redis_url} refused the credentials: {one_line(exc)}; "
                "check the user and password of --redis-url (or REDIS_URL)"
            )
        return CliError(
            f"cannot reach Redis at {self.shown_redis_url}: {one_line(exc)}; start it or pass "
            "--redis-url (or set REDIS_URL)"
        )

    def redis(self) -> SyncClient:
        """A client on ``redis_url`` that has answered PING (bytes replies, no retries).

        A URL with ``?cluster=true`` makes a Redis Cluster client, which every command
        takes: scans cover every primary (redis-py's cluster ``SCAN``) and multi-key reads
        are split per slot (docs/cluster.md).

        Example::

            Settings(redis_url="redis://localhost:6379/0").redis().ping()
        """
        if self._client is None:
            try:
                client = client_from_url(
                    self.redis_url,
                    socket_connect_timeout=_CONNECT_TIMEOUT,
                    socket_timeout=_SOCKET_TIMEOUT,
                    retry=Retry(NoBackoff(), 0),
                )
            except RedisClusterException as exc:
                raise self.unreachable(exc) from exc
            except (ValueError, TypeError) as exc:
                # a parser may quote a piece of the password it took for a port
                why = self.redact(one_line(exc))
                raise click.BadParameter(
                    f"{self.shown_redis_url!r} is not a Redis URL ({why}); "
                    "write it as redis://[USER:PASSWORD@]HOST:PORT/DB",
                    param_hint="--redis-url",
                ) from exc
            try:
                client.ping()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                client.close()
                raise self.unreachable(exc) from exc
            self._client = client
        return self._client

    def cache(self) -> Cache:
        """A :class:`~sa_redis_cache.Cache` on this namespace, with ``--models`` imported."""
        if self._cache is None:
            self.load_models()
            client = self.redis()
            try:
                # the slot groups the models declare: their tables' keys carry the group's tag
                self._cache = Cache(
                    client, namespace=self.namespace, slot_groups=self._slot_groups()
                )
            except ConfigurationError as exc:
                # a namespace with a colon, a URL asking for decode_responses: what the
                # user typed cannot work, and the library's message says why
                raise click.UsageError(str(exc)) from exc
        return self._cache

    def _slot_groups(self) -> dict[str, list[str]]:
        """Group -> tables, as the imported models' ``CachePolicy(slot_group=...)`` and
        ``--slot-group`` (the application's ``Cache(slot_groups=...)``) say."""
        by_group: dict[str, list[str]] = {g: list(t) for g, t in self.slot_groups.items()}
        for table, group in model_groups(m.class_ for m in all_mappers()).items():
            if table not in by_group.get(group, []):
                by_group.setdefault(group, []).append(table)
        return by_group

    def load_models(self) -> None:
        """Import every ``--models`` module, so that their mapped classes exist."""
        if self._models_loaded:
            return
        for name in self.models:
            _import_module(name, param_hint="--models")
        self._models_loaded = True

    def model_mappers(self) -> list[Mapper[Any]]:
        """The mapped classes of the ``--models`` modules (every one, when none is given).

        A class belongs to a module when it is defined in it (or in a submodule of it) or
        is one of its attributes, so a package that re-exports its models counts.
        """
        self.load_models()
        mappers = all_mappers()
        if not self.models:
            return mappers
        exported = {
            id(value)
            for name in self.models
            for value in vars(sys.modules[name]).values()
            if isinstance(value, type)
        }
        return [
            m
            for m in mappers
            if id(m.class_) in exported
            or any(
                m.class_.__module__ == n or m.class_.__module__.startswith(n + ".")
                for n in self.models
            )
        ]

    def engine(
        self,
        url: str | None = None,
        *,
        option: str = "--database-url",
        exact: bool = False,
        pool: bool = False,
    ) -> Engine:
        """An engine on ``url`` (default ``--database-url``); it connects on first use.

        A URL without a driver (``postgresql://``) gets psycopg 3, the driver the library
        installs, unless ``exact``: a cache key includes the bind's URL and driver, so a
        key computed for the application must use its URL untouched. Without ``pool``,
        every use opens its own connection (a one-shot command); with it, connections
        are pooled and checked before use (a long-running one, the worker).
        """
        from sqlalchemy import create_engine
        from sqlalchemy.exc import ArgumentError
        from sqlalchemy.pool import NullPool

        asked = option
        if url:
            self._other_urls.append(url)  # --bind-url: its credentials are redacted too
        else:  # the default: a bad URL is --database-url's
            url, option = self.database_url, "--database-url"
        if not url:
            options = option if asked == option else f"{asked} or --database-url"
            raise click.UsageError(
                f"this command needs a database: pass {options} URL (or set DATABASE_URL)"
            )
        try:
            target = url if exact else normalize_database_url(url)
            pooling: dict[str, Any] = {"pool_pre_ping": True} if pool else {"poolclass": NullPool}
            engine = create_engine(target, connect_args=_connect_args(url), **pooling)
        except (ArgumentError, ValueError, ImportError) as exc:
            why = self.redact(one_line(exc))
            raise click.BadParameter(
                f"{redact_url(url)!r} is not a usable database URL ({why}); write "
                "it as postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DB",
                param_hint=option,
            ) from exc
        return engine

    def database(self, url: str | None = None, *, option: str = "--database-url") -> Database:
        """What ``url`` (default ``--database-url``) connects to, as cache keys name it.

        Connects once (with psycopg 3 when the URL names an asyncio driver: the database
        is the same); the name keeps the URL's own driver, which query keys include.
        """
        from sqlalchemy.exc import SQLAlchemyError

        from sa_redis_cache.binds import Binds, Database

        given = self.engine(url, option=option, exact=True)
        driver = f"{given.dialect.name}+{given.dialect.driver}"
        sync_url = given.url
        if getattr(given.dialect, "is_async", False):
            sync_url = sync_url.set(drivername=f"{given.dialect.name}+psycopg")
        engine = self.engine(sync_url.render_as_string(hide_password=False), option=option)
        try:
            found = Binds().database_of_engine(engine)
        except SQLAlchemyError as exc:
            # worded as every command words an unreachable database (cli.md), naming the
            # option the URL came from; the driver's own text, without SQLAlchemy's links
            named = option if url is not None else "--database-url"
            raise CliError(
                f"cannot reach the database at {redact_url(str(given.url))}: "
                f"{one_line(getattr(exc, 'orig', None) or exc)}; start it or pass {named} "
                "(or set DATABASE_URL)"
            ) from exc
        finally:
            engine.dispose()
            given.dispose()
        if found is None:
            raise CliError(f"{option}: the database did not say which one it is")
        return Database(found.identity, found.default_schema, driver, views=found.views)

    def close(self) -> None:
        """Close the Redis connection, if one was made."""
        if self._client is not None:
            self._client.close()
            self._client = None


def normalize_database_url(url: str) -> str:
    """Give a plain ``postgres://``/``postgresql://`` URL the psycopg 3 driver.

    Example::

        >>> normalize_database_url("postgresql://app@db/shop")
        'postgresql+psycopg://app@db/shop'
    """
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def one_line(error: object) -> str:
    """An error's text on one line, without its final period (messages go on after it).

    Example::

        >>> one_line("Connection refused.")
        'Connection refused'
    """
    return " ".join(str(error).split()).rstrip(".")


def _connect_args(url: str) -> dict[str, Any]:
    from sqlalchemy import make_url

    # psycopg would otherwise wait for the OS's TCP timeout on an unreachable host
    return {"connect_timeout": 5} if make_url(url).get_backend_name() == "postgresql" else {}


# --------------------------------------------------------------------------- options


def _set(
    name: str, *, append: bool = False
) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is None or value == ():
            return  # not given here: the group's value (option, env or default) stands
        settings = ctx.find_object(Settings)
        if settings is None:
            settings = ctx.ensure_object(Settings)
        if append:
            getattr(settings, name).extend(value)
        else:
            setattr(settings, name, value)

    return callback


_OPTIONS: dict[str, tuple[str, str, bool, str]] = {
    # settings field: (option, metavar, repeatable, help)
    "redis_url": ("--redis-url", "URL", False, "Redis URL (overrides the global option)."),
    "namespace": ("--namespace", "NAME", False, "Cache namespace (overrides the global option)."),
    "database_url": (
        "--database-url",
        "URL",
        False,
        "Postgres URL (overrides the global option).",
    ),
    "models": (
        "--models",
        "MODULE",
        True,
        "Module defining mapped models; repeatable (adds to the global list).",
    ),
}


def common_options(*names: str) -> Callable[[F], F]:
    """Accept the named global options after the command name too (``stats --namespace shop``).

    ``names`` are :class:`Settings` fields: ``redis_url``, ``namespace``, ``database_url``,
    ``models``; a command takes only those it uses, so its ``--help`` stays short. A value
    given here overrides the one given before the command, from the environment or by
    default; ``--models`` adds to the modules already listed.

    Example::

        @click.command()
        @common_options("redis_url", "namespace")
        def stats() -> None: ...
    """

    def decorate(func: F) -> F:
        for name in reversed(names):
            flag, metavar, repeatable, help_text = _OPTIONS[name]
            func = click.option(
                flag,
                metavar=metavar,
                multiple=repeatable,
                expose_value=False,
                callback=_set(name, append=repeatable),
                help=help_text,
            )(func)
        return func

    return decorate


# --------------------------------------------------------------------------- user modules


def _import_module(name: str, *, param_hint: str) -> Any:
    # like flask, celery and alembic: the directory the command runs in is importable,
    # so "--models app.models" works from a project's root with the console script too
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise click.BadParameter(
                f"cannot import {name!r} ({exc}); give a dotted module path importable from "
                "the current directory or the environment, e.g. examples.shop",
                param_hint=param_hint,
            ) from exc
        raise CliError(f"importing {name!r} failed: {exc}") from exc
    except Exception as exc:
        # the user's module raised while importing: their bug, not a usage error
        raise CliError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def import_object(spec: str, *, param_hint: str) -> Any:
    """The object named ``module:attribute`` (the attribute may be dotted).

    Example::

        import_object("examples.shop:Product", param_hint="MODEL")
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r} is not of the form module:attribute (e.g. examples.shop:Product)",
            param_hint=param_hint,
        )
    obj = _import_module(module_name, param_hint=param_hint)
    for part in attr.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attr!r}", param_hint=param_hint
            )
    return obj


def call_factory(spec: str, func: Any, *, param_hint: str, wanted: str) -> Any:
    """What ``func``, the function of no arguments ``spec`` names, returns.

    A function that needs arguments is bad usage (exit 2); one that raises is the
    user's code failing, told in one line (exit 1) like a module that raises on import.

    Example::

        call_factory("app.queries:books", books, param_hint="--statement", wanted="a select()")
    """
    try:
        inspect.signature(func).bind()
    except TypeError as exc:
        raise click.BadParameter(
            f"{spec} is a callable that needs arguments ({exc}); point at {wanted} or "
            "a function of no arguments returning it",
            param_hint=param_hint,
        ) from exc
    except ValueError:
        pass  # no signature to check (some builtins): calling it tells
    try:
        return func()
    except Exception as exc:
        raise CliError(f"calling {spec} failed: {type(exc).__name__}: {exc}") from exc


def _imported_model(target: str, spec: str) -> type:
    """The mapped class ``module:Class`` names (``spec`` is how the user wrote it)."""
    cls = import_object(target, param_hint="MODEL")
    if not isinstance(cls, type) or mapper_of(cls) is None:
        raise click.BadParameter(f"{spec!r} is not a mapped class", param_hint="MODEL")
    return cls


def resolve_model(spec: str, settings: Settings) -> type:
    """The mapped class named ``spec``: ``module:Class``, ``module.Class`` or ``Class``.

    A bare class name is looked up among the models of the ``--models`` modules (all
    mapped classes of the process when none is given): two applications' ``Product``
    classes in one process do not make the name ambiguous for the one asked about.

    Example::

        resolve_model("examples.shop:Product", settings)
    """
    if ":" in spec:
        return _imported_model(spec, spec)
    mappers = settings.model_mappers()
    found = [m for m in mappers if spec in (m.class_.__name__, mapper_name(m))]
    if not found:
        found = [m for m in all_mappers() if mapper_name(m) == spec]
    module_name, dot, class_name = spec.rpartition(".")
    if not found and dot and module_name and class_name:
        # module.Class names its module as module:Class does: imported on the spot, so it
        # needs no --models (cli.md lists the two forms side by side)
        return _imported_model(f"{module_name}:{class_name}", spec)
    if len(found) == 1:
        return found[0].class_
    if found:
        names = ", ".join(sorted(mapper_name(m) for m in found))
        raise click.BadParameter(
            f"{spec!r} is ambiguous: {names}; name one as module:Class", param_hint="MODEL"
        )
    if not mappers:
        raise click.BadParameter(
            f"unknown model {spec!r}: no mapped models are imported; pass --models MODULE "
            "(e.g. --models examples.shop) or name the model as module:Class",
            param_hint="MODEL",
        )
    known = ", ".join(sorted({m.class_.__name__ for m in mappers}))
    raise click.BadParameter(
        f"unknown model {spec!r}; the imported models are: {known}", param_hint="MODEL"
    )


@contextmanager
def cli_errors(ctx: click.Context) -> Iterator[None]:
    """Turn a Redis failure raised in a command into one clear message (exit 1), and take
    the credentials of the command's URLs out of every error message.

    The ``sa-redis-cache`` group runs each command in it, and so does a command run on
    its own (``python -m sa_redis_cache.worker``), which the group does not wrap.

    Example::

        with cli_errors(ctx):
            ctx.invoke(command)
    """
    try:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            settings = ctx.find_object(Settings) or Settings()
            raise settings.unreachable(exc) from exc
        except redis.RedisError as exc:
            settings = ctx.find_object(Settings) or Settings()
            raise CliError(f"Redis at {settings.shown_redis_url} failed: {one_line(exc)}") from exc
    except click.ClickException as exc:
        given = ctx.find_object(Settings)
        message = exc.message if given is None else given.redact(exc.message)
        if message == exc.message:
            raise
        raise _with_message(exc, message) from exc


def _with_message(exc: click.ClickException, message: str) -> click.ClickException:
    """``exc`` again, with ``message`` (click's messages are final once made)."""
    if isinstance(exc, click.BadParameter):
        return click.BadParameter(message, ctx=exc.ctx, param=exc.param, param_hint=exc.param_hint)
    if isinstance(exc, click.UsageError):
        return click.UsageError(message, ctx=exc.ctx)
    return CliError(message)  # every other ClickException exits 1, as CliError does


class TranslatedCommand(click.Command):
    """A command that translates its errors itself (:func:`cli_errors`), for commands that
    also run outside the ``sa-redis-cache`` group; inside it, translating twice is
    harmless (a translated message has nothing left to redact)."""

    def invoke(self, ctx: click.Context) -> Any:
        with cli_errors(ctx):
            return super().invoke(ctx)
