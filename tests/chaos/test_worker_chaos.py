"""Write-behind under crashes: SIGKILLed workers and a restarted Redis lose nothing.

A writer (this process) commits a known, seeded sequence of puts and deletes over a few
keys, including put-then-delete and delete-then-put on one key, while two worker
processes flush. Workers are SIGKILLed at random points and restarted under the same
consumer name; the test's Redis (AOF ``always``) is killed and restarted once. After
draining, the table must equal the oracle exactly: nothing lost, nothing duplicated, no
deleted row back, no row older than its last write.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer
from sa_redis_cache import Cache, CacheUnavailableError, schema
from sa_redis_cache.schema import dead_letters
from tests.wb_chaos import SEED, Retry, plan, restart_one, start_worker, wait_for, write
from tests.wb_support import private_models

OPS = 600
DEADLINE = 40.0


def test_crashing_workers_and_a_restarted_redis_lose_nothing(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    rnd = random.Random(SEED)
    ops = plan(rnd, OPS)
    kill_at = set(rnd.sample(range(20, len(ops) - 20), 5))
    redis_restart_at = len(ops) // 2
    namespace = f"chaos{uuid.uuid4().hex[:8]}"
    schema.upgrade(engine)
    log_path = tmp_path / "workers.log"
    with (
        log_path.open("ab") as log,
        RedisServer(appendonly=True, appendfsync="always") as server,
        private_models() as models,
    ):
        page_view = models[0]
        page_view.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(page_view.__table__.delete())
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
        cache = Cache(client, namespace=namespace, breaker_threshold=1000)
        factory = sessionmaker(engine)
        cache.attach(factory)
        workers = {
            name: start_worker(name, database_url, server.url, namespace, log)
            for name in ("w1", "w2")
        }
        oracle: dict[uuid.UUID, tuple[str, int]] = {}
        members = f"sarc:{namespace}:{{{namespace}:{page_view.__tablename__}}}:wbw:*"

        def workers_seen() -> int:
            return sum(int(client.zcard(key)) for key in client.scan_iter(match=members))

        try:
            wait_for(lambda: workers_seen() == 2, "both workers to start")
            for i, (op, key, views) in enumerate(ops):
                give_up = time.monotonic() + 15
                while True:
                    try:
                        write(factory, page_view, op, key, views)
                        break
                    except (CacheUnavailableError, Retry):
                        assert time.monotonic() < give_up, f"op {i} never succeeded"
                if op == "put":
                    oracle[key] = (f"/{key.hex[:6]}/{views}", views)
                else:
                    oracle.pop(key, None)
                if i in kill_at:
                    restart_one(rnd, workers, database_url, server.url, namespace, log)
                if i == redis_restart_at:
                    server.kill()
                    server.restart()
            for _ in range(3):  # and while they drain the backlog
                time.sleep(rnd.uniform(0.05, 0.4))  # a random kill point, not a synchronisation
                restart_one(rnd, workers, database_url, server.url, namespace, log)
            table = page_view.__table__
            deadline = time.monotonic() + DEADLINE
            found: dict[uuid.UUID, tuple[str, int]] = {}
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    found = {r.id: (r.path, r.views) for r in conn.execute(select(table))}
                if found == oracle and not list(client.scan_iter(match="sarc:*:wbp:*")):
                    break
                time.sleep(0.1)  # polling observable state, bounded by the deadline
            assert found == oracle, log_path.read_text()[-4000:]
            for proc in workers.values():
                # SIGTERM before the handler is installed would just kill it
                pid = f'"wb_pid":{proc.pid}'
                wait_for(lambda pid=pid: pid in log_path.read_text(), "the worker to start")
                proc.send_signal(signal.SIGTERM)
            for proc in workers.values():
                assert proc.wait(timeout=20) == 0, log_path.read_text()[-4000:]
            with engine.connect() as conn:
                letters = conn.execute(
                    select(dead_letters).where(dead_letters.c.namespace == namespace)
                ).all()
            assert letters == []
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            cache.detach()
            client.close()
