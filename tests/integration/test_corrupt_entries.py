"""Corrupt, truncated or foreign values under the cache's real keys read as misses (docs/design.md,
"Reads" and "Failure and bad input").

Each test fills the cache through the public API, finds the real Redis key by SCAN, plants
bad data under it, and checks that the next read gives the database's rows with SQL, never
raises, counts a decode error, and leaves a good entry behind (the read after is a hit with
no SQL).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import sa_redis_cache.models
from examples.shop import Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.codec import CODEC_VERSION, pack, unpack

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis

    from tests.support import SQLCounter

PRODUCTS = cast("sa.Table", Product.__table__)
QUERY = select(Product).where(Product.id.between(10, 14)).order_by(Product.id)
ENTITY_PK = 11

Snapshot = list[dict[str, tuple[Any, type]]]


def snapshot(obj: Any) -> dict[str, tuple[Any, type]]:
    """Column values of a mapped object, with their types."""
    mapper = sa.inspect(obj).mapper
    return {a.key: (getattr(obj, a.key), type(getattr(obj, a.key))) for a in mapper.column_attrs}


def read_query(factory: sessionmaker[Session]) -> Snapshot:
    with factory() as s:
        return [snapshot(p) for p in s.scalars(QUERY.options(FromCache())).all()]


def read_entity(factory: sessionmaker[Session]) -> Snapshot:
    with factory() as s:
        product = s.get(Product, ENTITY_PK)
        return [snapshot(product)] if product is not None else []


READERS: dict[str, Callable[[sessionmaker[Session]], Snapshot]] = {
    "query": read_query,
    "entity": read_entity,
}
MARKERS = {"query": b":q:", "entity": b":e:"}


def data_keys(client: redis.Redis, namespace: str, kind: str) -> list[bytes]:
    """The real query (``kind="query"``) or entity keys of this test's namespace."""
    return sorted(k for k in client.scan_iter(match=f"sarc:{namespace}:*") if MARKERS[kind] in k)


def the_key(client: redis.Redis, namespace: str, kind: str) -> bytes:
    keys = data_keys(client, namespace, kind)
    assert len(keys) == 1, keys
    return keys[0]


def expected_rows(shop_engine: sa.Engine, kind: str) -> Snapshot:
    """What the database gives, through a session the cache is not attached to."""
    return READERS[kind](sessionmaker(shop_engine))


def decode_errors(cache: Cache) -> int:
    return int(cache.stats()["total"]["decode_errors"])


def misses(cache: Cache, kind: str) -> int:
    """Misses of the FromCache region (queries) or of the Product model (entity loads)."""
    stats = cache.stats()
    scope = stats["regions"]["default"] if kind == "query" else stats["models"]["Product"]
    return int(scope["misses"])


# -- corruptions of a good value ----------------------------------------------------------


def _drop_last_column(good: bytes, kind: str) -> bytes:
    """A well-formed entry for a table that had one column fewer (an older deploy)."""
    stamp, body = unpack(good)
    if kind == "entity":  # [row, missing]
        body[0] = body[0][:-1]
    else:  # query: [keys, single, mappers, objects, rows]; object = [mapper, row, ...]
        for obj in body[3]:
            obj[1] = obj[1][:-1]
    return pack([stamp, body])


def same_entry(got: object, good: bytes) -> bool:
    """The same rows under the same versions (a query stamp's timing differs per fill)."""
    assert isinstance(got, bytes)
    a, b = unpack(got), unpack(good)
    if isinstance(a[0][0], str):  # query: [digest, delta_ms, expires_ms, filled_ms, *versions]
        return bool(a[1] == b[1] and a[0][0] == b[0][0] and a[0][4:] == b[0][4:])
    # entity entry: [generation, row_writes] (a writer's), or with delta_ms, expires_ms and
    # filled_ms
    return bool(a[1] == b[1] and a[0][:2] == b[0][:2])


