"""The ``sa-redis-cache`` commands on a Redis Cluster.

``stats``, ``inspect`` and ``invalidate`` run :mod:`tests.integration.test_cli`'s own tests
here, unchanged, with this module's ``redis_url``, ``redis_client`` and ``cache_client``
pointing at the run's cluster (three primaries): the keys a test makes land on several
nodes, so a count, a row, a statement's counters or a namespace-wide delete that missed a
node, or a multi-table read sent to one slot, fails the same assertions that hold on one
server. The write-behind commands take a cluster too (docs/cluster.md).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from examples.shop import Category
from sa_redis_cache.compat import key_slot
from sa_redis_cache.protocol import KeyScheme
from sa_redis_cache.redis_io import client_from_url
from tests.integration.test_cli import (  # noqa: F401 - collected here, on the cluster
    base,
    json_of,
    run,
    statements,
    test_inspect_row_by_uuid_and_absent_rows,
    test_inspect_row_reports_a_planted_key_and_goes_on,
    test_inspect_row_shows_the_decoded_entry_then_stale,
    test_inspect_statement_computes_the_read_paths_key,
    test_inspect_statement_reports_a_planted_key_and_goes_on,
    test_invalidate_asks_for_confirmation,
    test_invalidate_namespace_wide_deletes_only_that_namespace,
    test_invalidate_namespace_wide_returns_once_every_local_tier_dropped_what_it_deleted,
    test_invalidate_region_still_retires_a_region_after_invalidate_namespace_wide,
    test_invalidate_row_and_model,
    test_key_names_cannot_write_to_the_terminal,
    test_stats_counts_entries_memory_and_counters_per_table,
    test_stats_reports_a_planted_key_and_goes_on,
    test_stats_says_when_no_counters_were_published,
    test_stats_sums_the_hits_and_misses_every_process_published,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from devservices import RedisCluster
    from sa_redis_cache.redis_io import SyncClient

pytestmark = pytest.mark.cluster


@pytest.fixture
def redis_url(redis_cluster: RedisCluster) -> str:
    """The run's cluster (``?cluster=true``), for the commands and the tests' caches."""
    return redis_cluster.url


@pytest.fixture
def redis_client(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """A cluster client: the tests' own reads and writes of keys, and the clean-up."""
    client = redis_cluster.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def cache_client(redis_url: str) -> SyncClient:
    """The fixture cache's client, on the cluster."""
    return client_from_url(redis_url)


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "--database-url", "postgresql://nowhere/x", "--models", "examples.shop"],
        ["dlq", "replay", "--database-url", "postgresql://nowhere/x", "--yes"],
    ],
)
def test_write_behind_commands_take_a_cluster(redis_url: str, args: list[str]) -> None:
    result = run("--redis-url", redis_url, *args)
    assert result.exit_code != 0, result.output  # no database there
    assert "Redis Cluster" not in result.output + result.stderr


TWO_TABLES = """
from sqlalchemy import select

from examples.shop import Category, Product
from sa_redis_cache import FromCache

IN_CATEGORY = (
    select(Product)
    .join(Category)
    .where(Category.name == "category-2")
    .order_by(Product.id)
    .options(FromCache())
)
"""


def test_inspect_statement_over_two_tables_reads_each_slots_counters(
    base: list[str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
    session_factory: sessionmaker[Session],
    redis_client: redis.cluster.RedisCluster,
    namespace: str,
) -> None:
    keys = KeyScheme(namespace)
    version_keys = [keys.version_key("products"), keys.version_key("categories")]
    # the counters' MGET must be split: one MGET over both would be refused (CROSSSLOT)
    assert len({key_slot(key) for key in version_keys}) == 2
    name = f"sarc_cli_two_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text(TWO_TABLES)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    with session_factory() as s:
        rows = s.scalars(module.IN_CATEGORY).all()
    assert rows
    args = [*base, "inspect", "--bind-url", database_url, "--json", "--statement"]
    document = json_of(run(*args, f"{name}:IN_CATEGORY"))
    assert document["state"] == "valid", document["detail"]
    assert document["row_count"] == len(rows)
    assert document["bad_keys"] == []

    with session_factory() as s:  # a write to the second table only retires the entry
        s.execute(sa.update(Category).where(Category.id == -1).values(name="x"))
        s.commit()
    stale = json_of(run(*args, f"{name}:IN_CATEGORY"))
    assert stale["state"] == "stale"
    assert "categories" in stale["detail"]
    assert "products" not in stale["detail"]
