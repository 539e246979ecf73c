"""Redis Cluster cases: a 1-row hit (from Redis and from the local tier), a two-table hit,
a write-through commit and a write-behind commit on a local cluster, against the same on
the single Redis of the run, in one run.

The cluster is a ``devservices.RedisCluster`` of three primaries with a replica each
(only the write-behind commit waits for them: ``WAIT`` after its enqueue) started on
loopback for the case and stopped after it.
Its cache has a namespace of its own, is attached to a sessionmaker on an engine of its
own, and reads and writes the same rows as the single-Redis cache's contender (the
contenders alternate, so each sees the other's commits as a plain invalidation would).

What differs on a cluster (docs/guarantees.md, "Redis Cluster"): redis-py's cluster
client computes each key's slot and picks the node in Python, and a pipeline becomes a
cluster pipeline; a statement whose tables live in two slots reads one ``MGET`` per slot
(one round trip of wall time, two sockets), unless the tables share a slot group
(``Cache(slot_groups=...)``: one ``MGET`` in one slot, the third contender of the
two-table case). A commit of one table is one script on one node, as on one server.
"""

from __future__ import annotations

import shutil
import uuid
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from benchmarks.cases_local import local_side
from benchmarks.cases_writes import committer, new_price
from benchmarks.common import (
    Consume,
    check_result,
    close,
    entities,
    orm_contender,
    rows,
    snapshot,
)
from benchmarks.harness import CaseResult, Comparison, Contender, measure
from devservices.cluster import RedisCluster
from examples.shop import Category, Product
from sa_redis_cache import Cache, CachePolicy, FromCache

if TYPE_CHECKING:
    from collections.abc import Callable

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

SINGLE = "single Redis"
CLUSTER = "Redis Cluster (3 primaries)"
GROUPED = "Redis Cluster, tables in one slot group"
# rows of their own: no other case reads or writes them
HIT_PRODUCT, JOIN_PRODUCT, COMMIT_SINGLE, COMMIT_CLUSTER = 31, 33, 35, 36


