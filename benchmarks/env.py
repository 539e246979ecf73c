"""The benchmark's world: its own database and Redis namespace, sessions, machine facts.

:func:`bench_env` creates a database of its own on the server named by ``DATABASE_URL``
(never touching the others), seeds the example shop into it, and builds three
sessionmakers: ``plain`` (not attached to any cache), ``cached`` (attached to our
:class:`~sa_redis_cache.Cache`) and ``recipe`` (served by
:class:`~benchmarks.dogpile_recipe.DogpileRecipe`). Each has an engine (and connection
pool) of its own, configured alike: attaching the cache also puts listeners on the
engine (Core DML invalidation), and those must cost ours, not the baselines. Everything
lives under a random namespace; at the end its keys are removed with SCAN + UNLINK
(never FLUSH: the server may be shared) and the database is dropped.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import platform
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.dogpile_recipe import DogpileRecipe
from devservices.scratch import scratch_database
from examples.shop import Base, seed
from sa_redis_cache import Cache
from sa_redis_cache.redis_io import unlink_matching

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import URL


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much data to seed. ``extra_orders`` (4 lines each) feed the expensive query."""

    products: int
    customers: int
    orders: int
    extra_orders: int


class NotLoopback(Exception):
    """A service URL points off this machine; the benchmarks use only loopback services."""


def _is_loopback(host: str | None) -> bool:
    if not host or host.startswith("/"):  # empty or a Unix socket directory
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_loopback(database_url: str, redis_url: str) -> None:
    """Refuse service URLs that are not on this machine (network noise would dominate)."""
    db_host = sa.make_url(database_url).host
    redis_host = urlsplit(redis_url).hostname  # None for unix:// sockets
    for what, host in (("DATABASE_URL", db_host), ("REDIS_URL", redis_host)):
        if not _is_loopback(host):
            raise NotLoopback(
                f"{what} points at {host!r}; the benchmarks measure against loopback "
                "services only (pass --allow-remote to measure anyway)"
            )


@contextmanager
def bench_database(server_url: str) -> Iterator[URL]:
    """Create a database of our own on the server; drop it (FORCE) when done."""
    with scratch_database(server_url, f"sarc_bench_{secrets.token_hex(4)}") as url:
        yield url


# Extra orders for the expensive query, made in the database: going through the unit of
# work for tens of thousands of rows would take longer than the whole benchmark.
_EXTRA_ORDERS_SQL = """
WITH customer_ids AS (SELECT array_agg(id ORDER BY id) AS ids FROM customers),
new_orders AS (
    INSERT INTO orders (customer_id, status, placed_at)
    SELECT c.ids[1 + g % array_length(c.ids, 1)],
           (ARRAY['OPEN', 'PAID', 'SHIPPED'])[1 + g % 3]::order_status,
           timestamptz '2026-02-01 00:00+00' + g * interval '7 minutes'
    FROM generate_series(1, :n) AS g, customer_ids AS c
    RETURNING id
)
INSERT INTO order_lines (order_id, product_id, quantity, unit_price)
SELECT o.id, p.id, 1 + (o.id + k) % 5, p.price
FROM new_orders AS o
CROSS JOIN generate_series(1, 4) AS k
JOIN products AS p ON p.id = 1 + (o.id * 7 + k * 13) % :products
"""


