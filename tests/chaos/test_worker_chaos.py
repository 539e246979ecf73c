"""Write-behind under crashes and pauses: killed, stopped and replaced workers lose nothing.

A writer (this process) commits a known, seeded sequence of puts and deletes over a few
keys, including put-then-delete and delete-then-put on one key, while three worker
processes flush with their default lease (5 s). Meanwhile, at seeded points:

* a worker is SIGKILLed and started again, half the time under its consumer name (it
  resumes at once), half the time under a new one (the others take its partitions over
  when its lease expires);
* a worker is SIGSTOPped until every lease it held has expired and been taken over, then
  SIGCONTinued: it wakes up holding batches it read before the pause, which the fencing
  token must refuse;
* the test's Redis (AOF ``always``) is killed and restarted from its AOF.

After draining, the table equals the oracle exactly, nothing went to the dead letters, and
a trigger's record of every move of the partitions' offsets shows that each entry was
applied in exactly one transaction: every batch starts where the previous one ended.

The time from each kill or stop to the next batch applied to a partition the victim held
is printed (median and max per kind): ``pytest -s tests/chaos/test_worker_chaos.py``.
"""

from __future__ import annotations

import random
import signal
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from devservices import RedisServer
from sa_redis_cache import Cache, CacheUnavailableError, schema
from sa_redis_cache.protocol import scripts, stream_id
from sa_redis_cache.schema import dead_letters
from tests.wb_chaos import SEED, Retry, plan, start_worker, wait_for, write
from tests.wb_support import private_models

if TYPE_CHECKING:
    from collections.abc import Sequence

MIN_OPS = 600
MAX_OPS = 20_000  # the writer stops once every fault has happened and settled
PARTITIONS = 4  # of the page views (tests.wb_support)
KILLS = 6
STOPS = 2
DEADLINE = 60.0
STOP_LIMIT = 30.0  # a stopped worker's leases must be taken over well within this

AUDIT = """
CREATE TABLE chaos_offset_moves (
    n bigserial PRIMARY KEY, stream text NOT NULL, old_id text NOT NULL, new_id text NOT NULL,
    token bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION chaos_offset_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_offset_moves (stream, old_id, new_id, token)
    VALUES (NEW.stream, OLD.last_id, NEW.last_id, NEW.lease_token);
    RETURN NULL;
END $$;
CREATE TRIGGER chaos_offset_moved AFTER UPDATE ON sarc_wb_offsets FOR EACH ROW
    WHEN (OLD.last_id IS DISTINCT FROM NEW.last_id) EXECUTE FUNCTION chaos_offset_moved();
"""
UNAUDIT = """
DROP TRIGGER IF EXISTS chaos_offset_moved ON sarc_wb_offsets;
DROP FUNCTION IF EXISTS chaos_offset_moved();
DROP TABLE IF EXISTS chaos_offset_moves;
"""


@dataclass
class Fault:
    """One kill or stop: when, of whom, and the streams whose leases the victim held."""

    kind: str  # "kill, same name", "kill, new name" or "stop past the lease"
    at: float  # time.time()
    victim: str
    streams: list[str]


