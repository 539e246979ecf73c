"""Review probes of the cache on a Redis Cluster (docs/cluster.md, docs/guarantees.md
"Redis Cluster"), with the database as the oracle: a slot held half migrated (``ASK`` and
``TRYAGAIN`` for as long as the test wants), a failover that loses an acknowledged write,
and the write-behind worker with one primary of several down.

Each test starts a cluster of its own (a few seconds) when it kills or freezes nodes, so
that the run's shared cluster is left as it was.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from devservices import RedisCluster
from sa_redis_cache import Cache, FlushWorker
from sa_redis_cache.protocol.keys import KeyScheme
from sa_redis_cache.redis_io import client_from_url
from tests.wb_support import private_models

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session, sessionmaker

pytestmark = pytest.mark.slow


def owner_of_table(cluster: RedisCluster, namespace: str, table: str) -> Any:
    """The primary serving every key of ``table`` (they share its hash tag)."""
    return cluster.owner_of(cluster.slot_of(KeyScheme(namespace).generation_key(table)))


# --------------------------------------------------------------------------- write-behind


@pytest.fixture
def no_full_coverage_cluster() -> Iterator[RedisCluster]:
    """3 primaries without replicas, AOF on, serving their slots while another is down
    (``cluster-require-full-coverage no``: the set-up in which one shard can be down while
    the others serve)."""
    with RedisCluster(
        primaries=3,
        replicas=0,
        appendonly=True,
        node_timeout_ms=1000,
        extra_args=["--cluster-require-full-coverage", "no"],
    ) as made:
        yield made


def split_namespace(cluster: RedisCluster, tables: list[str]) -> str:
    """A namespace in which ``tables`` live on distinct primaries."""
    for n in range(1000):
        name = f"rc{n}"
        owners = {owner_of_table(cluster, name, t).node_id for t in tables}
        if len(owners) == len(tables):
            return name
    raise AssertionError("no namespace spreads the tables")


def test_the_worker_keeps_draining_the_other_primaries_while_one_is_down(
    no_full_coverage_cluster: RedisCluster, engine: sa.Engine, database_url: str
) -> None:
    """Queues on two primaries; the primary of one is killed (no replica to promote). The
    worker must go on flushing the other's queue, and flush the first once it is back."""
    from sa_redis_cache import schema

    cluster = no_full_coverage_cluster
    schema.upgrade(engine)
    with private_models() as (page_view, stock_level):
        page_view.metadata.create_all(engine)
        tables = [page_view.__table__.name, stock_level.__table__.name]
        namespace = split_namespace(cluster, tables)
        with engine.begin() as conn:
            conn.execute(page_view.__table__.delete())
            conn.execute(stock_level.__table__.delete())
        client = client_from_url(cluster.url)
        worker_engine = sa.create_engine(database_url)
        cache = Cache(client, namespace=namespace)
        made: sessionmaker[Session] = sa.orm.sessionmaker(engine)
        cache.attach(made)
        worker = FlushWorker(
            worker_engine,
            client_from_url(cluster.url),
            namespace=namespace,
            models=[page_view, stock_level],
            max_backoff=0.2,
        )
        try:

            def add(obj: Any) -> None:
                with made() as s:
                    s.add(obj)
                    s.commit()

            add(page_view(path="/first", views=1))
            add(stock_level(warehouse="first", quantity=1))
            for _ in range(20):
                if not worker.run_once():
                    break
            assert len(count_rows(engine, page_view)) == 1
            assert len(count_rows(engine, stock_level)) == 1

            down = owner_of_table(cluster, namespace, tables[1])
            # the stock levels' shard holds queued writes when it dies: they are on
            # its disk (AOF), flushed once it is back
            add(stock_level(warehouse="queued", quantity=2))
            add(page_view(path="/queued", views=2))
            down.kill()
            # the page views' shard is up: its commits queue, its queue drains
            for n in range(5):
                add(page_view(path=f"/while-down/{n}", views=n))
            for _ in range(60):
                worker.run_once()
                if len(count_rows(engine, page_view)) == 7:
                    break
            assert len(count_rows(engine, page_view)) == 7, (
                "the worker stopped draining the live primary's queues while another was down"
            )
            cluster.restart_node(down)
            for _ in range(60):
                worker.run_once()
                if len(count_rows(engine, stock_level)) == 2:
                    break
            assert sorted(r[0] for r in count_rows(engine, stock_level).values()) == [
                "first",
                "queued",
            ]
        finally:
            with contextlib.suppress(Exception):
                worker.release()
            cache.detach()
            worker_engine.dispose()
            with engine.begin() as conn:
                conn.execute(page_view.__table__.delete())
                conn.execute(stock_level.__table__.delete())


def count_rows(engine: sa.Engine, model: Any) -> dict[Any, tuple[Any, ...]]:
    """``{id: (the row's second column, ...)}`` of ``model``'s table, read with plain SQL."""
    table = model.__table__
    with engine.connect() as conn:
        return {r[0]: tuple(r[1:]) for r in conn.execute(select(table))}
