"""Bring up the Postgres and Redis that the demo, the tests and the benchmarks run against.

Each service is chosen on its own; the first source that works wins:

1. ``DATABASE_URL`` / ``REDIS_URL`` from the environment (when ``use_env``). A set variable is
   a promise: if it does not answer, that is an error, never a silent fallback.
2. The local default server: Postgres on 127.0.0.1:5432 as user ``postgres``, Redis on
   127.0.0.1:6379.
3. A throwaway server started from the binaries (``initdb`` + ``postgres`` on PATH or in
   /usr/lib/postgresql/*/bin; ``redis-server`` on PATH) in a temporary folder on a free
   loopback port. It is stopped and its folder deleted when the context exits (and at
   interpreter exit, as a safety net).

Example::

    from sqlalchemy import create_engine
    from devservices import bring_up

    with bring_up() as services:
        engine = create_engine(services.database_url)

From a shell, ``python -m devservices -- pytest -q`` runs a command with
``DATABASE_URL`` and ``REDIS_URL`` exported, and ``--print`` shows what was found.

This is a development package of the repository, not part of the library: it is not in
the wheel, and it is importable from the repository's root (the working directory of
``make``, and pytest's ``pythonpath``). The library never imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from sqlalchemy.pool import NullPool

from devservices.cluster import ClusterNode, RedisCluster
from devservices.process import ManagedServer, ServerStartError, free_port
from devservices.servers import (
    PG_BIN_GLOBS,
    PostgresServer,
    RedisServer,
    find_postgres_bindir,
    find_waitaof_server,
)
from sa_redis_cache.cli.common import normalize_database_url
from sa_redis_cache.redaction import redact_text
from sa_redis_cache.redaction import redact_url as redact
from sa_redis_cache.redis_io import client_from_url

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "DEFAULT_PG_ADDRESS",
    "DEFAULT_REDIS_ADDRESS",
    "PG_BIN_GLOBS",
    "ClusterNode",
    "ManagedServer",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerStartError",
    "Services",
    "ServicesUnavailable",
    "bring_up",
    "find_postgres_bindir",
    "find_waitaof_server",
    "free_port",
    "normalize_database_url",
    "redact",
]

log = logging.getLogger(__name__)

DEFAULT_PG_ADDRESS: tuple[str, int] = ("127.0.0.1", 5432)
DEFAULT_REDIS_ADDRESS: tuple[str, int] = ("127.0.0.1", 6379)


class ServicesUnavailable(RuntimeError):
    """Neither the environment, the local servers nor the binaries gave a needed service."""


@dataclass(frozen=True)
class Services:
    """Where the services are.

    ``database_url`` is a server-level SQLAlchemy URL (``postgresql+psycopg://...``); callers
    create their own databases on it. ``started`` names the throwaway servers this process
    started (``"postgres"``, ``"redis"``), which are gone once the context exits.

    Example::

        with bring_up() as s:
            print(s.database_url, s.redis_url, s.started)
    """

    database_url: str
    redis_url: str
    started: tuple[str, ...]


def _probe_database(url: str) -> str | None:
    """None when ``url`` answers ``SELECT 1``, else a one-line reason."""
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, ImportError, OSError, ValueError) as exc:
        return _first_line(exc)
    return None


def _probe_redis(url: str) -> str | None:
    """None when ``url`` answers PING, else a one-line reason."""
    try:
        client = client_from_url(
            url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, OSError, ValueError) as exc:
        return _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _choose(
    kind: str,
    *,
    env_var: str,
    use_env: bool,
    address: tuple[str, int],
    default_url: str,
    normalize: Callable[[str], str],
    probe: Callable[[str], str | None],
    start: Callable[[], str],
    problems: list[str],
    started: list[str],
) -> str | None:
    env_url = os.environ.get(env_var) if use_env else None
    if env_url:
        try:
            url = normalize(env_url)
        except (ValueError, sa.exc.ArgumentError) as exc:
            why = redact_text(str(exc), env_url)
            problems.append(f"{kind}: {env_var} is not a valid URL ({why})")
            return None
        reason = probe(url)
        if reason is None:
            log.info("%s: using %s from the environment (%s)", kind, env_var, redact(url))
            return url
        why = redact_text(reason, url, env_url)
        problems.append(f"{kind}: {env_var}={redact(url)} does not answer ({why})")
        return None
    reason = probe(default_url)
    if reason is None:
        log.info("%s: using the local server at %s:%d", kind, *address)
        return default_url
    try:
        url = start()
    except ServerStartError as exc:
        problems.append(f"{kind}: nothing answers at {address[0]}:{address[1]} ({reason}); {exc}")
        return None
    log.info("%s: started a throwaway server at %s (none at %s:%d)", kind, url, *address)
    started.append(kind)
    return url


_HOW_TO_FIX = """\
Provide them in one of these ways:
  - point at running servers: export DATABASE_URL=postgresql+psycopg://postgres@HOST:5432/postgres
    and REDIS_URL=redis://HOST:6379/0
  - install the server binaries, so throwaway servers are started from them
    (Debian/Ubuntu: apt-get install postgresql redis-server)
  - start the servers in compose.yaml: docker compose up -d"""


@contextlib.contextmanager
def bring_up(
    *,
    pg_address: tuple[str, int] | None = None,
    redis_address: tuple[str, int] | None = None,
    use_env: bool = True,
) -> Iterator[Services]:
    """Find or start Postgres and Redis; stop whatever was started when the block exits.

    ``pg_address``/``redis_address`` replace the local defaults that are probed before
    falling back to binaries; ``use_env=False`` ignores ``DATABASE_URL``/``REDIS_URL``.
    Raises :class:`ServicesUnavailable`, naming what is missing and how to provide it.

    Example::

        with bring_up(use_env=False) as services:
            redis.Redis.from_url(services.redis_url).ping()
    """
    pg_host, pg_port = pg_address or DEFAULT_PG_ADDRESS
    redis_host, redis_port = redis_address or DEFAULT_REDIS_ADDRESS
    problems: list[str] = []
    started: list[str] = []
    with contextlib.ExitStack() as stack:
        database_url = _choose(
            "postgres",
            env_var="DATABASE_URL",
            use_env=use_env,
            address=(pg_host, pg_port),
            default_url=f"postgresql+psycopg://postgres@{pg_host}:{pg_port}/postgres",
            normalize=normalize_database_url,
            probe=_probe_database,
            start=lambda: stack.enter_context(PostgresServer()).url,
            problems=problems,
            started=started,
        )
        redis_url = _choose(
            "redis",
            env_var="REDIS_URL",
            use_env=use_env,
            address=(redis_host, redis_port),
            default_url=f"redis://{redis_host}:{redis_port}/0",
            normalize=str,
            probe=_probe_redis,
            start=lambda: stack.enter_context(RedisServer()).url,
            problems=problems,
            started=started,
        )
        if database_url is None or redis_url is None:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise ServicesUnavailable(
                f"Postgres and Redis are needed but not available:\n{listed}\n{_HOW_TO_FIX}"
            )
        yield Services(database_url, redis_url, tuple(started))