@dataclass
class Pool:
    """The worker processes, by slot; a slot's consumer name changes on a new-name restart."""

    args: tuple[str, str, str]
    log: Any
    names: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    def start(self, slot: str, name: str) -> None:
        self.names[slot] = name
        self.procs[slot] = start_worker(name, *self.args, self.log, lease_ms=None)

    def kill(self, slot: str, *, same_name: bool) -> None:
        self.procs[slot].kill()
        self.procs[slot].wait()
        self.restarts += 1
        self.start(slot, self.names[slot] if same_name else f"{slot}-{self.restarts}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()


@dataclass
class Chaos:
    """The faults, one at a time, each once the previous one has settled."""

    rnd: random.Random
    pool: Pool
    engine: sa.Engine
    server: RedisServer
    client: redis.Redis
    namespace: str
    log_path: Path
    due: list[str]
    faults: list[Fault] = field(default_factory=list)
    stopped: tuple[str, str, float] | None = None  # slot, consumer name, when
    next_at: int = 30

    def held(self, name: str) -> list[str]:
        """The page views' streams whose lease names consumer ``name`` now."""
        found = []
        pattern = f"sarc:{self.namespace}:{{{self.namespace}:wb_page_views}}:wbl:*"
        for lease in self.client.scan_iter(match=pattern):
            parsed = scripts.parse_lease(self.client.get(lease))
            if parsed is not None and parsed[1] == name:
                found.append(lease.decode().replace(":wbl:", ":wb:"))
        return found

    def settled(self) -> bool:
        """Every worker started, every page-view partition held by a live worker, and
        each partition the last victim held has had a batch applied since."""
        started = self.log_path.read_text()
        if not all(f'"wb_pid":{proc.pid}' in started for proc in self.pool.procs.values()):
            return False
        live = set(self.pool.names.values())
        pattern = f"sarc:{self.namespace}:{{{self.namespace}:wb_page_views}}:wbl:*"
        owners = [scripts.parse_lease(self.client.get(k)) for k in self.client.scan_iter(pattern)]
        if len(owners) != PARTITIONS or not all(o and o[1] in live for o in owners):
            return False
        if not self.faults:
            return True
        last = self.faults[-1]
        with self.engine.connect() as conn:
            moved = conn.execute(
                text(
                    "SELECT count(DISTINCT stream) FROM chaos_offset_moves "
                    "WHERE stream = ANY(:streams) AND at > to_timestamp(:at)"
                ),
                {"streams": last.streams, "at": last.at},
            ).scalar_one()
        return int(moved) == len(last.streams)

    def done(self) -> bool:
        return not self.due and self.stopped is None

    def after_op(self, i: int) -> None:
        """Resume a stopped worker once its leases moved; else maybe inject the next fault."""
        if self.stopped is not None:
            slot, name, since = self.stopped
            # resumed once its leases lapsed and others took them (seen in Redis)
            if not self.held(name):
                self.pool.procs[slot].send_signal(signal.SIGCONT)
                self.stopped = None
            else:
                assert time.time() - since < STOP_LIMIT, "a stopped worker kept its leases"
            return
        if not self.due or i < self.next_at or not self.settled():
            return
        kind = self.due.pop(0)
        self.next_at = i + self.rnd.randrange(20, 60)
        if kind == "redis":
            at = time.strftime("%H:%M:%S")
            self.server.kill()
            self.server.restart()
            print(f"\n{at} Redis killed and restarted from its AOF")
            return
        # a worker that holds partitions, when one does: its fault must matter
        procs = sorted(self.pool.procs)
        slot = self.rnd.choice([s for s in procs if self.held(self.pool.names[s])] or procs)
        name = self.pool.names[slot]
        streams = self.held(name)
        if kind == "kill":
            same = self.rnd.random() < 0.5
            label = "kill, same name" if same else "kill, new name"
            self.faults.append(Fault(label, time.time(), name, streams))
            self.pool.kill(slot, same_name=same)
        else:
            self.pool.procs[slot].send_signal(signal.SIGSTOP)
            self.faults.append(Fault("stop past the lease", time.time(), name, streams))
            self.stopped = (slot, name, time.time())


def test_killed_and_stopped_workers_and_a_restarted_redis_lose_nothing(
    engine: sa.Engine, database_url: str, tmp_path: Path
) -> None:
    rnd = random.Random(SEED)
    ops = plan(rnd, MAX_OPS)
    due = ["kill"] * KILLS + ["stop"] * STOPS
    rnd.shuffle(due)
    due.insert(len(due) // 2, "redis")
    namespace = f"chaos{uuid.uuid4().hex[:8]}"
    schema.upgrade(engine)
    log_path = tmp_path / "workers.log"
    with engine.begin() as conn:
        conn.exec_driver_sql(UNAUDIT + AUDIT)
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
        pool = Pool((database_url, server.url, namespace), log)
        for slot in ("w1", "w2", "w3"):
            pool.start(slot, slot)
        chaos = Chaos(rnd, pool, engine, server, client, namespace, log_path, due)
        oracle: dict[uuid.UUID, tuple[str, int]] = {}
        try:
            wait_for(chaos.settled, "the workers to start and share the partitions")
            for i, (op, key, views) in enumerate(ops):
                write_until_done(factory, page_view, op, key, views)
                if op == "put":
                    oracle[key] = (f"/{key.hex[:6]}/{views}", views)
                else:
                    oracle.pop(key, None)
                if chaos.done() and i >= MIN_OPS:
                    break
                chaos.after_op(i)
            assert chaos.done(), "the writer ran out of operations"
            drained(engine, client, page_view, oracle, log_path)
            for proc in pool.procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in pool.procs.values():
                assert proc.wait(timeout=20) == 0, log_path.read_text()[-4000:]
            with engine.connect() as conn:
                letters = conn.execute(
                    select(dead_letters).where(dead_letters.c.namespace == namespace)
                ).all()
                moves = conn.execute(
                    text(
                        "SELECT stream, old_id, new_id, token, extract(epoch FROM at) AS at "
                        "FROM chaos_offset_moves WHERE stream LIKE :ns ORDER BY n"
                    ),
                    {"ns": f"sarc:{namespace}:%"},
                ).all()
            assert letters == []
            check_each_entry_applied_once(moves)
            report(chaos.faults, moves, refused=log_path.read_text().count("taken over by"))
        finally:
            pool.stop_all()
            cache.detach()
            client.close()
            with engine.begin() as conn:
                conn.exec_driver_sql(UNAUDIT)


def write_until_done(factory: Any, model: Any, op: str, key: uuid.UUID, views: int) -> None:
    """One operation of the writer, retried while Redis restarts."""
    give_up = time.monotonic() + 15
    while True:
        try:
            write(factory, model, op, key, views)
            break
        except (CacheUnavailableError, Retry):
            assert time.monotonic() < give_up, f"{op} {key} never succeeded"


def drained(
    engine: sa.Engine, client: redis.Redis, model: Any, oracle: dict[Any, Any], log_path: Path
) -> None:
    """Wait until the table equals the oracle and nothing is pending; fail at the deadline."""
    table = model.__table__
    deadline = time.monotonic() + DEADLINE
    found: dict[uuid.UUID, tuple[str, int]] = {}
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            found = {r.id: (r.path, r.views) for r in conn.execute(select(table))}
        if found == oracle and not list(client.scan_iter(match="sarc:*:wbp:*")):
            return
        time.sleep(0.1)  # polling observable state, bounded by the deadline
    assert found == oracle, log_path.read_text()[-4000:]


def check_each_entry_applied_once(moves: Sequence[Any]) -> None:
    """Per stream, each batch's offset starts where the previous one's ended, and moves on."""
    last: dict[str, tuple[str, int]] = {}
    for move in moves:
        previous_id, previous_token = last.get(move.stream, ("0-0", 0))
        assert move.old_id == previous_id, f"a batch overlapped or skipped entries: {move}"
        assert stream_id(move.new_id) > stream_id(move.old_id), move
        assert move.token >= previous_token, f"a batch under an older token: {move}"
        last[move.stream] = (move.new_id, move.token)
    assert last, "no batch was applied"


def report(faults: list[Fault], moves: Sequence[Any], *, refused: int) -> None:
    """Print the time from each fault to the next batch of each stream its victim held."""
    delays: dict[str, list[float]] = {}
    for fault in faults:
        found = []
        for stream in fault.streams:
            after = [m.at for m in moves if m.stream == stream and float(m.at) > fault.at]
            if after:
                found.append(float(min(after)) - fault.at)
        delays.setdefault(fault.kind, []).extend(found)
        at = time.strftime("%H:%M:%S", time.localtime(fault.at))
        print(f"{at} {fault.kind} ({fault.victim}): {', '.join(f'{d:.2f} s' for d in found)}")
    everything = [d for found in delays.values() for d in found]
    print(f"{len(moves)} batches applied, {refused} refused by the fencing token")
    print("kill or stop -> next applied batch of each partition the victim held:")
    for kind, found in [*sorted(delays.items()), ("all", everything)]:
        if not found:
            continue
        print(
            f"  {kind}: {len(found)} partitions, median {statistics.median(found):.2f} s, "
            f"max {max(found):.2f} s"
        )
    assert everything, "no fault hit a worker holding a partition"
