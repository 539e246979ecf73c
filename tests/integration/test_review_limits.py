"""A review of the cache at its limits: sizes, counts and memory bounds.

The database is the oracle for values (a session of an engine no cache saw); the process
(``len()`` of the cache's internal structures) and Redis are the oracles for resources.
Each probe pushes one bound far past its limit (the local tier's entries and the counters
it mirrors, ``max_entry_bytes``, the read path's memo dicts, many tenants) and checks the
structure stays within it while every value read is the database's.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.reads import queries
from tests.integration.test_local_tier import WAIT, tier_of

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def many_products(shop_engine: sa.Engine) -> Iterator[list[int]]:
    """1500 products of the test's own (category 1, each its own price), deleted afterwards."""
    rows = [
        {
            "category_id": 1,
            "name": f"limits-{i}",
            "price": Decimal(i) / 100,
            "status": "ACTIVE",
            "attributes": {},
        }
        for i in range(1500)
    ]
    with shop_engine.begin() as connection:
        ids = list(connection.scalars(sa.insert(Product).returning(Product.id), rows))
    yield ids
    with shop_engine.begin() as connection:
        connection.execute(sa.delete(Product).where(Product.id.in_(ids)))


def _oracle_prices(shop_engine: sa.Engine, ids: list[int]) -> dict[int, Decimal]:
    with Session(shop_engine) as s:
        rows = s.execute(select(Product.id, Product.price).where(Product.id.in_(ids)))
        return {int(row[0]): row[1] for row in rows}


# -- the local tier's bound ----------------------------------------------------------------


def test_the_local_tier_forgets_the_counters_of_the_entries_it_evicts(
    database_url: str,
    redis_url: str,
    namespace: str,
    shop_engine: sa.Engine,
    many_products: list[int],
) -> None:
    """Each entity entry is valid under its row's write counter, which the store mirrors.
    Filling a 50-entry tier with 600 rows' entries evicts 550 of them: the mirror must
    not keep the 550 counters no entry names any more (it grew by one per row ever held,
    without bound, in a long-lived process reading many rows)."""
    engine = sa.create_engine(database_url)
    cache = Cache(redis_url, namespace=namespace, local=True, local_max_entries=50)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = tier_of(cache)
        assert tier.wait_ready(WAIT)
        oracle = _oracle_prices(shop_engine, many_products)
        rows = many_products[:600]
        for _ in range(2):  # a fill, then a Redis hit the tier keeps
            for pid in rows:
                with factory() as s:
                    found = s.get(Product, pid)
                    assert found is not None
                    assert found.price == oracle[pid]
        store = tier.store
        assert len(store) <= 50
        assert store.evictions >= 500
        # the counters of the entries held (3 per entity entry at most), no more
        assert len(store._mirror) <= 3 * 50
        # and the entries it still holds are served, right
        for pid in rows[-10:]:
            with factory() as s:
                found = s.get(Product, pid)
                assert found is not None
                assert found.price == oracle[pid]
    finally:
        cache.detach()
        engine.dispose()


def test_the_local_tier_holds_large_entries_within_its_bytes_and_serves_them_right(
    database_url: str,
    redis_url: str,
    namespace: str,
    shop_engine: sa.Engine,
    many_products: list[int],
) -> None:
    """Query entries of 100 to 1500 products each, in a tier of 400 kB: the tier stays
    within its bytes (evicting), refuses none it can hold, and every read, from the
    tier, Redis or the database, is the database's."""
    engine = sa.create_engine(database_url)
    # entries of hundreds of kB on a loaded machine: a lapsed lease or a Redis call past
    # the URL's 0.25 s timeout would empty the tier or keep nothing, and it would count
    # no eviction
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    cache = Cache(
        client, namespace=namespace, local=True, local_max_bytes=400_000, local_lease=30.0
    )
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        tier = tier_of(cache)
        assert tier.wait_ready(WAIT)
        oracle = _oracle_prices(shop_engine, many_products)
        for n in (100, 1500, 300, 1000, 100, 700, 1500, 200):
            stmt = select(Product).where(Product.id.in_(many_products[:n])).order_by(Product.id)
            for _ in range(3):
                with factory() as s:
                    got = {p.id: p.price for p in s.scalars(stmt.options(FromCache()))}
                assert got == {pid: oracle[pid] for pid in many_products[:n]}
                assert tier.store.bytes <= 400_000
        local = cache.stats()["local"]
        assert local["evictions"] >= 1
        assert cache.stats()["total"]["local_hits"] >= 1
    finally:
        cache.detach()
        engine.dispose()
        client.close()


