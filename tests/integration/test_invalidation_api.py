"""Explicit invalidation: ``invalidate``, ``invalidate_model`` and ``invalidate_query``.

Each removes exactly what the matching reads stored: the next matching read emits SQL,
and every other entry stays a hit (zero SQL).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis as redis_lib
import sqlalchemy as sa
from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import CITEXT
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    selectinload,
    sessionmaker,
)

from examples.shop import Category, Customer, Order, Product
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import redis

    from tests.support import SQLCounter


def get(model: type, *pk: Any) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        obj = s.get(model, pk if len(pk) > 1 else pk[0])
        return None if obj is None else sa.inspect(obj).identity

    return read


def query(stmt: Any, params: dict[str, Any] | None = None) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        return [tuple(row) for row in s.execute(stmt.options(FromCache()), params).all()]

    # never str(stmt) here: compiling an ORM select replaces its _compile_options, which
    # changes the cache key of the statements later derived from it
    return read


def sql_of(
    factory: sessionmaker[Session], sql: SQLCounter, reads: dict[str, Callable[[Session], Any]]
) -> dict[str, int]:
    """Run each read in a fresh session; the number of statements each sent to Postgres."""
    out = {}
    for name, read in reads.items():
        sql.reset()
        with factory() as s:
            read(s)
        out[name] = sql.count
    return out


@pytest.fixture
def warm(
    session_factory: sessionmaker[Session], sql: SQLCounter
) -> Callable[[dict[str, Callable[[Session], Any]]], None]:
    """Fill the cache with ``reads`` and check they are all hits before the test acts."""

    def fill(reads: dict[str, Callable[[Session], Any]]) -> None:
        sql_of(session_factory, sql, reads)
        assert sql_of(session_factory, sql, reads) == dict.fromkeys(reads, 0)

    return fill


PRODUCTS = cast("sa.Table", Product.__table__)
PRODUCTS_LOW = select(Product.id, Product.name).where(Product.id < 6).order_by(Product.id)
PRODUCTS_HIGH = select(Product).where(Product.id.between(40, 45)).order_by(Product.id)
CATEGORIES = select(Category).order_by(Category.id)
CATEGORIES_WITH_PRODUCTS = (
    select(Category).options(selectinload(Category.products)).order_by(Category.id)
)
PRODUCT_JOIN = (
    select(Product.id, Category.name)
    .join(Product.category)
    .where(Product.id < 4)
    .order_by(Product.id)
)
ORDERS = select(Order.id).where(Order.id < 4).order_by(Order.id)
BY_CATEGORY = select(Product.id).where(Product.category_id == bindparam("cat")).order_by(Product.id)


def test_invalidate_one_entity(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    reads = {
        "p11": get(Product, 11),
        "p12": get(Product, 12),
        "c1": get(Category, 1),
        "products_high": query(PRODUCTS_HIGH),
    }
    warm(reads)
    cache.invalidate(Product, 11)
    assert sql_of(session_factory, sql, reads) == {
        "p11": 1,
        "p12": 0,
        "c1": 0,
        # the row may be in any cached query on its table: those are retired too
        "products_high": 1,
    }
    # refilled: a hit again
    assert sql_of(session_factory, sql, {"p11": reads["p11"]}) == {"p11": 0}
    assert cache.stats()["models"]["Product"]["invalidations"] == 1


def test_invalidate_entity_with_uuid_key(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    with session_factory() as s:
        first, second = s.scalars(select(Customer.id).order_by(Customer.id).limit(2)).all()
    reads = {"first": get(Customer, first), "second": get(Customer, second)}
    warm(reads)
    cache.invalidate(Customer, first)
    assert sql_of(session_factory, sql, reads) == {"first": 1, "second": 0}


def test_invalidate_entity_removes_the_real_key(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    with session_factory() as s:
        s.get(Product, 11)
        s.get(Product, 12)

    def entity_keys() -> set[bytes]:
        return set(redis_client.scan_iter(match=f"sarc:{namespace}:*:e:*"))

    before = entity_keys()
    assert len(before) == 2
    cache.invalidate(Product, 11)
    after = entity_keys()
    assert len(after) == 1
    assert next(iter(before - after)).endswith(b":11")


def test_invalidate_model(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    reads = {
        "p11": get(Product, 11),
        "p12": get(Product, 12),
        "products_low": query(PRODUCTS_LOW),
        "products_high": query(PRODUCTS_HIGH),
        "join": query(PRODUCT_JOIN),
        "categories_with_products": query(CATEGORIES_WITH_PRODUCTS),
        "by_category_1": query(BY_CATEGORY, {"cat": 1}),
        "c1": get(Category, 1),
        "categories": query(CATEGORIES),
        "orders": query(ORDERS),
    }
    warm(reads)
    cache.invalidate_model(Product)
    counts = sql_of(session_factory, sql, reads)
    missed = {name for name, count in counts.items() if count}
    assert missed == {
        "p11",
        "p12",
        "products_low",
        "products_high",
        "join",
        "categories_with_products",
        "by_category_1",
    }
    assert counts["categories_with_products"] == 2  # the query and its selectin load
    assert sql_of(session_factory, sql, reads) == dict.fromkeys(reads, 0)


def test_invalidate_model_leaves_other_models(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    reads = {
        "p11": get(Product, 11),
        "products_low": query(PRODUCTS_LOW),
        "c1": get(Category, 1),
        "c2": get(Category, 2),
        "categories": query(CATEGORIES),
        "join": query(PRODUCT_JOIN),
    }
    warm(reads)
    cache.invalidate_model(Category)
    counts = sql_of(session_factory, sql, reads)
    assert {name for name, count in counts.items() if count} == {"c1", "c2", "categories", "join"}


def test_invalidate_model_without_a_policy(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    """Order has no CachePolicy; FromCache queries on it are still invalidated."""
    reads = {"orders": query(ORDERS), "products_low": query(PRODUCTS_LOW)}
    warm(reads)
    cache.invalidate_model(Order)
    assert sql_of(session_factory, sql, reads) == {"orders": 1, "products_low": 0}


def test_invalidate_query(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    reads = {
        "products_low": query(PRODUCTS_LOW),
        "products_high": query(PRODUCTS_HIGH),
        "categories_with_products": query(CATEGORIES_WITH_PRODUCTS),
        "categories": query(CATEGORIES),
        "p11": get(Product, 11),
    }
    warm(reads)
    assert cache.invalidate_query(PRODUCTS_LOW.options(FromCache())) == 1
    assert sql_of(session_factory, sql, reads) == {
        "products_low": 1,
        "products_high": 0,
        "categories_with_products": 0,
        "categories": 0,
        "p11": 0,
    }
    # loader options are part of the key: only the eager variant goes
    assert cache.invalidate_query(CATEGORIES_WITH_PRODUCTS.options(FromCache())) == 1
    counts = sql_of(session_factory, sql, reads)
    assert counts["categories_with_products"] == 2
    assert counts["categories"] == 0
    assert counts["products_low"] == 0  # the read after the invalidation filled again
    # nothing left to remove: the entry was refilled, then removed; removing twice is 0
    assert cache.invalidate_query(CATEGORIES.options(FromCache())) == 1
    assert cache.invalidate_query(CATEGORIES.options(FromCache())) == 0


def test_invalidate_query_with_params(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    reads = {
        "cat1": query(BY_CATEGORY, {"cat": 1}),
        "cat2": query(BY_CATEGORY, {"cat": 2}),
    }
    warm(reads)
    assert cache.invalidate_query(BY_CATEGORY.options(FromCache()), {"cat": 1}) == 1
    assert sql_of(session_factory, sql, reads) == {"cat1": 1, "cat2": 0}


def test_invalidate_query_literal_values_are_part_of_the_key(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    def below(n: int) -> Any:
        return select(Product.id).where(Product.id < n).order_by(Product.id)

    reads = {"below5": query(below(5)), "below6": query(below(6))}
    warm(reads)
    assert cache.invalidate_query(below(5).options(FromCache())) == 1
    assert sql_of(session_factory, sql, reads) == {"below5": 1, "below6": 0}


def test_invalidate_query_ignores_the_fromcache_arguments(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    cache: Cache,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    """The entry is the statement's; the ttl/region of FromCache, or its absence, do not matter."""
    reads = {"products_low": query(PRODUCTS_LOW)}
    warm(reads)
    assert cache.invalidate_query(PRODUCTS_LOW.options(FromCache(ttl=5, region="other"))) == 1
    warm(reads)
    assert cache.invalidate_query(PRODUCTS_LOW) == 1
    assert sql_of(session_factory, sql, reads) == {"products_low": 1}


