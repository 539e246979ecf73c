"""A statement that reads a database view is validated against the tables the view reads
(docs/guarantees.md, "Only tables the cache can see are versioned"): the database reads
them on the view's behalf, and a write to them changes what the view returns."""

from __future__ import annotations

import importlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, registry, sessionmaker

from examples.shop import Category, Product, ProductStatus
from sa_redis_cache import Cache, CachePolicy, FromCache
from sa_redis_cache.binds import view_bases
from sa_redis_cache.cli import cli

WAIT = 10.0


class Listing:
    """A row of the listing view: a product, its price and its category's name."""

    id: int
    price: Decimal
    category: str


class Cheap:
    """A row of a view of the listing view."""

    id: int
    price: Decimal


class Priced:
    """A row of an updatable view of products: writes through it write products."""

    id: int
    price: Decimal


@dataclass
class Views:
    """Two views made for one test, mapped, on an engine made after them."""

    engine: sa.Engine
    listing: type[Listing]
    cheap: type[Cheap]
    priced: type[Priced]
    product: int
    category: int


@pytest.fixture
def views(shop_engine: sa.Engine, database_url: str) -> Iterator[Views]:
    """A product and category of the test's own, a view over products and categories and a
    view of that view; the engine is new, so its pool meets the views on first use."""
    suffix = secrets.token_hex(4)
    listing, cheap, priced = f"listing_{suffix}", f"cheap_{suffix}", f"priced_{suffix}"
    with Session(shop_engine) as s:
        category = Category(name=f"views {suffix}")
        product = Product(
            category=category, name="viewed", price=Decimal("1.00"), status=ProductStatus.ACTIVE
        )
        s.add(product)
        s.commit()
        pid, cid = product.id, category.id
    with shop_engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE VIEW {listing} AS SELECT p.id, p.price, c.name AS category "  # noqa: S608 - our names
                "FROM products p JOIN categories c ON c.id = p.category_id"
            )
        )
        conn.execute(text(f"CREATE VIEW {cheap} AS SELECT id, price FROM {listing}"))  # noqa: S608 - our names
        conn.execute(text(f"CREATE VIEW {priced} AS SELECT id, price FROM products"))  # noqa: S608 - our names
    mapped: dict[str, type] = {}
    for name, base, columns in (
        (listing, Listing, ("price", "category")),
        (cheap, Cheap, ("price",)),
        (priced, Priced, ("price",)),
    ):
        table = sa.Table(
            name,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            *(sa.Column(c, sa.Numeric(10, 2) if c == "price" else sa.String(80)) for c in columns),
        )
        # with a policy: its session.get would use the entity cache
        policy = {"__cache__": CachePolicy(strategy="cache_aside", ttl=600)}
        mapped[name] = type(f"{base.__name__}{suffix}", (base,), policy)
        registry().map_imperatively(mapped[name], table)
    engine = sa.create_engine(database_url)
    yield Views(engine, mapped[listing], mapped[cheap], mapped[priced], pid, cid)
    engine.dispose()
    with shop_engine.begin() as conn:
        conn.execute(text(f"DROP VIEW {priced}"))
        conn.execute(text(f"DROP VIEW {cheap}"))
        conn.execute(text(f"DROP VIEW {listing}"))
        conn.execute(sa.delete(Product).where(Product.id == pid))
        conn.execute(sa.delete(Category).where(Category.id == cid))


@pytest.fixture(params=["redis", "local"])
def view_cache(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Cache]:
    """A cache with and without the local tier."""
    cache = Cache(
        redis.Redis.from_url(redis_url), namespace=namespace, local=request.param == "local"
    )
    yield cache
    cache.detach()


def _attached(cache: Cache, engine: sa.Engine) -> sessionmaker[Session]:
    """A factory on ``engine`` attached to ``cache``, its local tier (if any) tracking."""
    factory = sessionmaker(engine)
    cache.attach(factory)
    tier = cache.inspector.local_tier
    assert tier is None or tier.wait_ready(WAIT)
    return factory


def _listing(factory: sessionmaker[Session], views: Views) -> tuple[Decimal, str]:
    with factory() as s:
        row = s.scalars(
            select(views.listing).filter_by(id=views.product).options(FromCache())
        ).one()
        return row.price, row.category


def _cheap(factory: sessionmaker[Session], views: Views) -> Decimal:
    with factory() as s:
        row = s.scalars(select(views.cheap).filter_by(id=views.product).options(FromCache())).one()
        return row.price