# -- max_entry_bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("signing_key", [None, b"k" * 32], ids=["unsigned", "signed"])
def test_an_entry_just_under_max_entry_bytes_is_stored_and_one_just_over_is_not(
    shop_engine: sa.Engine,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    many_products: list[int],
    signing_key: bytes | None,
) -> None:
    """The bound is on what Redis holds (signature included): an entry just under
    ``max_entry_bytes`` is written and read back (not refused by the read cap as
    oversized); one just over it is not stored, counted, and the result is still the
    database's."""
    stmt = select(Product).where(Product.id.in_(many_products[:200])).order_by(Product.id)
    expected = _oracle_prices(shop_engine, many_products[:200])

    def run(limit: int, namespace: str) -> tuple[dict[str, Any], int]:
        cache = Cache(
            redis_url, namespace=namespace, max_entry_bytes=limit, signing_key=signing_key
        )
        factory = sessionmaker(shop_engine)
        cache.attach(factory)
        try:
            for _ in range(2):
                with factory() as s:
                    got = {p.id: p.price for p in s.scalars(stmt.options(FromCache()))}
                assert got == expected
            stored = [
                len(redis_client.get(key) or b"")
                for key in redis_client.scan_iter(f"sarc:{namespace}:*:q:*")
                if not key.endswith(b":inv")
            ]
            return cache.stats()["total"], max(stored, default=0)
        finally:
            cache.detach()
            for key in redis_client.scan_iter(f"sarc:{namespace}:*"):
                redis_client.delete(key)

    # the entry's size moves by a few bytes between fills (the read time it records)
    totals, size = run(1 << 20, namespace)
    assert (totals["fills"], totals["hits"]) == (1, 1)
    assert size > 0
    totals, stored = run(size + 8, namespace + "x")
    assert (totals["fills"], totals["hits"], totals["oversize"], totals["decode_errors"]) == (
        1,
        1,
        0,
        0,
    )
    assert size - 8 <= stored <= size + 8
    totals, stored = run(size - 16, namespace + "y")
    assert (totals["fills"], totals["hits"], totals["oversize"]) == (0, 0, 2)
    assert stored == 0


# -- the read path's memo dicts ----------------------------------------------------------------


