"""Redis Cluster cases: a 1-row hit (from Redis and from the local tier), a two-table hit
and a write-through commit on a local cluster, against the same on the single Redis of
the run, in one run.

The cluster is a ``devservices.RedisCluster`` of three primaries (no replicas: nothing
the cache sends waits for them) started on loopback for the case and stopped after it.
Its cache has a namespace of its own, is attached to a sessionmaker on an engine of its
own, and reads and writes the same rows as the single-Redis cache's contender (the
contenders alternate, so each sees the other's commits as a plain invalidation would).

What differs on a cluster (docs/guarantees.md, "Redis Cluster"): redis-py's cluster
client computes each key's slot and picks the node in Python, and a pipeline becomes a
cluster pipeline; a statement whose tables live in two slots reads one ``MGET`` per slot
(one round trip of wall time, two sockets). A commit of one table is one script on one
node, as on one server.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.cases_local import local_side
from benchmarks.cases_writes import committer, new_price
from benchmarks.common import Consume, check_result, entities, orm_contender, rows, snapshot
from benchmarks.harness import CaseResult, Comparison, Contender, measure
from devservices.cluster import RedisCluster
from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from collections.abc import Callable

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

SINGLE = "single Redis"
CLUSTER = "Redis Cluster (3 primaries)"
# rows of their own: no other case reads or writes them
HIT_PRODUCT, JOIN_PRODUCT, COMMIT_SINGLE, COMMIT_CLUSTER = 31, 33, 35, 36


class ClusterCache:
    """The cluster, a cache on it and a sessionmaker attached to it; closed by ``close``."""

    def __init__(self, env: BenchEnv) -> None:
        self.cluster = RedisCluster(primaries=3, replicas=0, appendonly=False).start()
        self.engine = env.new_engine()
        self.cache = Cache(self.cluster.url, namespace=env.new_namespace("cl"), default_ttl=3600)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine)
        self.cache.attach(self.sessions)

    def close(self) -> None:
        self.cache.detach()
        self.cache.client.close()
        self.cluster.stop()


def _one_row() -> Any:
    return select(Product).where(Product.id == HIT_PRODUCT)


def _two_tables() -> Any:
    return (
        select(Product.name, Category.name)
        .join(Category, Category.id == Product.category_id)
        .where(Product.id == JOIN_PRODUCT)
    )


def cluster_cases(env: BenchEnv, plan: Plan) -> list[CaseResult]:
    """The three cluster cases, on one cluster started for them."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed: the cluster cases start a cluster")
    made = ClusterCache(env)
    try:
        return [
            _hits(env, plan, made),
            _local_hits(env, plan, made),
            _joins(env, plan, made),
            _commits(env, plan, made),
        ]
    finally:
        made.close()


def _hit_contenders(
    env: BenchEnv, made: ClusterCache, statement: Any, wrap: Callable[[Any], Consume]
) -> tuple[list[Contender], list[str]]:
    """Fill both caches; notes when a hit runs SQL or differs from the database."""
    with Session(env.engine) as session:
        expected = snapshot(wrap(statement)(session))
    consume = wrap(statement.options(FromCache()))
    notes: list[str] = []
    contenders = []
    for name, factory in ((SINGLE, env.cached), (CLUSTER, made.sessions)):
        with factory() as session:
            consume(session)  # the fill
        notes += check_result(env, name, factory, consume, expected, expect_no_sql=True)
        contenders.append(orm_contender(name, factory, consume))
    return contenders, notes


def _ratio(label: str) -> Comparison:
    return Comparison(row=CLUSTER, numerator=CLUSTER, denominator=SINGLE, label=label)


def _hits(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    contenders, notes = _hit_contenders(env, made, _one_row(), entities)
    result = measure(
        "cluster_hit",
        "cluster: FromCache hit, 1 row (Product by id)",
        contenders,
        plan.cheap,
        [_ratio("cluster ÷ single")],
    )
    result.notes += notes
    result.breakdown.append(
        "both: one round trip (MGET of the entry, its invalidation counter and the table's "
        "version, all in one slot); the cluster client adds its slot lookup and node choice"
    )
    return result


def _local_hits(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    """The 1-row hit served by the local tier, on a cluster (a tracking pair per primary,
    all drained before the hit) and on the single Redis (one pair)."""
    consume = entities(_one_row().options(FromCache()))
    with (
        local_side(env, "lsingle") as single,
        local_side(env, "lcluster", client=made.cache.client) as clustered,
    ):
        contenders = []
        for name, side in ((SINGLE, single), (CLUSTER, clustered)):
            side.keep(consume, side.statement_key(_one_row().options(FromCache())))
            contenders.append(orm_contender(name, side.factory, consume))
        result = measure(
            "cluster_local_hit",
            "cluster: local-tier hit, 1 row (Product by id)",
            contenders,
            plan.cheap,
            [_ratio("cluster ÷ single")],
        )
        for name, side in ((SINGLE, single), (CLUSTER, clustered)):
            if side.local_hits() == 0:
                result.notes.append(f"{name}: no local hit")
    result.breakdown.append(
        "no round trip on either: before the hit the reading thread reads every tracked "
        "node's invalidation socket (one non-blocking recv each: 1 on one server, 3 here)"
    )
    return result


def _joins(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    contenders, notes = _hit_contenders(env, made, _two_tables(), rows)
    slots = {
        made.cluster.slot_of(made.cache.keys.version_key(t)) for t in ("products", "categories")
    }
    result = measure(
        "cluster_join_hit",
        "cluster: FromCache hit, 2 tables (Product join Category)",
        contenders,
        plan.cheap,
        [_ratio("cluster ÷ single")],
    )
    result.notes += notes
    result.breakdown.append(
        f"the two tables' counters live in {len(slots)} slot(s) on the cluster: one MGET per "
        "slot in one cluster pipeline (one round trip of wall time, one socket per node)"
    )
    return result


def _commits(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    result = measure(
        "cluster_commit",
        "cluster: commit, update Product.price (write_through)",
        [
            committer(SINGLE, env.cached, Product, COMMIT_SINGLE, new_price),
            committer(CLUSTER, made.sessions, Product, COMMIT_CLUSTER, new_price),
        ],
        plan.commits,
        [_ratio("cluster ÷ single")],
    )
    result.breakdown.append(
        "both: flush_mark.lua before COMMIT and commit.lua after it, one table (one slot): "
        "one script per step on one node; the cluster pipeline adds its routing in Python"
    )
    with Session(env.engine) as session:
        stored = session.scalar(select(Product.price).where(Product.id == COMMIT_CLUSTER))
    with made.sessions() as session:
        cached = session.get(Product, COMMIT_CLUSTER)
        if cached is None or cached.price != stored:
            result.notes.append("cluster: the entity cache does not hold the last committed price")
    return result