def test_invalidate_query_from_another_process(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    redis_url: str,
    namespace: str,
    warm: Callable[[dict[str, Callable[[Session], Any]]], None],
) -> None:
    """A process that never ran the query (an admin script) can still invalidate it."""
    reads = {"products_low": query(PRODUCTS_LOW), "products_high": query(PRODUCTS_HIGH)}
    warm(reads)
    client = redis_lib.Redis.from_url(redis_url)
    other = Cache(client, namespace=namespace)
    try:
        other.attach(sessionmaker(shop_engine))  # knows the engine from its session factory
        assert other.invalidate_query(PRODUCTS_LOW) == 1
        bare = Cache(client, namespace=namespace)
        warm(reads)
        with pytest.raises(ValueError, match="bind="):
            bare.invalidate_query(PRODUCTS_LOW)  # no engine known: say so, never a silent 0
        assert bare.invalidate_query(PRODUCTS_LOW, bind=shop_engine) == 1
    finally:
        other.detach()  # its engine listeners would otherwise outlive the test
        client.close()
    assert sql_of(session_factory, sql, reads) == {"products_low": 1, "products_high": 0}


def test_invalidate_query_of_an_uncacheable_statement_is_zero(cache: Cache) -> None:
    assert cache.invalidate_query(sa.text("SELECT 1")) == 0


