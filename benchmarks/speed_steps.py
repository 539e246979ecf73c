"""Where a Redis-tier hit's microseconds go: ``python -m benchmarks.speed_steps [N]``.

Splits a 1-row ``FromCache`` hit and a ``session.get`` hit into the steps a hit cannot
avoid and the rest, each timed as its own contender, all alternated call by call in one
process (medians of N rounds, 2,000 by default):

* the whole hit, ours;
* the floor: redis-py ``GET`` of the stored entry and an orjson decode;
* the ``MGET`` our hit sends (the entry and its counters), sent as ours is
  (``SyncRedisIO.call``: on the thread's own connection), with nothing done with it;
* SQLAlchemy's execute pipeline alone (a ``do_orm_execute`` hook returning a ready
  result), for a select and for ``session.get``: what a hit served before the pipeline
  (both are, ``sessions.SessionHooks.install_direct_reads``) no longer pays;
* opening and closing a session, which every contender's call includes.

What is left of the hit after its ``MGET`` and the session is the library's own work
(keys, decode, building objects, counters). Needs ``DATABASE_URL``
and ``REDIS_URL`` as :mod:`benchmarks.run` does (``python -m devservices -- ...``).
benchmarks/results/speed.md quotes its output before and after issue 15.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import select

from benchmarks.common import HEADER_LEN, canned_sessions
from benchmarks.env import Sizes, bench_env
from benchmarks.harness import TIMES
from examples.shop import Product
from sa_redis_cache import FromCache
from sa_redis_cache.redis_io import SyncRedisIO

if TYPE_CHECKING:
    from collections.abc import Callable

HIT_PRODUCT, GET_PRODUCT = 7, 11
WARMUP = 200


def steps(rounds: int) -> dict[str, float]:
    """The median of each step, in microseconds."""
    with bench_env(
        os.environ["DATABASE_URL"],
        os.environ["REDIS_URL"],
        Sizes(products=50, customers=10, orders=20, extra_orders=0),
    ) as env:
        client = env.client
        io = SyncRedisIO(client)
        statement = select(Product).where(Product.id == HIT_PRODUCT)
        cached = statement.options(FromCache())
        with env.cached() as s:
            s.scalars(cached).all()
        with env.cached() as s:
            s.get(Product, GET_PRODUCT)
        query_key = next(iter(env.query_keys())).decode()
        entity_key = next(
            k for k in env.entity_keys() if k.endswith(f":{GET_PRODUCT}".encode())
        ).decode()
        keys = env.cache._core.keys
        table = "products"
        query_keys = [query_key, keys.invalidations_key(query_key), keys.version_key(table)]
        entity_keys = [
            entity_key,
            keys.version_key(table),
            keys.generation_key(table),
            keys.row_write_key(table, str(GET_PRODUCT)),
        ]
        with env.plain() as s:
            product = s.get(Product, HIT_PRODUCT)
        canned = canned_sessions(env.engine, [product], ["Product"], scalars=True)

        def hit() -> None:
            with env.cached() as s:
                s.scalars(cached).all()

        def get() -> None:
            with env.cached() as s:
                s.get(Product, GET_PRODUCT)

        def floor(key: str) -> Callable[[], Any]:
            return lambda: orjson.loads(memoryview(client.get(key))[HEADER_LEN:])  # type: ignore[arg-type]

        def pipeline_select() -> None:
            with canned() as s:
                s.scalars(statement).all()

        def pipeline_get() -> None:
            with canned() as s:
                s.get(Product, HIT_PRODUCT)

        def session() -> None:
            with env.cached():
                pass

        contenders: dict[str, Callable[[], Any]] = {
            "FromCache hit, 1 row": hit,
            "floor (FromCache entry)": floor(query_key),
            "MGET of the hit's 3 keys": lambda: io.call(("MGET", *query_keys)),
            "SQLAlchemy pipeline, select": pipeline_select,
            "session.get hit": get,
            "floor (entity entry)": floor(entity_key),
            "MGET of the get's 4 keys": lambda: io.call(("MGET", *entity_keys)),
            "SQLAlchemy pipeline, session.get": pipeline_get,
            "an empty session": session,
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for i in range(WARMUP + rounds):
            for name, call in contenders.items():
                started = time.perf_counter()
                call()
                took = time.perf_counter() - started
                if i >= WARMUP:
                    times[name].append(took)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
    """Print the steps' medians as a markdown table, and what is left to the library."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000
    med = steps(rounds)
    print("| step | median |\n|---|--:|")
    for name, value in med.items():
        print(f"| {name} | {value:.1f} µs |")
    hit, get = med["FromCache hit, 1 row"], med["session.get hit"]
    print(f"\nhit ÷ floor {hit / med['floor (FromCache entry)']:.2f}{TIMES}, ", end="")
    print(f"get ÷ floor {get / med['floor (entity entry)']:.2f}{TIMES}")
    rest = hit - med["MGET of the hit's 3 keys"] - med["an empty session"]
    print(f"FromCache hit (without the pipeline): the library's own work ≈ {rest:.1f} µs")
    rest_get = get - med["MGET of the get's 4 keys"] - med["an empty session"]
    print(f"session.get hit (without the pipeline): the library's own work ≈ {rest_get:.1f} µs")


if __name__ == "__main__":
    main()
