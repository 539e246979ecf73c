"""Write-behind through a Postgres outage, with workers dying between commit and ack.

A throwaway Postgres is started for the test (the run's shared server is never stopped).
The writer queues a seeded sequence of puts and deletes (including put-then-delete and
delete-then-put on one key) before any worker runs, so a backlog waits. Two worker
processes then drain it, each SIGKILLing itself right after some batches' database
commit and before their acknowledgement (:mod:`tests.crashing_worker`); the
test restarts each dead worker under its consumer name. Once the drain is under way,
Postgres is stopped, and started again only after the workers have failed against it
(their logs say so). After draining, the table equals the oracle exactly, and no
operation went to the dead letters.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from devservices import PostgresServer, RedisServer, ServerStartError
from sa_redis_cache import Cache, schema
from sa_redis_cache.schema import dead_letters, wb_offsets
from tests.crashing_worker import CRASH_MESSAGE
from tests.wb_chaos import SEED, plan, start_worker, wait_for, write
from tests.wb_support import private_models

OPS = 500
CRASH_RATE = "0.1"  # per batch of 8 entries: several crashes per worker over the drain
DEADLINE = 40.0
REFUSAL = "Error: cannot reach the database"  # a worker started during the outage


@pytest.fixture(scope="module")
def postgres(unavailable: Any) -> Any:
    """A Postgres server of this module's own: the test stops and starts it."""
    try:
        server = PostgresServer().start()
    except ServerStartError as exc:
        unavailable(f"cannot start a throwaway Postgres: {exc}")
    try:
        yield server
    finally:
        server.close()


class Workers:
    """Two worker processes; any that died (its crash point) is started again."""

    def __init__(self, database_url: str, redis_url: str, namespace: str, log: Path) -> None:
        self.args = (database_url, redis_url, namespace)
        self.log_path = log
        self.log = log.open("ab")
        self.crashes = 0
        self.refusals = 0
        self.starts = 0
        self.procs = {name: self._start(name) for name in ("w1", "w2")}

    def _start(self, name: str) -> Any:
        self.starts += 1
        crash = ("--crash-rate", CRASH_RATE, "--crash-seed", f"{SEED}-{name}-{self.starts}")
        extra = ("--batch-size", "8", "--max-backoff", "0.3", *crash)
        return start_worker(name, *self.args, self.log, *extra, module="tests.crashing_worker")

    def revive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                if proc.returncode == 1:  # started during the outage: it refuses to start
                    # counted over the whole log: the other worker's lines may fill its
                    # tail meanwhile
                    log = self.log_path.read_text(errors="replace")
                    self.refusals += 1
                    assert log.count(REFUSAL) >= self.refusals, self.tail()
                else:
                    assert proc.returncode == -signal.SIGKILL, self.tail()
                    self.crashes += 1
                self.procs[name] = self._start(name)

    def failures(self) -> int:
        """Outages the workers reported so far (each worker says it once, then repeats)."""
        return self.log_path.read_text(errors="replace").count("cannot reach the database")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.log.close()


def test_a_postgres_outage_and_crashes_between_commit_and_ack_lose_nothing(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    rnd = random.Random(SEED + 1)
    ops = plan(rnd, OPS)
    namespace = f"pgout{uuid.uuid4().hex[:8]}"
    url = postgres.url
    engine = sa.create_engine(url, poolclass=NullPool)
    schema.upgrade(engine)
    with (
        RedisServer(appendonly=True, appendfsync="always") as server,
        private_models() as models,
    ):
        page_view = models[0]
        page_view.metadata.create_all(engine)
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
        cache = Cache(client, namespace=namespace)
        factory = sessionmaker(engine)
        cache.attach(factory)
        oracle: dict[uuid.UUID, tuple[str, int]] = {}
        for op, key, views in ops:  # queued before any worker runs: a backlog waits
            write(factory, page_view, op, key, views)
            if op == "put":
                oracle[key] = (f"/{key.hex[:6]}/{views}", views)
            else:
                oracle.pop(key, None)
        workers = Workers(url, server.url, namespace, tmp_path / "workers.log")
        try:

            def draining() -> bool:
                workers.revive()
                return applied(engine) >= 40

            wait_for(draining, "the drain to start")
            postgres.stop()
            failures = workers.failures()

            def failed_against_the_outage() -> bool:
                workers.revive()
                return workers.failures() >= failures + 2

            wait_for(failed_against_the_outage, "the workers to fail against the outage")
            assert backlog(client, namespace) > 0, "the outage came after the drain"
            postgres.start()
            table = page_view.__table__
            found: dict[uuid.UUID, tuple[str, int]] = {}
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                workers.revive()
                with engine.connect() as conn:
                    found = {r.id: (r.path, r.views) for r in conn.execute(select(table))}
                if found == oracle and not list(client.scan_iter(match="sarc:*:wbp:*")):
                    break
                time.sleep(0.1)  # polling observable state, bounded by the deadline
            assert found == oracle, workers.tail()
            assert workers.crashes >= 2, f"only {workers.crashes} crash(es) between commit and ack"
            with engine.connect() as conn:
                letters = conn.scalar(
                    select(func.count())
                    .select_from(dead_letters)
                    .where(dead_letters.c.namespace == namespace)
                )
            assert letters == 0
            log = (tmp_path / "workers.log").read_text(errors="replace")
            assert log.count(CRASH_MESSAGE) == workers.crashes
        finally:
            workers.stop()
            cache.detach()
            client.close()
            engine.dispose()


def applied(engine: sa.Engine) -> int:
    """Operations the workers applied so far (the offsets' counters)."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.coalesce(func.sum(wb_offsets.c.applied_ops), 0))) or 0)


def backlog(client: redis.Redis, namespace: str) -> int:
    """Entries still queued in the namespace's streams."""
    return sum(int(client.xlen(k)) for k in client.scan_iter(match=f"sarc:{namespace}:*:wb:*"))