@pytest.mark.parametrize("pk", [(), (1, 2), (1, 2, 3)])
def test_invalidate_with_the_wrong_number_of_pk_values(cache: Cache, pk: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"Product has a primary key of 1 column") as info:
        cache.invalidate(Product, *pk)
    assert f"got {len(pk)} value" in str(info.value)
    assert not isinstance(info.value, ConfigurationError)


@pytest.mark.parametrize(
    ("model", "pk"),
    [
        (Product, "eleven"),
        (Product, 11.5),
        (Product, None),
        (Customer, "not-a-uuid"),
        (Customer, 1),
    ],
)
def test_invalidate_with_a_pk_of_the_wrong_type(cache: Cache, model: type, pk: Any) -> None:
    """A pk that cannot be read as its column's type names no row: refused, never ignored."""
    with pytest.raises(ValueError, match=rf"{model.__name__}\.id") as info:
        cache.invalidate(model, pk)
    assert type(pk).__name__ in str(info.value)


@pytest.mark.parametrize("text", ["11", 11.0])
def test_invalidate_reads_the_pk_as_its_column_type(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter, text: Any
) -> None:
    """``"11"`` for an integer key is the row 11, as ``session.get`` reads it (issue 16)."""
    with session_factory() as s:
        assert s.get(Product, 11) is not None
    cache.invalidate(Product, text)
    with session_factory() as s:
        sql.reset()
        assert s.get(Product, 11) is not None
        assert sql.count == 1


class NotMapped:
    pass


