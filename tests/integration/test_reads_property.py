"""Property: a cached read gives exactly what the uncached read gives, types included.

Hypothesis generates statements over the example shop (filters, ordering, limits, eager
loaders, entity rows, mixed entity/column rows, aggregates) and rows to insert; each
statement runs without the cache (a sessionmaker the cache is not attached to), then
twice through the cache: the first run (a miss) and the second (a hit, with no SQL at all)
must both equal the uncached result, value for value and type for type.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, false, func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker, subqueryload

from examples.shop import Category, Product, ProductStatus
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from tests.support import SQLCounter

# SARC_PROPERTY_EXAMPLES=500 for a longer hunt; the suite keeps to 25 so it stays fast
SETTINGS = settings(
    max_examples=int(os.environ.get("SARC_PROPERTY_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# SQLAlchemy leaves the dialect's __init__ unannotated
SHOP_DIALECT: sa.Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

# -- exact views of results -------------------------------------------------------------


def exact(value: Any) -> Any:
    """A value with its type and exact spelling (Decimal digits, tzinfo, JSON key order)."""
    if isinstance(value, dict):
        return ("dict", [(exact(k), exact(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [exact(v) for v in value])
    return (type(value).__name__, repr(value))


def entity_view(obj: Any, depth: int = 0) -> Any:
    """Columns of ``obj`` exactly, and the relationships already loaded (no SQL to read)."""
    state = sa.inspect(obj)
    mapper = state.mapper
    columns = [(a.key, exact(state.dict.get(a.key))) for a in mapper.column_attrs]
    loaded = []
    for rel in mapper.relationships:
        if rel.key not in state.dict:
            loaded.append((rel.key, "not loaded"))
            continue
        target = state.dict[rel.key]
        if depth >= 1:
            view: Any = "loaded"
        elif target is None:
            view = None
        elif isinstance(target, list):
            # collection order is the database's; without ORDER BY it is not guaranteed
            view = sorted(
                (entity_view(t, depth + 1) for t in target),
                key=lambda v: repr(v[1]),
            )
        else:
            view = entity_view(target, depth + 1)
        loaded.append((rel.key, view))
    return (mapper.class_.__name__, columns, loaded)


def row_view(row: Any) -> Any:
    return [entity_view(v) if hasattr(v, "_sa_instance_state") else exact(v) for v in row]


# -- statements ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySpec:
    kind: str
    price_low: Decimal | None
    price_high: Decimal | None
    categories: tuple[int, ...] | None
    statuses: tuple[ProductStatus, ...] | None
    order: str
    descending: bool
    limit: int | None
    only_ids: tuple[int, ...] | None = None


KINDS = (
    "products",
    "products_joined_category",
    "products_selectin_category",
    "categories_selectin",
    "categories_joined_products",
    "categories_subquery_products",
    "columns",
    "mixed",
    "outer_mixed",
    "aggregate_grouped",
    "aggregate_total",
    "scalar_count",
)
ORDERS = ("id", "price", "name", "created_at", "status")

prices = st.integers(min_value=0, max_value=110_000).map(lambda cents: Decimal(cents) / 100)


@st.composite
def query_specs(draw: st.DrawFn, only_ids: tuple[int, ...] | None = None) -> QuerySpec:
    low = draw(st.none() | prices)
    high = draw(st.none() | prices)
    return QuerySpec(
        kind=draw(st.sampled_from(KINDS)),
        price_low=low,
        price_high=high,
        categories=draw(
            st.none() | st.lists(st.integers(1, 9), min_size=1, max_size=4, unique=True).map(tuple)
        ),
        statuses=draw(
            st.none()
            | st.lists(st.sampled_from(list(ProductStatus)), min_size=1, unique=True).map(tuple)
        ),
        order=draw(st.sampled_from(ORDERS)),
        descending=draw(st.booleans()),
        limit=draw(st.none() | st.integers(0, 15)),
        only_ids=only_ids,
    )


def product_filters(spec: QuerySpec) -> list[Any]:
    where: list[Any] = []
    if spec.price_low is not None:
        where.append(Product.price >= spec.price_low)
    if spec.price_high is not None:
        where.append(Product.price <= spec.price_high)
    if spec.categories is not None:
        where.append(Product.category_id.in_(spec.categories))
    if spec.statuses is not None:
        where.append(Product.status.in_(spec.statuses))
    if spec.only_ids is not None:
        where.append(Product.id.in_(spec.only_ids))
    return where


def ordering(spec: QuerySpec) -> list[Any]:
    column = getattr(Product, spec.order)
    return [column.desc() if spec.descending else column.asc(), Product.id]


def build(spec: QuerySpec) -> Any:
    """The statement of ``spec``; deterministic order wherever a limit applies."""
    where = product_filters(spec)
    if spec.kind == "products":
        stmt: Any = select(Product).where(*where).order_by(*ordering(spec))
    elif spec.kind == "products_joined_category":
        stmt = (
            select(Product)
            .options(joinedload(Product.category))
            .where(*where)
            .order_by(*ordering(spec))
        )
    elif spec.kind == "products_selectin_category":
        stmt = (
            select(Product)
            .options(selectinload(Product.category))
            .where(*where)
            .order_by(*ordering(spec))
            .offset(spec.limit or 0)
        )
    elif spec.kind.startswith("categories_"):
        loader = {
            "categories_selectin": selectinload,
            "categories_joined_products": joinedload,
            "categories_subquery_products": subqueryload,
        }[spec.kind]
        products = Category.products.and_(*where) if where else Category.products
        stmt = (
            select(Category)
            .options(loader(products))
            .order_by(Category.id.desc() if spec.descending else Category.id)
        )
    elif spec.kind == "columns":
        stmt = (
            select(
                Product.id,
                Product.name,
                Product.price,
                Product.status,
                Product.attributes,
                Product.created_at,
                Product.price * 3,
                (Product.price > 100).label("expensive"),
                func.length(Product.name),
            )
            .where(*where)
            .order_by(*ordering(spec))
        )
    elif spec.kind == "mixed":
        stmt = (
            select(Product, Category.name, Category, Product.price / 7)
            .join(Product.category)
            .where(*where)
            .order_by(*ordering(spec))
        )
    elif spec.kind == "outer_mixed":
        # categories without a matching product give None entities and None columns
        stmt = (
            select(Category, Product, Product.price)
            .outerjoin(Product, and_(Product.category_id == Category.id, *where))
            .order_by(Category.id, *ordering(spec))
        )
    elif spec.kind == "aggregate_grouped":
        stmt = (
            select(
                Product.category_id,
                func.count(Product.id),
                func.sum(Product.price),
                func.avg(Product.price),
                func.min(Product.created_at),
                func.max(Product.name),
                func.array_agg(Product.id),
            )
            .where(*where)
            .group_by(Product.category_id)
            .order_by(Product.category_id.desc() if spec.descending else Product.category_id)
        )
    elif spec.kind == "aggregate_total":
        stmt = select(
            func.count(Product.id), func.sum(Product.price), func.max(Product.created_at)
        ).where(*where, false() if spec.limit == 0 else sa.true())
    else:
        stmt = select(func.count()).select_from(Product).where(*where)
    if spec.limit is not None and spec.kind not in ("aggregate_total", "scalar_count"):
        stmt = stmt.limit(spec.limit)
    return stmt


def run(factory: sessionmaker[Session], stmt: Any) -> list[Any]:
    with factory() as s:
        result = s.execute(stmt)
        descriptions = stmt.column_descriptions
        if len(descriptions) == 1 and hasattr(descriptions[0]["type"], "__mapper__"):
            # unique(): a joined eager collection repeats its parent row
            return [entity_view(obj) for obj in result.unique().scalars().all()]
        return [row_view(row) for row in result.all()]


class Checker:
    """Runs statements uncached and cached twice; remembers what the cache has seen."""

    def __init__(
        self,
        plain: sessionmaker[Session],
        cached: sessionmaker[Session],
        cache: Cache,
        sql: SQLCounter,
    ) -> None:
        self.plain = plain
        self.cached = cached
        self.cache = cache
        self.sql = sql
        self.seen: set[str] = set()

    def misses(self) -> int:
        return int(self.cache.stats()["regions"].get("default", {}).get("misses", 0))

    def check(self, spec: QuerySpec) -> None:
        stmt = build(spec)
        expected = run(self.plain, stmt)
        before = self.misses()
        first = run(self.cached, stmt.options(FromCache()))
        assert first == expected
        # specs that differ only where the statement ignores them make the same statement;
        # compiled on a copy: compiling replaces an ORM select's _compile_options
        text = str(
            build(spec).compile(dialect=SHOP_DIALECT, compile_kwargs={"literal_binds": True})
        )
        if text not in self.seen:
            assert self.misses() == before + 1, "the first cached run is a miss"
        self.seen.add(text)
        self.sql.reset()
        second = run(self.cached, stmt.options(FromCache()))
        assert self.sql.statements == [], "a hit sends nothing to the database"
        assert second == expected


@pytest.fixture
def checker(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
) -> Checker:
    return Checker(sessionmaker(shop_engine), session_factory, cache, sql)


@SETTINGS
@given(spec=query_specs())
def test_cached_reads_equal_uncached_reads(checker: Checker, spec: QuerySpec) -> None:
    checker.check(spec)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_statement_once(checker: Checker, kind: str) -> None:
    """Each statement kind at least once, whatever hypothesis draws."""
    checker.check(
        QuerySpec(
            kind=kind,
            price_low=Decimal("10.00"),
            price_high=Decimal("700.00"),
            categories=(1, 2, 3),
            statuses=None,
            order="price",
            descending=True,
            limit=7,
        )
    )


# -- generated rows -----------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
NO_SURROGATES: list[Any] = ["Cs"]  # Postgres text takes no lone surrogates (nor NUL)
json_text = st.text(
    st.characters(blacklist_categories=NO_SURROGATES, blacklist_characters="\x00"), max_size=12
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    # JSONB keeps numbers as numeric: a float of 1e16 or more comes back as an int, which
    # may not fit 64 bits (see test_json_number_beyond_64_bits_is_not_cached)
    | st.floats(min_value=-1e15, max_value=1e15, allow_nan=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class NewProduct:
    name: str
    price: Decimal
    status: ProductStatus
    attributes: dict[str, Any]
    category_id: int


new_products = st.builds(
    NewProduct,
    name=st.text(
        st.characters(blacklist_categories=NO_SURROGATES, blacklist_characters="\x00"),
        min_size=1,
        max_size=60,
    ),
    price=st.integers(min_value=-(10**8) + 1, max_value=10**8 - 1).map(
        lambda cents: Decimal(cents).scaleb(-2)
    ),
    status=st.sampled_from(list(ProductStatus)),
    attributes=st.dictionaries(json_text, json_values, max_size=5),
    category_id=st.integers(1, 8),
)


@SETTINGS
@given(rows=st.lists(new_products, min_size=1, max_size=6), data=st.data())
def test_generated_rows_read_back_exactly(
    checker: Checker,
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
    rows: list[NewProduct],
    data: st.DataObject,
) -> None:
    # written through the attached factory, so the commit invalidates what it must
    with session_factory() as s:
        objects = [
            Product(
                name=r.name,
                price=r.price,
                status=r.status,
                attributes=r.attributes,
                category_id=r.category_id,
            )
            for r in rows
        ]
        s.add_all(objects)
        s.commit()
        ids = tuple(o.id for o in objects)
    # The commit wrote the rows through to the entity cache: drop them, so that the entity
    # reads below are filled from the database and checked against it.
    for pk in ids:
        cache.invalidate(Product, pk)
    try:
        spec = data.draw(query_specs(only_ids=ids))
        checker.check(spec)
        checker.check(
            QuerySpec(
                kind="products",
                price_low=None,
                price_high=None,
                categories=None,
                statuses=None,
                order="id",
                descending=False,
                limit=None,
                only_ids=ids,
            )
        )
        # the entity cache, by primary key
        with checker.plain() as s:
            expected = [entity_view(s.get(Product, pk)) for pk in ids]
        for _ in range(2):
            sql.reset()
            with session_factory() as s:
                got = [entity_view(s.get(Product, pk)) for pk in ids]
            assert got == expected
        assert sql.count == 0
    finally:
        with session_factory() as s:
            s.execute(sa.delete(Product).where(Product.id.in_(ids)))
            s.commit()


@pytest.mark.parametrize(
    ("price", "attributes", "created_at", "written_through"),
    [
        # values Postgres normalises: the row read back after the flush is what is written
        # through, so the entry still equals the database row
        (
            Decimal("1.5"),
            {"b": 1, "a": 2.0, "big": 1e16},
            dt.datetime(2024, 1, 1, 12, tzinfo=ZoneInfo("Asia/Kolkata")),
            True,
        ),
        # values Postgres returns unchanged: the committed state is served with no SQL
        (
            Decimal("1.50"),
            {"b": 1, "a": 2.5},
            dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc),
            True,
        ),
    ],
)
def test_write_through_entry_equals_the_database_row(
    shop_engine: sa.Engine,
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    price: Decimal,
    attributes: dict[str, Any],
    created_at: dt.datetime,
    written_through: bool,
) -> None:
    with session_factory() as s:
        product = Product(
            category_id=1,
            name="written through",
            price=price,
            status=ProductStatus.ACTIVE,
            attributes=attributes,
            created_at=created_at,
        )
        s.add(product)
        s.commit()
        pk = product.id
    try:
        with sessionmaker(shop_engine)() as s:
            expected = entity_view(s.get(Product, pk))
        sql.reset()
        with session_factory() as s:
            got = entity_view(s.get(Product, pk))
        assert sql.count == (0 if written_through else 1)
        assert got == expected
    finally:
        with session_factory() as s:
            s.execute(sa.delete(Product).where(Product.id == pk))
            s.commit()


def test_json_number_beyond_64_bits_is_not_cached(
    session_factory: sessionmaker[Session],
    checker: Checker,
    cache: Cache,
    sql: SQLCounter,
) -> None:
    """JSONB gives 2**64 back as an int that orjson cannot store: the result is not cached
    (counted), and every read still gives the database's answer."""
    with session_factory() as s:
        product = Product(
            category_id=1,
            name="huge json number",
            price=Decimal("1.00"),
            status=ProductStatus.DRAFT,
            attributes={"n": 2**64},
        )
        s.add(product)
        s.commit()
        pk = product.id
    try:
        stmt = select(Product).where(Product.id == pk)
        expected = run(checker.plain, stmt)
        assert expected[0][1][5] == (
            "attributes",
            ("dict", [(("str", "'n'"), ("int", "18446744073709551616"))]),
        )
        for _ in range(2):
            sql.reset()
            assert run(session_factory, stmt.options(FromCache())) == expected
            assert sql.count == 1
        assert cache.stats()["regions"]["default"]["uncacheable"] == 2
    finally:
        with session_factory() as s:
            s.execute(sa.delete(Product).where(Product.id == pk))
            s.commit()
