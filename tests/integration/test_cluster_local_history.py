"""The local tier's guarantee on a Redis Cluster while its slots move and its primaries
fail over: three processes with ``Cache(local=True)`` on the run's cluster announce every
commit to each other (tests/local_history.py), and no read that starts after an
announcement may return older data (docs/guarantees.md, "The local tier" on a cluster).

Meanwhile a thread reshards the slot of the table's keys back and forth (its keys are
reported deleted by the source and written by the target: every process must track the
target before it serves again), fails its primary over with ``CLUSTER FAILOVER`` (the old
primary lives on as a replica: the processes must notice the new set of primaries), or
SIGKILLs it (a replica is elected; the dead node comes back as a replica).
"""

from __future__ import annotations

import secrets
import threading
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from sa_redis_cache.protocol import KeyScheme
from tests.integration.test_cluster_history import started
from tests.integration.test_local_tier import Process, until
from tests.local_history import Config, Shared, assert_no_stale_read, prepare_table, run_processes
from tests.local_history import until as until_progress

if TYPE_CHECKING:
    from collections.abc import Callable

    from devservices.cluster import RedisCluster

pytestmark = pytest.mark.slow

STRATEGY = "write_through"
PROCESSES = 3
ROWS = 4
LEASE = 0.5
DEADLINE = 45.0  # each test stays well under a minute
MIN_READS = 3000
CALM = 300
MIN_WRITES = 30


def table_slot(cluster: RedisCluster, namespace: str) -> int:
    """The slot of every key of the run's table (its hash tag)."""
    return cluster.slot_of(f"{{{namespace}:sarc_local_history_{STRATEGY}}}")


def table_exists(cluster: RedisCluster, namespace: str, stop: threading.Event) -> bool:
    """Wait until the processes have read the table (True), or the run ended."""
    return started(cluster, namespace, stop, table=f"sarc_local_history_{STRATEGY}")


def run_through(
    cluster: RedisCluster,
    database_url: str,
    namespace: str,
    chaos: Callable[[threading.Event, list[int], Callable[[], None]], None],
    rounds_wanted: int,
) -> tuple[list[dict[str, Any]], int]:
    """The run with ``chaos`` in a thread (it appends one item to its list per round, and
    stops when the event is set or it is done; between rounds it calls the given
    ``calm()``, which returns once the processes read :data:`CALM` more times, so that the
    tiers get ready again and serve); the run ends once ``rounds_wanted`` rounds are done
    and the processes read and wrote enough. The results and rounds."""
    engine = sa.create_engine(database_url)
    prepare_table(engine, STRATEGY, rows=ROWS)
    engine.dispose()
    config = Config(
        database_url=database_url,
        redis_urls=(cluster.url,) * PROCESSES,
        namespace=namespace,
        strategy=STRATEGY,
        rows=ROWS,
        lease=LEASE,
        seed=secrets.randbits(31),
    )
    rounds: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def during(shared: Shared, _procs: list[Any]) -> None:
        def calm() -> None:
            start = shared.reads()
            while not stop.is_set() and shared.reads() < start + CALM:
                stop.wait(0.02)  # polls the processes' progress

        def loop() -> None:
            try:
                chaos(stop, rounds, calm)
            except BaseException as exc:  # reported by the test, not lost in the thread
                failures.append(exc)

        thread = threading.Thread(target=loop, name="cluster-chaos")
        thread.start()
        try:
            until_progress(
                lambda: (
                    bool(failures)
                    or (
                        len(rounds) >= rounds_wanted
                        and shared.reads() >= MIN_READS
                        and shared.writes() >= MIN_WRITES
                    )
                ),
                f"{rounds_wanted} rounds of chaos, {MIN_READS} reads, {MIN_WRITES} writes",
                DEADLINE,
            )
        finally:
            stop.set()
            thread.join()

    results = run_processes(config, during, deadline=DEADLINE)
    if failures:
        raise failures[0]
    assert_no_stale_read(results)
    print(
        {k: sum(r[k] for r in results) for k in ("reads", "writes", "local_hits", "breaks")},
        f"rounds={len(rounds)}",
    )
    # the run was served by the local tiers, and every process's writes were waited for
    assert all(r["local_hits"] > 0 for r in results), results
    return results, len(rounds)


def test_no_stale_local_read_while_the_tables_slot_is_resharded(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    slot = table_slot(redis_cluster, namespace)

    def reshard(stop: threading.Event, rounds: list[int], calm: Callable[[], None]) -> None:
        table_exists(redis_cluster, namespace, stop)
        while not stop.is_set():
            owner = redis_cluster.owner_of(slot)
            target = next(p for p in redis_cluster.primaries() if p is not owner)
            redis_cluster.reshard([slot], target, batch=2)
            rounds.append(1)
            calm()

    results, rounds = run_through(redis_cluster, database_url, namespace, reshard, rounds_wanted=3)
    assert rounds >= 3
    # the renewals that met the moved slot emptied the tiers, which tracked on
    assert all(r["breaks"] >= 1 for r in results), results


def test_no_stale_local_read_while_the_tables_primary_fails_over(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    slot = table_slot(redis_cluster, namespace)

    def fail_over(stop: threading.Event, rounds: list[int], calm: Callable[[], None]) -> None:
        if table_exists(redis_cluster, namespace, stop):
            for _ in range(2):
                redis_cluster.failover(redis_cluster.owner_of(slot))
                rounds.append(1)
                calm()

    results, _ = run_through(redis_cluster, database_url, namespace, fail_over, rounds_wanted=2)
    # each process saw the set of primaries change and tracked the new one
    assert all(r["breaks"] >= 1 for r in results), results


def test_no_stale_local_read_while_the_tables_primary_is_killed(
    redis_cluster: RedisCluster, database_url: str, namespace: str
) -> None:
    slot = table_slot(redis_cluster, namespace)

    def kill(stop: threading.Event, rounds: list[int], calm: Callable[[], None]) -> None:
        if table_exists(redis_cluster, namespace, stop):
            old = redis_cluster.owner_of(slot)
            redis_cluster.failover(old, kill=True)
            redis_cluster.restart_node(old)
            rounds.append(1)
            calm()

    results, _ = run_through(redis_cluster, database_url, namespace, kill, rounds_wanted=1)
    assert all(r["breaks"] >= 1 for r in results), results


def test_after_a_failover_the_tier_tracks_the_new_primary_before_it_serves(
    redis_cluster: RedisCluster, database_url: str, namespace: str, product: int
) -> None:
    """``CLUSTER FAILOVER`` leaves the old primary up, as a replica: the tier must see the
    new set of primaries, empty itself, and serve again only once every current primary
    (the promoted replica among them) has a pair with tracking on."""
    reader = Process(database_url, redis_cluster.url, namespace)
    writer = Process(database_url, redis_cluster.url, namespace)
    try:
        reader.hold(product)
        tier = reader.tier
        breaks = tier.breaks
        slot = redis_cluster.slot_of(KeyScheme(namespace).version_key("products"))
        promoted = redis_cluster.failover(redis_cluster.owner_of(slot))
        until(lambda: tier.breaks > breaks, "the tier noticed the failover")
        writer.set_price(product, "9.00")  # on the promoted primary
        assert reader.price(product) == Decimal("9.00")
        primaries = {node.node_id for node in redis_cluster.primaries()}
        assert promoted.node_id in primaries
        until(
            lambda: tier.ready and {link.node_id for link in tier._listener._links} == primaries,
            "the tier tracks every current primary",
        )
        reader.hold(product)  # served locally again
        assert reader.price(product) == Decimal("9.00")
    finally:
        reader.close()
        writer.close()
