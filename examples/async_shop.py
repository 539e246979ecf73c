"""The example shop under asyncio: ``AsyncSession``, the cache, and a loop that stays free.

Run it with the URLs the demo uses::

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.async_shop

or ``python -m devservices -- python -m examples.async_shop``, which finds
or starts both. ``DATABASE_URL`` is a server-level URL with any Postgres driver: the
program talks to it through psycopg's asyncio driver (``postgresql+psycopg_async``),
creates its own database on it (``sarc_async_demo``, or ``SARC_ASYNC_DATABASE``) and drops
it at the end; its Redis namespace (``async_demo``, or ``SARC_ASYNC_NAMESPACE``) is
cleared at the start and at the end (SCAN + UNLINK of its own keys; it never flushes a
server).

What it shows, each claim checked (exit status 1 when one fails):

1. a category page (``selectinload`` + ``FromCache``) read twice: the second time with no
   SQL at all;
2. product pages by primary key (``session.get``, the entity cache);
3. 400 requests from 20 concurrent tasks, cold then warm, while a watchdog task measures
   how late the event loop wakes it: the warm run sends no SQL, and the loop is never
   held for a Redis round trip (the lag printed is the CPU work of the other tasks);
4. a write-through price change, seen at once by a fresh session without SQL;
5. an ``async def`` cached with ``@cache.cached``.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import NullPool

from devservices.scratch import drop_database, recreate_database
from examples.checks import Checks
from examples.shop import Base, Category, Product, seed
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.redis_io import client_from_url, unlink_matching

if TYPE_CHECKING:
    from collections.abc import Awaitable

DEFAULT_DATABASE = "sarc_async_demo"
DEFAULT_NAMESPACE = "async_demo"
CATEGORIES = 8
PRODUCTS = 120


class SQLCounter:
    """Counts the statements an engine sends to Postgres."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_: Any) -> None:
        self.count += 1


