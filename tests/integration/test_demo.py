"""`make demo` tells its story and exits 0 (run small, against this run's services)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from sa_redis_cache.devservices import Services

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_prints_its_summary(services: Services) -> None:
    suffix = secrets.token_hex(5)
    database, namespace = f"sarc_demo_test_{suffix}", f"demotest{suffix}"
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "SARC_DEMO_SMALL": "1",
        "SARC_DEMO_DATABASE": database,
        "SARC_DEMO_NAMESPACE": namespace,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "examples.demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        _drop_database(services.database_url, database)
        _delete_namespace(services.redis_url, namespace)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in (
        "A read-heavy workload, without and with the cache",
        "without cache:    200 requests",
        "with cache:       200 requests",
        "with cache, warm: 200 requests",
        "queries saved:",
        "A fresh session reads",
        "Another process (its own engine and Cache) reads",
        "The same cached query now gives",
        "cache.stats()",
        "claims checked: 0 failed",
    ):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out}"


def _drop_database(server_url: str, name: str) -> None:
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            quoted = admin.dialect.identifier_preparer.quote(name)
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


def _delete_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"sarc:{namespace}:*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()
