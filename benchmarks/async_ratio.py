"""The AsyncSession hit against the sync hit and the uncached async query, in one run.

``python -m benchmarks.async_ratio`` (``--quick`` for a smoke run, ``--json`` for scripts)
finds Postgres and Redis like the other benchmarks (``DATABASE_URL``/``REDIS_URL``, the
local servers, or throwaway ones), creates a database of its own with the example shop,
and measures one statement, ``select(Product).where(Product.id == 7)``, four ways:

* ``sync hit``: ``FromCache`` through a ``Session`` (sessionmaker attached to the cache);
* ``async hit``: ``FromCache`` through an ``AsyncSession`` (async_sessionmaker attached),
  whose Redis calls await ``redis.asyncio`` through SQLAlchemy's greenlet bridge;
* ``async uncached``: the same statement without the cache, through an ``AsyncSession``
  of a factory that is not attached, on an engine of its own;
* ``sync uncached``: the same through a plain ``Session``, for reference.

Each operation opens a session, runs the statement, reads the one row and closes the
session, as a request handler would. The four are measured in interleaved rounds on one
event loop (the sync ones run on the loop's thread with nothing else scheduled), so
drift of the machine affects them alike; the figures are medians of all operations, and
each ratio is the median of its per-round ratios. The database and the namespace's keys
are removed at the end (SCAN + UNLINK, never FLUSH).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from devservices import bring_up, redact
from examples.shop import Base, Product, seed
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

CASES = ("sync hit", "async hit", "async uncached", "sync uncached")


def _database(server_url: str) -> tuple[str, Callable[[], None]]:
    """A fresh database with the seeded shop; its URL and a function that drops it."""
    server = sa.make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"sarc_bench_async_{secrets.token_hex(4)}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            seed(s, products=400, customers=50, orders=100)
    finally:
        engine.dispose()

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url.render_as_string(hide_password=False), drop


def _clear(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"sarc:{namespace}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])
    finally:
        client.close()


async def _measure(
    database_url: str, redis_url: str, rounds: int, ops: int
) -> dict[str, list[list[float]]]:
    namespace = f"bench_async_{secrets.token_hex(3)}"
    async_url = sa.make_url(database_url).set(drivername="postgresql+psycopg_async")
    stmt = select(Product).where(Product.id == 7)
    cached_stmt = stmt.options(FromCache())
    # an engine per factory, as benchmarks/env.py does: attaching instruments the engine
    sync_cached_engine = sa.create_engine(database_url)
    sync_plain_engine = sa.create_engine(database_url)
    async_cached_engine = create_async_engine(async_url)
    async_plain_engine = create_async_engine(async_url)
    cache = Cache(redis_url, namespace=namespace)
    sync_cached = sessionmaker(sync_cached_engine)
    sync_plain = sessionmaker(sync_plain_engine)
    async_cached = async_sessionmaker(async_cached_engine)
    async_plain = async_sessionmaker(async_plain_engine)
    cache.attach(sync_cached)
    cache.attach(async_cached)

    def sync_op(factory: sessionmaker[Session], statement: Any) -> Callable[[], None]:
        def op() -> None:
            with factory() as s:
                s.scalars(statement).one()

        return op

    def async_op(factory: Any, statement: Any) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            async with factory() as s:
                (await s.scalars(statement)).one()

        return op

    cases: dict[str, Callable[[], Any]] = {
        "sync hit": sync_op(sync_cached, cached_stmt),
        "async hit": async_op(async_cached, cached_stmt),
        "async uncached": async_op(async_plain, stmt),
        "sync uncached": sync_op(sync_plain, stmt),
    }
    clock = time.perf_counter
    try:
        for op in cases.values():  # connections, compiled statements, filled entries
            for _ in range(20):
                result = op()
                if asyncio.iscoroutine(result):
                    await result
        samples: dict[str, list[list[float]]] = {name: [] for name in CASES}
        for _ in range(rounds):
            for name, op in cases.items():
                times: list[float] = []
                is_async = name.startswith("async")
                for _ in range(ops):
                    began = clock()
                    if is_async:
                        await op()
                    else:
                        op()
                    times.append(clock() - began)
                samples[name].append(times)
        stats = cache.stats()["total"]
        assert stats["errors"] == 0, stats
        return samples
    finally:
        cache.detach()
        await cache.aclose()
        cache.client.close()
        for engine in (async_cached_engine, async_plain_engine):
            await engine.dispose()
        sync_cached_engine.dispose()
        sync_plain_engine.dispose()
        _clear(redis_url, namespace)


def _summary(samples: dict[str, list[list[float]]]) -> dict[str, Any]:
    medians = {
        name: statistics.median(t for r in runs for t in r) for name, runs in samples.items()
    }
    per_round = {name: [statistics.median(r) for r in runs] for name, runs in samples.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(per_round[a], per_round[b], strict=True))

    return {
        "median_us": {name: round(value * 1e6, 1) for name, value in medians.items()},
        "p95_us": {
            name: round(statistics.quantiles([t for r in runs for t in r], n=20)[-1] * 1e6, 1)
            for name, runs in samples.items()
        },
        "ratios": {
            "async hit / sync hit": round(ratio("async hit", "sync hit"), 3),
            "async hit / async uncached": round(ratio("async hit", "async uncached"), 3),
            "sync hit / sync uncached": round(ratio("sync hit", "sync uncached"), 3),
        },
        "rounds": len(next(iter(samples.values()))),
        "ops_per_round": len(next(iter(samples.values()))[0]),
        "machine": f"{platform.python_implementation()} {platform.python_version()}, "
        f"SQLAlchemy {sa.__version__}, redis-py {redis.__version__}",
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the figures (a table, or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async_ratio")
    parser.add_argument("--quick", action="store_true", help="a smoke run (2 x 50 operations)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", type=int, default=400, help="operations per case per round")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--out", type=Path, help="also write the table, as markdown, here")
    args = parser.parse_args(argv)
    rounds, ops = (2, 50) if args.quick else (args.rounds, args.ops)
    with ExitStack() as stack:
        services = stack.enter_context(bring_up())
        database_url, drop = _database(services.database_url)
        stack.callback(drop)
        samples = asyncio.run(_measure(database_url, services.redis_url, rounds, ops))
    summary = _summary(samples)
    summary["services"] = {
        "postgres": redact(services.database_url),
        "redis": redact(services.redis_url),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"one-row FromCache hit, {summary['rounds']} rounds x {summary['ops_per_round']} ops")
    print(f"{'case':<16}{'median us':>11}{'p95 us':>9}")
    for name in CASES:
        print(f"{name:<16}{summary['median_us'][name]:>11.1f}{summary['p95_us'][name]:>9.1f}")
    for name, value in summary["ratios"].items():
        print(f"{name:<28}{value:>7.3f}")
    print(summary["machine"])
    if args.out:
        lines = [
            (
                f"# AsyncSession: one-row FromCache hit ({summary['rounds']} rounds x "
                f"{summary['ops_per_round']} ops, interleaved in one run)"
            ),
            "",
            "| case | median µs | p95 µs |",
            "|---|--:|--:|",
            *(
                f"| {name} | {summary['median_us'][name]:.1f} | {summary['p95_us'][name]:.1f} |"
                for name in CASES
            ),
            "",
            "| ratio | value |",
            "|---|--:|",
            *(f"| {name} | {value:.3f} |" for name, value in summary["ratios"].items()),
            "",
            f"{summary['machine']}",
        ]
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