def test_the_read_paths_memos_stay_within_their_bounds(
    monkeypatch: pytest.MonkeyPatch,
    shop_engine: sa.Engine,
    cache: Cache,
    many_products: list[int],
) -> None:
    """Plans, keys made, entries last found and databases seen are each bounded (lowered
    here so that a few hundred reads pass them many times over): distinct values, shapes
    and tenants far past the bounds leave each within it, and every value read is the
    database's."""
    monkeypatch.setattr(queries, "_PLAN_CACHE_SIZE", 20)
    monkeypatch.setattr(queries, "KEYS_REMEMBERED", 50)
    monkeypatch.setattr(queries, "HITS_REMEMBERED", 50)
    monkeypatch.setattr(queries, "_SEEN_BINDS", 5)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        reads = cache._reads.queries
        oracle = _oracle_prices(shop_engine, many_products)
        largest = {"plans": 0, "keys": 0, "hits": 0, "seen": 0}

        def measure() -> None:
            for name, size in (
                ("plans", len(reads._plans)),
                ("keys", len(reads._keys_made._keys)),
                ("hits", len(reads._hits_last)),
                ("seen", len(reads._seen)),
            ):
                largest[name] = max(largest[name], size)

        with factory() as s:
            for pid in many_products[:200]:  # distinct values: one shape
                stmt = select(Product.price).where(Product.id == pid).options(FromCache())
                for _ in range(2):
                    assert s.execute(stmt).scalar_one() == oracle[pid]
                measure()
            for i in range(60):  # distinct shapes
                pid = many_products[i]
                label = Product.price.label(f"price_{i}")
                stmt = select(label).where(Product.id == pid).options(FromCache())
                assert s.execute(stmt).scalar_one() == oracle[pid]
                measure()
            for tenant in range(30):  # distinct tenants
                pid = many_products[tenant]
                stmt = select(Product.price).where(Product.id == pid).options(FromCache())
                translate = {"schema_translate_map": {f"t_{tenant}": f"t_{tenant}"}}
                assert s.execute(stmt, execution_options=translate).scalar_one() == oracle[pid]
                measure()
        assert largest == {"plans": 20, "keys": 50, "hits": 50, "seen": 5}
    finally:
        cache.detach()


@pytest.mark.parametrize(
    "options",
    [
        {"yield_per": 100},
        {"stream_results": True},
        {"stream_results": True, "max_row_buffer": 10},
        {"populate_existing": True},
    ],
    ids=["yield_per", "stream_results", "max_row_buffer", "populate_existing"],
)
def test_streamed_and_refreshing_reads_of_a_large_result_bypass_the_cache(
    shop_engine: sa.Engine,
    cache: Cache,
    many_products: list[int],
    options: dict[str, Any],
) -> None:
    """1500 rows read with an option that asks for streamed or fresh rows: the database
    answers (``bypassed``), nothing is stored, and the rows are the database's."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        oracle = _oracle_prices(shop_engine, many_products)
        stmt = (
            select(Product)
            .where(Product.id.in_(many_products))
            .options(FromCache())
            .execution_options(**options)
        )
        with factory() as s:
            got = {p.id: p.price for p in s.scalars(stmt)}
        assert got == oracle
        totals = cache.stats()["total"]
        assert (totals["bypassed"], totals["fills"], totals["misses"]) == (1, 0, 0)
    finally:
        cache.detach()


# -- many tenants --------------------------------------------------------------------------


def test_invalidate_query_retires_a_tenant_this_process_no_longer_remembers(
    shop_engine: sa.Engine, database_url: str, cache: Cache, product: int
) -> None:
    """``invalidate_query(stmt)`` without ``bind`` keys the statement for every (database,
    ``schema_translate_map``) this process served, as an entry's key holds both. Those
    pairs are remembered up to a bound (256): past it, the first tenant's entry was left
    in place, and its next read served the value the unseen write had replaced."""
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        stmt = select(Product.price).where(Product.id == product).options(FromCache())

        def read(tenant: int) -> Decimal:
            # a map naming a schema the shop does not use: the same rows, keyed apart
            options = {"schema_translate_map": {f"tenant_{tenant}": f"tenant_{tenant}"}}
            with factory() as s:
                price: Decimal = s.execute(stmt, execution_options=options).scalar_one()
                return price

        assert read(0) == Decimal("1.00")
        assert read(0) == Decimal("1.00")  # a hit
        for tenant in range(1, 300):
            read(tenant)
        unseen = sa.create_engine(database_url)  # a write the cache does not see
        with unseen.begin() as connection:
            connection.execute(
                sa.update(Product).where(Product.id == product).values(price=Decimal("2.00"))
            )
        unseen.dispose()
        cache.invalidate_query(stmt)
        assert _oracle_prices(shop_engine, [product]) == {product: Decimal("2.00")}
        assert read(0) == Decimal("2.00")
        assert read(299) == Decimal("2.00")
    finally:
        cache.detach()
