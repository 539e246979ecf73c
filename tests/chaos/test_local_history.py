"""The local tier's guarantee across processes, through faults (issue 14).

Three processes with ``Cache(local=True)`` read and write the same rows and statements;
every write is announced to the others through a pipe once its ``commit()`` returns, and
no read that starts after the announcement may return older data (tests/local_history.py).
During the run the test kills every invalidation connection (``CLIENT KILL TYPE pubsub``),
stops one reader with SIGSTOP for longer than its lease while the others write, resumes
it, and restarts Redis. The run ends after at least 10,000 reads.

The last process reaches Redis through a proxy that delays every reply by a few
milliseconds, invalidations included, while the announcements reach it at once: without
the commit fences (``local_consistency="bounded"``) it serves rows older than an announced
commit, and this test fails (checked by hand when the fences were written).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from devservices import RedisServer
from tests.local_history import (
    Config,
    Shared,
    assert_no_stale_read,
    prepare_table,
    run_processes,
    until,
)
from tests.slow_proxy import SlowProxy

PROCESSES = 3
MIN_READS = 10_000
LEASE = 0.5
DELAY = 0.005
DEADLINE = 120.0
PAUSED = 1  # the reader that is stopped: it only reads (see Config.readers_only)


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
def test_no_stale_read_from_any_local_tier_through_faults(
    database_url: str, namespace: str, strategy: str
) -> None:
    engine = sa.create_engine(database_url)
    prepare_table(engine, strategy, rows=4)
    engine.dispose()
    with RedisServer() as server, SlowProxy(server.host, server.port, delay=DELAY) as proxy:
        config = Config(
            database_url=database_url,
            redis_urls=(*[server.url] * (PROCESSES - 1), proxy.url()),
            namespace=namespace,
            strategy=strategy,
            rows=4,
            lease=LEASE,
            seed=secrets.randbits(31),
            readers_only=frozenset({PAUSED}),
        )
        admin = redis.Redis.from_url(server.url)

        def faults(shared: Shared, procs: list[Any]) -> None:
            def reads_grow(by: int) -> None:
                start = shared.reads()
                until(lambda: shared.reads() >= start + by, f"{by} more reads", DEADLINE)

            reads_grow(2000)
            admin.client_kill_filter(_type="pubsub")
            reads_grow(2000)
            paused = procs[PAUSED]
            assert paused.pid is not None
            os.kill(paused.pid, signal.SIGSTOP)
            try:
                writes = shared.writes()
                until(
                    lambda: shared.writes() >= writes + 20,
                    "writes while one is stopped",
                    DEADLINE,
                )
                # its lease must end while it is stopped: writers stop waiting for it
                time.sleep(LEASE * 2)
            finally:
                os.kill(paused.pid, signal.SIGCONT)
            reads_grow(2000)
            server.restart()
            reads_grow(2000)
            until(lambda: shared.reads() >= MIN_READS, f"{MIN_READS} reads in all", DEADLINE)

        try:
            results = run_processes(config, faults, deadline=DEADLINE)
        finally:
            admin.close()
    assert_no_stale_read(results)
    assert sum(r["reads"] for r in results) >= MIN_READS
    # the run was served by the local tiers, and every fault reached them
    assert sum(r["local_hits"] for r in results) > MIN_READS // 10
    assert all(r["breaks"] >= 2 for r in results), results  # the kill and the restart
    (stopped,) = [r for r in results if r["worker"] == 1]
    assert stopped["lapses"] >= 1, stopped
    assert sum(r["fence_waits"] for r in results) > 0
