"""Read-after-write on a Redis Cluster while its slots move: the history checker
(:mod:`tests.history_checker`) runs its worker processes on the run's cluster while
another thread reshards the slot of the history table's keys back and forth, or fails
its primary over, for the whole run. No read that started after a write's ``commit()``
returned may see an older version (docs/guarantees.md, "Redis Cluster").

The chaos thread starts once the workers have read the table (its version counter exists
on the cluster), so that it overlaps the run. A reshard moves every key of the slot in
batches, with ``ASK`` redirections and ``TRYAGAIN`` answers meanwhile, again and again
until the run ends; failovers (``CLUSTER FAILOVER``, or a SIGKILL and an election) are
counted, so that the run also has calm stretches in which to commit and hit.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import pytest
import redis

from sa_redis_cache.compat import key_slot
from sa_redis_cache.protocol import KeyScheme
from tests.history_checker import DEFAULT_WRITES, HistoryRun, run_history
from tests.integration.test_history import ATTEMPTS, check, until_meaningful
from tests.integration.test_history import SECONDS as HISTORY_SECONDS

if TYPE_CHECKING:
    from collections.abc import Callable

    from devservices.cluster import RedisCluster

pytestmark = pytest.mark.slow

SECONDS = 4.0
STRATEGY = "cache_aside"
FAILOVERS = 2


def history_slot(cluster: RedisCluster, namespace: str, strategy: str) -> int:
    """The slot every key of the history table of ``strategy`` lives in (its hash tag)."""
    return cluster.slot_of(f"{{{namespace}:sarc_history_{strategy}}}")


def started(
    cluster: RedisCluster,
    namespace: str,
    stop: threading.Event,
    table: str = f"sarc_history_{STRATEGY}",
) -> bool:
    """Wait until the run's workers have read ``table`` (True), or the run ended."""
    key = KeyScheme(namespace).version_key(table)
    client = cluster.client()
    try:
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError):
                if client.exists(key):
                    return True
            stop.wait(0.05)  # polls a condition the workers make true by themselves
        return False
    finally:
        client.close()


def run_with(
    chaos: Callable[[threading.Event], int],
    database_url: str,
    url: str,
    namespace: str,
    seconds: float = SECONDS,
) -> tuple[HistoryRun, int]:
    """The history run on ``url`` with ``chaos`` looping in a thread until it ends; the
    run and how many rounds of chaos completed."""
    stop = threading.Event()
    rounds: list[int] = []
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            rounds.append(chaos(stop))
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=loop, name="cluster-chaos")
    thread.start()
    try:
        run = run_history(
            database_url,
            url,
            namespace,
            strategy=STRATEGY,
            processes=2,
            threads=3,
            seconds=seconds,
        )
    finally:
        stop.set()
        thread.join()
    if failures:
        raise failures[0]
    return run, rounds[0]


def run_until_meaningful(
    chaos: Callable[[threading.Event], int],
    database_url: str,
    url: str,
    namespace: str,
    *,
    writes: int,
    hits: int = 30,
    seconds: float = SECONDS,
) -> int:
    """History runs under ``chaos`` until, together, they wrote and hit often enough to
    mean something (at most :data:`ATTEMPTS`: a loaded machine makes thin runs); every
    run is checked on its own. Returns the rounds of chaos of all runs."""
    written = hit = rounds = 0
    for _ in range(ATTEMPTS):
        run, done = run_with(chaos, database_url, url, namespace, seconds)
        check(run)
        written += len(run.writes)
        hit += run.counter("total", "hits")
        rounds += done
        if written >= writes and hit >= hits:
            return rounds
    pytest.fail(f"{ATTEMPTS} runs wrote {written} times (< {writes}) or hit {hit} (< {hits})")


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
def test_the_history_suite_on_a_cluster(
    redis_cluster: RedisCluster, database_url: str, namespace: str, strategy: str
) -> None:
    """tests/integration/test_history.py's run, on the cluster, every write kind."""
    until_meaningful(
        lambda: run_history(
            database_url,
            redis_cluster.url,
            namespace,
            strategy=strategy,
            processes=2,
            threads=3,
            seconds=HISTORY_SECONDS,
            writes=DEFAULT_WRITES,
        )
    )


