"""The service bring-up really starts, uses and removes throwaway servers from binaries."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import pytest
import redis
import sqlalchemy as sa

from devservices import (
    PostgresServer,
    RedisServer,
    bring_up,
    find_postgres_bindir,
    free_port,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from devservices import Services

ROOT = Path(__file__).resolve().parents[2]


def refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def address_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


@pytest.fixture
def binaries(unavailable: Callable[[str], NoReturn]) -> None:
    missing = []
    if find_postgres_bindir() is None:
        missing.append("initdb/postgres (PostgreSQL server binaries)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if missing:
        unavailable("not installed: " + ", ".join(missing))


def select_one(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT 1")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.usefixtures("binaries")
def test_falls_back_to_throwaway_servers_and_removes_them() -> None:
    dead_pg = ("127.0.0.1", free_port())
    dead_redis = ("127.0.0.1", free_port())

    with bring_up(use_env=False, pg_address=dead_pg, redis_address=dead_redis) as services:
        assert services.started == ("postgres", "redis")
        pg_address = address_of(services.database_url)
        redis_address = address_of(services.redis_url)
        assert services.database_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert pg_address != dead_pg
        assert redis_address != dead_redis

        assert select_one(services.database_url) == 1
        client = redis.Redis.from_url(services.redis_url)
        try:
            assert client.ping() is True
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        finally:
            client.close()

    assert refuses(*pg_address)
    assert refuses(*redis_address)


@pytest.mark.usefixtures("binaries")
def test_redis_server_survives_kill_and_restart_with_its_aof() -> None:
    with RedisServer(appendfsync="always") as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        try:
            client.set("sarc:devservices:k", "v")
            server.kill()
            assert not server.running
            assert refuses(server.host, port)
            server.restart()
            assert server.port == port
            assert client.get("sarc:devservices:k") == b"v"
        finally:
            client.close()
        data_dir = server.data_dir
    assert not data_dir.exists()
    assert refuses("127.0.0.1", port)


@pytest.mark.usefixtures("binaries")
def test_postgres_server_survives_kill_and_restart() -> None:
    with PostgresServer() as server:
        port = server.port
        assert server.pid is not None
        if os.geteuid() == 0:  # Postgres refuses root: it must run as the unprivileged user
            status = Path(f"/proc/{server.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid_line.split()[1]) != 0

        engine = sa.create_engine(server.url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE kept (n int)"))
                conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
            engine.dispose()  # the pooled connection dies with the server
            server.kill()
            assert refuses(server.host, port)
            server.restart()  # crash recovery replays the WAL
            assert server.port == port
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT n FROM kept")).scalar_one() == 42
            engine.dispose()
            server.stop()
            assert refuses(server.host, port)
            server.start()
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM kept")).scalar_one() == 1
        finally:
            engine.dispose()
        data_dir = server.data_dir
    assert not data_dir.exists()


def test_env_urls_win_over_probing(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = services.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    monkeypatch.setenv("DATABASE_URL", plain)
    monkeypatch.setenv("REDIS_URL", services.redis_url)
    dead = ("127.0.0.1", free_port())
    with bring_up(pg_address=dead, redis_address=dead) as found:
        assert found.started == ()
        assert found.database_url == services.database_url  # given the psycopg 3 driver
        assert found.redis_url == services.redis_url


def test_command_runs_with_urls_exported_and_its_exit_code(services: Services) -> None:
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    script = (
        "import os, sys; print(os.environ['DATABASE_URL'], os.environ['REDIS_URL']); sys.exit(7)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "devservices", "--", sys.executable, "-c", script],
        cwd=ROOT,  # the development package is importable from the repository's root
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.split() == [services.database_url, services.redis_url]
    assert "postgres: using DATABASE_URL from the environment" in result.stderr
    assert "redis: using REDIS_URL from the environment" in result.stderr


def test_harness_gives_a_run_database_and_a_test_namespace(
    engine: sa.Engine, redis_client: redis.Redis, namespace: str
) -> None:
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT current_database()")).scalar_one().startswith("sarc_test_")
        )
    assert re.fullmatch(r"t[0-9a-f]{10}", namespace)
    assert redis_client.ping() is True
