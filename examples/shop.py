"""A small shop: the schema the demo, the integration tests and the benchmarks share.

Categories have products; customers place orders made of order lines that point at
products. The columns cover the types the cache must round-trip exactly: Numeric,
timestamptz, UUID, JSONB and a Python Enum.

Example::

    from sqlalchemy import create_engine
    from examples.shop import Base, seed
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1/shop")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        seed(s, products=200)
"""

from __future__ import annotations

import enum
import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from sqlalchemy import ForeignKey, Numeric, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import DateTime, Enum

from sa_redis_cache import CachePolicy


class Base(DeclarativeBase):
    """Declarative base of the shop models."""


class ProductStatus(enum.Enum):
    """Lifecycle of a product in the catalogue."""

    DRAFT = "draft"
    ACTIVE = "active"
    RETIRED = "retired"


class OrderStatus(enum.Enum):
    """Lifecycle of an order."""

    OPEN = "open"
    PAID = "paid"
    SHIPPED = "shipped"


class Category(Base):
    """A catalogue section; read often, written rarely."""

    __tablename__ = "categories"
    __cache__ = CachePolicy(strategy="cache_aside", ttl=3600)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    products: Mapped[list[Product]] = relationship(back_populates="category")


class Product(Base):
    """A product; its price changes are written through to the cache."""

    __tablename__ = "products"
    __cache__ = CachePolicy(strategy="write_through", ttl=600)

    id: Mapped[int] = mapped_column(primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    status: Mapped[ProductStatus] = mapped_column(Enum(ProductStatus, name="product_status"))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    category: Mapped[Category] = relationship(back_populates="products")


class Customer(Base):
    """A customer, keyed by a client-side UUID."""

    __tablename__ = "customers"
    __cache__ = CachePolicy(ttl=900)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    """An order; not cached by policy, but FromCache queries may still read it."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("customers.id"), index=True)
    status: Mapped[OrderStatus] = mapped_column(Enum(OrderStatus, name="order_status"))
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(
        back_populates="order", cascade="all, delete-orphan"
    )


class OrderLine(Base):
    """One product on an order, with the price it was sold at."""

    __tablename__ = "order_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    quantity: Mapped[int]
    unit_price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    order: Mapped[Order] = relationship(back_populates="lines")
    product: Mapped[Product] = relationship()


def seed(
    session: Session,
    *,
    categories: int = 8,
    products: int = 400,
    customers: int = 100,
    orders: int = 300,
    lines_per_order: int = 4,
    rng_seed: int = 7,
) -> None:
    """Fill an empty shop with deterministic data and commit.

    Example::

        with Session(engine) as s:
            seed(s, products=50, orders=20)
    """
    rng = random.Random(rng_seed)
    base_time = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # names count from 1, as the ids do: category-1 is the category whose id is 1
    cats = [Category(name=f"category-{i + 1}") for i in range(categories)]
    session.add_all(cats)
    prods = [
        Product(
            category=cats[i % categories],
            name=f"product-{i + 1}",
            price=Decimal(rng.randrange(100, 100_000)) / 100,
            status=rng.choice(list(ProductStatus)),
            attributes={"colour": rng.choice(["red", "green", "blue"]), "weight_g": i * 3},
        )
        for i in range(products)
    ]
    session.add_all(prods)
    custs = [
        Customer(
            id=uuid.UUID(int=rng.getrandbits(128), version=4),
            email=f"customer{i + 1}@example.com",
            name=f"Customer {i + 1}",
        )
        for i in range(customers)
    ]
    session.add_all(custs)
    for i in range(orders):
        order = Order(
            customer=custs[i % customers],
            status=rng.choice(list(OrderStatus)),
            placed_at=base_time + timedelta(minutes=17 * i),
        )
        for _ in range(lines_per_order):
            product = rng.choice(prods)
            order.lines.append(
                OrderLine(product=product, quantity=rng.randint(1, 5), unit_price=product.price)
            )
        session.add(order)
    session.commit()
