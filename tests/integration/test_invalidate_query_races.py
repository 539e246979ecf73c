"""invalidate_query() against fills whose database read began before it.

Each test forces an interleaving that once ended with the cache serving a value older
than the external write ``invalidate_query`` was called for: an invalidation marker
stored in the entry's place was replaced by the first fill after it, and a REPEATABLE
READ transaction could fill its older snapshot after the call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, FromCache

if TYPE_CHECKING:
    from collections.abc import Iterator

PRODUCTS = cast("sa.Table", Product.__table__)
STMT = select(Product.name).where(Product.id == 14)


def _name(s: Session, option: FromCache | None = None) -> str:
    return s.scalars(STMT.options(option or FromCache())).one()


@contextmanager
def _external(shop_engine: sa.Engine) -> Iterator[sa.Engine]:
    # an engine the cache is not attached to, as another application's
    external = sa.create_engine(shop_engine.url, poolclass=sa.NullPool)
    with Session(external) as s:
        original = s.scalars(STMT).one()
    try:
        yield external
    finally:
        with external.begin() as conn:
            conn.execute(sa.update(PRODUCTS).where(Product.id == 14).values(name=original))
        external.dispose()


def _write(external: sa.Engine) -> None:
    with external.begin() as conn:
        conn.execute(sa.update(PRODUCTS).where(Product.id == 14).values(name="external"))


def test_a_fill_that_read_before_the_call_cannot_replace_a_later_fill(
    session_factory: sessionmaker[Session], shop_engine: sa.Engine, cache: Cache
) -> None:
    """A looks (no entry), reads the database; the external write and invalidate_query
    land; B looks (its lease wait is over), reads and fills; then A's fill must be refused,
    though the entry it finds is B's."""
    with _external(shop_engine) as external:
        fired = False

        def between(*args: Any) -> None:
            nonlocal fired
            if fired:
                return
            fired = True
            _write(external)
            cache.invalidate_query(STMT)
            with session_factory() as b:  # a reader after the call: its wait timed out
                assert _name(b, FromCache(lease_wait=0)) == "external"

        sa.event.listen(shop_engine, "after_cursor_execute", between)
        try:
            with session_factory() as a:
                assert _name(a) != "external"  # A read before the write
        finally:
            sa.event.remove(shop_engine, "after_cursor_execute", between)
        assert fired
        with session_factory() as s:
            assert _name(s) == "external"  # A's older read did not replace B's entry


def test_a_repeatable_read_transaction_does_not_fill_its_older_snapshot(
    shop_engine: sa.Engine, cache: Cache
) -> None:
    """A REPEATABLE READ transaction whose snapshot predates the external write looks after
    invalidate_query: it reads its old snapshot, and must not store it."""
    with _external(shop_engine) as external:
        rr_engine = sa.create_engine(shop_engine.url, isolation_level="REPEATABLE READ")
        factory = sessionmaker(rr_engine)
        cache.attach(factory)
        try:
            with factory() as s:
                _name(s)  # the version counters exist, so the transaction pins them
            with factory() as reader:
                reader.execute(select(sa.literal(1)))  # the snapshot is taken here
                _write(external)
                assert cache.invalidate_query(STMT, bind=rr_engine) == 1  # the warm entry
                assert _name(reader) != "external"  # its snapshot, correctly
            with factory() as s2:
                assert _name(s2) == "external"  # the old snapshot was not stored
        finally:
            cache.detach()
            rr_engine.dispose()
