"""A hit whose bytes are those an earlier hit decoded reuses that decoding
(``QueryReads.decoded``): the document, its stamp and the body checked against the
statement. Only the work moves; what a hit returns must stay what decoding the bytes
Redis returned gives, and the objects of two sessions must not share a mutable value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import select

from examples.shop import Product
from sa_redis_cache import FromCache, hydrate
from sa_redis_cache.codec import pack, unpack
from sa_redis_cache.reads import queries

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from sa_redis_cache import Cache
    from tests.support import SQLCounter


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every body the read path decodes and checks against its statement."""
    calls: list[Any] = []
    original = hydrate.prepare

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args[0])
        return original(*args, **kw)

    monkeypatch.setattr(hydrate, "prepare", counted)
    return calls


def by_id(pid: int) -> Any:
    return select(Product).where(Product.id == pid).options(FromCache())


def read(factory: sessionmaker[Session], pid: int) -> Product:
    with factory() as s:
        found: Product = s.scalars(by_id(pid)).one()
        return found


def the_entry(client: redis.Redis, namespace: str) -> bytes:
    keys: list[bytes] = [k for k in client.scan_iter(match=f"sarc:*{namespace}*") if b":q:" in k]
    assert len(keys) == 1, keys
    return keys[0]


def test_a_hit_on_the_bytes_it_decoded_before_does_not_decode_them_again(
    session_factory: sessionmaker[Session],
    product: int,
    prepared: list[Any],
    sql: SQLCounter,
) -> None:
    name = read(session_factory, product).name  # a miss: fills
    sql.reset()
    assert read(session_factory, product).name == name
    assert len(prepared) == 1  # the first hit decodes
    for _ in range(3):
        assert read(session_factory, product).name == name
    assert len(prepared) == 1  # the next ones reuse it
    assert sql.count == 0


def test_other_bytes_under_the_same_key_are_decoded_and_served(
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    prepared: list[Any],
    sql: SQLCounter,
) -> None:
    read(session_factory, product)
    read(session_factory, product)  # decoded and kept
    key = the_entry(redis_client, namespace)
    raw = redis_client.get(key)
    assert raw is not None
    stamp, body = unpack(raw)
    names = Product.__mapper__.column_attrs.keys()
    body[3][0][1][list(names).index("name")] = "renamed in Redis"
    redis_client.set(key, pack([stamp, body]), keepttl=True)  # still valid: stamp kept
    sql.reset()
    assert read(session_factory, product).name == "renamed in Redis"
    assert sql.count == 0
    assert len(prepared) == 2


def test_a_write_is_seen_by_the_next_read(
    session_factory: sessionmaker[Session], product: int
) -> None:
    read(session_factory, product)
    read(session_factory, product)
    with session_factory() as s:
        s.get_one(Product, product, populate_existing=True).name = "written"
        s.commit()
    assert read(session_factory, product).name == "written"  # a miss, then a fill
    assert read(session_factory, product).name == "written"  # a hit on the new bytes


def test_two_sessions_never_share_a_mutable_value(
    session_factory: sessionmaker[Session], product: int, sql: SQLCounter
) -> None:
    read(session_factory, product)
    with session_factory() as first, session_factory() as second:
        one = first.scalars(by_id(product)).one()
        one.attributes["seen"] = "by the first session only"  # in place, never flushed
        other = second.scalars(by_id(product)).one()
        assert "seen" not in other.attributes
        assert other.attributes is not one.attributes
    assert "seen" not in read(session_factory, product).attributes


def test_an_entry_too_large_to_keep_is_decoded_on_every_hit(
    session_factory: sessionmaker[Session],
    product: int,
    prepared: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries, "DECODED_MAX_ONE", 0)
    read(session_factory, product)
    for _ in range(3):
        read(session_factory, product)
    assert len(prepared) == 3


def test_the_kept_decodings_stay_within_their_bound(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queries, "DECODED_MAX_BYTES", 4_000)  # two or three 1-row entries
    monkeypatch.setattr(queries, "DECODED_MAX_ONE", 4_000)
    for pid in (1, 2, 3, 4, 5, product):
        read(session_factory, pid)
        read(session_factory, pid)  # a hit: decoded and kept
    held = cache.inspector.decoded()
    assert 1 <= held["entries"] < 6
    assert 0 < held["bytes"] <= 4_000
