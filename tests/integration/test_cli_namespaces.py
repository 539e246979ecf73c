"""``sa-redis-cache stats`` on a namespace with no keys, and the library's own tables.

A misspelt ``--namespace`` used to print an empty table that looked like a cache with no
traffic; the library's ``sarc_*`` tables, written by the worker on an attached engine,
were listed among the application's (issue 16).
"""

from __future__ import annotations

import json

import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.dialects.postgresql import insert

from sa_redis_cache import Cache, schema
from sa_redis_cache.cli import cli


def test_stats_of_an_empty_namespace_names_those_with_keys(
    redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    redis_client.set(f"sarc:{namespace}x:{{{namespace}x:products}}:v", 5, px=60_000)
    try:
        args = ["--redis-url", redis_url, "--namespace", namespace, "stats"]
        out = " ".join(CliRunner().invoke(cli, args, catch_exceptions=False).output.split())
        assert f"Namespace {namespace!r} has no keys" in out
        assert "namespaces with keys there:" in out  # other tests' namespaces may come too
        document = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)
        assert document["namespaces_with_keys"][f"{namespace}x"] == 1
    finally:
        redis_client.delete(f"sarc:{namespace}x:{{{namespace}x:products}}:v")


def test_the_library_tables_are_not_the_applications(
    engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    """The worker's offsets, written on an attached engine, invalidate nothing and are not
    listed by ``stats``."""
    schema.upgrade(engine)
    cache = Cache(redis_url, namespace=namespace)
    cache.attach(engine)
    try:
        with engine.begin() as conn:
            stmt = insert(schema.wb_offsets).values(stream=f"{namespace}:s", last_id="1-0")
            conn.execute(stmt.on_conflict_do_nothing())
            conn.execute(
                schema.wb_offsets.delete().where(schema.wb_offsets.c.stream == f"{namespace}:s")
            )
        assert cache.client.get(cache.keys.version_key("sarc_wb_offsets")) is None
        args = ["--redis-url", redis_url, "--namespace", namespace, "stats", "--json"]
        document = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).output)
        listed = {t["table"] for t in document["tables"]}
        assert listed.isdisjoint(schema.metadata.tables)
    finally:
        cache.detach()
        cache.client.close()
