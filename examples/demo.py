"""The story behind ``make demo``: the example shop with and without the cache.

Run it with ``make demo``, which finds or starts Postgres and Redis and exports their
URLs, or by hand::

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/postgres \\
    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.demo

``DATABASE_URL`` is a server-level URL: the demo drops and recreates its own database on
that server (``sarc_demo``) and uses its own Redis namespace (``demo``), whose keys it
deletes at the start (SCAN + UNLINK of ``sarc:demo:*``; it never flushes a server).

Sections: set-up; a read-heavy workload without and with the cache (wall time, latency,
SQL statements sent to Postgres); a write-through price change seen at once by a fresh
session and by another process; a cache-aside rename seen at once by a cached query; a
write-behind burst of page views drained into Postgres by a flush worker, with its
progress bar (:mod:`examples.demo_write_behind`; it starts a Redis with AOF when the
demo's has AOF off); the same shop under asyncio (:mod:`examples.async_shop`, on a
database and namespace of its own); the final stats table, as ``sa-redis-cache stats`` shows it: the
hits and misses every process published, this one's and its reader process's. The demo
checks each claim it prints and exits 1 if one fails.

Environment knobs: ``SARC_DEMO_SMALL=1`` (small counts, for the test suite),
``SARC_DEMO_DATABASE`` and ``SARC_DEMO_NAMESPACE`` (other names than the defaults).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.pool import NullPool

from devservices import normalize_database_url, redact
from devservices.scratch import recreate_database
from examples.checks import Checks
from examples.demo_write_behind import BurstResult, write_behind_burst
from examples.shop import Base, Category, Product, seed
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.cli.keyspace import collect
from sa_redis_cache.cli.output import render
from sa_redis_cache.cli.stats import published_text, scope_blocks
from sa_redis_cache.redis_io import unlink_matching

if TYPE_CHECKING:
    from collections.abc import Sequence


DEFAULT_DATABASE = "sarc_demo"
DEFAULT_NAMESPACE = "demo"
CATEGORY_PAGES = "category_pages"


@dataclass(frozen=True)
class Settings:
    """What this run uses: URLs, names and how much work to do."""

    server_url: str
    redis_url: str
    database: str
    namespace: str
    requests: int
    views: int
    hot_products: int
    products: int
    customers: int
    orders: int
    small: bool

    @property
    def database_url(self) -> str:
        """URL of the demo's own database on the server."""
        url = sa.make_url(self.server_url).set(database=self.database)
        return url.render_as_string(hide_password=False)


def load_settings() -> Settings | None:
    """Settings from the environment; None (after saying why) when the URLs are missing."""
    server_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    if not server_url or not redis_url:
        print(
            "demo: DATABASE_URL and REDIS_URL must be set. Run `make demo`, which finds or\n"
            "starts Postgres and Redis, or `python -m devservices -- python -m\n"
            "examples.demo`; with Docker, `docker compose up -d` first.",
            file=sys.stderr,
        )
        return None
    small = os.environ.get("SARC_DEMO_SMALL", "").strip().lower() in {"1", "true", "yes"}
    return Settings(
        server_url=normalize_database_url(server_url),
        redis_url=redis_url,
        database=os.environ.get("SARC_DEMO_DATABASE") or DEFAULT_DATABASE,
        namespace=os.environ.get("SARC_DEMO_NAMESPACE") or DEFAULT_NAMESPACE,
        requests=200 if small else 2_000,
        views=400 if small else 2_000,
        hot_products=40 if small else 100,
        products=120 if small else 400,
        customers=20 if small else 100,
        orders=40 if small else 300,
        small=small,
    )


# --------------------------------------------------------------------------- output


