"""Slot groups (docs/cluster.md, "Slot groups: what is co-located, and why").

``Cache(slot_groups={"catalog": ["products", "categories"]})`` gives both shop tables the
hash tag ``{<ns>:@catalog}``: on a Redis Cluster a statement over them reads and fills in
one slot (no per-slot check of a foreign table: :func:`sa_redis_cache.protocol.cluster.
fill_plan` is never needed) and a commit writing both runs in one slot too. The scenarios
run in every mode; on a single server they check that groups change nothing served.
The checks of ``Cache(slot_groups=...)``, ``CachePolicy(slot_group=...)`` and of
write-behind models at ``attach()`` are here too.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_lib
from sqlalchemy import ForeignKey, Integer, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from sa_redis_cache.cli.keyspace import collect
from sa_redis_cache.compat import key_slot
from sa_redis_cache.protocol import KeyScheme, cluster
from tests.integration.test_attach import private_base
from tests.integration.test_cli import run
from tests.integration.test_cluster_protocol import category, joined, read, rename

if TYPE_CHECKING:
    import sqlalchemy as sa

    from devservices.cluster import RedisCluster
    from tests.modes import Db, Runner

pytestmark = pytest.mark.cluster

GROUPS = {"catalog": ["products", "categories"]}
__all__ = ["category"]  # the fixture, shared with test_cluster_protocol


def grouped(in_mode: Runner) -> Runner:
    return dataclasses.replace(in_mode, cache_kwargs={"slot_groups": GROUPS})


def group_prefix(db: Db) -> str:
    ns = db.cache._core.namespace
    return f"sarc:{ns}:{{{ns}:@catalog}}:"


@pytest.fixture
def fill_plans(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every fill the cluster client had to split over slots (spied on, not replaced)."""
    plans: list[Any] = []
    real = cluster.fill_plan

    def spy(call: Any) -> cluster.FillPlan:
        plans.append(call)
        return real(call)

    monkeypatch.setattr(cluster, "fill_plan", spy)
    return plans


def test_a_statement_over_a_group_reads_and_fills_in_one_slot(
    in_mode: Runner, category: int, fill_plans: list[Any]
) -> None:
    def scenario(db: Db) -> None:
        keys = db.cache._core.keys
        counters = [
            k(t) for t in ("products", "categories") for k in (keys.version_key, keys.writers_key)
        ]
        assert all(key.startswith(group_prefix(db)) for key in counters)
        assert len({key_slot(key) for key in counters}) == 1
        first = read(db, category)
        db.sql.reset()
        assert read(db, category) == first
        assert db.sql.count == 0  # a hit
        rename(db, category, f"grouped-{category}")
        after = read(db, category)
        assert after != first
        assert {name for _, name in after} == {f"grouped-{category}"}
        assert db.cache.stats()["total"]["fill_refused"] == 0

    grouped(in_mode)(scenario)
    # the entry and both tables' counters share the group's slot: every fill was one
    # fill.lua call, never the two steps of a statement over several slots
    assert fill_plans == []


def test_a_write_through_commit_over_a_group(
    in_mode: Runner, category: int, mode_redis_client: redis_lib.Redis, namespace: str
) -> None:
    def scenario(db: Db) -> None:
        with db.session() as s:
            (pid,) = s.scalars(select(Product.id).where(Product.category_id == category))
        read(db, category)  # a grouped query entry over both tables
        with db.session() as s:
            s.get(Product, pid).price = Decimal("7.50")  # write-through
            s.get(Category, category).name = f"both-{category}"  # cache-aside
            s.commit()
        db.sql.reset()
        with db.session() as s:
            assert s.get(Product, pid).price == Decimal("7.50")  # the written-through state
        assert db.sql.count == 0
        assert {name for _, name in read(db, category)} == {f"both-{category}"}

    grouped(in_mode)(scenario)
    grouped_keys = KeyScheme(namespace, dict.fromkeys(GROUPS["catalog"], "catalog"))
    for table in GROUPS["catalog"]:  # the commit bumped the group's counters, not the tables'
        assert int(mode_redis_client.get(grouped_keys.version_key(table)) or 0) > 0
        assert not mode_redis_client.exists(KeyScheme(namespace).version_key(table))


def test_keys_of_tables_without_a_group_are_unchanged(
    session_factory: sessionmaker[Session], cache: Cache, product: int, namespace: str
) -> None:
    with session_factory() as s:
        s.scalars(select(Product).where(Product.id == product).options(FromCache())).one()
        s.get(Product, product)
    tag = f"sarc:{namespace}:{{{namespace}:products}}:"
    found = [k.decode() for k in cache.client.scan_iter(match=f"sarc:{namespace}:*")]
    assert f"{tag}v" in found
    assert any(k.startswith(f"{tag}q:") for k in found)
    assert any(k.startswith(f"{tag}e:") for k in found)
    assert not any("@" in k for k in found)


