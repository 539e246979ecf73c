"""The worker's command line: ``sa-redis-cache worker`` and ``python -m sa_redis_cache.worker``.

Both run one click command with the global options of ``sa-redis-cache`` (``REDIS_URL``,
``DATABASE_URL``, ``--namespace``...). In-process runs name the running test's models
(``tests.wb_support:active_models``): models made there would stay mapped, and every
later ``attach()`` of the run would check them. Every bad input is one ``Error:`` line and a
non-zero exit, never a traceback: exit 2 for what was typed, 1 for a service that does
not answer or is not ready. Bad inputs run in-process; two tests start the worker as a
process and drain a queued write with the URLs from the environment.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.pool import NullPool

from devservices.process import free_port
from sa_redis_cache.cli import cli
from sa_redis_cache.cli.admin import WORKER_PROG, worker, worker_main
from tests.wb_support import WB_SERVERS, queue, rows, wb_server_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session, sessionmaker

    from devservices import RedisServer

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture(params=WB_SERVERS)
def wb_redis_url(request: pytest.FixtureRequest) -> str:
    """The worker process drains a Redis server and a Redis Cluster (``?cluster=true``)."""
    return wb_server_url(request)


ROOT = Path(__file__).resolve().parents[2]
MODELS = "tests.wb_support:active_models"  # the running test's models (in-process)
PROCESS_MODELS = "tests.wb_support:worker_models"  # a worker process makes its own


def run(*args: str, env: dict[str, Any] | None = None) -> Result:
    """``sa-redis-cache ARGS`` in-process; a traceback is a test failure, never exit 1."""
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def one_error(result: Result) -> str:
    """The one ``Error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def bare_url(database_url: str) -> Iterator[str]:
    """A fresh database without the library's tables; dropped afterwards."""
    server = sa.make_url(database_url)
    name = f"sarc_wcli_{secrets.token_hex(5)}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_every_option_is_explained() -> None:
    options = [p for p in worker.params if isinstance(p, click.Option)]
    assert {o.name for o in options} >= {"model_specs", "consumer", "lease_ms", "heartbeat_ms"}
    assert [o.name for o in options if not (o.help or "").strip()] == []
    assert "--claim-idle-ms" not in run("worker", "--help").output


def test_python_m_worker_names_itself_in_its_usage_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sa_redis_cache.worker", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: {WORKER_PROG} [OPTIONS]\n"), done.stdout
    assert "--lease-ms" in done.stdout


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--model", "examples.nosuch:PageView"], 2, "cannot import 'examples.nosuch'"),
        (
            ["--model", "examples.shop:Product"],
            2,
            "is not a mapped class with __cache__ = CachePolicy(strategy='write_behind')",
        ),
        # never a module of write-behind models in-process: attach() would check them
        (["--model", "examples.shop:Nope"], 2, "has no attribute 'Nope'"),
        (["--model", "examples.shop"], 2, "is not of the form module:attribute"),
        (["--models", "examples.shop"], 2, "no write-behind model to flush: pass --model"),
        (["--model", MODELS, "--heartbeat-ms", "3000"], 2, "more than half of --lease-ms"),
        (["--model", MODELS, "--lease-ms", "10"], 2, "--lease-ms"),
        (["--model", MODELS, "--consumer", "a\nb"], 2, "without newlines"),
        (["--model", MODELS, "--metrics-addr", "127.0.0.2"], 2, "add --metrics-port PORT"),
    ],
    ids=[
        "unknown module",
        "not write-behind",
        "unknown class",
        "no class",
        "no model",
        "heartbeat",
        "lease",
        "consumer",
        "metrics address without a port",
    ],
)
def test_bad_input_is_one_line_and_a_usage_error(
    args: list[str], status: int, says: str, database_url: str, aof_redis: RedisServer, models: Any
) -> None:
    result = run("worker", *args, env={"REDIS_URL": aof_redis.url, "DATABASE_URL": database_url})
    assert result.exit_code == status, result.output
    assert says in one_error(result)


def test_unreachable_services_are_one_line_and_exit_1(
    database_url: str, aof_redis: RedisServer, models: Any
) -> None:
    no_redis = f"redis://127.0.0.1:{free_port()}/0"
    result = run(
        "--redis-url", no_redis, "worker", "--model", MODELS, env={"DATABASE_URL": database_url}
    )
    assert result.exit_code == 1, result.output
    assert f"cannot reach Redis at {no_redis}" in one_error(result)

    no_database = sa.make_url(database_url).set(port=free_port())
    shown = no_database.render_as_string(hide_password=False)
    result = run(
        "worker", "--model", MODELS, "--database-url", shown, env={"REDIS_URL": aof_redis.url}
    )
    assert result.exit_code == 1, result.output
    assert "cannot reach the database at" in one_error(result)

    result = run(
        "worker", "--model", MODELS, env={"REDIS_URL": aof_redis.url, "DATABASE_URL": None}
    )
    assert result.exit_code == 2, result.output
    assert "pass --database-url URL (or set DATABASE_URL)" in one_error(result)


def test_an_unmigrated_database_names_the_fix(
    bare_url: str, aof_redis: RedisServer, models: Any
) -> None:
    result = run(
        "worker", "--model", MODELS, env={"REDIS_URL": aof_redis.url, "DATABASE_URL": bare_url}
    )
    assert result.exit_code == 1, result.output
    assert "sa_redis_cache.schema.upgrade(URL)" in one_error(result)


def test_python_m_worker_reports_bad_input_the_same_way(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/db")
    assert worker_main(["--model", "examples.nosuch:PageView"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Usage: {WORKER_PROG} [OPTIONS]"), err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("Error: Invalid value for --model: cannot import 'examples.nosuch'")


@pytest.mark.parametrize("entry", ["sa-redis-cache worker", WORKER_PROG])
def test_the_worker_takes_its_urls_from_the_environment_and_the_global_namespace(
    entry: str,
    factory: sessionmaker[Session],
    models: Any,
    wb_redis_url: str,
    database_url: str,
    worker_engine: sa.Engine,
    namespace: str,
    tmp_path: Path,
) -> None:
    page_view, _ = models
    pk = queue(factory, page_view, path="/env", views=3)  # queued in this test's namespace
    command = (
        [sys.executable, "-m", "sa_redis_cache", "--namespace", namespace, "worker"]
        if entry != WORKER_PROG
        else [sys.executable, "-m", "sa_redis_cache.worker", "--namespace", namespace]
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": wb_redis_url,
        "DATABASE_URL": database_url,
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [*command, "--model", PROCESS_MODELS, "--no-progress"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while rows(worker_engine, page_view) != {pk: ("/env", 3)}:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling observable state, bounded by the deadline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert '"message":"write-behind batch flushed"' in log.read_text()
