"""Entry signing (``Cache(..., signing_key=...)``): what does not verify is a counted miss.

With a key, every value the library writes carries an HMAC bound to its Redis key
(:mod:`sa_redis_cache.signing`). A party with write access to Redis can still delete
values, but a value it changed, copied from another key, or wrote itself (unsigned, or
signed with another key) is never served: it is deleted, counted as a decode error, and
the read goes to the database, whose answer is stored signed.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Product
from sa_redis_cache import Cache, ConfigurationError, FlushWorker, FromCache
from sa_redis_cache.codec import pack, unpack
from sa_redis_cache.signing import TRAILER_BYTES
from tests.wb_support import drain

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support import SQLCounter

pytest_plugins = ["tests.wb_fixtures"]

KEY = b"k" * 32
QUERY = select(Product).where(Product.id.between(10, 14)).order_by(Product.id)
ENTITY_PK = 11


@pytest.fixture
def signed(
    shop_engine: sa.Engine, redis_url: str, namespace: str
) -> Iterator[tuple[Cache, sessionmaker[Session]]]:
    """A signing cache in this test's namespace, attached to a sessionmaker on the shop."""
    client = redis.Redis.from_url(redis_url)
    made = Cache(client, namespace=namespace, signing_key=KEY)
    factory = sessionmaker(shop_engine)
    made.attach(factory)
    yield made, factory
    made.detach()
    client.close()


def keys_with(client: redis.Redis, namespace: str, marker: bytes) -> list[bytes]:
    return sorted(k for k in client.scan_iter(match=f"sarc:*{namespace}*") if marker in k)


def decode_errors(cache: Cache) -> int:
    return int(cache.stats()["total"]["decode_errors"])


def read_query(factory: sessionmaker[Session]) -> list[tuple[int, str]]:
    with factory() as s:
        return [(p.id, p.name) for p in s.scalars(QUERY.options(FromCache()))]


def read_entity(factory: sessionmaker[Session], pk: int = ENTITY_PK) -> list[tuple[int, str]]:
    with factory() as s:
        p = s.get(Product, pk)
        assert p is not None
        return [(p.id, p.name)]


READERS: dict[str, tuple[Callable[[sessionmaker[Session]], Any], bytes]] = {
    "query": (read_query, b":q:"),
    "entity": (read_entity, b":e:"),
}


def with_names_changed(value: bytes, kind: str) -> bytes:
    """A signed value whose document says other product names, with the original trailer."""
    document, trailer = value[:-TRAILER_BYTES], value[-TRAILER_BYTES:]
    stamp, body = unpack(document)
    rows = [body[0]] if kind == "entity" else [obj[1] for obj in body[3]]
    name_at = list(sa.inspect(Product).column_attrs.keys()).index("name")
    for row in rows:
        row[name_at] = "tampered"
    return pack([stamp, body]) + trailer


@pytest.mark.parametrize("kind", ["query", "entity"])
def test_signed_entries_are_hits_and_tampered_ones_are_counted_misses(
    signed: tuple[Cache, sessionmaker[Session]],
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
    kind: str,
) -> None:
    cache, factory = signed
    read, marker = READERS[kind]
    expected = read(sessionmaker(shop_engine))
    assert read(factory) == expected
    (key,) = keys_with(redis_client, namespace, marker)
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    assert good[-TRAILER_BYTES:-32] == b"E", "a value the client assembles signs it whole"
    sql.reset()
    assert read(factory) == expected
    assert sql.count == 0, "a signed entry verifies: a hit"

    redis_client.set(key, with_names_changed(good, kind), px=600_000)
    sql.reset()
    assert read(factory) == expected
    assert sql.count >= 1
    assert decode_errors(cache) == 1
    refilled = redis_client.get(key)
    assert isinstance(refilled, bytes)
    assert unpack(refilled[:-TRAILER_BYTES])[1] == unpack(good[:-TRAILER_BYTES])[1]


def test_an_entity_entry_moved_to_another_key_is_a_miss(
    signed: tuple[Cache, sessionmaker[Session]],
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
) -> None:
    cache, factory = signed
    expected = read_entity(sessionmaker(shop_engine))
    read_entity(factory)
    (key,) = keys_with(redis_client, namespace, b":e:")
    read_entity(factory, ENTITY_PK + 1)
    other = key[: -len(str(ENTITY_PK))] + str(ENTITY_PK + 1).encode()
    value = redis_client.get(other)
    assert isinstance(value, bytes)
    redis_client.set(key, value, px=600_000)
    sql.reset()
    assert read_entity(factory) == expected
    assert sql.count == 1
    assert decode_errors(cache) == 1


@pytest.mark.parametrize("signing", [False, True])
def test_a_function_entry_moved_to_another_key(
    redis_url: str, redis_client: redis.Redis, namespace: str, signing: bool
) -> None:
    """Without a key, a copied function entry is served (nothing names the call in it);
    with a key it is a counted miss."""
    client = redis.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace, signing_key=KEY if signing else None)
    try:

        @cache.cached("square")
        def square(n: int) -> int:
            return n * n

        assert (square(2), square(3)) == (4, 9)
        redis_client.set(square.key_for(2), redis_client.get(square.key_for(3)) or b"")
        assert square(2) == (4 if signing else 9)
        assert decode_errors(cache) == (1 if signing else 0)
        assert square(2) == (4 if signing else 9)  # signed: refilled; unsigned: still wrong
    finally:
        client.close()


