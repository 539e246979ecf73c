"""The history check with a Redis outage in the middle (docs/design.md, "Failure and bad input",
issue 6).

Worker processes read and write a hot set of rows through their caches while the test
stops the Redis server it started, lets writes commit while it is away, and starts it
again from its AOF (so the entries from before the outage come back). No read that
started after a commit returned may see an older version.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from devservices import RedisServer
from tests.history_checker import run_history

WRITES_DURING_OUTAGE = 20
DEADLINE = 60.0


def _total_version(engine: sa.Engine, table: str) -> int:
    versions = sa.table(table, sa.column("version"))
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(versions.c.version), 0)))
        return int(total.scalar_one())


def _until(condition: Any) -> None:
    """Poll a condition on the system under test (not a sleep standing in for an event)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "the workers made no progress"
        time.sleep(0.02)


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
def test_no_stale_read_across_a_redis_outage(
    database_url: str, namespace: str, strategy: str
) -> None:
    table = f"sarc_history_{strategy}"
    engine = sa.create_engine(database_url, poolclass=NullPool)
    with RedisServer(appendonly=True, appendfsync="always") as server:
        probe = redis.Redis.from_url(server.url)
        outage: dict[str, Any] = {}

        def inject() -> None:
            try:
                # traffic is flowing and entries exist: the cache is in use
                _until(lambda: probe.dbsize() > 20)
                before = _total_version(engine, table)
                server.stop()
                outage["stopped"] = True
                _until(lambda: _total_version(engine, table) >= before + WRITES_DURING_OUTAGE)
                server.start()
                outage["restarted"] = True
            except BaseException as exc:  # reported by the test below
                outage["error"] = exc

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        run = run_history(
            database_url,
            server.url,
            namespace,
            strategy=strategy,
            processes=2,
            threads=3,
            seconds=6.0,
        )
        injector.join(DEADLINE)
        probe.close()
    engine.dispose()
    assert "error" not in outage, outage.get("error")
    assert outage.get("stopped"), outage
    assert outage.get("restarted"), outage
    print(run.summary())
    if run.violations():
        pytest.fail(run.report(), pytrace=False)
    assert len(run.writes) >= WRITES_DURING_OUTAGE
