"""A commit's Redis work overlaps the database's: the flush's marks are sent before its
statements run and read after them; the post-commit work is read when SQLAlchemy has
finished the commit, before ``commit()`` returns (strategies/cache_aside.py).

What must hold whatever the overlap: the marks reach Redis before the database commit,
the post-commit work is done when ``commit()`` returns, and no connection is left out of
the pool with replies unread, even when the flush fails.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from examples.shop import Category, Product
from sa_redis_cache.protocol import KeyScheme, scripts
from tests.seams import RedisTap, RoundTrip

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import sessionmaker

    from sa_redis_cache import Cache


TAPS_CACHE = True  # the cache's client is tapped: tests see its round trips (conftest)


@pytest.fixture
def timeline(shop_engine: sa.Engine, redis_tap: RedisTap) -> Iterator[list[str]]:
    """Database statements and Redis scripts, in the order they were sent."""
    events: list[str] = []
    names = {scripts.script(n).sha: n for n in ("flush_mark", "commit")}

    def on_trip(trip: RoundTrip) -> None:
        events.extend(names[c[1]] for c in trip if c[0].upper() == "EVALSHA" and c[1] in names)

    def on_sql(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        events.append(statement.split(maxsplit=1)[0].upper())

    def on_commit(_conn: Any) -> None:
        events.append("COMMIT")

    redis_tap.listen(on_trip)
    sa.event.listen(shop_engine, "before_cursor_execute", on_sql)
    sa.event.listen(shop_engine, "commit", on_commit)
    yield events
    sa.event.remove(shop_engine, "before_cursor_execute", on_sql)
    sa.event.remove(shop_engine, "commit", on_commit)


def in_use(cache: Cache) -> int:
    return len(cache.client.connection_pool._in_use_connections)  # type: ignore[union-attr]


def test_an_update_is_marked_before_its_statement_and_once(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    timeline: list[str],
) -> None:
    with session_factory() as s:
        s.get_one(Product, product).price = Decimal("3.25")
        timeline.clear()
        s.commit()
        assert in_use(cache) == 0  # every reply read before commit() returned
    # Product writes through: the row comes back with its UPDATE (RETURNING), so the
    # commit makes no round trip to the database of its own
    assert timeline == ["flush_mark", "UPDATE", "COMMIT", "commit"]
    keys = KeyScheme(cache.namespace)
    assert cache.client.zcard(keys.writers_key("products")) == 0  # the mark released
    with session_factory() as s:
        assert s.get_one(Product, product).price == Decimal("3.25")


def test_an_insert_with_a_key_from_the_database_is_marked_after_its_statement(
    session_factory: sessionmaker[Session], cache: Cache, timeline: list[str]
) -> None:
    with session_factory() as s:
        p = Product(category_id=1, name="new", price=Decimal("1.00"), status="ACTIVE")
        s.add(p)
        s.commit()
        pid = p.id
    try:
        # the row's key is known after the INSERT only: one mark, sent then
        assert timeline.count("flush_mark") == 1
        assert timeline.index("INSERT") < timeline.index("flush_mark")
        assert in_use(cache) == 0
    finally:
        with session_factory() as s:
            s.delete(s.get_one(Product, pid))
            s.commit()


def test_a_flush_that_fails_after_its_marks_were_sent_releases_them(
    session_factory: sessionmaker[Session], cache: Cache, timeline: list[str]
) -> None:
    keys = KeyScheme(cache.namespace)
    with session_factory() as s:
        other = s.get_one(Category, 2).name
        s.get_one(Category, 1).name = other  # names are unique: the UPDATE fails
        with pytest.raises(IntegrityError):
            s.commit()
        assert "flush_mark" in timeline
        assert timeline.index("flush_mark") < timeline.index("UPDATE")
        s.rollback()
    assert in_use(cache) == 0
    assert cache.client.zcard(keys.writers_key("categories")) == 0


@pytest.mark.parametrize("before", ["clean", "set_to_itself"])
def test_a_row_a_later_before_flush_listener_changes_is_marked(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    product: int,
    before: str,
) -> None:
    """The plan made for the early marks is reused after the flush only if nothing
    changed it: a listener that runs after the cache's changes another row (one that
    was clean, or dirty with no net change), and that row is marked and invalidated too."""
    with session_factory() as s:
        other = Product(category_id=1, name="other", price=Decimal("1.00"), status="ACTIVE")
        s.add(other)
        s.commit()
        other_id = other.id
    try:
        with session_factory() as s:  # both rows in the entity cache
            s.get_one(Product, product)
            s.get_one(Product, other_id)
        with session_factory() as s:
            first = s.get_one(Product, product)
            second = s.get_one(Product, other_id)
            if before == "set_to_itself":
                second.price = second.price  # dirty, with no net change

            def later(*_: Any) -> None:
                second.price = Decimal("7.50")

            sa.event.listen(s, "before_flush", later)  # after the cache's listener
            first.price = Decimal("2.00")
            s.commit()
        with session_factory() as s:
            assert s.get_one(Product, other_id).price == Decimal("7.50")
    finally:
        with Session(shop_engine) as s:
            s.execute(sa.delete(Product).where(Product.id == other_id))
            s.commit()