class Output:
    """Sections, lines and tables, through ``rich`` when it is installed."""

    def __init__(self) -> None:
        try:
            from rich.console import Console
        except ImportError:
            self._console: Any = None
        else:
            self._console = Console(highlight=False, width=max(100, Console().width))

    def section(self, title: str) -> None:
        """Start a numbered part of the story."""
        if self._console is not None:
            self._console.print()
            self._console.rule(f"[bold]{title}", align="left")
        else:
            print(f"\n== {title} " + "=" * max(3, 76 - len(title)))

    def line(self, text: str = "") -> None:
        """One line of plain text."""
        if self._console is not None:
            self._console.print(text, markup=False)
        else:
            print(text)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A small table; the first column is left-aligned, the others right-aligned."""
        if self._console is not None:
            from rich.table import Table

            table = Table(show_edge=True, header_style="bold")
            for i, header in enumerate(headers):
                table.add_column(header, justify="right" if i else "left", no_wrap=not i)
            for row in rows:
                table.add_row(*row)
            self._console.print(table)
            return
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        print(fmt(headers))
        print("  ".join("-" * w for w in widths))
        for row in rows:
            print(fmt(row))


# --------------------------------------------------------------------------- plumbing


class SQLCounter:
    """Counts the statements the engine sends to Postgres (``before_cursor_execute``)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_: Any) -> None:
        self.count += 1


def category_page(category_id: int) -> sa.Select[Any]:
    """The statement behind a category page: the category and all its products."""
    return (
        select(Category)
        .where(Category.id == category_id)
        .options(selectinload(Category.products), FromCache(region=CATEGORY_PAGES))
    )


def show_category_page(session: Session, category_id: int) -> tuple[str, dict[int, Decimal]]:
    """Render a category page: its name and the price of each of its products."""
    category: Category = session.scalars(category_page(category_id)).one()
    return category.name, {p.id: p.price for p in category.products}


def show_product_page(session: Session, product_id: int) -> tuple[str, Decimal, str]:
    """Render a product page: the product (by primary key) and its category's name."""
    product = session.get(Product, product_id)
    assert product is not None
    return product.name, product.price, product.category.name


# --------------------------------------------------------------------------- the story


@dataclass
class Run:
    """One pass of the workload."""

    label: str
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    sql: int = 0
    without_sql: int = 0

    @property
    def mean_ms(self) -> float:
        """Mean latency of one request, in milliseconds."""
        return statistics.fmean(self.latencies) * 1000

    @property
    def p95_ms(self) -> float:
        """95th percentile latency, in milliseconds."""
        return statistics.quantiles(self.latencies, n=20)[-1] * 1000


Request = tuple[str, int]


def plan_requests(settings: Settings, categories: int) -> list[Request]:
    """The same request sequence for both runs: 1 in 4 a category page, else a product page."""
    rng = random.Random(2026)
    hot = rng.sample(range(1, settings.products + 1), settings.hot_products)
    return [
        ("category", rng.randint(1, categories))
        if rng.random() < 0.25
        else ("product", rng.choice(hot))
        for _ in range(settings.requests)
    ]


def run_workload(
    label: str, factory: sessionmaker[Session], requests: list[Request], sql: SQLCounter
) -> Run:
    """Serve every request in a session of its own, as a web application would."""
    run = Run(label)
    clock = time.perf_counter
    start_sql = sql.count
    start = clock()
    for kind, ident in requests:
        before_sql = sql.count
        began = clock()
        with factory() as session:
            if kind == "category":
                show_category_page(session, ident)
            else:
                show_product_page(session, ident)
        run.latencies.append(clock() - began)
        if sql.count == before_sql:
            run.without_sql += 1
    run.wall = clock() - start
    run.sql = sql.count - start_sql
    return run


