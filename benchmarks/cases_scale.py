"""Scale: hit latency and memory with many cached entries; invalidation with many queries.

Filling 10^5 or 10^6 entries through real queries would take longer than the rest of the
run, so each step fills a few entries through the cache and adds copies of a real entry's
bytes under distinct query keys of the same table, with a TTL. To Redis these are
exactly cached queries: same key layout, same value, same hash slot tag. What scale can
change (hash-table size, CPU cache misses, rehashing, memory) is therefore measured.

The hit steps run one after another (the keyspace only grows), so their latencies across
steps are not noise-cancelled; within a step, ours and the floor alternate as everywhere
else. The invalidation case alternates two namespaces, one with few and one with many
cached queries on the same table, so its ratio is noise-cancelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.cases_writes import committer, new_price
from benchmarks.common import counter_probe, entities, expect_count, floor_contender, orm_contender
from benchmarks.common import region_counter as _region_counter
from benchmarks.harness import (
    CaseResult,
    Comparison,
    Contender,
    Summary,
    Target,
    alternate,
    measure,
)
from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    import redis

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

SCALE_PRODUCT = 17
_TTL_MS = 900_000  # synthetic entries expire by themselves if the cleanup never runs
_REAL_FILLS = 50


def add_copies(client: redis.Redis, prefix: str, blob: bytes, start: int, count: int) -> None:
    """SET ``count`` copies of ``blob`` under ``prefix`` + distinct digests, pipelined."""
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + count):
        pipe.set(f"{prefix}{i:032x}", blob, px=_TTL_MS)
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()


@dataclass(frozen=True, slots=True)
class ScaleRow:
    """One step of the scale case."""

    entries: int
    dbsize: int
    ours: Summary
    floor: Summary
    ratio: float
    entry_memory: int
    memory_per_entry: float
    invalidate_model: Summary


def _used_memory(client: redis.Redis) -> int:
    info: Any = client.info("memory")
    return int(info["used_memory"])


def hit_at_scale(env: BenchEnv, plan: Plan) -> tuple[list[CaseResult], list[ScaleRow]]:
    """Hit latency, memory per entry, and invalidate_model() cost at each step."""
    statement = select(Product).where(Product.id == SCALE_PRODUCT).options(FromCache())
    ours = entities(statement)
    before = env.query_keys()
    with env.cached() as session:
        ours(session)
    new = env.query_keys() - before
    if len(new) != 1:
        raise RuntimeError(f"expected one new query entry, found {len(new)}")
    entry_key = new.pop().decode()
    blob = cast("bytes | None", env.client.get(entry_key))
    assert blob is not None
    prefix = env.cache.keys.query_key("products", "")
    present = len(env.query_keys())
    cases: list[CaseResult] = []
    steps: list[ScaleRow] = []
    for target in plan.scale_entries:
        mem_before = _used_memory(env.client)
        added = max(0, target - present)
        add_copies(env.client, prefix, blob, present, added)
        present += added
        mem_after = _used_memory(env.client)
        hits = counter_probe(lambda: _region_counter(env, "hits"))
        label = f"{target:,} entries"
        case = measure(
            f"scale_hit_{target}",
            f"scale: FromCache 1-row hit with {label} cached",
            [
                floor_contender(env.client, entry_key, "floor: GET + orjson"),
                orm_contender("ours", env.cached, ours),
            ],
            plan.scale_hits,
            [
                Comparison(
                    row="floor: GET + orjson",
                    numerator="ours",
                    denominator="floor: GET + orjson",
                    label="ours ÷ floor",
                )
            ],
        )
        case.notes += expect_count(
            "hits", hits(), plan.scale_hits.warmup + plan.scale_hits.iterations
        )
        cases.append(case)

        def invalidate_categories(_: object) -> None:
            env.cache.invalidate_model(Category)

        scans = alternate(
            [Contender("invalidate_model", call=invalidate_categories)], plan.scan_calls
        )
        entry_memory = env.client.memory_usage(entry_key, samples=0)
        steps.append(
            ScaleRow(
                entries=target,
                dbsize=int(env.client.dbsize()),
                ours=case.summaries["ours"],
                floor=case.summaries["floor: GET + orjson"],
                ratio=case.ratios[0].ratio,
                entry_memory=int(entry_memory or 0),
                memory_per_entry=(mem_after - mem_before) / added if added else math.nan,
                invalidate_model=Summary.of(scans["invalidate_model"]),
            )
        )
    return cases, steps


def invalidation_at_scale(env: BenchEnv, plan: Plan) -> CaseResult:
    """A commit to a table with few vs many cached queries on it: must cost the same."""
    contenders: list[Contender] = []
    names: list[str] = []
    for n, product_id in zip(plan.invalidation_entries, (31, 32), strict=True):
        namespace = env.new_namespace(f"inv{n}")
        cache = Cache(env.client, namespace=namespace, default_ttl=600)
        # an engine per cache, as attach() puts the cache's listeners on its engine
        factory: sessionmaker[Session] = sessionmaker(env.new_engine())
        cache.attach(factory)
        real = min(n, _REAL_FILLS)
        for i in range(1, real + 1):
            with factory() as session:
                session.scalars(select(Product).where(Product.id == i).options(FromCache())).all()
        keys = env.query_keys(namespace)
        blob = cast("bytes | None", env.client.get(next(iter(keys))))
        assert blob is not None
        add_copies(env.client, cache.keys.query_key("products", ""), blob, real, n - len(keys))
        name = f"commit, {n:,} cached queries"
        names.append(name)
        contenders.append(committer(name, factory, Product, product_id, new_price))
    few, many = names
    return measure(
        "invalidation_scale",
        "scale: write-through commit to products with few vs many cached queries on it",
        contenders,
        plan.commits,
        [
            Comparison(
                row=many,
                numerator=many,
                denominator=few,
                label=f"{plan.invalidation_entries[1]:,} ÷ {plan.invalidation_entries[0]:,}",
                target=Target("<=", 1.2),
                miss_note=(
                    "a commit bumps one version counter whatever the number of entries; a "
                    "miss here means work that grows with the entries crept into commit"
                ),
            )
        ],
    )