CORRUPTIONS: dict[str, Callable[[bytes, str], bytes]] = {
    "garbage": lambda good, kind: b"\x00\xff\xfe garbage \x13\x37" * 3,
    "empty": lambda good, kind: b"",
    "truncated": lambda good, kind: good[: len(good) // 2],
    "truncated_to_header": lambda good, kind: good[:3],
    "magic_only": lambda good, kind: good[:2],
    "other_codec_version": lambda good, kind: good[:2] + bytes([CODEC_VERSION + 1]) + good[3:],
    "foreign_json": lambda good, kind: good[3:],  # the document without our envelope
    "not_json": lambda good, kind: good[:3] + b"{not json",
    "wrong_document": lambda good, kind: pack({"a": 1, "b": 2}),
    "scalar_document": lambda good, kind: pack(7),
    "other_schema_shape": _drop_last_column,
}

# Every corruption is counted: a document of the wrong shape is refused before its
# versions are compared, so it is never mistaken for a stale entry.
NOT_COUNTED: set[str] = set()


@pytest.mark.parametrize("kind", ["query", "entity"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_value_is_a_counted_miss_and_is_replaced(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    corruption: str,
) -> None:
    read = READERS[kind]
    expected = expected_rows(shop_engine, kind)
    assert read(session_factory) == expected  # the fill
    key = the_key(redis_client, namespace, kind)
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    bad = CORRUPTIONS[corruption](good, kind)
    assert bad != good
    redis_client.set(key, bad, px=600_000)
    errors_before = decode_errors(cache)

    sql.reset()
    with caplog.at_level(logging.WARNING, logger="sa_redis_cache"):
        assert read(session_factory) == expected
    assert sql.count >= 1, "a corrupt entry must be a miss that reads the database"
    counted = corruption not in NOT_COUNTED
    assert decode_errors(cache) == errors_before + counted
    if counted:
        assert any(key.decode() in r.getMessage() for r in caplog.records), "it is logged"

    # the corrupt value was replaced by a good one: same bytes as the first fill
    assert same_entry(redis_client.get(key), good)
    assert redis_client.pttl(key) > 0
    sql.reset()
    assert read(session_factory) == expected
    assert sql.count == 0
    assert decode_errors(cache) == errors_before + counted


@pytest.mark.parametrize("kind", ["query", "entity"])
@pytest.mark.parametrize("document", [{"a": 1, "b": 2}, ["x", "y"]])
def test_wrong_shape_document_is_counted(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    kind: str,
    document: Any,
) -> None:
    read = READERS[kind]
    read(session_factory)
    key = the_key(redis_client, namespace, kind)
    redis_client.set(key, pack(document), px=600_000)
    read(session_factory)
    assert decode_errors(cache) == 1


def test_total_counts_each_read_once(session_factory: sessionmaker[Session], cache: Cache) -> None:
    from examples.shop import Category

    stmt = select(Product, Category).join(Product.category).where(Product.id < 3)
    for _ in range(2):
        with session_factory() as s:
            s.execute(stmt.options(FromCache())).all()
    total = cache.stats()["total"]
    assert (total["hits"], total["misses"]) == (1, 1)


@pytest.mark.parametrize("kind", ["query", "entity"])
@pytest.mark.parametrize("redis_type", ["list", "hash", "set"])
def test_key_of_the_wrong_redis_type_is_a_miss_and_is_replaced(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    kind: str,
    redis_type: str,
) -> None:
    """Pinned behaviour: MGET answers nil for a key that is not a string, so the read path
    cannot tell it from an absent key. It is a plain miss (not counted as a decode error)
    and the compare-and-set fill's SET replaces it with a string entry."""
    read = READERS[kind]
    expected = expected_rows(shop_engine, kind)
    read(session_factory)
    key = the_key(redis_client, namespace, kind)
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    redis_client.delete(key)
    if redis_type == "list":
        redis_client.rpush(key, b"a", b"b")
    elif redis_type == "hash":
        redis_client.hset(key, mapping={"a": b"1"})
    else:
        redis_client.sadd(key, b"a")
    misses_before = misses(cache, kind)

    sql.reset()
    assert read(session_factory) == expected
    assert sql.count >= 1
    assert misses(cache, kind) == misses_before + 1
    assert decode_errors(cache) == 0
    assert redis_client.type(key) == b"string"
    assert same_entry(redis_client.get(key), good)
    sql.reset()
    assert read(session_factory) == expected
    assert sql.count == 0


def _poisoned(good: bytes, kind: str) -> bytes:
    """``good`` with every product name replaced: a valid entry that must never be served."""
    stamp, body = unpack(good)
    name_at = list(sa.inspect(Product).column_attrs.keys()).index("name")
    rows = [body[0]] if kind == "entity" else [obj[1] for obj in body[3]]
    for row in rows:
        row[name_at] = "poisoned"
    return pack([stamp, body])


@pytest.mark.parametrize("kind", ["query", "entity"])
def test_poisoned_entry_under_the_real_key_is_served(
    session_factory: sessionmaker[Session],
    sql: SQLCounter,
    redis_client: redis.Redis,
    namespace: str,
    kind: str,
) -> None:
    """Control for the schema-hash tests: the poisoned value is visible when it is read."""
    read = READERS[kind]
    read(session_factory)
    key = the_key(redis_client, namespace, kind)
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    redis_client.set(key, _poisoned(good, kind), px=600_000)
    sql.reset()
    got = read(session_factory)
    assert sql.count == 0
    assert {row["name"][0] for row in got} == {"poisoned"}


def test_entity_entry_under_another_schema_hash_is_never_read(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    expected = expected_rows(shop_engine, "entity")
    read_entity(session_factory)
    key = the_key(redis_client, namespace, "entity")
    prefix, schema_hash, scope, pk = key.rsplit(b":", 3)
    assert pk == str(ENTITY_PK).encode()
    assert schema_hash == sa_redis_cache.models.table_schema_hash(PRODUCTS).encode()
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    other = b":".join([prefix, b"0123456789ab", scope, pk])
    redis_client.delete(key)
    redis_client.set(other, _poisoned(good, "entity"), px=600_000)

    sql.reset()
    assert read_entity(session_factory) == expected
    assert sql.count == 1
    assert same_entry(redis_client.get(key), good)  # refilled under the current hash
    assert unpack(redis_client.get(other)) == unpack(_poisoned(good, "entity"))  # untouched


@pytest.mark.parametrize("kind", ["query", "entity"])
def test_a_deploy_that_changes_the_schema_never_reads_old_entries(
    shop_engine: sa.Engine,
    sql: SQLCounter,
    redis_url: str,
    redis_client: redis.Redis,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Old-shaped entries (a poisoned one here) stay unread by a process whose model differs.

    A new process (a fresh Cache on the same namespace) computes another schema hash for
    ``products``: its query digests and entity keys must differ from the old process's.
    """
    import redis as redis_lib

    read = READERS[kind]
    expected = expected_rows(shop_engine, kind)
    old_client = redis_lib.Redis.from_url(redis_url)
    new_client = redis_lib.Redis.from_url(redis_url)
    old_cache = Cache(old_client, namespace=namespace)
    new_cache = Cache(new_client, namespace=namespace)
    try:
        old_factory = sessionmaker(shop_engine)
        old_cache.attach(old_factory)
        read(old_factory)
        old_key = the_key(redis_client, namespace, kind)
        good = redis_client.get(key := old_key)
        assert isinstance(good, bytes)
        redis_client.set(key, _poisoned(good, kind), px=600_000)

        real_hash = sa_redis_cache.models.table_schema_hash

        def changed_hash(table: sa.Table) -> str:
            return "feedfacecafe" if table.name == "products" else real_hash(table)

        monkeypatch.setattr(sa_redis_cache.models, "table_schema_hash", changed_hash)
        new_factory = sessionmaker(shop_engine)
        new_cache.attach(new_factory)
        sql.reset()
        assert read(new_factory) == expected
        assert sql.count >= 1
        keys = data_keys(redis_client, namespace, kind)
        assert len(keys) == 2, keys
        assert unpack(redis_client.get(old_key)) == unpack(_poisoned(good, kind))
    finally:
        old_cache.detach()  # their engine listeners and publishers must not outlive the test
        new_cache.detach()
        old_client.close()
        new_client.close()


def test_entity_entry_of_another_row_under_the_key_is_not_served(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    expected = expected_rows(shop_engine, "entity")
    read_entity(session_factory)
    key = the_key(redis_client, namespace, "entity")
    with session_factory() as s:
        s.get(Product, ENTITY_PK + 1)
    other_key = key[: -len(str(ENTITY_PK))] + str(ENTITY_PK + 1).encode()
    other = redis_client.get(other_key)
    assert isinstance(other, bytes)
    redis_client.set(key, other, px=600_000)
    sql.reset()
    with session_factory() as s:
        product = s.get(Product, ENTITY_PK)
        assert product is not None
        assert product.id == ENTITY_PK
        assert [snapshot(product)] == expected


def test_query_entry_of_another_statement_under_the_key_is_not_served(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    sql: SQLCounter,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    low = select(Product).where(Product.id < 3).order_by(Product.id)
    high = select(Product).where(Product.id > 100).order_by(Product.id)
    with sessionmaker(shop_engine)() as s:
        expected = [snapshot(p) for p in s.scalars(high)]
    with session_factory() as s:
        s.scalars(low.options(FromCache())).all()
    low_key = the_key(redis_client, namespace, "query")
    with session_factory() as s:
        s.scalars(high.options(FromCache())).all()
    (high_key,) = set(data_keys(redis_client, namespace, "query")) - {low_key}
    low_entry = redis_client.get(low_key)
    assert isinstance(low_entry, bytes)
    redis_client.set(high_key, low_entry, px=600_000)
    with session_factory() as s:
        assert [snapshot(p) for p in s.scalars(high.options(FromCache()))] == expected
    assert decode_errors(cache) == 1


def _plant_a_list(client: redis.Redis, key: str) -> None:
    client.delete(key)
    client.rpush(key, b"x")


def _plant_garbage(client: redis.Redis, key: str) -> None:
    client.set(key, b"not a number")


@pytest.mark.parametrize("plant", [_plant_a_list, _plant_garbage], ids=["wrong_type", "garbage"])
@pytest.mark.parametrize("counter", ["v", "g"])
@pytest.mark.parametrize("kind", ["query", "entity"])
def test_a_corrupt_counter_never_fails_a_read(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    redis_client: redis.Redis,
    namespace: str,
    kind: str,
    counter: str,
    plant: Callable[[redis.Redis, str], None],
) -> None:
    """A version/generation counter that is not a string, or not a number: reads stay
    correct and never raise."""
    read = READERS[kind]
    expected = expected_rows(shop_engine, kind)
    read(session_factory)
    plant(redis_client, f"sarc:{namespace}:{{{namespace}:products}}:{counter}")
    for _ in range(2):
        assert read(session_factory) == expected


def test_entry_document_is_orjson() -> None:
    """The corruptions above assume the envelope layout: magic, version byte, orjson."""
    packed = pack([1, "a"])
    assert packed[:2] == b"\x01S"
    assert packed[2] == CODEC_VERSION
    assert orjson.loads(packed[3:]) == [1, "a"]