@pytest.mark.parametrize("target", [NotMapped, int, "Product"])
@pytest.mark.parametrize("method", ["invalidate", "invalidate_model"])
def test_invalidate_unmapped_class(cache: Cache, target: Any, method: str) -> None:
    args = (target, 1) if method == "invalidate" else (target,)
    with pytest.raises(ConfigurationError, match="not a mapped class") as info:
        getattr(cache, method)(*args)
    assert repr(target) in str(info.value)


def test_invalidate_abstract_base(cache: Cache) -> None:
    class Base(DeclarativeBase):
        pass

    try:
        with pytest.raises(ConfigurationError, match="not a mapped class"):
            cache.invalidate_model(Base)
    finally:
        Base.registry.dispose()


@contextmanager
def external_rename(
    shop_engine: sa.Engine, product_id: int
) -> Iterator[tuple[Callable[[], None], str]]:
    """A function that renames the product to "external" through an engine the cache is
    not attached to, as another application would, and the product's name before it; the
    old name is put back after."""
    external = sa.create_engine(shop_engine.url, poolclass=sa.NullPool)
    where = Product.id == product_id
    with Session(external) as s:
        original = s.scalars(select(Product.name).where(where)).one()

    def rename() -> None:
        with external.begin() as conn:
            conn.execute(sa.update(PRODUCTS).where(where).values(name="external"))

    try:
        yield rename, original
    finally:
        with external.begin() as conn:
            conn.execute(sa.update(PRODUCTS).where(where).values(name=original))
        external.dispose()


RACE_STMT = select(Product.name).where(Product.id == 13)


def _get_name(s: Session) -> str:
    product = s.get(Product, 13)
    assert product is not None
    return product.name


def _query_name(s: Session) -> str:
    return s.scalars(RACE_STMT.options(FromCache())).one()


RACES: dict[str, tuple[Callable[[Cache], Any], Callable[[Session], str]]] = {
    "invalidate": (lambda c: c.invalidate(Product, 13), _get_name),
    "invalidate_model_get": (lambda c: c.invalidate_model(Product), _get_name),
    "invalidate_model_query": (lambda c: c.invalidate_model(Product), _query_name),
    "invalidate_query": (lambda c: c.invalidate_query(RACE_STMT), _query_name),
}


@pytest.mark.parametrize(
    "race",
    [
        "invalidate",
        "invalidate_model_get",
        "invalidate_model_query",
        "invalidate_query",
    ],
)
def test_invalidation_refuses_a_fill_that_read_before_it(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    race: str,
) -> None:
    """Deterministic interleaving: an external write and the invalidation land between a
    miss's database read and its fill."""
    invalidate, read = RACES[race]
    with external_rename(shop_engine, 13) as (rename, original):
        fired = False

        def write_then_invalidate(*args: Any) -> None:
            nonlocal fired
            if fired:
                return
            fired = True
            rename()
            invalidate(cache)

        sa.event.listen(shop_engine, "after_cursor_execute", write_then_invalidate)
        try:
            with session_factory() as s:
                assert read(s) == original  # read before the write
            assert fired
        finally:
            sa.event.remove(shop_engine, "after_cursor_execute", write_then_invalidate)
        try:
            with session_factory() as s:
                assert read(s) == "external"
        finally:
            cache.invalidate_model(Product)


# invalidate_query() against fills whose read began before it: each interleaving once
# ended with an older value served (a marker stored in the entry's place was replaced by
# the first fill after the call; a REPEATABLE READ transaction filled its older snapshot)

RACE_14 = select(Product.name).where(Product.id == 14)


def _name_14(s: Session, option: FromCache | None = None) -> str:
    return s.scalars(RACE_14.options(option or FromCache())).one()


