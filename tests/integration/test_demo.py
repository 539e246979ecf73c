"""`make demo` tells its story and exits 0 (run small, against this run's services, and
against a Redis Cluster with AOF, where its write-behind part queues on the cluster)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devservices import RedisCluster
from devservices.scratch import drop_database
from sa_redis_cache.redis_io import client_from_url, unlink_matching

if TYPE_CHECKING:
    from collections.abc import Iterator

    from devservices import Services

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["single", "cluster"])
def demo_redis_url(request: pytest.FixtureRequest, services: Services) -> Iterator[str]:
    """The run's Redis, or a Redis Cluster with AOF started for the test."""
    if request.param == "single":
        yield services.redis_url
        return
    with RedisCluster(primaries=3, replicas=1, appendonly=True) as cluster:
        yield cluster.url


def test_demo_runs_and_prints_its_summary(services: Services, demo_redis_url: str) -> None:
    suffix = secrets.token_hex(5)
    database, namespace = f"sarc_demo_test_{suffix}", f"demotest{suffix}"
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": demo_redis_url,
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
        drop_database(services.database_url, database)
        client = client_from_url(demo_redis_url)
        try:
            unlink_matching(client, f"sarc:{namespace}:*")
        finally:
            client.close()
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())  # lines wrap at the console's width
    for expected in (
        "A read-heavy workload, without and with the cache",
        "without cache:    200 requests",
        "with cache:       200 requests",
        "with cache, warm: 200 requests",
        "queries saved:",
        "A fresh session reads",
        "Another process (its own engine and Cache) reads",
        "The same cached query now gives",
        "A write-behind burst (PageView: strategy='write_behind')",
        "400 page views committed in 4 commits of up to 100",
        "with 0 SQL statements: each commit queued its rows in Redis",
        "Postgres holds 0 page views so far",
        # not a terminal: the worker's progress comes as its plain log lines
        "worker: write-behind backlog found: 400 entries to flush",
        "worker: write-behind backlog drained:",
        "Postgres now holds 400 rows in page_views.",
        "The same shop under asyncio (AsyncSession)",
        "every claim held",
        "The final stats table (sa-redis-cache stats)",
        "claims checked: 0 failed",
    ):
        assert " ".join(expected.split()) in out, f"{expected!r} missing:\n{done.stdout}"
    drained = re.search(
        r"Drained: 400 page views in (\d+) batches \([\d.]+ s, 0 dead letters\)", out
    )
    assert drained is not None, done.stdout
    summary = (
        f"write-behind: 400 page views queued, 400 drained by the worker in {drained[1]} "
        "batches, 400 rows in Postgres"
    )
    assert summary in out, done.stdout
    # the final table: hits and misses per model and region, summed over both processes
    product = re.search(r"model Product (\d+) (\d+) [\d.]+% 0 \d+ ", out)
    assert product is not None, done.stdout
    assert int(product[1]) > 0
    assert int(product[2]) > 0
    assert re.search(r"region category_pages \d+ \d+ [\d.]+% 0 - -", out), done.stdout
    if "cluster=true" in demo_redis_url:
        # the cluster keeps an AOF: the write-behind part queued on it, not on a spare server
        assert "has AOF on: the queue lives there" in out, done.stdout