def test_an_orm_write_to_a_table_a_view_reads_retires_its_entries(
    views: Views, view_cache: Cache
) -> None:
    factory = _attached(view_cache, views.engine)
    assert _listing(factory, views)[0] == Decimal("1.00")
    assert _cheap(factory, views) == Decimal("1.00")
    with factory() as s:
        product = s.get(Product, views.product)
        assert product is not None
        product.price = Decimal("2.00")
        s.commit()
    assert _listing(factory, views)[0] == Decimal("2.00")
    assert _cheap(factory, views) == Decimal("2.00")  # through the view it reads


def test_core_and_text_writes_to_a_table_a_view_reads_retire_its_entries(
    views: Views, view_cache: Cache
) -> None:
    factory = _attached(view_cache, views.engine)
    _, category = _listing(factory, views)
    with views.engine.begin() as conn:
        conn.execute(
            text("UPDATE categories SET name = :name WHERE id = :id"),
            {"name": category + " renamed", "id": views.category},
        )
    assert _listing(factory, views)[1] == category + " renamed"
    with views.engine.begin() as conn:
        conn.execute(
            update(Product).where(Product.id == views.product).values(price=Decimal("3.00"))
        )
    assert _listing(factory, views)[0] == Decimal("3.00")
    assert _cheap(factory, views) == Decimal("3.00")


def test_a_transaction_reads_its_own_write_through_a_view(views: Views, view_cache: Cache) -> None:
    factory = _attached(view_cache, views.engine)
    _listing(factory, views)
    with factory() as s:
        product = s.get(Product, views.product)
        assert product is not None
        product.price = Decimal("4.00")
        s.flush()
        row = s.scalars(
            select(views.listing).filter_by(id=views.product).options(FromCache())
        ).one()
        assert row.price == Decimal("4.00")
        s.rollback()
    assert _listing(factory, views)[0] == Decimal("1.00")


def test_a_model_mapped_onto_a_view_is_read_by_primary_key_from_the_database(
    views: Views, view_cache: Cache
) -> None:
    factory = _attached(view_cache, views.engine)
    with factory() as s:
        row = s.get(views.listing, views.product)
        assert row is not None
        assert row.price == Decimal("1.00")
    with views.engine.begin() as conn:
        conn.execute(
            update(Product).where(Product.id == views.product).values(price=Decimal("5.00"))
        )
    with factory() as s:
        row = s.get(views.listing, views.product)
        assert row is not None
        assert row.price == Decimal("5.00")


def _product_price(factory: sessionmaker[Session], views: Views) -> Decimal:
    with factory() as s:
        return (
            s.scalars(select(Product).where(Product.id == views.product).options(FromCache()))
            .one()
            .price
        )


@pytest.mark.parametrize("how", ["orm", "text"])
def test_a_write_through_an_updatable_view_retires_the_tables_it_reads(
    views: Views, view_cache: Cache, how: str
) -> None:
    factory = _attached(view_cache, views.engine)
    assert _product_price(factory, views) == Decimal("1.00")
    with factory() as s:
        if how == "orm":
            row = s.get(views.priced, views.product)
            assert row is not None
            row.price = Decimal("6.00")
        else:
            name = views.priced.__table__.name  # type: ignore[attr-defined]
            s.execute(
                text(f"UPDATE {name} SET price = 6.00 WHERE id = :id"),  # noqa: S608 - our names
                {"id": views.product},
            )
        s.commit()
    assert _product_price(factory, views) == Decimal("6.00")
    with factory() as s:  # and the entity cache's copy of the product
        product = s.get(Product, views.product)
        assert product is not None
        assert product.price == Decimal("6.00")


def _priced_view_read(view: str, product: int) -> sa.Select[Any]:
    """A ``FromCache`` read of ``product`` through ``view`` (``id``, ``price``), mapped anew."""
    table = sa.Table(
        view,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("price", sa.Numeric(10, 2)),
    )
    mapped = type(f"Late{view}", (Priced,), {})
    registry().map_imperatively(mapped, table)
    return select(mapped).filter_by(id=product).options(FromCache())


def _follows_a_price_write(
    factory: sessionmaker[Session], views: Views, read: sa.Select[Any]
) -> None:
    """``read`` gives the product's price, and its new one after a write to products."""
    with factory() as s:
        assert s.scalars(read).one().price == Decimal("1.00")
    with views.engine.begin() as conn:
        conn.execute(
            update(Product).where(Product.id == views.product).values(price=Decimal("7.00"))
        )
    with factory() as s:
        assert s.scalars(read).one().price == Decimal("7.00")


@pytest.mark.parametrize("how", ["text", "DDL"])
def test_a_view_made_after_the_pools_first_use_is_seen(
    views: Views, view_cache: Cache, how: str
) -> None:
    factory = _attached(view_cache, views.engine)
    assert _product_price(factory, views) == Decimal("1.00")  # the pool's first use
    late = f"late_{secrets.token_hex(4)}"
    create = f"CREATE OR REPLACE VIEW {late} AS SELECT id, price FROM products"  # noqa: S608 - our names
    with views.engine.begin() as conn:
        conn.execute(text(create) if how == "text" else sa.DDL(create))  # type: ignore[no-untyped-call]
    late_view = _priced_view_read(late, views.product)
    try:
        _follows_a_price_write(factory, views, late_view)
    finally:
        with views.engine.begin() as conn:
            conn.execute(text(f"DROP VIEW {late}"))