def test_the_command_line_finds_a_groups_keys(
    shop_engine: sa.Engine, redis_url: str, namespace: str, category: int
) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace, slot_groups=GROUPS)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        with factory() as s:
            s.execute(joined(category)).all()
            rename_in = s.get(Category, category)
            assert rename_in is not None
            rename_in.name = f"cli-{category}"
            s.commit()
        # stats knows nothing of the group (no model declares it): it reads it from the keys
        tables = {row["table"]: row for row in collect(client, KeyScheme(namespace))["tables"]}
        assert sum(tables[t]["query_entries"] for t in GROUPS["catalog"]) == 1
        version = client.get(cache.keys.version_key("categories"))
        assert version is not None
        assert tables["categories"]["version"] == int(version)
        assert cache.clear() >= 1
        for table in GROUPS["catalog"]:
            assert not list(client.scan_iter(match=cache.keys.query_pattern(table)))
    finally:
        cache.detach()
        client.close()


# -- what attach() and Cache() refuse ---------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "named"),
    [
        ({"a": ["t"], "b": ["t"]}, "table 't' in slot group 'b'"),
        ({"": ["t"]}, "slot group ''"),
        ({"a{b}": ["t"]}, "slot group 'a{b}'"),
        ({"a:b": ["t"]}, "slot group 'a:b'"),
        ({"a": "t"}, "give a list of table names"),
    ],
)
def test_cache_refuses_bad_slot_groups(redis_url: str, groups: Any, named: str) -> None:
    with pytest.raises(ConfigurationError, match="slot_groups") as raised:
        Cache(redis_url, slot_groups=groups)
    assert named in str(raised.value)