class Watchdog:
    """A task that asks to wake every ``period`` seconds and records how late it woke."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watchdog:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, loop.time() - asked - self.period)


def category_page(category_id: int) -> sa.Select[Any]:
    """A category with all its products, cached as one entry."""
    return (
        select(Category)
        .where(Category.id == category_id)
        .options(selectinload(Category.products), FromCache(region="category_pages"))
    )


async def show_category(session: AsyncSession, category_id: int) -> dict[int, Decimal]:
    """A category page: the price of each product of the category."""
    category = (await session.scalars(category_page(category_id))).one()
    return {p.id: p.price for p in category.products}


async def show_product(session: AsyncSession, product_id: int) -> tuple[str, Decimal, str]:
    """A product page: the product and its category, both by primary key."""
    product = await session.get(Product, product_id)
    assert product is not None
    category = await session.get(Category, product.category_id)
    assert category is not None
    return product.name, product.price, category.name


async def workload(
    factory: async_sessionmaker[AsyncSession], requests: list[tuple[str, int]], tasks: int
) -> float:
    """Serve ``requests`` from ``tasks`` concurrent tasks, a session per request."""
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            kind, ident = queue.pop()
            async with factory() as session:
                if kind == "category":
                    await show_category(session, ident)
                else:
                    await show_product(session, ident)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - start


async def counted(sql: SQLCounter, step: Awaitable[Any]) -> tuple[Any, int]:
    """Await ``step``; its result and the SQL statements it sent."""
    before = sql.count
    result = await step
    return result, sql.count - before


async def story(database_url: str, redis_url: str, namespace: str, checks: Checks) -> None:
    """The asyncio part: everything below runs on one event loop."""
    engine = create_async_engine(database_url)
    sql = SQLCounter(engine.sync_engine)
    # a URL gives the cache both clients: redis.Redis, and redis.asyncio.Redis per loop
    cache = Cache(redis_url, namespace=namespace, default_ttl=300)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    cache.attach(factory)
    checks.watch(cache)
    try:
        print("\n1. a category page, twice")
        for attempt in ("first", "second"):
            async with factory() as s:
                prices, n = await counted(sql, show_category(s, 1))
            print(f"  {attempt} read: {len(prices)} products, {n} SQL statement(s)")
        checks.expect(n == 0, "the second category page read sent no SQL")

        print("\n2. a product page by primary key, twice")
        for attempt in ("first", "second"):
            async with factory() as s:
                page, n = await counted(sql, show_product(s, 7))
            print(f"  {attempt} read: {page[0]} ({page[2]}) at {page[1]}, {n} SQL statement(s)")
        checks.expect(n == 0, "the second product page read sent no SQL")

        print("\n3. 400 requests from 20 concurrent tasks, cold then warm")
        rng = random.Random(2026)
        requests = [
            ("category", rng.randint(1, CATEGORIES))
            if rng.random() < 0.25
            else ("product", rng.randint(1, PRODUCTS))
            for _ in range(400)
        ]
        for label in ("cold", "warm"):
            async with Watchdog() as dog:
                wall, n = await counted(sql, workload(factory, requests, 20))
            print(
                f"  {label}: {wall * 1000:.0f} ms, {n} SQL statement(s), "
                f"worst event-loop lag {dog.worst * 1000:.1f} ms"
            )
        checks.expect(n == 0, "the warm run sent no SQL")

        print("\n4. a write-through price change")
        async with factory() as s:
            product = await s.get(Product, 7)
            assert product is not None
            product.price = Decimal("12.34")
            await s.commit()  # the new state is in Redis before commit() returns
        async with factory() as s:
            page, n = await counted(sql, show_product(s, 7))
        print(f"  a fresh session reads {page[1]} with {n} SQL statement(s)")
        checks.expect(page[1] == Decimal("12.34") and n == 0, "the new price is read from Redis")

        print("\n5. an async function under @cache.cached")

        @cache.cached("products_in_category", ttl=60)
        async def products_in(category_id: int) -> int:
            async with factory() as s:
                count = await s.scalar(
                    select(func.count(Product.id)).where(Product.category_id == category_id)
                )
                return int(count or 0)

        for attempt in ("first", "second"):
            value, n = await counted(sql, products_in(2))
            print(f"  {attempt} call: {value} products, {n} SQL statement(s)")
        checks.expect(n == 0, "the second call was served from Redis")

        totals = cache.stats()["total"]
        print(f"\ncache.stats(): {totals['hits']} hits, {totals['misses']} misses, ", end="")
        print(f"{totals['fills']} fills, {totals['errors']} errors")
    finally:
        cache.detach()
        await cache.aclose()  # the asyncio client the cache made for this loop
        cache.client.close()
        await engine.dispose()


def set_up(server_url: str, database: str, redis_url: str, namespace: str) -> str:
    """Create the database with the seeded shop; clear the namespace. Returns its URL."""
    url = recreate_database(server_url, database)
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=NullPool)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            seed(s, categories=CATEGORIES, products=PRODUCTS, customers=20, orders=40)
    finally:
        engine.dispose()
    clear_namespace(redis_url, namespace)
    return url.set(drivername="postgresql+psycopg_async").render_as_string(hide_password=False)


def clear_namespace(redis_url: str, namespace: str) -> None:
    """Delete the namespace's keys (SCAN + UNLINK, never FLUSH: the server may be shared)."""
    client = client_from_url(redis_url)  # a ?cluster=true URL: every primary is scanned
    try:
        unlink_matching(client, f"sarc:{namespace}:*")
    finally:
        client.close()


def main(server_url: str, redis_url: str, database: str, namespace: str) -> int:
    """Set up, run the story on an event loop, clean up; 0 when every claim held."""
    server_url = (
        sa.make_url(server_url)
        .set(drivername="postgresql+psycopg")
        .render_as_string(hide_password=False)
    )
    print(f"database {database} on the server of DATABASE_URL, Redis namespace {namespace}")
    database_url = set_up(server_url, database, redis_url, namespace)
    checks = Checks()
    try:
        asyncio.run(story(database_url, redis_url, namespace, checks))
    finally:
        drop_database(server_url, database)
        clear_namespace(redis_url, namespace)
    if checks.failed:
        print(f"\n{len(checks.failed)} claim(s) failed", file=sys.stderr)
        return 1
    print("\nevery claim held")
    return 0


if __name__ == "__main__":
    server = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    if not server or not redis_url:
        print(
            "async_shop: DATABASE_URL and REDIS_URL must be set; `python -m "
            "devservices -- python -m examples.async_shop` sets both",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(
        main(
            server,
            redis_url,
            os.environ.get("SARC_ASYNC_DATABASE") or DEFAULT_DATABASE,
            os.environ.get("SARC_ASYNC_NAMESPACE") or DEFAULT_NAMESPACE,
        )
    )