def test_a_fill_that_read_before_the_call_cannot_replace_a_later_fill(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, cache: Cache
) -> None:
    """A looks (no entry), reads the database; the external write and invalidate_query
    land; B looks (its lease wait is over), reads and fills; then A's fill must be refused,
    though the entry it finds is B's."""
    with external_rename(shop_engine, 14) as (rename, _):
        fired = False

        def between(*args: Any) -> None:
            nonlocal fired
            if fired:
                return
            fired = True
            rename()
            cache.invalidate_query(RACE_14)
            with session_factory() as b:  # a reader after the call: its wait timed out
                assert _name_14(b, FromCache(lease_wait=0)) == "external"

        sa.event.listen(shop_engine, "after_cursor_execute", between)
        try:
            with session_factory() as a:
                assert _name_14(a) != "external"  # A read before the write
        finally:
            sa.event.remove(shop_engine, "after_cursor_execute", between)
        assert fired
        with session_factory() as s:
            assert _name_14(s) == "external"  # A's older read did not replace B's entry


def test_a_repeatable_read_transaction_does_not_fill_its_older_snapshot(
    shop_engine: sa.Engine, cache: Cache
) -> None:
    """A REPEATABLE READ transaction whose snapshot predates the external write looks after
    invalidate_query: it reads its old snapshot, and must not store it."""
    with external_rename(shop_engine, 14) as (rename, _):
        rr_engine = sa.create_engine(shop_engine.url, isolation_level="REPEATABLE READ")
        factory = sessionmaker(rr_engine)
        cache.attach(factory)
        try:
            with factory() as s:
                _name_14(s)  # the version counters exist, so the transaction pins them
            with factory() as reader:
                reader.execute(select(sa.literal(1)))  # the snapshot is taken here
                rename()
                assert cache.invalidate_query(RACE_14, bind=rr_engine) == 1  # the warm entry
                assert _name_14(reader) != "external"  # its snapshot, correctly
            with factory() as s2:
                assert _name_14(s2) == "external"  # the old snapshot was not stored
        finally:
            cache.detach()
            rr_engine.dispose()


def test_invalidate_a_key_the_database_takes_in_several_forms(
    engine: sa.Engine, cache: Cache
) -> None:
    """``CHAR(5)`` pads ``'ab'`` to the ``'ab   '`` a load gives, and ``citext`` matches
    ``'BOB@X.ORG'`` to a stored ``'Bob@x.org'``: the entity entry is keyed by the loaded
    form, which ``invalidate()`` given the application's form cannot name. It retires the
    table's entries instead."""

    class Base(DeclarativeBase):
        pass

    class Padded(Base):
        __tablename__ = "inv_padded"
        __cache__ = CachePolicy()
        code: Mapped[str] = mapped_column(sa.CHAR(5), primary_key=True)
        label: Mapped[str] = mapped_column(sa.String(20))

    class Folded(Base):
        __tablename__ = "inv_folded"
        __cache__ = CachePolicy()
        email: Mapped[str] = mapped_column(CITEXT, primary_key=True)
        label: Mapped[str] = mapped_column(sa.String(20))

    with engine.begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS citext"))
        Base.metadata.drop_all(conn)
        Base.metadata.create_all(conn)
        conn.execute(sa.insert(Padded), [{"code": "ab", "label": "v1"}])
        conn.execute(sa.insert(Folded), [{"email": "Bob@x.org", "label": "v1"}])
    factory = sessionmaker(engine)
    cache.attach(factory)
    outside = sa.create_engine(engine.url)
    try:
        # the application's form of the key, and the one a load gives
        for model, asked, loaded in ((Padded, "ab", "ab   "), (Folded, "BOB@X.ORG", "Bob@x.org")):
            table = cast("sa.Table", model.__table__)
            for _ in range(2):  # filled, then served
                with factory() as s:
                    assert s.get(model, loaded).label == "v1"  # type: ignore[union-attr]
            with outside.begin() as conn:  # not attached: another program's write
                conn.execute(sa.update(table).values(label="raw"))
            cache.invalidate(model, asked)
            for key in (asked, loaded):
                with factory() as s:
                    assert s.get(model, key).label == "raw"  # type: ignore[union-attr]
    finally:
        outside.dispose()
        cache.detach()
        Base.metadata.drop_all(engine)