def seed_shop(engine: sa.Engine, sizes: Sizes) -> None:
    """Create the shop's tables and fill them (seed() plus bulk orders), then ANALYZE."""
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        seed(
            session,
            products=sizes.products,
            customers=sizes.customers,
            orders=sizes.orders,
        )
    with engine.begin() as conn:
        conn.execute(
            sa.text(_EXTRA_ORDERS_SQL), {"n": sizes.extra_orders, "products": sizes.products}
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE"))


@dataclass(slots=True)
class BenchEnv:
    """Everything a case needs: engines, Redis, the cache, and the three session kinds.

    ``engine`` is the plain sessions' engine; :meth:`new_engine` makes more, alike.
    """

    url: URL
    engine: sa.Engine
    client: redis.Redis
    redis_url: str
    namespace: str
    cache: Cache
    plain: sessionmaker[Session]
    cached: sessionmaker[Session]
    recipe_sessions: sessionmaker[Session]
    recipe: DogpileRecipe
    # entries filled by the hit cases, by case slug: (our key, the recipe's key)
    entries: dict[str, tuple[str, str]] = field(default_factory=dict)
    # every extra namespace a case created, so the cleanup removes its keys too
    extra_namespaces: list[str] = field(default_factory=list)
    engines: list[sa.Engine] = field(default_factory=list)
    sql_count: int = 0

    def new_engine(self) -> sa.Engine:
        """An engine on the benchmark database with a pool of its own, disposed at the end."""
        engine = sa.create_engine(self.url, pool_size=5)
        self.engines.append(engine)
        return engine

    def _count_sql(self, *_args: Any) -> None:
        self.sql_count += 1

    @contextmanager
    def counting_sql(self) -> Iterator[None]:
        """Count statements on every engine meanwhile (in ``sql_count``); off when timing."""
        for engine in self.engines:
            sa.event.listen(engine, "before_cursor_execute", self._count_sql)
        try:
            yield
        finally:
            for engine in self.engines:
                sa.event.remove(engine, "before_cursor_execute", self._count_sql)

    def query_keys(self, namespace: str | None = None) -> set[bytes]:
        """Every query entry key of a namespace (ours by default)."""
        ns = namespace or self.namespace
        return set(self.client.scan_iter(match=f"sarc:{ns}:*:q:*", count=1000))

    def entity_keys(self, namespace: str | None = None) -> set[bytes]:
        """Every entity entry key of a namespace (ours by default)."""
        ns = namespace or self.namespace
        return set(self.client.scan_iter(match=f"sarc:{ns}:*:e:*", count=1000))

    def new_namespace(self, label: str) -> str:
        """A further namespace, cleaned up with the main one."""
        name = f"{self.namespace}{label}"
        self.extra_namespaces.append(name)
        return name

    def recipe_prefix(self) -> str:
        """Where the recipe's keys live (inside our namespace, so cleanup finds them)."""
        return f"sarc:{self.namespace}:dogpile:"


@contextmanager
def bench_env(database_url: str, redis_url: str, sizes: Sizes) -> Iterator[BenchEnv]:
    """A seeded database and a fresh namespace for one benchmark run; both removed after."""
    with bench_database(database_url) as url:
        # one engine (and pool) per contender kind, configured alike; see the module doc
        engine, cached_engine, recipe_engine = (
            sa.create_engine(url, pool_size=5) for _ in range(3)
        )
        engines = [engine, cached_engine, recipe_engine]
        # one client for every contender: the same connection pool and parser (hiredis)
        client = redis.Redis.from_url(redis_url)
        namespace = f"bench{secrets.token_hex(4)}"
        env: BenchEnv | None = None
        try:
            seed_shop(engine, sizes)
            env = BenchEnv(
                url=url,
                engine=engine,
                client=client,
                redis_url=redis_url,
                namespace=namespace,
                cache=Cache(client, namespace=namespace, default_ttl=600),
                plain=sessionmaker(engine),
                cached=sessionmaker(cached_engine),
                recipe_sessions=sessionmaker(recipe_engine),
                recipe=DogpileRecipe(client, f"sarc:{namespace}:dogpile:"),
                engines=engines,
            )
            env.cache.attach(env.cached)
            env.recipe.attach(env.recipe_sessions)
            yield env
        finally:
            if env is not None:
                # its statistics publisher publishes once more as it stops: before the
                # namespace is removed, not after
                env.cache.detach()
            for ns in [namespace, *(env.extra_namespaces if env else [])]:
                unlink_matching(client, f"sarc:{ns}:*")
            client.close()
            for each in engines:
                each.dispose()


# -- machine description ---------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(env: BenchEnv) -> dict[str, str]:
    """The facts a reader needs to compare this run with another."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: Any = env.client.info("server")
    with env.engine.connect() as conn:
        pg_version = conn.execute(sa.text("SHOW server_version")).scalar_one()
        sync_commit = conn.execute(sa.text("SHOW synchronous_commit")).scalar_one()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} (usable: {usable or '?'})",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlalchemy": sa.__version__,
        "redis-py": f"{_version('redis')} (hiredis {_version('hiredis')})",
        "orjson": _version("orjson"),
        "psycopg": _version("psycopg"),
        "redis server": f"{info.get('redis_version', '?')} (loopback)",
        "postgres server": f"{pg_version} (loopback, synchronous_commit={sync_commit})",
        "load average (1 min)": load_average(),
    }


def load_average() -> str:
    """The 1-minute load average: other work on the machine widens every bracket."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"
