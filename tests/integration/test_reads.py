"""Cache-aside reads: FromCache and the entity cache give what the database gives, no SQL."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker, subqueryload

from examples.shop import Category, Customer, Order, OrderLine, Product, ProductStatus
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    import redis

    from tests.support import SQLCounter


def snapshot(obj: Any) -> dict[str, Any]:
    """Column values of a mapped object, with their types, for exact comparisons."""
    mapper = sa.inspect(obj).mapper
    return {a.key: (getattr(obj, a.key), type(getattr(obj, a.key))) for a in mapper.column_attrs}


def run_twice(
    factory: sessionmaker[Session], sql: SQLCounter, stmt: Any, consume: Any
) -> tuple[Any, Any, int]:
    """Run ``stmt`` in two fresh sessions; return both results and the SQL count of the second."""
    with factory() as s:
        first = consume(s, stmt)
    sql.reset()
    with factory() as s:
        second = consume(s, stmt)
        return first, second, sql.count


def test_entity_rows_hit_without_sql(
    session_factory: sessionmaker[Session], sql: SQLCounter, cache: Cache
) -> None:
    stmt = select(Product).where(Product.category_id == 2).order_by(Product.id)

    def consume(s: Session, st: Any) -> list[dict[str, Any]]:
        return [snapshot(p) for p in s.scalars(st.options(FromCache())).all()]

    with session_factory() as s:
        expected = [snapshot(p) for p in s.scalars(stmt).all()]
    first, second, count = run_twice(session_factory, sql, stmt, consume)
    assert count == 0
    assert expected == first == second
    assert isinstance(second[0]["price"][0], Decimal)
    assert cache.stats()["regions"]["default"]["hits"] == 1


@pytest.mark.parametrize("loader", [selectinload, subqueryload])
def test_eager_graph_cached_with_parent(
    session_factory: sessionmaker[Session], sql: SQLCounter, loader: Any
) -> None:
    stmt = select(Category).options(loader(Category.products), FromCache()).order_by(Category.id)
    with session_factory() as s:
        expected = {c.id: sorted(p.id for p in c.products) for c in s.scalars(stmt)}
    sql.reset()
    with session_factory() as s:
        got = {c.id: sorted(p.id for p in c.products) for c in s.scalars(stmt)}
        assert sql.count == 0
    assert got == expected


def test_joinedload_collection_with_unique(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    stmt = (
        select(Order)
        .options(joinedload(Order.lines).joinedload(OrderLine.product), FromCache())
        .where(Order.id <= 5)
        .order_by(Order.id)
    )

    def consume(s: Session, st: Any) -> list[Any]:
        return [
            (o.id, o.status, [(ln.id, ln.unit_price, ln.product.name) for ln in o.lines])
            for o in s.scalars(st).unique()
        ]

    first, second, count = run_twice(session_factory, sql, stmt, consume)
    assert count == 0
    assert first == second
    assert len(first) == 5


def test_mixed_entity_and_column_rows(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    stmt = (
        select(Product, Category.name, Product.price * 2)
        .join(Product.category)
        .where(Product.id < 10)
        .order_by(Product.id)
        .options(FromCache())
    )

    def consume(s: Session, st: Any) -> list[Any]:
        return [(p.id, name, doubled, type(doubled)) for p, name, doubled in s.execute(st)]

    first, second, count = run_twice(session_factory, sql, stmt, consume)
    assert count == 0
    assert first == second


def test_scalar_and_aggregate(session_factory: sessionmaker[Session], sql: SQLCounter) -> None:
    stmt = (
        select(
            Category.name,
            func.count(Product.id),
            func.sum(Product.price),
            func.max(Order.placed_at),
        )
        .join(Category.products)
        .join(OrderLine, OrderLine.product_id == Product.id)
        .join(Order)
        .group_by(Category.name)
        .order_by(Category.name)
        .options(FromCache())
    )

    def consume(s: Session, st: Any) -> list[Any]:
        return [tuple((v, type(v)) for v in row) for row in s.execute(st)]

    first, second, count = run_twice(session_factory, sql, stmt, consume)
    assert count == 0
    assert first == second
    assert first[0][3][1] is dt.datetime


def test_loader_options_are_part_of_the_key(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    """DESIGN §7: select(X) and select(X).options(selectinload(...)) must not share an entry."""
    plain = select(Category).options(FromCache()).order_by(Category.id)
    eager = (
        select(Category).options(selectinload(Category.products), FromCache()).order_by(Category.id)
    )
    with session_factory() as s:
        s.scalars(plain).all()
    with session_factory() as s:
        s.scalars(eager).all()
    sql.reset()
    with session_factory() as s:
        categories = s.scalars(eager).all()
        assert all("products" in sa.inspect(c).dict for c in categories)
        sum(len(c.products) for c in categories)
        assert sql.count == 0


def test_execute_time_parameters_are_part_of_the_key(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    """DESIGN §7: a key blind to execute-time parameters made every execution share one entry."""
    stmt = select(Product.id).where(Product.category_id == bindparam("cat")).options(FromCache())
    with session_factory() as s:
        one = s.scalars(stmt, {"cat": 1}).all()
        two = s.scalars(stmt, {"cat": 2}).all()
    with session_factory() as s:
        assert s.scalars(stmt, {"cat": 1}).all() == one
        assert s.scalars(stmt, {"cat": 2}).all() == two
    assert one != two


def test_empty_results_are_cached(session_factory: sessionmaker[Session], sql: SQLCounter) -> None:
    """DESIGN §7: `if not cached_value` never cached empty results."""
    stmt = select(Product).where(Product.name == "no such product").options(FromCache())
    _, second, count = run_twice(session_factory, sql, stmt, lambda s, st: s.scalars(st).all())
    assert second == []
    assert count == 0


def test_hit_never_overwrites_unflushed_change(session_factory: sessionmaker[Session]) -> None:
    """DESIGN §7: merging a cached result overwrote an unflushed change in the session."""
    stmt = select(Product).where(Product.id == 3).options(FromCache())
    with session_factory() as s:
        s.scalars(stmt).one()
    with session_factory() as s, s.no_autoflush:
        product = s.get(Product, 3)
        assert product is not None
        product.name = "changed, not flushed"
        again = s.scalars(stmt).one()
        assert again is product
        assert product.name == "changed, not flushed"
        assert product in s.dirty
        s.rollback()


def test_populate_existing_reads_the_database(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    stmt = select(Product).where(Product.id == 4).options(FromCache())
    with session_factory() as s:
        s.scalars(stmt).one()
    sql.reset()
    with session_factory() as s:
        s.scalars(stmt.execution_options(populate_existing=True)).one()
        assert sql.count == 1


def test_every_entry_has_a_ttl(
    session_factory: sessionmaker[Session], redis_client: redis.Redis, namespace: str
) -> None:
    """DESIGN §7: the Redis keys had no TTL by default."""
    with session_factory() as s:
        s.scalars(select(Product).options(FromCache())).all()
        s.get(Product, 1)
    entries = [
        k for k in redis_client.scan_iter(match=f"sarc:{namespace}:*") if b":q:" in k or b":e:" in k
    ]
    assert len(entries) >= 2
    for key in entries:
        assert 0 < redis_client.pttl(key) <= 600_000  # Product.__cache__ ttl=600


def test_session_get_reads_the_entity_cache(
    session_factory: sessionmaker[Session], sql: SQLCounter, cache: Cache
) -> None:
    with session_factory() as s:
        expected = snapshot(s.get(Product, 5))
    sql.reset()
    with session_factory() as s:
        got = s.get(Product, 5)
        assert sql.count == 0
        assert snapshot(got) == expected
    assert cache.stats()["models"]["Product"]["hits"] == 1


def test_entity_cache_uuid_key_and_absent_rows(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    with session_factory() as s:
        customer_id = s.scalars(select(Customer.id).limit(1)).one()
        s.get(Customer, customer_id)
        assert s.get(Customer, uuid.uuid4()) is None
    sql.reset()
    with session_factory() as s:
        customer = s.get(Customer, customer_id)
        assert customer is not None
        assert isinstance(customer.id, uuid.UUID)
        assert sql.count == 0


def test_many_to_one_lazy_load_reads_the_entity_cache(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    with session_factory() as s:
        product = s.get(Product, 6)
        assert product is not None
        category_id = product.category_id
        s.get(Category, category_id)
    sql.reset()
    with session_factory() as s:
        product = s.get(Product, 6)
        assert product is not None
        assert product.category.id == category_id
        assert sql.count == 0


def test_commit_invalidates_cached_queries_and_entities(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    stmt = select(Product).where(Product.id == 7).options(FromCache())
    with session_factory() as s:
        original = s.scalars(stmt).one().name
        s.get(Product, 7)
    with session_factory() as s:
        product = s.get(Product, 7)
        assert product is not None
        product.name = "renamed"
        s.commit()
    try:
        with session_factory() as s:
            assert s.scalars(stmt).one().name == "renamed"
            s.expunge_all()
            got = s.get(Product, 7)
            assert got is not None
            assert got.name == "renamed"
    finally:
        with session_factory() as s:
            product = s.get(Product, 7)
            assert product is not None
            product.name = original
            s.commit()


def test_status_enum_round_trip(session_factory: sessionmaker[Session], sql: SQLCounter) -> None:
    stmt = select(Product.status).where(Product.id == 8).options(FromCache())
    first, second, count = run_twice(session_factory, sql, stmt, lambda s, st: s.scalar(st))
    assert count == 0
    assert isinstance(second, ProductStatus)
    assert first is second


def test_statement_derived_after_its_base_ran_shares_the_entry(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> None:
    """Running a select replaces its compile options in place; the key must not change."""
    base = select(Product).where(Product.id == 13)
    with session_factory() as s:
        s.scalars(base.options(FromCache())).one()
    with session_factory() as s:
        s.scalars(base).one()  # the base statement is compiled in a session
    sql.reset()
    with session_factory() as s:
        s.scalars(base.options(FromCache())).one()
        assert sql.count == 0


def test_detach_removes_every_listener(
    shop_engine: sa.Engine, redis_url: str, namespace: str, sql: SQLCounter
) -> None:
    factory = sessionmaker(shop_engine)
    cache = Cache(redis_url, namespace=namespace)
    before = len(shop_engine.dispatch.after_cursor_execute)
    cache.attach(factory)
    assert len(shop_engine.dispatch.after_cursor_execute) == before + 1
    stmt = select(Product).where(Product.id == 2).options(FromCache())
    with factory() as s:
        s.scalars(stmt).one()
    cache.detach()
    assert len(shop_engine.dispatch.after_cursor_execute) == before
    sql.reset()
    with factory() as s:
        s.scalars(stmt).one()
    assert sql.count == 1  # no longer served from the cache


def test_version_counters_expire_too(
    session_factory: sessionmaker[Session], redis_client: redis.Redis, namespace: str
) -> None:
    """Counters outlive entries but are not immortal: an abandoned namespace empties itself."""
    with session_factory() as s:
        s.scalars(select(Product).where(Product.id == 3).options(FromCache())).one()
        s.get(Product, 3)
        product = s.get(Product, 3)
        assert product is not None
        product.name = product.name  # no net change: nothing is flushed
    with session_factory() as s:
        s.execute(sa.update(Product).where(Product.id == -1).values(name="x"))
        s.commit()
    counters = [
        k for k in redis_client.scan_iter(match=f"sarc:{namespace}:*") if k.endswith((b":v", b":g"))
    ]
    assert counters
    for key in counters:
        assert redis_client.pttl(key) > 0, key


def test_a_lost_counter_never_restarts_at_one(
    session_factory: sessionmaker[Session], redis_client: redis.Redis, namespace: str
) -> None:
    """A counter recreated at 1 could climb back to a value an old entry was stored under."""
    version_key = f"sarc:{namespace}:{{{namespace}:categories}}:v"
    with session_factory() as s:
        category = s.get(Category, 1)
        assert category is not None
        original = category.name
    for name in ("renamed once", original):
        redis_client.delete(version_key)
        with session_factory() as s:
            category = s.get(Category, 1)
            assert category is not None
            category.name = name
            s.commit()
        assert int(redis_client.get(version_key) or 0) > 2**32


def test_results_over_the_size_cap_are_not_cached_and_are_counted(
    shop_engine: sa.Engine, redis_url: str, namespace: str, sql: SQLCounter
) -> None:
    cache = Cache(redis_url, namespace=namespace, max_entry_bytes=2_000)
    factory = sessionmaker(shop_engine)
    cache.attach(factory)
    try:
        big = select(Product).order_by(Product.id).limit(50).options(FromCache())
        small = select(Product).where(Product.id == 1).options(FromCache())
        for _ in range(2):
            with factory() as s:
                s.scalars(big).all()
                s.scalars(small).all()
        sql.reset()
        with factory() as s:
            assert len(s.scalars(big).all()) == 50
            s.scalars(small).all()
        assert sql.count == 1  # the big result is read from the database every time
        region = cache.stats()["regions"]["default"]
        assert region["oversize"] == 3
        assert region["hits"] == 2
    finally:
        cache.detach()
