"""A session joined to a transaction the application began on a connection (SQLAlchemy's
"join a session into an external transaction", the usual test-suite recipe): its
``commit()`` releases a savepoint or commits nothing, and the database commits, or rolls
back, when the application ends the connection's transaction. The cache's post-commit
work waits for that (docs/decisions.md, "Writes").
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from examples.shop import Category, Product
from tests.support import read_both, read_price

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

JOINED = ["conditional_savepoint", "create_savepoint", "rollback_only"]


def names(factory: sessionmaker[Session], category: int) -> tuple[str, str]:
    """A category's name through FromCache and through session.get, in fresh sessions."""
    return read_both(factory, Category, category, "name")


@pytest.mark.parametrize("mode", JOINED)
def test_a_write_through_commit_the_application_rolls_back_is_not_served(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int, mode: str
) -> None:
    """The write-through value was written at the session's commit, and served after the
    application rolled the transaction back."""
    assert read_price(session_factory, product) == (Decimal("1.00"), Decimal("1.00"))
    with shop_engine.connect() as connection:
        outer = connection.begin()
        with session_factory(bind=connection, join_transaction_mode=mode) as s:
            changed = s.get(Product, product)
            assert changed is not None
            changed.price = Decimal("9.00")
            s.commit()
        outer.rollback()
    assert read_price(session_factory, product) == (Decimal("1.00"), Decimal("1.00"))


@pytest.mark.parametrize("mode", JOINED)
def test_a_read_between_the_sessions_commit_and_the_databases_is_not_kept(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, category: int, mode: str
) -> None:
    """The marks were released at the session's commit: a read before the database's
    commit filled the old name, served after it."""
    before = names(session_factory, category)[0]
    with shop_engine.connect() as connection:
        outer = connection.begin()
        with session_factory(bind=connection, join_transaction_mode=mode) as s:
            changed = s.get(Category, category)
            assert changed is not None
            changed.name = "renamed in a joined session"
            s.commit()
        # another request meanwhile: it reads the last committed name
        assert names(session_factory, category) == (before, before)
        outer.commit()
    renamed = "renamed in a joined session"
    assert names(session_factory, category) == (renamed, renamed)


def test_a_session_that_commits_the_applications_transaction_finishes_at_once(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, product: int
) -> None:
    """``control_fully``: the session's commit is the database's, and the write-through
    value is written then, before the connection goes back to the pool."""
    read_price(session_factory, product)
    with shop_engine.connect() as connection:
        connection.begin()
        with session_factory(bind=connection, join_transaction_mode="control_fully") as s:
            changed = s.get(Product, product)
            assert changed is not None
            changed.price = Decimal("8.00")
            s.commit()
        assert read_price(session_factory, product) == (Decimal("8.00"), Decimal("8.00"))
