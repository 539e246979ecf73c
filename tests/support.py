"""Helpers shared by test modules (fixtures live in the conftest files)."""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from examples.shop import Product
from sa_redis_cache import FromCache

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker


class SQLCounter:
    """Statements sent to the database while it listens."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    def reset(self) -> None:
        """Forget what ran so far."""
        self.statements.clear()


def read_price(factory: sessionmaker[Session], pid: int) -> tuple[Decimal, Decimal]:
    """A product's price through FromCache and through session.get, each in a fresh session."""
    with factory() as s:
        stmt = select(Product).where(Product.id == pid).options(FromCache())
        by_query = s.scalars(stmt).one().price
    with factory() as s:
        got = s.get(Product, pid)
        assert got is not None
        return by_query, got.price