@pytest.mark.parametrize("writer_key", [None, b"another key, also long enough"])
@pytest.mark.parametrize("kind", ["query", "entity"])
def test_entries_not_signed_with_our_key_are_misses(
    signed: tuple[Cache, sessionmaker[Session]],
    shop_engine: sa.Engine,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
    kind: str,
    writer_key: bytes | None,
) -> None:
    """An unsigned entry (a cache without a key, or anyone) or one signed with another key."""
    cache, factory = signed
    read, marker = READERS[kind]
    expected = read(sessionmaker(shop_engine))
    client = redis.Redis.from_url(redis_url)
    other = Cache(client, namespace=namespace, signing_key=writer_key)
    other_factory = sessionmaker(shop_engine)
    other.attach(other_factory)
    try:
        assert read(other_factory) == expected
    finally:
        other.detach()
        client.close()
    (key,) = keys_with(redis_client, namespace, marker)
    sql.reset()
    assert read(factory) == expected
    assert sql.count >= 1
    assert decode_errors(cache) == 1
    sql.reset()
    assert read(factory) == expected
    assert sql.count == 0, "refilled, signed with our key"
    stored = redis_client.get(key)
    assert isinstance(stored, bytes)
    assert stored[-TRAILER_BYTES:-32] == b"E"


def test_write_through_states_are_signed(
    signed: tuple[Cache, sessionmaker[Session]],
    product: int,
    sql: SQLCounter,
) -> None:
    cache, factory = signed
    with factory() as s:
        p = s.get(Product, product)
        assert p is not None
        p.price = Decimal("7.25")
        s.commit()
    sql.reset()
    with factory() as s:
        got = s.get(Product, product)
        assert got is not None
        assert got.price == Decimal("7.25")
    assert sql.count == 0, "the written-through state verifies"
    assert decode_errors(cache) == 0


@pytest.mark.parametrize("key", ["a string key, long enough", b"short", bytearray(b"")])
def test_a_signing_key_must_be_bytes_of_16_or_more(key: Any) -> None:
    with pytest.raises(ConfigurationError, match="signing_key"):
        Cache(redis.Redis(), signing_key=key)


# -- write-behind: the scripts assemble the values, the client signs their body ----------------


@pytest.fixture
def signed_wb(
    engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> Iterator[tuple[Cache, sessionmaker[Session]]]:
    """A signing cache on the AOF Redis of tests.wb_fixtures."""
    made = Cache(client, namespace=namespace, signing_key=KEY)
    factory = sessionmaker(engine)
    made.attach(factory)
    yield made, factory
    made.detach()


def test_write_behind_values_are_signed(
    signed_wb: tuple[Cache, sessionmaker[Session]],
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Callable[..., FlushWorker],
    sql: SQLCounter,
) -> None:
    cache, factory = signed_wb
    page_view = models[0]

    def state_of(pk: Any) -> tuple[str, int]:
        sql.reset()
        with factory() as s:
            got = s.get(page_view, pk)
            assert got is not None
            assert sql.count == 0, "served from Redis"
            return str(got.path), int(got.views)

    with factory() as s:
        row = page_view(path="/signed", views=1)
        s.add(row)
        s.commit()
        pk = row.id
    (pending,) = keys_with(client, namespace, b":wbp:")
    (entity,) = keys_with(client, namespace, b":e:")
    for key in (pending, entity):
        value = client.get(key)
        assert isinstance(value, bytes)
        assert value[-TRAILER_BYTES:-32] == b"B", "the script's value signs its body"
    assert state_of(pk) == ("/signed", 1)  # from the pending key
    # sa-redis-cache inspect opens it as session.get does
    pending_value = client.get(pending)
    assert isinstance(pending_value, bytes)
    shown = cache.inspector.pending_state(pending.decode(), pending_value, page_view, (pk,))
    assert shown.row is not None
    assert (shown.row["path"], shown.row["views"]) == ("/signed", 1)

    # a pending state changed by someone else is never served; the entity entry still
    # serves. It is kept: a process of the namespace with another signing_key writes
    # pending keys this one cannot verify, which may hold its only queued state, and a
    # write of the row is refused rather than composed over the database's older row
    value = client.get(pending)
    assert isinstance(value, bytes)
    client.set(pending, value.replace(b"/signed", b"/forged"))
    assert state_of(pk) == ("/signed", 1)
    assert client.exists(pending)
    assert decode_errors(cache) == 1
    with factory() as s:
        got = s.get(page_view, pk)
        assert got is not None
        got.views = 2
        with pytest.raises(ConfigurationError, match="same signing_key"):
            s.commit()
    # the worker's acknowledgement of the entry it names removes it
    worker = make_worker()
    drain(worker)
    assert not keys_with(client, namespace, b":wbp:")

    # the worker's flush deletes the pending key and the entity entry; the next read fills
    # the entry from the database, signed as a whole
    with factory() as s:
        got = s.get(page_view, pk)
        assert got is not None
        got.views = 2
        s.commit()
    drain(worker)
    assert not keys_with(client, namespace, b":wbp:")
    assert not client.exists(entity)
    with factory() as s:
        got = s.get(page_view, pk)
        assert got is not None
        assert got.views == 2
    filled = client.get(entity)
    assert isinstance(filled, bytes)
    assert filled[-TRAILER_BYTES:-32] == b"E"
    assert state_of(pk) == ("/signed", 2)  # from the filled entity entry
    # the kept forged key counted again when the refused write's get and flush read it
    assert decode_errors(cache) == 3
