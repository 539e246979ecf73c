"""Helpers of the write-behind chaos tests: worker processes, a seeded writer, an oracle.

The writer commits a known sequence of puts and deletes over a few keys (including
put-then-delete and delete-then-put on one key); :func:`plan` makes it from a seed, and
the test keeps the oracle: what the table must hold once everything is flushed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SARC_CHAOS_SEED", "20261126"))
KEYS = 24


class Retry(Exception):
    """The operation could not be done now (Redis was restarting); try it again."""


def start_worker(
    name: str,
    database_url: str,
    redis_url: str,
    namespace: str,
    log: Any,
    *extra: str,
    module: str = "sa_redis_cache.worker",
    lease_ms: int | None = 1500,
) -> Any:
    """A ``python -m sa_redis_cache.worker`` process on the test models; stderr to ``log``.

    ``module`` runs another entry point on the same arguments (``tests.crashing_worker``);
    ``lease_ms=None`` keeps the worker's default lease.
    """
    lease = () if lease_ms is None else ("--lease-ms", str(lease_ms))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            module,
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
            *lease,
            *extra,
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


def plan(rnd: random.Random, count: int) -> list[tuple[str, uuid.UUID, int]]:
    """The writer's sequence: ("put", key, views) and ("del", key, 0), valid in order."""
    keys = [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(KEYS)]
    present: set[uuid.UUID] = set()
    ops: list[tuple[str, uuid.UUID, int]] = []
    while len(ops) < count:
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