def test_a_repeatable_read_transaction_reads_a_view_as_of_its_snapshot(
    views: Views, view_cache: Cache
) -> None:
    factory = _attached(view_cache, views.engine)
    snapshots = sessionmaker(views.engine.execution_options(isolation_level="REPEATABLE READ"))
    view_cache.attach(snapshots)
    _listing(factory, views)  # filled
    with snapshots() as s:
        first = s.scalars(
            select(views.listing).filter_by(id=views.product).options(FromCache())
        ).one()
        assert first.price == Decimal("1.00")
        with views.engine.begin() as conn:
            conn.execute(
                update(Product).where(Product.id == views.product).values(price=Decimal("8.00"))
            )
        _listing(factory, views)  # filled again, after the write
        columns = views.listing.__table__.c  # type: ignore[attr-defined]
        again = s.execute(
            select(columns.price).where(columns.id == views.product).options(FromCache())
        ).scalar_one()
        assert again == Decimal("1.00")  # the snapshot's, not the entry's
    with snapshots() as s:
        assert s.scalars(
            select(views.listing).filter_by(id=views.product).options(FromCache())
        ).one().price == Decimal("8.00")


def test_a_view_made_in_a_transaction_is_seen_once_it_committed(
    views: Views, view_cache: Cache
) -> None:
    factory = _attached(view_cache, views.engine)
    _product_price(factory, views)  # the pool's first use
    late = f"late_{secrets.token_hex(4)}"
    late_view = _priced_view_read(late, views.product)
    try:
        with views.engine.connect() as conn:
            conn.execute(text(f"CREATE VIEW {late} AS SELECT id, price FROM products"))  # noqa: S608 - our names
            # another connection asks which views there are before the commit: none yet
            _product_price(factory, views)
            conn.commit()
        _follows_a_price_write(factory, views, late_view)
    finally:
        with views.engine.begin() as conn:
            conn.execute(text(f"DROP VIEW IF EXISTS {late}"))


_STATEMENT_MODULE = """
import sqlalchemy as sa
from sqlalchemy.orm import registry

from sa_redis_cache import FromCache

TABLE = sa.Table(
    "{view}",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("price", sa.Numeric(10, 2)),
)


class Row:
    pass


registry().map_imperatively(Row, TABLE)
LISTING = sa.select(Row).where(TABLE.c.id == {product}).options(FromCache())
"""


def test_the_cli_explains_an_entry_of_a_view_by_the_tables_it_reads(
    views: Views,
    cache: Cache,
    redis_url: str,
    namespace: str,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"sarc_view_statements_{secrets.token_hex(4)}"
    view = views.listing.__table__.name  # type: ignore[attr-defined]
    text_of = _STATEMENT_MODULE.format(view=view, product=views.product)
    (tmp_path / f"{module}.py").write_text(text_of)
    monkeypatch.syspath_prepend(str(tmp_path))
    statement = importlib.import_module(module).LISTING
    factory = _attached(cache, views.engine)
    with factory() as s:
        s.scalars(statement).all()
    cache.stats()  # the fill's reply is read: the entry is stored
    args = ["--redis-url", redis_url, "--namespace", namespace, "--models", "examples.shop"]
    inspect = [*args, "inspect", "--bind-url", database_url, "--json", "--statement"]

    def explained() -> dict[str, Any]:
        result = CliRunner().invoke(cli, [*inspect, f"{module}:LISTING"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    valid = explained()
    assert valid["state"] == "valid", valid["detail"]
    assert {"products", "categories"} <= set(valid["tables"])
    with views.engine.begin() as conn:
        conn.execute(
            update(Product).where(Product.id == views.product).values(price=Decimal("9.00"))
        )
    stale = explained()
    assert stale["state"] == "stale"
    assert "products" in stale["detail"]


def test_view_bases_follow_views_of_views() -> None:
    edges = [
        "listing\x1fpublic\x1fproducts",
        "listing\x1fpublic\x1fcategories",
        "cheap\x1fpublic\x1flisting",
        "loop_a\x1fpublic\x1floop_b",
        "loop_b\x1fpublic\x1floop_a",
    ]
    found = view_bases(edges)
    assert found["cheap"] == {("public", "products"), ("public", "categories")}
    assert found["listing"] == found["cheap"]
    assert found["loop_a"] == frozenset()  # a cycle (not possible in Postgres) ends