@pytest.mark.parametrize(
    ("slot_group", "spread"), [("history", False), (None, True)], ids=["slot-group", "spread"]
)
def test_the_history_suite_on_a_slot_group_and_with_spread_entries(
    redis_cluster: RedisCluster,
    database_url: str,
    namespace: str,
    slot_group: str | None,
    spread: bool,
) -> None:
    """The same run with the table's keys in a slot group (``{ns:@history}``), or with its
    query entries spread over the slots by their digest (every look and fill then spans
    the entry's slot and the table's): every write still retires every entry."""
    run = until_meaningful(
        lambda: run_history(
            database_url,
            redis_cluster.url,
            namespace,
            strategy="write_through",
            processes=2,
            threads=3,
            seconds=HISTORY_SECONDS,
            writes=DEFAULT_WRITES,
            slot_group=slot_group,
            spread=spread,
        )
    )
    table = f"sarc_history_{run.config.strategy}"
    keys = KeyScheme(namespace, {} if slot_group is None else {table: slot_group})
    client = redis_cluster.client()
    try:
        assert client.exists(keys.version_key(table))  # the run used the group's keys
        if spread:
            # the query entries of the one table: the list and the by-id reads of 5 rows
            pattern = f"sarc:{namespace}:{{{namespace}:@q:*"
            found = list(client.scan_iter(match=pattern, count=1000))
            assert len({key_slot(k.decode()) for k in found}) > 1
    finally:
        client.close()


def test_no_stale_read_while_the_tables_slot_is_resharded(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    slot = history_slot(redis_cluster, namespace, STRATEGY)

    def reshard(stop: threading.Event) -> int:
        moved = 0
        started(redis_cluster, namespace, stop)
        while not stop.is_set():
            owner = redis_cluster.owner_of(slot)
            target = next(p for p in redis_cluster.primaries() if p is not owner)
            redis_cluster.reshard([slot], target, batch=5)
            moved += 1
        return moved

    moved = run_until_meaningful(reshard, database_url, redis_cluster.url, namespace, writes=20)
    assert moved >= 2


def test_no_stale_read_while_the_tables_primary_fails_over(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    slot = history_slot(redis_cluster, namespace, STRATEGY)

    def fail_over(stop: threading.Event) -> int:
        done = 0
        if started(redis_cluster, namespace, stop):
            for _ in range(FAILOVERS):
                redis_cluster.failover(redis_cluster.owner_of(slot))
                done += 1
        return done

    # each failover stalls the slot's commands for a moment: a longer run, fewer writes
    done = run_until_meaningful(
        fail_over, database_url, redis_cluster.url, namespace, writes=10, seconds=8.0
    )
    assert done >= FAILOVERS


def test_no_stale_read_while_the_tables_primary_is_killed(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    """A crash: the primary is SIGKILLed (writes it acknowledged may not have reached its
    replica), a replica is elected, and the dead node comes back as a replica."""
    slot = history_slot(redis_cluster, namespace, STRATEGY)

    def kill(stop: threading.Event) -> int:
        done = 0
        if started(redis_cluster, namespace, stop):
            old = redis_cluster.owner_of(slot)
            redis_cluster.failover(old, kill=True)
            redis_cluster.restart_node(old)
            done += 1
        return done

    # while the slot has no primary (about 2 s per kill) its reads and writes wait for
    # redis-py's retries, then use the database: few operations, each one checked
    done = run_until_meaningful(
        kill, database_url, redis_cluster.url, namespace, writes=10, hits=10, seconds=8.0
    )
    assert done >= 1
