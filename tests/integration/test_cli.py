"""The ``sa-redis-cache`` command line against real Redis and Postgres.

Each command is driven in-process with click's runner (fast) and checked for its output
and exit status: 0 done, 1 failed or unreachable, 2 bad usage. Two tests run it as
``python -m sa_redis_cache`` in a child process, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from devservices import RedisServer, ServerStartError
from devservices.process import free_port
from examples.shop import Category, Customer, Product
from sa_redis_cache import Cache, FromCache, schema
from sa_redis_cache.cli import cli
from sa_redis_cache.codec import pack, unpack
from sa_redis_cache.protocol import KeyScheme, scripts
from sa_redis_cache.redis_io import client_from_url
from tests.integration.test_local_tier import HeldAck, Process, held_until_dropped
from tests.wb_support import private_models

if TYPE_CHECKING:
    from collections.abc import Iterator

    from devservices import Services

ROOT = Path(__file__).resolve().parents[2]

STATEMENTS = """
from sqlalchemy import bindparam, select, text

from examples.shop import Product
from sa_redis_cache import FromCache

BY_CATEGORY = select(Product).where(Product.category_id == 2).options(FromCache())


def by_name():
    return select(Product).where(Product.name == bindparam("name")).options(FromCache())


NOT_A_STATEMENT = 42

TEXTUAL = select(Product).where(text("id < 5")).options(FromCache())
"""


# the caches of the running test (the cache fixture's)
_LIVE: list[Cache] = []


@pytest.fixture
def cache(cache: Cache) -> Iterator[Cache]:
    """The conftest's cache; the commands a test runs see its fills (:func:`run`)."""
    _LIVE.append(cache)
    try:
        yield cache
    finally:
        _LIVE.remove(cache)


def run(*args: str, stdin: str | None = None, env: dict[str, Any] | None = None) -> Result:
    # a miss returns before its fill's reply, which the thread's next cache call reads:
    # the command's own connection could otherwise reach Redis before the fill does
    for live in _LIVE:
        live.stats()
    # the test's database is named by --database-url where a command needs one: a
    # DATABASE_URL of the shell (python -m devservices sets one) would name another
    env = {"DATABASE_URL": None, **(env or {})}
    # catch_exceptions=False: a traceback from the command is a test failure, never an exit 1
    return CliRunner().invoke(cli, list(args), input=stdin, env=env, catch_exceptions=False)


@pytest.fixture
def base(redis_url: str, namespace: str) -> list[str]:
    """Global options every invocation gets: this test's Redis namespace and the shop models."""
    return ["--redis-url", redis_url, "--namespace", namespace, "--models", "examples.shop"]


@pytest.fixture
def statements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Name of a throwaway module holding statements, importable by the command."""
    name = f"sarc_cli_statements_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(STATEMENTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


@pytest.fixture
def dead_url(database_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases: one migrated with the library's tables, one bare."""
    server = sa.make_url(database_url)
    names = [f"sarc_cli_{secrets.token_hex(5)}" for _ in range(2)]
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f"CREATE DATABASE {quote(name)}"))
    urls = [server.set(database=n).render_as_string(hide_password=False) for n in names]
    try:
        schema.upgrade(urls[0])
        yield urls[0], urls[1]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(name)} WITH (FORCE)"))
        admin.dispose()