class ClusterCache:
    """The cluster, a cache on it and a sessionmaker attached to it; closed by ``close``."""

    def __init__(self, env: BenchEnv) -> None:
        self.cluster = RedisCluster(primaries=3, replicas=1, appendonly=False).start()
        self.engine = env.new_engine()
        self.cache = Cache(self.cluster.url, namespace=env.new_namespace("cl"), default_ttl=3600)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine)
        self.cache.attach(self.sessions)
        # the same cluster, with both tables of the two-table case in one slot group
        self.grouped = Cache(
            self.cluster.url,
            namespace=env.new_namespace("clg"),
            default_ttl=3600,
            slot_groups={"catalog": ["products", "categories"]},
        )
        self.grouped_sessions: sessionmaker[Session] = sessionmaker(self.engine)
        self.grouped.attach(self.grouped_sessions)

    def close(self) -> None:
        for cache in (self.cache, self.grouped):
            cache.detach()
            cache.client.close()
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
    """The four cluster cases, on one cluster started for them."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed: the cluster cases start a cluster")
    made = ClusterCache(env)
    try:
        return [
            _hits(env, plan, made),
            _local_hits(env, plan, made),
            _joins(env, plan, made),
            _commits(env, plan, made),
            _queued_commits(env, plan, made),
        ]
    finally:
        made.close()


def _hit_contenders(
    env: BenchEnv,
    made: ClusterCache,
    statement: Any,
    wrap: Callable[[Any], Consume],
    grouped: bool = False,
) -> tuple[list[Contender], list[str]]:
    """Fill both caches; notes when a hit runs SQL or differs from the database."""
    with Session(env.engine) as session:
        expected = snapshot(wrap(statement)(session))
    consume = wrap(statement.options(FromCache()))
    notes: list[str] = []
    contenders = []
    factories = [(SINGLE, env.cached), (CLUSTER, made.sessions)]
    if grouped:
        factories.append((GROUPED, made.grouped_sessions))
    for name, factory in factories:
        with factory() as session:
            consume(session)  # the fill
        notes += check_result(env, name, factory, consume, expected, expect_no_sql=True)
        contenders.append(orm_contender(name, factory, consume))
    return contenders, notes


def _ratio(label: str, row: str = CLUSTER, denominator: str = SINGLE) -> Comparison:
    return Comparison(row=row, numerator=row, denominator=denominator, label=label)


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
        "no round trip on either: before the hit the reading thread asks whether anything "
        "arrived on every tracked node's invalidation socket (one poll of them all: 1 "
        "socket on one server, 3 here) and reads those that got something"
    )
    return result


def _joins(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    contenders, notes = _hit_contenders(env, made, _two_tables(), rows, grouped=True)
    tables = ("products", "categories")
    slots = {made.cluster.slot_of(made.cache.keys.version_key(t)) for t in tables}
    grouped = {made.cluster.slot_of(made.grouped.keys.version_key(t)) for t in tables}
    result = measure(
        "cluster_join_hit",
        "cluster: FromCache hit, 2 tables (Product join Category)",
        contenders,
        plan.cheap,
        [
            _ratio("cluster ÷ single"),
            _ratio("group ÷ single", GROUPED),
            _ratio("group ÷ 2 slots", GROUPED, CLUSTER),
        ],
    )
    result.notes += notes
    result.breakdown.append(
        f"the two tables' counters live in {len(slots)} slot(s) on the cluster: one MGET per "
        "slot in one cluster pipeline (one round trip of wall time, one socket per node); "
        f"in a slot group, {len(grouped)} slot: one MGET, as for one table"
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


def _queued_view_model() -> Any:
    """A write-behind model on a table of its own, in a registry of its own: mapped only
    for the case (disposed of after it, so that no later cache attaches it)."""

    class Base(DeclarativeBase):
        pass

    class QueuedView(Base):
        __tablename__ = "bench_cluster_queued_views"
        # the run's Redis and this cluster keep no AOF: the case measures the commit, not
        # a queue that must survive a restart
        __cache__ = CachePolicy(strategy="write_behind", accept_volatile=True)

        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(String(100))
        views: Mapped[int] = mapped_column(default=0)

    return QueuedView


def _queuer(name: str, factory: sessionmaker[Session], model: Any) -> Contender:
    """A contender whose timed call commits one new write-behind row (no SQL: queued)."""

    def setup() -> Session:
        session = factory()
        session.add(model(path="/bench", views=1))
        return session

    return Contender(name=name, call=lambda session: session.commit(), setup=setup, teardown=close)


def _queued_commits(env: BenchEnv, plan: Plan, made: ClusterCache) -> CaseResult:
    """A write-behind commit of one new row: one ``wb_enqueue.lua`` on each side; on the
    cluster, in the same round trip, ``WAIT`` for the shard's replica (docs/cluster.md)."""
    model = _queued_view_model()
    model.metadata.create_all(env.engine)
    single = Cache(env.redis_url, namespace=env.new_namespace("wbs"))
    on_cluster = Cache(made.cluster.url, namespace=env.new_namespace("wbc"))
    factories = (sessionmaker(made.engine), sessionmaker(made.engine))
    try:
        single.attach(factories[0])
        on_cluster.attach(factories[1])
        result = measure(
            "cluster_wb_commit",
            "cluster: write-behind commit of one new row (queued, no SQL)",
            [_queuer(SINGLE, factories[0], model), _queuer(CLUSTER, factories[1], model)],
            plan.commits,
            [_ratio("cluster ÷ single")],
        )
    finally:
        single.detach()
        on_cluster.detach()
        single.client.close()
        on_cluster.client.close()
        model.metadata.drop_all(env.engine)
        model.registry.dispose()
    result.breakdown.append(
        "both: one wb_enqueue.lua call; the cluster sends it on the slot's primary's own "
        "connection followed by WAIT 1 (its replica's acknowledgement) in the same round trip"
    )
    return result