def test_attach_refuses_a_bad_group_name_and_a_table_in_two_groups(
    redis_url: str, namespace: str
) -> None:
    cache = Cache(redis_url, namespace=namespace, slot_groups={"sales": ["sg_lines"]})
    with private_base() as base:

        class Line(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_lines"
            __cache__ = CachePolicy(slot_group="billing")
            id: Mapped[int] = mapped_column(Integer, primary_key=True)

        class Odd(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_odd"
            __cache__ = CachePolicy(slot_group="no{braces}")
            id: Mapped[int] = mapped_column(Integer, primary_key=True)

        with pytest.raises(ConfigurationError) as raised:
            cache.attach(sessionmaker())
        text = str(raised.value)
        assert "Line puts table 'sg_lines' in slot group 'billing', and it is in 'sales'" in text
        assert "Odd: slot group 'no{braces}' must be a non-empty name" in text
        assert cache.keys.version_key("sg_lines").startswith(
            f"sarc:{namespace}:{{{namespace}:@sales}}"
        )
        del Line, Odd
    cache.detach()


def test_attach_takes_a_models_slot_group(redis_url: str, namespace: str) -> None:
    cache = Cache(redis_url, namespace=namespace)
    with private_base() as base:

        class Head(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_heads"
            __cache__ = CachePolicy(slot_group="docs")
            id: Mapped[int] = mapped_column(Integer, primary_key=True)

        cache.attach(sessionmaker())
        assert (
            cache.keys.version_key("sg_heads")
            == f"sarc:{namespace}:{{{namespace}:@docs}}:sg_heads:v"
        )
        del Head
    cache.detach()


def test_attach_refuses_a_group_that_appears_after_the_first_attach(
    redis_url: str, namespace: str
) -> None:
    cache = Cache(redis_url, namespace=namespace)
    cache.attach(sessionmaker())
    with private_base() as base:

        class Late(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_late"
            __cache__ = CachePolicy(slot_group="late")
            id: Mapped[int] = mapped_column(Integer, primary_key=True)

        with pytest.raises(ConfigurationError, match="after the cache's first attach"):
            cache.attach(sessionmaker())
        assert cache.keys.version_key("sg_late") == KeyScheme(namespace).version_key("sg_late")
        del Late
    cache.detach()


def test_write_behind_refuses_a_group_the_worker_cannot_see(redis_url: str, namespace: str) -> None:
    cache = Cache(redis_url, namespace=namespace, slot_groups={"views": ["sg_views"]})
    with private_base() as base:

        class View(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_views"
            __cache__ = CachePolicy(strategy="write_behind", accept_volatile=True)
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)

        with pytest.raises(ConfigurationError, match=r"write CachePolicy\(slot_group='views'\)"):
            cache.attach(sessionmaker())
        del View
    cache.detach()


def test_on_a_cluster_related_write_behind_models_must_share_a_group(
    redis_cluster: RedisCluster, namespace: str
) -> None:
    cache = Cache(redis_cluster.url, namespace=namespace)
    with private_base() as base:

        class Basket(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_baskets"
            __cache__ = CachePolicy(strategy="write_behind", slot_group="baskets")
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)

        class Item(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_items"
            __cache__ = CachePolicy(strategy="write_behind", slot_group="items")
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
            basket_id: Mapped[int] = mapped_column(ForeignKey("sg_baskets.id"))

        with pytest.raises(ConfigurationError) as raised:
            cache.attach(sessionmaker())
        assert (
            "Item and Basket are write-behind models related by a foreign key "
            "(sg_items.basket_id) in different slot groups"
        ) in str(raised.value)
        del Basket, Item
    cache.detach()
    cache.client.close()


# -- spread query entries ----------------------------------------------------------------


def by_id(pid: int, spread: bool | None = True) -> Any:
    return select(Product).where(Product.id == pid).options(FromCache(spread=spread))


def test_spread_entries_of_one_table_land_in_several_slots_and_a_write_retires_each(
    in_mode: Runner, mode_redis_client: redis_lib.Redis, namespace: str
) -> None:
    def scenario(db: Db) -> list[int]:
        with db.session() as s:
            ids = list(s.scalars(select(Product.id).order_by(Product.id).limit(8)))
            for pid in ids:
                s.scalars(by_id(pid))
        db.sql.reset()
        with db.session() as s:
            for pid in ids:
                s.scalars(by_id(pid))
        assert db.sql.count == 0  # every spread entry is a hit
        with db.session() as s:
            s.get(Product, ids[0], populate_existing=True).name += " "  # a write to the table
            s.commit()
        db.sql.reset()
        with db.session() as s:
            for pid in ids:
                s.scalars(by_id(pid))
        assert db.sql.count == len(ids)  # each of them a miss, in whatever slot it lives
        with db.session() as s:
            s.get(Product, ids[0], populate_existing=True).name = s.get(Product, ids[0]).name[:-1]
            s.commit()
        return ids

    ids, _ = in_mode(scenario)
    found = [
        k.decode()
        for k in mode_redis_client.scan_iter(match=f"sarc:{namespace}:{{{namespace}:@q:*")
    ]
    assert len(found) == len(ids)
    assert all(k.endswith(":products:q:" + k[-32:]) for k in found)
    assert len({key_slot(k) for k in found}) > 1


def test_a_models_policy_spreads_its_queries_and_from_cache_overrides_it(
    shop_engine: sa.Engine, redis_url: str, namespace: str
) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace)
    with private_base() as base:

        class Hot(base):  # type: ignore[valid-type,misc]
            __tablename__ = "sg_hot"
            __cache__ = CachePolicy(spread_queries=True)
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)

        base.metadata.create_all(shop_engine)
        try:
            factory = sessionmaker(shop_engine)
            cache.attach(factory)
            with factory() as s:
                s.add_all([Hot(id=1), Hot(id=2)])
                s.commit()
                s.scalars(select(Hot).where(Hot.id == 1).options(FromCache())).one()
                s.scalars(select(Hot).where(Hot.id == 2).options(FromCache(spread=False))).one()
            found = sorted(k.decode() for k in client.scan_iter(match=f"sarc:{namespace}:*:q:*"))
            tag = f"sarc:{namespace}:{{{namespace}:"
            assert [k.startswith(f"{tag}@q:") for k in found].count(True) == 1
            assert [k.startswith(f"{tag}sg_hot}}:q:") for k in found].count(True) == 1
            # invalidate_query() retires the entry whichever way it was keyed
            assert cache.invalidate_query(select(Hot).where(Hot.id == 1)) == 1
        finally:
            cache.detach()
            base.metadata.drop_all(shop_engine)
            client.close()
        del Hot


def test_the_command_line_invalidates_through_a_group_given_with_slot_group(
    redis_url: str, namespace: str
) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    grouped_keys = KeyScheme(namespace, dict.fromkeys(GROUPS["catalog"], "catalog"))
    try:
        args = ["--redis-url", redis_url, "--namespace", namespace, "--models", "examples.shop"]
        done = run(
            *args,
            "--slot-group",
            "catalog=products,categories",
            "invalidate",
            "examples.shop:Product",
            "--yes",
        )
        assert done.exit_code == 0, done.output
        assert client.get(grouped_keys.version_key("products")) is not None
        assert client.get(KeyScheme(namespace).version_key("products")) is None
        bad = run(*args, "--slot-group", "catalog", "stats")
        assert bad.exit_code == 2
        assert "write GROUP=TABLE[,TABLE...]" in bad.output
    finally:
        client.close()


def test_the_local_tier_serves_a_group_and_drops_it_on_a_commit(
    in_mode: Runner, category: int
) -> None:
    """A grouped statement kept by the local tier (its counters and fences under the
    group's tag, on a cluster on one node) is a local hit, and a commit to either table
    retires it before ``commit()`` returns."""

    def local_hits(db: Db) -> int:
        return int(db.cache.stats()["total"].get("local_hits", 0))

    def scenario(db: Db) -> None:
        tier = db.cache.inspector.local_tier
        assert tier is not None
        assert tier.wait_ready(10.0)
        read(db, category)  # a fill
        read(db, category)  # a Redis hit, kept by the tier
        hits = local_hits(db)
        read(db, category)
        assert local_hits(db) == hits + 1
        with db.session() as s:
            s.get(Category, category).name = f"local-{category}"
            s.commit()
        assert {name for _, name in read(db, category)} == {f"local-{category}"}

    local = {"slot_groups": GROUPS, "local": True}
    dataclasses.replace(in_mode, cache_kwargs=local)(scenario)