def json_of(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- help, python -m


def test_help_names_every_command_and_the_exit_codes() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("stats", "inspect", "invalidate", "worker", "dlq", "demo"):
        assert f"  {command} " in result.stdout
    assert "1 the operation failed" in result.stdout
    assert "2 bad usage" in result.stdout


def test_python_m_runs_the_same_program(
    base: list[str], session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as s:
        s.get(Product, 3)
    done = subprocess.run(
        [sys.executable, "-m", "sa_redis_cache", *base, "stats", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    tables = {t["table"]: t for t in json.loads(done.stdout)["tables"]}
    assert tables["products"]["entity_entries"] == 1
    usage = subprocess.run(
        [sys.executable, "-m", "sa_redis_cache", "stats", "--bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert usage.returncode == 2
    assert "Usage: python -m sa_redis_cache stats" in usage.stderr
    assert "--bogus" in usage.stderr  # click words the message differently across versions


# --------------------------------------------------------------------------- stats


def test_stats_counts_entries_memory_and_counters_per_table(
    base: list[str], cache: Cache, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as s:
        for pk in (1, 2, 3):
            s.get(Product, pk)
        s.scalars(select(Product).where(Product.category_id == 1).options(FromCache())).all()

    @cache.cached("profile")
    def profile(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    profile(1)
    document = json_of(run(*base, "stats", "--json"))
    tables = {t["table"]: t for t in document["tables"]}
    products = tables["products"]
    assert products["entity_entries"] == 3
    assert products["query_entries"] == 1
    assert products["memory_bytes"] > 0
    assert products["memory_estimated"] is False  # fewer keys than the sample size
    assert isinstance(products["version"], int)
    assert isinstance(products["generation"], int)
    assert products["writers_in_flight"] == 0
    assert products["models"] == [{"name": "Product", "strategy": "write_through", "ttl": 600}]
    # the models' tables are listed even without entries
    assert tables["orders"]["entity_entries"] == 0
    [function] = document["functions"]
    assert (function["prefix"], function["entries"]) == ("profile", 1)
    assert function["memory_bytes"] > 0

    table = run(*base, "stats")
    assert table.exit_code == 0
    assert "Product (write_through, ttl 600 s)" in table.stdout
    assert str(products["version"]) in table.stdout
    # the scope table lists the function with its entries, as the models with theirs
    assert re.search(r"function profile(\s+\S+){4}\s+1\s", table.stdout), table.stdout


def test_stats_counts_live_marks_and_holders_but_not_planted_ones(
    base: list[str], cache: Cache, redis_client: redis.Redis
) -> None:
    """A writer mark or holder lease scored beyond any writer's or holder's reach was
    planted: the scripts never honour it (lua/_prelude.lua), so stats must not report it
    as a writer in flight or a live holder either."""
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    keys = cache.keys
    far = 4_102_444_800_000  # 2100-01-01: no mark or lease is scored so late
    redis_client.zadd(
        keys.writers_key("products"),
        {"in flight": now_ms + scripts.WRITER_MARK_MS, "lapsed": now_ms - 1, "planted": far},
    )
    redis_client.zadd(
        keys.holders_key("products"),
        {"live": now_ms + scripts.LOCAL_LEASE_MAX_MS, "planted": far},
    )
    products = {t["table"]: t for t in json_of(run(*base, "stats", "--json"))["tables"]}["products"]
    assert (products["writers_in_flight"], products["local_holders"]) == (1, 1)


def test_stats_sums_the_hits_and_misses_every_process_published(
    base: list[str],
    cache: Cache,
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    redis_url: str,
    namespace: str,
) -> None:
    pages = select(Product).where(Product.category_id == 1).options(FromCache(region="pages"))
    for _ in range(3):  # a miss, then hits
        with session_factory() as s:
            s.get(Product, 4)
            s.scalars(pages).all()
    # another process of the same application: a cache of its own on the namespace
    other_client = client_from_url(redis_url)  # a cluster client in test_cli_cluster.py
    other = Cache(other_client, namespace=namespace)
    other_factory = sessionmaker(shop_engine)
    other.attach(other_factory)
    for pk in (4, 5):
        with other_factory() as s:
            s.get(Product, pk)
    other.detach()  # stops its publisher after a last publish
    other_client.close()
    assert cache._publisher.publish_now()  # the fixture's cache publishes at once

    mine, theirs = cache.stats(), other.stats()
    document = json_of(run(*base, "stats", "--json"))
    counters = document["counters"]
    product = counters["models"]["Product"]
    for name in ("hits", "misses", "errors", "fills"):
        assert product[name] == mine["models"]["Product"][name] + theirs["models"]["Product"][name]
    assert (product["hits"], product["misses"]) == (2 + 2 + 1, 1 + 1 + 1)  # get + page, each
    assert product["hit_rate"] == pytest.approx(5 / 8)
    region = counters["regions"]["pages"]
    assert (region["hits"], region["misses"], region["hit_rate"]) == (2, 1, pytest.approx(2 / 3))
    assert counters["total"]["hits"] == mine["total"]["hits"] + theirs["total"]["hits"]
    assert document["counters_published_seconds_ago"] >= 0

    table = run(*base, "stats")
    assert table.exit_code == 0
    row = re.search(r"model Product\s+5\s+3\s+62\.5%\s+0\s+(\d+)\s", table.stdout)
    assert row is not None, table.stdout
    tables = {t["table"]: t for t in document["tables"]}
    assert int(row[1]) == tables["products"]["entity_entries"] + tables["products"]["query_entries"]
    assert re.search(r"region pages\s+2\s+1\s+66\.7%\s+0\s+-\s+-", table.stdout), table.stdout
    assert "last publish" in table.stdout


def test_stats_says_when_no_counters_were_published(base: list[str]) -> None:
    document = json_of(run(*base, "stats", "--json"))
    assert document["counters"]["models"] == {}
    assert document["counters"]["total"]["hit_rate"] is None
    assert document["counters_published_seconds_ago"] is None
    table = run(*base, "stats")
    assert "hits, misses, errors: none published yet" in table.stdout
    assert re.search(r"model Product(\s+-){4}\s+0\s+0 B", table.stdout), table.stdout


def test_stats_watch_refreshes_count_times(base: list[str]) -> None:
    started = time.monotonic()
    result = run(*base, "stats", "--json", "--watch", "0.5", "--count", "2")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["namespace"] for line in lines)
    assert time.monotonic() - started >= 0.5

    assert run(*base, "stats", "--count", "2").exit_code == 2  # --count without --watch


# --------------------------------------------------------------------------- inspect


def test_inspect_row_shows_the_decoded_entry_then_stale(
    base: list[str], cache: Cache, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as s:
        product = s.get(Product, 7)
        assert product is not None
        name, price = product.name, product.price
    document = json_of(run(*base, "inspect", "Product", "7", "--json"))
    assert document["state"] == "valid"
    assert document["exists"] is True
    assert 0 < document["ttl_ms"] <= 600_000
    assert document["row"]["name"] == name
    assert Decimal(document["row"]["price"]) == price
    assert document["stored_generation"] == document["current_generation"]

    human = run(*base, "inspect", "examples.shop:Product", "7")
    assert human.exit_code == 0
    assert document["key"] in human.stdout
    assert f"'{name}'" in human.stdout
    assert "valid" in human.stdout

    cache.invalidate_model(Product)
    stale = json_of(run(*base, "inspect", "Product", "7", "--json"))
    assert stale["state"] == "stale"
    assert stale["stored_generation"] != stale["current_generation"]


def test_inspect_row_by_uuid_and_absent_rows(
    base: list[str], session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as s:
        customer_id = s.scalars(select(Customer.id).order_by(Customer.id)).first()
        s.get(Customer, customer_id)
    found = json_of(run(*base, "inspect", "Customer", str(customer_id), "--json"))
    assert found["state"] == "valid"
    assert found["row"]["id"] == str(customer_id)
    absent = json_of(run(*base, "inspect", "Category", "999999", "--json"))
    assert absent["state"] == "absent"
    assert absent["exists"] is False
    no_policy = json_of(run(*base, "inspect", "Order", "1", "--json"))
    assert no_policy["state"] == "absent"
    assert "Order has no __cache__ policy" in no_policy["not_cached_because"]


def test_inspect_statement_computes_the_read_paths_key(
    base: list[str],
    statements: str,
    database_url: str,
    session_factory: sessionmaker[Session],
    cache: Cache,
) -> None:
    module = __import__(statements)
    with session_factory() as s:
        rows = s.scalars(module.BY_CATEGORY).all()
        s.scalars(module.by_name(), {"name": "product-5"}).all()
    args = [*base, "inspect", "--bind-url", database_url, "--json", "--statement"]
    document = json_of(run(*args, f"{statements}:BY_CATEGORY"))
    assert document["state"] == "valid", document["detail"]
    assert document["row_count"] == len(rows)
    assert document["objects"] == {"Product": len(rows)}
    assert document["rows"][0]["Product"]["columns"]["category_id"] == 2

    named = json_of(run(*args, f"{statements}:by_name", "--param", "name=product-5"))
    assert named["state"] == "valid"
    assert named["row_count"] == 1
    other = json_of(run(*args, f"{statements}:by_name", "--param", "name=nobody"))
    assert other["state"] == "absent"
    assert cache.invalidate_query(module.by_name(), {"name": "product-5"}) == 1
    gone = json_of(run(*args, f"{statements}:by_name", "--param", "name=product-5"))
    assert gone["state"] == "absent"
    assert gone["invalidated"] is True
    assert "invalidate_query()" in gone["detail"]
    textual = json_of(run(*args, f"{statements}:TEXTUAL"))
    assert textual["state"] == "uncacheable"
    assert "textual SQL" in textual["detail"]  # the library's reason, not a guess

    with session_factory() as s:  # a write to products (of no row) retires the entries
        s.execute(sa.update(Product).where(Product.id == -1).values(name="x"))
        s.commit()
    stale = json_of(run(*args, f"{statements}:BY_CATEGORY"))
    assert stale["state"] == "stale"
    assert "products" in stale["detail"]


# --------------------------------------------------------------------------- invalidate


def test_invalidate_row_and_model(
    base: list[str],
    cache: Cache,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
) -> None:
    with session_factory() as s:
        s.get(Product, 4)
        s.get(Product, 5)
    before = json_of(run(*base, "inspect", "Product", "5", "--json"))

    one = run(*base, "invalidate", "Product", "4", "--yes")
    assert one.exit_code == 0, one.output
    assert "invalidated Product 4: its entity entry was deleted" in one.stdout
    assert json_of(run(*base, "inspect", "Product", "4", "--json"))["state"] == "absent"
    assert json_of(run(*base, "inspect", "Product", "5", "--json"))["state"] == "valid"

    model = run(*base, "invalidate", "Product", "-y")
    assert model.exit_code == 0, model.output
    assert "invalidated Product" in model.stdout
    after = json_of(run(*base, "inspect", "Product", "5", "--json"))
    assert after["state"] == "stale"
    assert after["current_generation"] == before["current_generation"] + 1
    assert redis_client.exists(before["key"])  # retired by the generation, not deleted


def test_invalidate_a_table(
    base: list[str], session_factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    with session_factory() as s:
        s.get(Category, 1)
    before = json_of(run(*base, "inspect", "Category", "1", "--json"))
    done = run(*base, "invalidate", "--table", "categories", "--yes")
    assert done.exit_code == 0, done.output
    assert "invalidated categories: versions and generations bumped" in done.stdout
    after = json_of(run(*base, "inspect", "Category", "1", "--json"))
    assert after["state"] == "stale"
    assert after["current_generation"] == before["current_generation"] + 1

    unknown = run(*base, "invalidate", "--table", "category", "--yes")
    assert unknown.exit_code == 1
    assert "no mapped MetaData has a table named 'category'" in unknown.stderr
    both = run(*base, "invalidate", "Category", "--table", "categories", "--yes")
    assert both.exit_code == 2
    assert "--table takes no MODEL or PK" in both.stderr


def test_invalidate_asks_for_confirmation(
    base: list[str], session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as s:
        s.get(Product, 6)
    closed = run(*base, "invalidate", "Product", "6")
    assert closed.exit_code == 1
    assert "no answer (stdin closed or interrupted): pass --yes" in closed.stderr
    declined = run(*base, "invalidate", "Product", "6", stdin="n\n")
    assert declined.exit_code == 1
    assert "nothing was invalidated" in declined.stderr
    assert json_of(run(*base, "inspect", "Product", "6", "--json"))["state"] == "valid"
    agreed = run(*base, "invalidate", "Product", "6", stdin="y\n")
    assert agreed.exit_code == 0
    assert "Invalidate Product 6" in agreed.stderr  # the question goes to stderr
    assert json_of(run(*base, "inspect", "Product", "6", "--json"))["state"] == "absent"


def test_invalidate_namespace_wide_deletes_only_that_namespace(
    base: list[str],
    namespace: str,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
) -> None:
    with session_factory() as s:
        s.get(Product, 8)
    neighbour = f"sarc:{namespace}x:{{{namespace}x:products}}:v"  # shares the prefix text
    redis_client.set(neighbour, 1)
    # write-behind queue state holds writes not yet in the database: never deleted here
    queue = [
        f"sarc:{namespace}:{{{namespace}:views}}:wb:0",
        f"sarc:{namespace}:{{{namespace}:views}}:wbp:abc:1",
    ]
    redis_client.xadd(queue[0], {"op": "upsert"})
    redis_client.set(queue[1], b"state")
    assert run(*base, "invalidate", "--namespace-wide").exit_code == 1  # no confirmation
    assert redis_client.exists(f"sarc:{namespace}:{{{namespace}:products}}:v")
    result = run(*base, "invalidate", "--namespace-wide", "--yes")
    assert result.exit_code == 0, result.output
    assert f"of namespace '{namespace}'" in result.stdout
    # the attached cache's publisher may have added its counters since: they are not entries
    stats_prefix = KeyScheme(namespace).stats_key("")
    left = {k.decode() for k in redis_client.scan_iter(match=f"sarc:{namespace}:*")}
    assert {k for k in left if not k.startswith(stats_prefix)} == set(queue)
    assert redis_client.exists(neighbour)
    assert run(*base, "invalidate", "--namespace-wide", "Product").exit_code == 2


def test_invalidate_namespace_wide_returns_once_every_local_tier_dropped_what_it_deleted(
    base: list[str], database_url: str, redis_url: str, namespace: str, product: int
) -> None:
    """Another process's local tier holds the row: the command returns only once that tier
    has dropped it, as ``cache.clear()`` does. The tier's registration as a holder is
    kept: a commit after the command still waits for the tier to drop what it changed."""
    reader = Process(database_url, redis_url, namespace, local_lease=30.0)  # cannot lapse here
    writer = Process(database_url, redis_url, namespace)
    wiped: list[Result] = []
    try:
        reader.hold(product)
        # deleted, then fenced, in two round trips (as cache.clear())
        held = HeldAck(reader, together=False)

        def wipe() -> None:
            wiped.append(run(*base, "invalidate", "--namespace-wide", "--yes"))

        assert held_until_dropped(reader, product, wipe, held) == Decimal("1.00")
        assert wiped[0].exit_code == 0, wiped[0].output
        reader.hold(product)  # kept again, under the lease it never lost
        assert held_until_dropped(
            reader, product, lambda: writer.set_price(product, "2.00")
        ) == Decimal("2.00")
    finally:
        reader.close()
        writer.close()


def test_invalidate_region_still_retires_a_region_after_invalidate_namespace_wide(
    base: list[str],
    database_url: str,
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
) -> None:
    """A process records a region's tables once a day, not before each read: the region's
    table sets outlive the command, or ``invalidate_region`` would retire nothing of what
    that process fills afterwards."""
    stmt = select(Product).where(Product.id == product).options(FromCache(region="pages"))

    def price() -> Decimal:
        with session_factory() as s:
            return s.scalars(stmt).one().price

    assert price() == Decimal("1.00")  # recorded the region's table, and filled
    assert run(*base, "invalidate", "--namespace-wide", "--yes").exit_code == 0
    assert price() == Decimal("1.00")  # filled again, the region not recorded again
    # written where the cache does not see it: what invalidate_region is for
    elsewhere = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with elsewhere.begin() as conn:
            conn.execute(sa.update(Product).where(Product.id == product).values(price=2))
    finally:
        elsewhere.dispose()
    assert cache.invalidate_region("pages") == ["products"]
    assert price() == Decimal("2.00")


# --------------------------------------------------------------------------- bad usage


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "Widget", "1"], "unknown model 'Widget'; the imported models are: "),
        (["inspect", "Product", "seven"], "'seven' is not a valid int for Product.id"),
        (["inspect", "Product"], "Product has a primary key of 1 column(s) (id); got 0"),
        (["inspect", "Product", "1", "2"], "got 2 value(s)"),
        (["inspect", "Customer", "42"], "'42' is not a valid UUID for Customer.id"),
        (
            ["--models", "examples.quickstart", "inspect", "Product", "1"],
            "is ambiguous: examples.quickstart.Product, examples.shop.Product; name one as",
        ),
        (["inspect", "nowhere.models:Product", "1"], "cannot import 'nowhere.models'"),
        (["inspect", "examples.shop:Nope", "1"], "has no attribute 'Nope'"),
        (["inspect"], "give MODEL PK..."),
        (["invalidate"], "give MODEL [PK]... or --namespace-wide"),
        (["invalidate", "Product", "x", "--yes"], "'x' is not a valid int"),
        (["--models", "no_such_module_xyz", "stats"], "cannot import 'no_such_module_xyz'"),
        (["--namespace", "a b", "stats"], "must be a non-empty name without spaces"),
        (["--redis-url", "http://x", "stats"], "is not a Redis URL"),
    ],
)
def test_bad_usage_exits_2_with_the_problem_and_the_fix(
    base: list[str], args: list[str], message: str
) -> None:
    result = run(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not result.stdout


def test_bad_statement_arguments_exit_2(
    base: list[str], statements: str, database_url: str
) -> None:
    args = [*base, "inspect", "--bind-url", database_url, "--statement"]
    wrong = run(*args, f"{statements}:NOT_A_STATEMENT")
    assert wrong.exit_code == 2
    assert "int, not a select() statement" in wrong.stderr
    unknown = run(*args, f"{statements}:by_name", "--param", "nmae=x")
    assert unknown.exit_code == 2
    assert "no parameter 'nmae'; its named parameters: name" in unknown.stderr
    missing = run(*args, f"{statements}:by_name")
    assert missing.exit_code == 2
    assert "add --param name=VALUE" in missing.stderr
    no_bind = run(
        *base,
        "inspect",
        "--statement",
        f"{statements}:by_name",
        "--param",
        "name=x",
        env={"DATABASE_URL": None},
    )
    assert no_bind.exit_code == 2
    assert "pass --bind-url or --database-url URL" in no_bind.stderr


@pytest.mark.parametrize(
    "args",
    [["stats"], ["inspect", "Product", "1"], ["invalidate", "Product", "--yes"]],
)
def test_unreachable_redis_exits_1_quickly(namespace: str, args: list[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    result = run("--redis-url", url, "--namespace", namespace, "--models", "examples.shop", *args)
    assert result.exit_code == 1
    assert f"cannot reach Redis at {url}" in result.stderr
    assert "start it or pass --redis-url" in result.stderr
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- dlq, worker


def test_dlq_list(base: list[str], namespace: str, dead_url: tuple[str, str]) -> None:
    migrated, bare = dead_url
    empty = run(*base, "--database-url", migrated, "dlq", "list")
    assert empty.exit_code == 0
    assert f"no dead letters in namespace '{namespace}'" in empty.stdout

    engine = sa.create_engine(migrated, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(schema.dead_letters),
            [
                {
                    "namespace": namespace,
                    "table_name": "products",
                    "stream": "s",
                    "entry_id": "1-0",
                    "op": "update",
                    "pk": [7],
                    "error": "deadlock detected",
                    "attempts": 5,
                },
                {
                    "namespace": "elsewhere",
                    "table_name": "products",
                    "stream": "s",
                    "entry_id": "2-0",
                    "op": None,  # an undecodable entry is dead-lettered without op or pk
                    "pk": None,
                    "error": "not ours",
                    "attempts": 1,
                },
            ],
        )
    engine.dispose()
    listed = run(*base, "dlq", "list", "--database-url", migrated)
    assert listed.exit_code == 0, listed.output
    assert "deadlock detected" in listed.stdout
    assert "not ours" not in listed.stdout
    rows = json_of(run(*base, "--database-url", migrated, "dlq", "list", "--json"))
    assert [(r["table_name"], r["op"], r["pk"], r["attempts"]) for r in rows] == [
        ("products", "update", [7], 5)
    ]

    missing = run(*base, "--database-url", bare, "dlq", "list")
    assert missing.exit_code == 1
    assert "sarc_dead_letters does not exist" in missing.stderr
    assert "sa_redis_cache.schema.upgrade(" in missing.stderr

    down = sa.make_url(migrated).set(port=free_port()).render_as_string(hide_password=False)
    unreachable = run(*base, "--database-url", down, "dlq", "list")
    assert unreachable.exit_code == 1
    assert "cannot reach the database" in unreachable.stderr

    no_url = run(*base, "dlq", "list", env={"DATABASE_URL": None})
    assert no_url.exit_code == 2
    assert "pass --database-url URL (or set DATABASE_URL)" in no_url.stderr


def test_dlq_replay_without_a_database_is_a_usage_error() -> None:
    # the replay itself is tested in test_dlq_replay.py, against write-behind models
    result = run(
        "dlq", "replay", "--model", "tests.wb_support:active_models", env={"DATABASE_URL": None}
    )
    assert result.exit_code == 2
    assert "pass --database-url URL (or set DATABASE_URL)" in result.stderr


def test_worker_without_its_required_options_is_a_usage_error() -> None:
    # the worker's own tests are in test_worker_cli.py
    result = run("worker", env={"DATABASE_URL": None})
    assert result.exit_code == 2
    assert "--database-url" in result.stderr


# --------------------------------------------------------------------------- demo


def test_demo_runs_the_example_story(services: Services, redis_client: redis.Redis) -> None:
    suffix = secrets.token_hex(5)
    database, namespace = f"sarc_cli_demo_{suffix}", f"clidemo{suffix}"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "SARC_DEMO_DATABASE": database,
        "SARC_DEMO_NAMESPACE": namespace,
    }
    command = [
        sys.executable, "-m", "sa_redis_cache",
        "--redis-url", services.redis_url, "--database-url", services.database_url,
        "demo", "--small",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        admin = sa.create_engine(
            services.database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
        keys = list(redis_client.scan_iter(match=f"sarc:{namespace}:*"))
        if keys:
            redis_client.unlink(*keys)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert "claims checked: 0 failed" in done.stdout

    no_db = run("demo", env={"DATABASE_URL": None})
    assert no_db.exit_code == 2
    assert "the demo needs a Postgres server: pass --database-url" in no_db.stderr


# --------------------------------------------------------------------------- planted keys
# Anyone who can write to the Redis may leave anything under the namespace's prefix: the
# commands report such a key (what is wrong with it) and go on, exit 0.


def completes(result: Result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def plant(client: redis.Redis, key: str | bytes, kind: str, value: Any = b"x") -> None:
    """Replace ``key`` by a key of Redis type ``kind`` holding ``value``."""
    client.delete(key)
    if kind == "string":
        client.set(key, value)
    elif kind == "hash":
        client.hset(key, "f", value)
    elif kind == "list":
        client.rpush(key, value)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("target", "kind", "value", "problem"),
    [
        # the KeyError of issue 19: a body that is a mapping where a list is expected
        ("entry", "string", "mapping", "the entry's body is not [row, columns not loaded]"),
        ("entry", "hash", b"x", "holds a Redis hash, not a string (entity entry)"),
        ("generation", "list", b"7", "holds a Redis list, not a string (generation counter)"),
        ("version", "string", b"seven", "holds 'seven', not an integer version counter"),
    ],
)
def test_inspect_row_reports_a_planted_key_and_goes_on(
    base: list[str],
    namespace: str,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    target: str,
    kind: str,
    value: Any,
    problem: str,
) -> None:
    with session_factory() as s:
        s.get(Product, 1)
    keys = KeyScheme(namespace)
    key = {
        "entry": json_of(run(*base, "inspect", "Product", "1", "--json"))["key"],
        "generation": keys.generation_key("products"),
        "version": keys.version_key("products"),
    }[target]
    # a value of the right type that does not decode is told in the state, not a bad key
    reported = [] if value == "mapping" else [{"key": key, "problem": problem}]
    if value == "mapping":
        generation = redis_client.get(keys.generation_key("products"))
        assert isinstance(generation, bytes)
        value = pack([[int(generation), 1], {"0": 1}])  # a good stamp, a foreign body
    plant(redis_client, key, kind, value)

    document = json_of(run(*base, "inspect", "Product", "1", "--json"))
    if target == "entry":
        assert document["state"] == "undecodable"
        assert problem in document["detail"]
    else:  # the entry is fine; a counter it is checked against is not
        assert document["state"] == "stale"
        assert "missing or unreadable" in document["detail"]
    assert document["bad_keys"] == reported
    human = run(*base, "inspect", "Product", "1")
    completes(human)
    assert problem in human.stdout


def _broken_body(raw: bytes, how: str) -> bytes:
    stamp, body = unpack(raw)
    columns, single, models, objects, rows = body
    if how == "related-objects-not-a-mapping":
        objects[0][3] = 7
    elif how == "model-name-not-text":
        models = [7]
    elif how == "column-names-not-text":
        columns = [7]
    return pack([stamp, [columns, single, models, objects, rows]])


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("related-objects-not-a-mapping", "an object's related objects are not a mapping"),
        ("model-name-not-text", "the entry's model names are not a list of text"),
        ("column-names-not-text", "the entry's column names are not a list of text"),
        ("entry-is-a-hash", "holds a Redis hash, not a string (query entry)"),
        ("version-is-a-hash", "holds a Redis hash, not a string (version counter)"),
    ],
)
def test_inspect_statement_reports_a_planted_key_and_goes_on(
    base: list[str],
    statements: str,
    database_url: str,
    namespace: str,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    how: str,
    problem: str,
) -> None:
    module = __import__(statements)
    with session_factory() as s:
        s.scalars(module.BY_CATEGORY).all()
    args = [
        *base,
        "inspect",
        "--bind-url",
        database_url,
        "--statement",
        f"{statements}:BY_CATEGORY",
    ]
    entry = json_of(run(*args, "--json"))["key"]
    version = KeyScheme(namespace).version_key("products")
    if how == "entry-is-a-hash":
        plant(redis_client, entry, "hash")
    elif how == "version-is-a-hash":
        plant(redis_client, version, "hash")
    else:
        raw = redis_client.get(entry)
        assert isinstance(raw, bytes)
        redis_client.set(entry, _broken_body(raw, how), keepttl=True)

    document = json_of(run(*args, "--json"))
    if how == "version-is-a-hash":  # the entry is fine; the counter it is checked against is not
        assert document["state"] == "stale"
        assert "version counter of products is missing or unreadable" in document["detail"]
        assert document["bad_keys"] == [{"key": version, "problem": problem}]
    else:
        assert document["state"] == "undecodable"
        assert problem in document["detail"]
    human = run(*args)
    completes(human)
    assert problem in human.stdout


@pytest.mark.parametrize(
    ("key", "kind", "value", "problem"),
    [
        ("stats:total", "string", b"x", "holds a Redis string, not a hash (published counters)"),
        ("stats:model:Product", "hash", b"abc", "field 'f' holds 'abc', not an integer counter"),
        ("v", "hash", b"1", "holds a Redis hash, not a string (version counter)"),
        ("v", "string", b"seven", "holds 'seven', not an integer version counter"),
        ("g", "list", b"1", "holds a Redis list, not a string (generation counter)"),
        ("w", "string", b"1", "holds a Redis string, not a sorted set (writer marks)"),
        # not UTF-8: redis-py cannot send back a key decoded with surrogates
        (b"stats:\xff", "string", b"x", "holds a Redis string, not a hash (published counters)"),
    ],
)
def test_stats_reports_a_planted_key_and_goes_on(
    base: list[str],
    namespace: str,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    key: str | bytes,
    kind: str,
    value: bytes,
    problem: str,
) -> None:
    with session_factory() as s:
        s.get(Product, 1)
    keys = KeyScheme(namespace)
    if isinstance(key, bytes):
        planted: str | bytes = keys.prefix.encode() + key
        shown = keys.prefix + key.decode("utf-8", "backslashreplace")
    elif key.startswith("stats:"):
        planted = shown = keys.prefix + key
    else:
        planted = shown = keys.table_prefix("products") + key
    plant(redis_client, planted, kind, value)

    document = json_of(run(*base, "stats", "--json"))
    assert {"key": shown, "problem": problem} in document["bad_keys"]
    tables = {t["table"]: t for t in document["tables"]}
    assert tables["products"]["entity_entries"] == 1  # the rest is still there
    human = run(*base, "stats")
    completes(human)
    assert shown in human.stdout
    assert problem in human.stdout


def test_key_names_cannot_write_to_the_terminal(
    base: list[str], namespace: str, redis_client: redis.Redis
) -> None:
    # a table name with an escape sequence (clear screen) and a newline (a fake row), and
    # one that is not UTF-8
    keys = KeyScheme(namespace)
    redis_client.set(keys.version_key("evil\x1b[2J\nproducts"), 1)
    redis_client.set(keys.version_key("t\udcff").encode("utf-8", "surrogateescape"), 2)
    document = json_of(run(*base, "stats", "--json"))
    assert {"evil\x1b[2J\nproducts", "t\udcff"} <= {t["table"] for t in document["tables"]}
    human = run(*base, "stats")
    completes(human)
    assert "\x1b" not in human.stdout
    assert "evil\\x1b[2J\\nproducts" in human.stdout
    assert "t\\xff" in human.stdout


# --------------------------------------------------------------------------- credentials
# No password reaches stdout or stderr, whether it is given in a URL's user-info or as a
# query parameter, whether the command succeeds, is refused or finds nobody there.

ACL_USER = "operator"


@pytest.fixture(scope="module")
def locked_redis(unavailable: Any) -> Iterator[tuple[str, str]]:
    """A private redis-server that needs a password, and an ACL user with another one.

    Yields ``(address, password)``: the default user's password; the ACL user's is
    ``password[::-1]``.
    """
    try:
        # with AOF, as write-behind models need, should the process have imported some
        server = RedisServer().start()
    except ServerStartError as exc:
        unavailable(f"no private redis-server: {exc}")
    password = "pw" + secrets.token_hex(8)
    try:
        admin = redis.Redis(host=server.host, port=server.port)
        admin.acl_setuser(
            ACL_USER,
            enabled=True,
            passwords=[f"+{password[::-1]}"],
            categories=["+@all"],
            keys=["*"],
            channels=["*"],
        )
        admin.config_set("requirepass", password)
        admin.close()
        yield f"{server.host}:{server.port}", password
    finally:
        server.close()


def secret_free(result: Result, *secret_texts: str) -> str:
    """The output, once checked for every secret (the failure names the command)."""
    output = result.stdout + result.stderr
    for text in secret_texts:
        assert text not in output, output
    assert "Traceback" not in output, output
    return output


def redis_urls(address: str, password: str) -> list[str]:
    """The ways a Redis password is given: user-info (default and ACL user), query."""
    return [
        f"redis://:{password}@{address}/0",
        f"redis://{ACL_USER}:{password[::-1]}@{address}/0",
        f"redis://{address}/0?password={password}",
    ]


def database_urls(database_url: str, password: str) -> list[str]:
    """A database URL with the password in its user-info, then as a query parameter.

    The test server trusts local connections: it accepts them and ignores the password.
    """
    url = sa.make_url(database_url)
    return [
        url.set(password=password).render_as_string(hide_password=False),
        url.update_query_dict({"password": password}).render_as_string(hide_password=False),
    ]


def test_no_command_prints_a_password(
    locked_redis: tuple[str, str],
    database_url: str,
    shop_engine: sa.Engine,
    statements: str,
    dead_url: tuple[str, str],
) -> None:
    address, password = locked_redis
    module = __import__(statements)
    migrated, bare = dead_url
    for redis_url, db_url, dlq_url in zip(
        redis_urls(address, password),
        [*database_urls(database_url, password), database_urls(database_url, password)[1]],
        [*database_urls(migrated, password), database_urls(migrated, password)[1]],
        strict=True,
    ):
        namespace = f"t{secrets.token_hex(5)}"
        client = redis.Redis.from_url(redis_url)
        cache = Cache(client, namespace=namespace)
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        with factory() as s:
            s.get(Product, 1)
            s.scalars(module.BY_CATEGORY).all()
        cache.detach()
        client.close()
        base = ["--redis-url", redis_url, "--namespace", namespace, "--models", "examples.shop"]
        statement = ["inspect", "--statement", f"{statements}:BY_CATEGORY", "--bind-url", db_url]
        for args in (
            ["stats"],
            ["stats", "--json"],
            ["stats", "--json", "--watch", "0.5", "--count", "2"],
            ["inspect", "Product", "1"],
            ["inspect", "Product", "1", "--json"],
            statement,
            [*statement, "--json"],
            ["--database-url", dlq_url, "dlq", "list"],
            ["invalidate", "Product", "1", "--yes"],
            ["invalidate", "Product", "--yes"],
            ["invalidate", "--namespace-wide", "--yes"],
        ):
            result = run(*base, *args)
            assert result.exit_code == 0, (args, result.output)
            secret_free(result, password, password[::-1])
        # refusals that print the database's URL
        bare_url = sa.make_url(bare).set(password=password)
        for args in (
            ["--database-url", bare_url.render_as_string(hide_password=False), "dlq", "list"],
            [
                "--database-url",
                bare_url.update_query_dict({"sslpassword": password}).render_as_string(
                    hide_password=False
                ),
                "dlq",
                "replay",
                "--model",
                "tests.wb_support:active_models",
                "--yes",
            ],
        ):
            # write-behind models of a private base: mapped for good, they would make
            # every later attach() to the shared Redis (AOF off) refuse
            with private_models():
                result = run(*base, *args)
            assert result.exit_code == 1, (args, result.output)
            assert "sarc_dead_letters does not exist in " in secret_free(result, password)


def test_connection_errors_print_no_password(
    locked_redis: tuple[str, str], database_url: str
) -> None:
    address, password = locked_redis
    wrong = "wrong" + secrets.token_hex(6)
    dead = f"127.0.0.1:{free_port()}"
    for redis_url in redis_urls(address, wrong):
        for args in (["stats"], ["inspect", "Product", "1"], ["invalidate", "Product", "--yes"]):
            result = run("--redis-url", redis_url, "--models", "examples.shop", *args)
            assert result.exit_code == 1, (args, result.output)
            assert "refused the credentials" in secret_free(result, wrong, wrong[::-1])
    for redis_url in redis_urls(dead, password):
        result = run("--redis-url", redis_url, "stats")
        assert result.exit_code == 1, result.output
        assert "cannot reach Redis at" in secret_free(result, password, password[::-1])
    redis_url = redis_urls(address, password)[2]  # Redis answers; the database does not
    for db_url in database_urls(database_url, password):
        down = sa.make_url(db_url).set(port=free_port()).render_as_string(hide_password=False)
        for args in (["dlq", "list"], ["demo", "--small"]):
            result = run("--redis-url", redis_url, "--database-url", down, *args)
            assert result.exit_code == 1, (args, result.output)
            assert "cannot reach the database at" in secret_free(result, password)


@pytest.mark.parametrize(
    ("option", "url"),
    [
        ("--redis-url", "redis://u:{secret}@[::1/0"),
        ("--redis-url", "redis://u:{secret}/x@h/0"),  # urllib reads part of it as the port
        ("--redis-url", "redis://h:1/0?password={secret}&db=x"),
        ("--database-url", "postgresql+psycopg://u:{secret}@[::1/db"),
        ("--database-url", "postgresql+psycopg://u@h:port/db?password={secret}"),
        ("--bind-url", "postgresql+psycopg://u:{secret}@[::1/db"),
    ],
)
def test_a_malformed_url_is_one_line_without_its_password(
    base: list[str], statements: str, option: str, url: str
) -> None:
    secret = "pw" + secrets.token_hex(6)
    given = url.format(secret=secret)
    commands = {
        "--redis-url": [["stats"], ["inspect", "Product", "1"], ["invalidate", "--namespace-wide"]],
        "--database-url": [
            ["dlq", "list"],
            ["demo"],
            ["inspect", "--statement", f"{statements}:BY_CATEGORY"],
        ],
        "--bind-url": [["inspect", "--statement", f"{statements}:BY_CATEGORY"]],
    }[option]
    for args in commands:
        if option == "--bind-url":
            result = run(*base, *args, option, given)
        else:
            result = run(*base, option, given, *args)
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"Error: Invalid value for {option}: "), errors[0]
        assert "is not a" in errors[0]
        secret_free(result, secret, secret[2:6])


@pytest.mark.parametrize(
    "urls",
    [
        ("postgresql+psycopg://u:{secret}@[::1/db", "redis://127.0.0.1:6379/0"),
        ("postgresql+psycopg://u@h:1/db", "redis://u:{secret}/x@h/0"),
        ("postgresql+psycopg://u@h:1/db", "redis://h:1/0?password={secret}&db=x"),
    ],
)
def test_the_worker_reports_a_malformed_url_in_one_line(urls: tuple[str, str]) -> None:
    secret = "pw" + secrets.token_hex(6)
    database, redis_url = (u.format(secret=secret) for u in urls)
    result = run(
        "worker",
        "--database-url", database,
        "--redis-url", redis_url,
        "--namespace", "n",
        "--model", "nowhere.models:Model",  # the URLs are refused before models load
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    option = "--database-url" if "{secret}" in urls[0] else "--redis-url"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: Invalid value for {option}: "), errors[0]
    secret_free(result, secret, secret[2:6])
