"""Write-behind under crashes: SIGKILLed workers and a restarted Redis lose nothing.

A writer (this process) commits a known, seeded sequence of puts and deletes over a few
keys, including put-then-delete and delete-then-put on one key, while two worker
processes flush. Workers are SIGKILLed at random points and restarted under the same
consumer name; the test's Redis (AOF ``always``) is killed and restarted once. After
draining, the table must equal the oracle exactly: nothing lost, nothing duplicated, no
deleted row back, no row older than its last write.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import Cache, CacheUnavailableError, schema
from sa_redis_cache.devservices import RedisServer
from sa_redis_cache.schema import dead_letters
from tests.wb_support import private_models

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("SARC_CHAOS_SEED", "20261126"))
KEYS = 24
OPS = 600
DEADLINE = 40.0


class Retry(Exception):
    """The operation could not be done now (Redis was restarting); try it again."""


def start_worker(name: str, database_url: str, redis_url: str, namespace: str, log: Any) -> Any:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sa_redis_cache.worker",
            "--database-url",
            database_url,
            "--redis-url",
            redis_url,
            "--namespace",
            namespace,
            "--model",
            "tests.wb_support:worker_models",
            "--consumer",
            name,
            "--batch-size",
            "16",
            "--lease-ms",
            "1500",
            "--claim-idle-ms",
            "800",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def restart_one(
    rnd: random.Random,
    workers: dict[str, Any],
    database_url: str,
    redis_url: str,
    namespace: str,
    log: Any,
) -> None:
    """SIGKILL one worker at random and start it again under the same consumer name."""
    name = rnd.choice(sorted(workers))
    workers[name].kill()
    workers[name].wait()
    workers[name] = start_worker(name, database_url, redis_url, namespace, log)


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling observable state, bounded by the deadline


def plan(rnd: random.Random) -> list[tuple[str, uuid.UUID, int]]:
    """The writer's sequence: ("put", key, views) and ("del", key, 0), valid in order."""
    keys = [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(KEYS)]
    present: set[uuid.UUID] = set()
    ops: list[tuple[str, uuid.UUID, int]] = []
    while len(ops) < OPS:
        key = rnd.choice(keys)
        if key not in present:
            ops.append(("put", key, rnd.randrange(1000)))
            present.add(key)
            continue
        roll = rnd.random()
        if roll < 0.5:
            ops.append(("put", key, rnd.randrange(1000)))
        elif roll < 0.7:
            ops.append(("del", key, 0))
            present.discard(key)
        elif roll < 0.85:  # put then delete: must end deleted
            ops += [("put", key, rnd.randrange(1000)), ("del", key, 0)]
            present.discard(key)
        else:  # delete then put: must end present
            ops += [("del", key, 0), ("put", key, rnd.randrange(1000))]
    return ops


def write(factory: sessionmaker[Session], model: Any, op: str, key: uuid.UUID, views: int) -> None:
    with factory() as s:
        if op == "put":
            s.merge(model(id=key, path=f"/{key.hex[:6]}/{views}", views=views))
        else:
            obj = s.get(model, key)
            if obj is None:
                raise Retry  # a read that could not see Redis fell back to the database
            s.delete(obj)
        s.commit()


def test_crashing_workers_and_a_restarted_redis_lose_nothing(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    rnd = random.Random(SEED)
    ops = plan(rnd)
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
        members = f"sarc:{namespace}:{{{namespace}:{page_view.__tablename__}}}:wbw"
        try:
            wait_for(lambda: client.zcard(members) == 2, "both workers to start")
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
