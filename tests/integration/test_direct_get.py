"""``session.get`` served from Redis before SQLAlchemy builds its statement
(``EntityReads.direct_get``), and its misses handed to the ordinary read path.

The fast path must serve exactly what the execute pipeline would (the identity map, the
counters), skip the pipeline on a hit, and cost a miss no extra round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.orm import loading

from examples.shop import Category, Product
from tests.seams import RedisTap, RoundTrip

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sa_redis_cache import Cache
    from tests.support import SQLCounter


TAPS_CACHE = True  # the cache's client is tapped: tests see its round trips (conftest)


@pytest.fixture
def pk_loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every primary-key load SQLAlchemy's execute pipeline runs for ``Session.get``."""
    calls: list[Any] = []
    # SQLAlchemy 2.1 made the name private
    name = next(n for n in ("_load_on_pk_identity", "load_on_pk_identity") if hasattr(loading, n))
    original = getattr(loading, name)

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        return original(*args, **kw)

    monkeypatch.setattr(loading, name, spy)
    return calls


def test_a_get_hit_skips_the_execute_pipeline(
    session_factory: sessionmaker[Session],
    cache: Cache,
    sql: SQLCounter,
    product: int,
    pk_loads: list[Any],
) -> None:
    with session_factory() as s:
        name = s.get_one(Product, product).name  # a miss: fills through the pipeline
    assert len(pk_loads) == 1
    sql.reset()
    with session_factory() as s:
        got = s.get(Product, product)
        assert got is not None
        assert got.name == name
        assert got in s
        assert s.get(Product, product) is got  # the identity map answers the second
        # any keyword argument goes the ordinary way, and sees the same object
        assert s.get(Product, product, populate_existing=True) is got
    assert sql.count == 1  # only populate_existing's load
    assert len(pk_loads) == 2
    model = cache.stats()["models"]["Product"]
    assert model["hits"] == 1
    assert cache.stats()["latency"]["models"]["Product"]["hit"]["count"] == 1


def test_a_get_miss_looks_at_the_entry_once(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_tap: RedisTap,
    sql: SQLCounter,
) -> None:
    """The fast path's look is the read path's first look: one MGET, then the lease
    request with its second look, then the fill."""
    trips: list[RoundTrip] = []
    redis_tap.listen(trips.append)
    with session_factory() as s:
        assert s.get(Category, 1) is not None
    assert sql.count == 1
    lone_mgets = [t for t in trips if len(t) == 1 and t[0][0].upper() == "MGET"]
    assert len(lone_mgets) == 1
    assert cache.stats()["models"]["Category"]["misses"] == 1
    trips.clear()
    with session_factory() as s:
        assert s.get(Category, 1) is not None
    assert [t[0][0].upper() for t in trips] == ["MGET"]  # a hit: one round trip
    assert sql.count == 1


def test_a_get_inside_a_transaction_that_wrote_the_table_reads_the_database(
    session_factory: sessionmaker[Session], sql: SQLCounter, product: int
) -> None:
    with session_factory() as s:
        s.get_one(Product, product)
    with session_factory() as s:
        s.get_one(Product, product).name = "renamed"
        s.flush()
        s.expunge_all()
        sql.reset()
        assert s.get_one(Product, product).name == "renamed"
        assert sql.count == 1
        s.rollback()