def read_in_other_process(product_id: int) -> dict[str, Any]:
    """Read one product in a new Python process with its own engine, cache and session."""
    done = subprocess.run(  # noqa: S603  # our own interpreter and module, no shell
        [sys.executable, "-m", "examples.demo", "--read-product", str(product_id)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the reader process failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child_read_product(settings: Settings, product_id: int) -> int:
    """``--read-product ID``: what another process sees; prints price and SQL count as JSON."""
    engine = sa.create_engine(settings.database_url, poolclass=NullPool)
    sql = SQLCounter(engine)
    cache = Cache(settings.redis_url, namespace=settings.namespace)
    factory = sessionmaker(engine)
    cache.attach(factory)
    with factory() as session:
        product = session.get(Product, product_id)
        assert product is not None
        print(json.dumps({"price": str(product.price), "sql": sql.count}))
    cache.detach()  # publishes this process's counters: the final stats table sums them
    cache.client.close()
    engine.dispose()
    return 0


def set_up(settings: Settings, out: Output) -> tuple[sa.Engine, Cache]:
    """Fresh database with the seeded shop, and an empty namespace."""
    out.section("1. Set-up")
    out.line(f"Postgres: {redact(settings.server_url)}  (database {settings.database!r})")
    out.line(f"Redis:    {redact(settings.redis_url)}  (namespace {settings.namespace!r})")
    began = time.perf_counter()
    recreate_database(settings.server_url, settings.database)
    engine = sa.create_engine(settings.database_url, pool_size=5)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(
            session,
            products=settings.products,
            customers=settings.customers,
            orders=settings.orders,
        )
    cache = Cache(settings.redis_url, namespace=settings.namespace, default_ttl=300)
    removed = unlink_matching(cache.client, f"sarc:{settings.namespace}:*")
    out.line(
        f"Created and seeded the shop in {time.perf_counter() - began:.2f} s: "
        f"{settings.products} products in 8 categories, {settings.customers} customers, "
        f"{settings.orders} orders."
    )
    out.line(f"Deleted {removed} leftover keys of sarc:{settings.namespace}:*.")
    return engine, cache


def workload(
    settings: Settings,
    out: Output,
    plain: sessionmaker[Session],
    cached: sessionmaker[Session],
    sql: SQLCounter,
    checks: Checks,
) -> tuple[Run, Run, Run]:
    """The read-heavy workload, the same requests without the cache, then twice with it."""
    out.section("2. A read-heavy workload, without and with the cache")
    requests = plan_requests(settings, categories=8)
    pages = sum(1 for kind, _ in requests if kind == "category")
    out.line(
        f"{len(requests)} requests, each in a new session: {pages} category pages "
        "(FromCache, the category with selectinload(products)) and "
        f"{len(requests) - pages} product pages (session.get, then the product's category) "
        f"over a hot set of {settings.hot_products} products. The cache starts empty."
    )
    without = run_workload("without cache", plain, requests, sql)
    with_cache = run_workload("with cache", cached, requests, sql)
    warm = run_workload("with cache, warm", cached, requests, sql)
    rows = [
        [
            run.label,
            f"{run.wall:.2f} s",
            f"{run.mean_ms:.3f} ms",
            f"{run.p95_ms:.3f} ms",
            f"{run.sql:,}",
            f"{run.without_sql:,}",
        ]
        for run in (without, with_cache, warm)
    ]
    out.table(
        ["mode", "wall time", "mean latency", "p95 latency", "SQL statements", "no-SQL requests"],
        rows,
    )
    saved = without.sql - with_cache.sql
    share = saved / without.sql if without.sql else 0.0
    out.line(
        f"Queries saved: {saved:,} of {without.sql:,} ({share:.0%}); "
        f"{without.wall / with_cache.wall:.1f}x faster in wall time. The cache's SQL is the "
        "first read of each page (a miss fills the entry). The warm pass repeats the same "
        f"requests on the filled cache: {without.mean_ms / warm.mean_ms:.1f}x faster per "
        "request than the database."
    )
    checks.expect(with_cache.sql < without.sql, "the cache sends fewer statements to Postgres")
    return without, with_cache, warm


def write_through(
    out: Output,
    engine: sa.Engine,
    cached: sessionmaker[Session],
    sql: SQLCounter,
    checks: Checks,
) -> None:
    """Product uses strategy="write_through": a commit writes the new state to Redis."""
    out.section("3. A write-through update (Product: strategy='write_through')")
    product_id = 1
    with cached() as session:  # make sure the product and the page listing it are cached
        show_product_page(session, product_id)
        product = session.get(Product, product_id)
        assert product is not None
        category_id = product.category_id
        show_category_page(session, category_id)
    with cached() as session:
        sql_before = sql.count
        _, old_price, _ = show_product_page(session, product_id)
        out.line(f"Product {product_id} costs {old_price} ({sql.count - sql_before} SQL: cached).")
    new_price = (old_price + Decimal("1.25")).quantize(Decimal("0.01"))
    with cached() as session:
        product = session.get(Product, product_id)
        assert product is not None
        product.price = new_price
        sql_before = sql.count
        session.commit()
        out.line(
            f"One session sets the price to {new_price} and commits "
            f"({sql.count - sql_before} SQL statement: the UPDATE)."
        )
    with cached() as session:
        sql_before = sql.count
        _, price, _ = show_product_page(session, product_id)
        used = sql.count - sql_before
    out.line(f"A fresh session reads {price} with {used} SQL statements: the commit wrote it.")
    checks.expect(price == new_price and used == 0, "a fresh session reads the new price, no SQL")
    other = read_in_other_process(product_id)
    out.line(
        f"Another process (its own engine and Cache) reads {other['price']} with "
        f"{other['sql']} SQL statements."
    )
    checks.expect(
        Decimal(other["price"]) == new_price and other["sql"] == 0,
        "another process reads the new price from the cache",
    )
    with engine.connect() as conn:
        stored = conn.scalar(
            sa.text("SELECT price FROM products WHERE id = :id"), {"id": product_id}
        )
    out.line(f"Postgres holds {stored}.")
    checks.expect(stored == new_price, "Postgres holds the new price")
    with cached() as session:
        sql_before = sql.count
        _, prices = show_category_page(session, category_id)
        used = sql.count - sql_before
    out.line(
        f"The cached page of category {category_id} lists it at {prices[product_id]}: the commit "
        f"moved the version of `products`, so that entry was refilled ({used} SQL)."
    )
    checks.expect(prices[product_id] == new_price, "the category page shows the new price")


def invalidation(
    out: Output,
    cached: sessionmaker[Session],
    sql: SQLCounter,
    checks: Checks,
) -> None:
    """Category uses strategy="cache_aside": a commit invalidates what read the table."""
    out.section("4. An invalidating write (Category: strategy='cache_aside')")
    category_id = 1
    with cached() as session:
        show_category_page(session, category_id)
    with cached() as session:
        sql_before = sql.count
        name, _ = show_category_page(session, category_id)
        out.line(f"Category page {category_id}: {name!r} ({sql.count - sql_before} SQL: cached).")
    new_name = f"{name} (renamed)"
    with cached() as session:
        category = session.get(Category, category_id)
        assert category is not None
        category.name = new_name
        session.commit()
    out.line(f"One session renames it to {new_name!r} and commits.")
    with cached() as session:
        sql_before = sql.count
        name, _ = show_category_page(session, category_id)
        used = sql.count - sql_before
    out.line(f"The same cached query now gives {name!r} ({used} SQL: a miss, refilled).")
    checks.expect(name == new_name, "the cached category query sees the rename at once")
    with cached() as session:
        sql_before = sql.count
        name, _ = show_category_page(session, category_id)
        used = sql.count - sql_before
    out.line(f"And once more: {name!r} ({used} SQL: a hit on the new entry).")
    checks.expect(name == new_name and used == 0, "the refilled entry is served without SQL")


def stats_table(out: Output, cache: Cache, settings: Settings, checks: Checks) -> None:
    """The final stats table, as ``sa-redis-cache stats`` shows it, from what was published.

    Call it after ``cache.detach()``, whose last publish sends this process's counters.
    """
    out.section("7. The final stats table (sa-redis-cache stats)")
    out.line(
        f"What `sa-redis-cache --namespace {settings.namespace} --models examples.shop stats` "
        "prints now. Every process with an attached Cache adds its counters into Redis once a "
        "second and when it detaches: these are this process's and the reader process's."
    )
    document = collect(cache.client, cache.keys, list(Base.registry.mappers))
    render(scope_blocks(document, redact(settings.redis_url)))
    out.line(published_text(document["counters_published_seconds_ago"]))
    mine = cache.stats()["models"]["Product"]
    summed = document["counters"]["models"].get("Product", {})
    checks.expect(
        summed.get("hits") == mine["hits"] + 1 and summed.get("misses") == mine["misses"],
        "the table sums this process's Product lookups and the reader process's hit",
    )


def asyncio_story(settings: Settings, out: Output, checks: Checks) -> None:
    """The same shop under asyncio: :mod:`examples.async_shop`, on its own database.

    In a process of its own: ``attach()`` checks every mapped model of the process, and
    this one has the write-behind models of part 5, which its Redis may refuse.
    """
    out.section("6. The same shop under asyncio (AsyncSession)")
    out.line(
        "examples/async_shop.py: the cache awaits the asyncio Redis client through "
        "SQLAlchemy's greenlet bridge, so the event loop keeps running during Redis calls."
    )
    env = {
        **os.environ,
        "DATABASE_URL": settings.server_url,
        "REDIS_URL": settings.redis_url,
        "SARC_ASYNC_DATABASE": settings.database + "_async",
        "SARC_ASYNC_NAMESPACE": settings.namespace + "_async",
    }
    done = subprocess.run(
        [sys.executable, "-m", "examples.async_shop"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in (done.stdout + done.stderr).splitlines():
        out.line("  " + line)
    checks.expect(done.returncode == 0, "every claim of the asyncio example held")


def write_behind_line(burst: BurstResult) -> str:
    """The summary's line on the write-behind part."""
    if burst.skipped is not None:
        return f"write-behind:     skipped ({burst.skipped})"
    return (
        f"write-behind:     {burst.queued:,} page views queued, {burst.drained:,} drained by "
        f"the worker in {burst.batches} batches, {burst.rows_in_postgres:,} rows in Postgres"
    )


def summary(
    out: Output, runs: Sequence[Run], burst: BurstResult, checks: Checks, elapsed: float
) -> None:
    """The lines a reader (and the test) looks for."""
    out.section("Summary")
    without, with_cache = runs[0], runs[1]
    saved = without.sql - with_cache.sql
    for run in runs:
        out.line(
            f"{run.label + ':':<18}{len(run.latencies)} requests, {run.wall:.2f} s, "
            f"{run.mean_ms:.3f} ms/request, {run.sql:,} SQL statements"
        )
    out.line(f"queries saved: {saved:,} ({saved / max(without.sql, 1):.0%})")
    out.line(write_behind_line(burst))
    out.line(f"claims checked: {len(checks.failed)} failed; demo took {elapsed:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    if settings is None:
        return 2
    if args[:1] == ["--read-product"] and len(args) == 2:
        return child_read_product(settings, int(args[1]))
    if args:
        print("usage: python -m examples.demo", file=sys.stderr)
        return 2
    began = time.perf_counter()
    out = Output()
    checks = Checks(out.line, only_failures=True)
    engine, cache = set_up(settings, out)
    checks.watch(cache)
    sql = SQLCounter(engine)
    plain = sessionmaker(engine)
    cached = sessionmaker(engine)
    cache.attach(cached)
    try:
        runs = workload(settings, out, plain, cached, sql, checks)
        write_through(out, engine, cached, sql, checks)
        invalidation(out, cached, sql, checks)
        # done with the shop's cache: detached (a last publish of its counters, as at
        # shutdown) before the write-behind part maps PageView, which this cache, on a
        # Redis that may have AOF off, would otherwise check and refuse with an error log
        cache.detach()
        out.section("5. A write-behind burst (PageView: strategy='write_behind')")
        burst = write_behind_burst(
            engine, settings.redis_url, settings.namespace, out, checks, sql, views=settings.views
        )
        asyncio_story(settings, out, checks)
        stats_table(out, cache, settings, checks)
        summary(out, runs, burst, checks, time.perf_counter() - began)
    finally:
        cache.client.close()
        engine.dispose()
    if checks.failed:
        print("demo: failed claims: " + "; ".join(checks.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
