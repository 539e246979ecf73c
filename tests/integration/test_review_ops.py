"""Review of what operators use, against its documents: the command line (docs/cli.md), the
demo (README, `make demo`), as a user runs them, in child processes against real services.

Each test holds one promise the documents make that the program did not keep.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.orm import sessionmaker

from devservices.process import free_port
from devservices.scratch import drop_database
from examples.shop import Product
from sa_redis_cache import Cache
from sa_redis_cache.redis_io import client_from_url, unlink_matching
from tests.integration.test_local_tier import WAIT, tier_of, until

if TYPE_CHECKING:
    import redis
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from devservices import Services

ROOT = Path(__file__).resolve().parents[2]


def command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m sa_redis_cache ARGS`` from the repository's root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sa_redis_cache", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_model_named_module_dot_class_is_imported_like_module_colon_class(
    redis_url: str,
    namespace: str,
    cache: Cache,
    session_factory: sessionmaker[Session],
    product: int,
    redis_client: redis.Redis,
    shop_engine: sa.Engine,
) -> None:
    # cli.md: "A model (MODEL) is named module:Class (imported on the spot), module.Class,
    # or just Class ..."; the dotted form used to be looked up only among the classes
    # already imported (--models), so without --models it was "unknown model", exit 2
    with session_factory() as s:
        assert s.get(Product, product) is not None  # write-through model: now cached
    cache.stats()  # the fill's reply is read by the thread's next cache call
    inspector = cache.inspector
    database = inspector.database_of(shop_engine)
    assert database is not None
    key = inspector.row_key(Product, (product,), database=database)
    assert redis_client.exists(key)
    for form in ("examples.shop.Product", "examples.shop:Product"):
        done = command(
            "--redis-url", redis_url, "--namespace", namespace,
            "invalidate", form, str(product), "--yes",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not redis_client.exists(key)
    wrong = command("--redis-url", redis_url, "--namespace", namespace,
                    "invalidate", "examples.shop.Widget", "--yes")  # fmt: skip
    assert wrong.returncode == 2
    assert "module 'examples.shop' has no attribute 'Widget'" in wrong.stderr


def test_the_demo_prints_no_error_on_a_redis_without_aof(services: Services) -> None:
    # README / cli.md: on a Redis with AOF off the demo runs its write-behind part on a
    # throwaway server; the shop's own cache, still attached, used to log an error telling
    # the user to turn AOF on when that part mapped PageView
    client = client_from_url(services.redis_url)
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
    finally:
        client.close()
    suffix = secrets.token_hex(5)
    database, namespace = f"sarc_demo_ops_{suffix}", f"demoops{suffix}"
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
        "SARC_DEMO_SMALL": "1",
        "SARC_DEMO_DATABASE": database,
        "SARC_DEMO_NAMESPACE": namespace,
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "examples.demo"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        drop_database(services.database_url, database)
        client = client_from_url(services.redis_url)
        try:
            unlink_matching(client, f"sarc:{namespace}*")
        finally:
            client.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "refused" not in done.stderr, done.stderr
    if appendonly == "no":
        assert "this part uses a redis-server started for it" in " ".join(done.stdout.split())


FACTORIES = """
from sqlalchemy import select

from examples.shop import Product


def broken_statement():
    raise RuntimeError("the query module is broken")


def statement_of(category):
    return select(Product).where(Product.category_id == category)


def broken_models():
    raise KeyError("no such setting")
"""


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (
            ["inspect", "--statement", "{module}:broken_statement"],
            1,
            "calling {module}:broken_statement failed: RuntimeError: the query module is broken",
        ),
        (
            ["inspect", "--statement", "{module}:statement_of"],
            2,
            "is a callable that needs arguments",
        ),
        (
            ["dlq", "replay", "--model", "{module}:broken_models", "--yes"],
            1,
            "calling {module}:broken_models failed: KeyError",
        ),
        (["worker", "--model", "{module}:broken_models"], 1, "KeyError: 'no such setting'"),
        (["worker", "--model", "{module}:statement_of"], 2, "needs arguments"),
    ],
)
def test_a_function_named_on_the_command_line_that_raises_is_one_error_line(
    args: list[str],
    status: int,
    says: str,
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    namespace: str,
) -> None:
    # cli.md: "a function of no arguments returning one" (--statement), "module:function
    # returning classes works too" (--model); "Errors are one line on stderr that names
    # the problem": a function that raised, or needed arguments, used to end in a traceback
    module = f"sarc_ops_factories_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(FACTORIES))
    done = command(
        "--redis-url", redis_url, "--namespace", namespace, "--database-url", database_url,
        *(arg.format(module=module) for arg in args),
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )  # fmt: skip
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert says.format(module=module) in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--database-url", "{url}", "inspect", "examples.shop:Product", "7"], "--database-url"),
        (["inspect", "examples.shop:Product", "7", "--bind-url", "{url}"], "--bind-url"),
        (
            ["--database-url", "{url}", "inspect", "--statement", "{module}:BOOKS"],
            "--database-url",
        ),
    ],
)
def test_inspect_words_an_unreachable_database_as_every_command_does(
    args: list[str], option: str, tmp_path: Path, redis_url: str, namespace: str
) -> None:
    # cli.md: Redis/Postgres that cannot be reached is exit 1 with one line naming the
    # problem and the fix ("cannot reach the database at URL: ...; start it or pass
    # --database-url"); inspect said "--bind-url: cannot reach URL: (psycopg...) ...
    # (Background on this error at: https://sqlalche.me/...)", even for --database-url
    module = f"sarc_ops_statements_{secrets.token_hex(4)}"
    (tmp_path / f"{module}.py").write_text(
        "from sqlalchemy import select\n"
        "from examples.shop import Product\n"
        "from sa_redis_cache import FromCache\n"
        "BOOKS = select(Product).options(FromCache())\n"
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/shop"
    done = command(
        "--redis-url", redis_url, "--namespace", namespace,
        *(arg.format(url=url, module=module) for arg in args),
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"Error: cannot reach the database at {url}: "), line
    assert line.endswith(f"; start it or pass {option} (or set DATABASE_URL)"), line
    assert "sqlalche.me" not in line


def test_stats_json_gives_a_local_tiers_readiness_as_a_boolean(
    redis_url: str, namespace: str, shop_engine: sa.Engine, product: int
) -> None:
    # cli.md: local_tiers hold what cache.stats()["local"] shows, whose ready is a bool;
    # the JSON had the string "True" (the published hash's text), so a script testing
    # `if tier["ready"]` took "False" for ready too
    cache = Cache(redis_url, namespace=namespace, local=True)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        # the tier connects in its own thread: ready once it tracks (not at attach())
        assert tier_of(cache).wait_ready(WAIT)
        with factory() as s:
            s.get(Product, product)
        local = cache.stats()["local"]
        assert local is not None
        assert local["ready"] is True
        tiers: list[dict[str, Any]] = []

        def published() -> bool:
            # the tier publishes its gauges at each lease renewal
            done = command("--redis-url", redis_url, "--namespace", namespace, "stats", "--json")
            assert done.returncode == 0, done.stderr
            tiers[:] = json.loads(done.stdout)["local_tiers"]
            return bool(tiers)

        until(published, "the local tier published its gauges")
        assert [t["holder"] for t in tiers] == [local["holder"]]
        assert tiers[0]["ready"] is True
    finally:
        cache.detach()
