"""Counters Redis cannot INCR, and keys of the wrong Redis type, under the cache's names.

Two caches on one namespace stand for two processes: ``writer`` commits, ``reader`` reads.
A commit whose invalidation did not reach Redis is invisible to the reader alone (the
writer's own process bypasses tables it could not deliver), so every check of a commit
reads through the other cache. What is planted must never hide a commit from it, never
raise into the application, never open the breaker, and never keep a table uncached: the
next fill heals it (docs/guarantees.md#hostile-values).
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from sa_redis_cache.counters import parse_counter
from sa_redis_cache.protocol import KeyScheme, scripts
from sa_redis_cache.redis_io import SyncRedisIO

if TYPE_CHECKING:
    from tests.modes import Db, Runner
    from tests.support import SQLCounter, Two


def name_by_query(factory: sessionmaker[Session], pid: int) -> str:
    with factory() as s:
        stmt = select(Product).where(Product.id == pid).options(FromCache())
        return s.scalars(stmt).one().name


def name_by_get(factory: sessionmaker[Session], pid: int) -> str:
    with factory() as s:
        got = s.get(Product, pid)
        assert got is not None
        return got.name


def clean(cache: Cache) -> None:
    """Nothing failed: no Redis error counted, the breaker closed, every write delivered."""
    assert cache.stats()["total"]["errors"] == 0
    assert cache._core.breaker.state == "closed"
    assert cache._core.undelivered == set()


# -- finding 4: counters parsed exactly as Redis parses them ------------------------------

CANDIDATES = [
    "0", "7", "-7", "42", "-0", "+7", " 7", "7 ", " 7 ", "07", "00", "7_0", "1e3", "0x10",
    "7.0", "", "-", "7\n", "\u0667", "9223372036854775807", "-9223372036854775808",
    "9223372036854775808", "-9223372036854775809", "9999999999999999999",
    "99999999999999999999", "1" * 25, "0007", "-07", "--7", "7-",
]  # fmt: skip


def test_counters_are_read_as_redis_reads_them(redis_client: redis.Redis, namespace: str) -> None:
    """parse_counter, the scripts' check (capture_versions keeps a counter it accepts) and
    Redis's own INCRBY agree on every candidate."""
    key = KeyScheme(namespace).version_key("probe")
    io = SyncRedisIO(redis_client)
    for text in CANDIDATES:
        raw = text.encode()
        redis_client.set(key, raw)
        try:
            by_redis: int | None = int(redis_client.incrby(key, 0))
        except redis.ResponseError:
            by_redis = None
        redis_client.set(key, raw)
        kept = io.run_script(*scripts.capture_versions([key], [60_000])) == [raw]
        assert parse_counter(raw) == by_redis, text
        assert kept == (by_redis is not None), text


@pytest.mark.parametrize("form", [" {} ", "+{}", "0{}", "{}_0"])
@pytest.mark.parametrize("kind", ["query", "entity"])
def test_a_counter_redis_cannot_incr_never_hides_a_commit(
    two: Two, redis_client: redis.Redis, product: int, sql: SQLCounter, kind: str, form: str
) -> None:
    """A version (query) or generation (entity) that ``int()`` reads as its own value but
    INCR refuses: the reader must not keep serving the old row once commit() returned."""
    read = name_by_query if kind == "query" else name_by_get
    assert read(two.read, product) == "scratch"  # filled
    table_key = two.keys.version_key if kind == "query" else two.keys.generation_key
    key = table_key("products")
    current = redis_client.get(key)
    assert isinstance(current, bytes)
    redis_client.set(key, form.format(current.decode()).encode())

    with two.write() as s:
        if kind == "query":
            got = s.get(Product, product)
            assert got is not None
            got.name = "renamed"
        else:  # unknown rows: the generation must move
            s.execute(update(Product).where(Product.id == product).values(name="renamed"))
        s.commit()

    assert read(two.read, product) == "renamed"
    clean(two.writer)  # the commit's invalidation landed
    sql.reset()
    assert read(two.read, product) == "renamed"
    assert sql.count == 0  # cached again
    assert parse_counter(redis_client.get(key)) is not None  # healed


# -- finding 5: keys of the wrong Redis type heal -----------------------------------------


def test_a_writers_key_of_another_type_is_replaced(
    two: Two, redis_client: redis.Redis, product: int, sql: SQLCounter
) -> None:
    """A string under the writers key: fills and writes went on failing with WRONGTYPE."""
    redis_client.set(two.keys.writers_key("products"), b"planted")
    assert name_by_query(two.read, product) == "scratch"
    assert name_by_query(two.read, product) == "scratch"
    sql.reset()
    assert name_by_query(two.read, product) == "scratch"
    assert sql.count == 0

    redis_client.set(two.keys.writers_key("products"), b"planted")
    with two.write() as s:
        got = s.get(Product, product)
        assert got is not None
        got.price = Decimal("2.50")
        s.commit()
    clean(two.writer)
    with two.read() as s:
        stmt = select(Product.price).where(Product.id == product).options(FromCache())
        assert s.scalars(stmt).one() == Decimal("2.50")
    clean(two.reader)


def test_a_version_key_of_another_type_neither_opens_the_breaker_nor_stays(
    two: Two, redis_client: redis.Redis, product: int, sql: SQLCounter
) -> None:
    """A hash under the version key: every read's capture failed, and the breaker opened."""
    key = two.keys.version_key("products")
    redis_client.delete(key)
    redis_client.hset(key, mapping={"planted": b"1"})
    for _ in range(4):  # more than breaker_threshold
        assert name_by_query(two.read, product) == "scratch"
    clean(two.reader)
    sql.reset()
    assert name_by_query(two.read, product) == "scratch"
    assert sql.count == 0
    assert redis_client.type(key) == b"string"


@pytest.mark.parametrize("plant", ["hash", "garbage"])
def test_explicit_invalidations_heal_what_they_bump(
    cache: Cache,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    plant: str,
) -> None:
    """invalidate(), invalidate_model() and invalidate_query() raised the Redis error."""
    keys = KeyScheme(namespace)
    stmt = select(Product).where(Product.id == product).options(FromCache())
    with session_factory() as s:
        s.scalars(stmt).one()
    (entry,) = redis_client.scan_iter(match=f"sarc:{namespace}:*:q:*")
    counters = [keys.version_key("products"), keys.generation_key("products"), entry + b":inv"]
    for key in counters:
        redis_client.delete(key)
        if plant == "hash":
            redis_client.hset(key, mapping={"planted": b"1"})
        else:
            redis_client.set(key, b"+7")
    cache.invalidate(Product, product)
    cache.invalidate_model(Product)
    assert cache.invalidate_query(stmt) == 1  # the entry was there
    for key in counters:
        assert parse_counter(redis_client.get(key)) is not None


def test_undelivered_writes_are_delivered_over_unusable_counters(
    cache: Cache, redis_client: redis.Redis, namespace: str
) -> None:
    keys = KeyScheme(namespace)
    redis_client.hset(keys.version_key("products"), mapping={"planted": b"1"})
    redis_client.set(keys.generation_key("products"), b" 9 ")
    cache._core.keep_undelivered(["products"])
    assert cache._core.deliver_undelivered()
    assert cache._core.undelivered == set()


# -- sorted sets scored beyond anything the cache writes ----------------------------------

FAR_MS = 4_102_444_800_000  # 2100-01-01 in milliseconds: no mark or lease is scored so late


@pytest.mark.cluster
def test_a_writer_mark_scored_beyond_any_writers_is_removed(
    in_mode: Runner, mode_redis_client: redis.Redis, product: int
) -> None:
    """``ZADD <writers> <year 2100> forged``: every fill of the table was refused until
    then, and each flush renewed the set's TTL, keeping the mark for good. Planted in both
    tables of a joined statement, so that on a cluster the other slot's check
    (``check_versions.lua``) meets one too."""
    keys = KeyScheme(in_mode.namespace)
    marks = [keys.writers_key(t) for t in ("products", "categories")]
    joined = (
        select(Product.name, Category.name)
        .join(Category, Category.id == Product.category_id)
        .where(Product.id == product)
        .options(FromCache())
    )

    def read(db: Db) -> tuple[str, str]:
        with db.session() as s:
            got = s.get(Product, product)
            assert got is not None
            (row,) = s.execute(joined)
            assert row[0] == got.name
            return (row[0], row[1])

    def scenario(db: Db) -> None:
        for key in marks:
            mode_redis_client.zadd(key, {"forged": FAR_MS})
        first = read(db)
        assert db.cache.stats()["total"]["fill_refused"] == 0
        db.sql.reset()
        assert read(db) == first
        assert db.sql.count == 0  # cached: both entries stored
        assert [mode_redis_client.zscore(key, "forged") for key in marks] == [None, None]

        # a flush meets one too, and does not keep it alive
        mode_redis_client.zadd(marks[0], {"forged": FAR_MS})
        with db.session() as s:
            got = s.get(Product, product)
            got.name = "renamed"
            s.commit()
        assert mode_redis_client.zscore(marks[0], "forged") is None
        assert read(db)[0] == "renamed"
        assert db.cache.stats()["total"]["errors"] == 0

    in_mode(scenario)


def test_a_writer_mark_within_a_writers_reach_still_refuses_fills(
    two: Two, redis_client: redis.Redis, product: int, sql: SQLCounter
) -> None:
    """What is removed is only what no writer could have scored: a mark that ends within
    one mark's life (a writer between flush and commit) still refuses every fill."""
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    key = two.keys.writers_key("products")
    redis_client.zadd(key, {"in flight": now_ms + scripts.WRITER_MARK_MS})
    for _ in range(2):
        assert name_by_query(two.read, product) == "scratch"
    assert two.reader.stats()["total"]["fill_refused"] == 2
    assert redis_client.zscore(key, "in flight") is not None


# -- the other keys: region sets -----------------------------------------------------------


def test_a_region_key_of_another_type_heals(
    cache: Cache,
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    sql: SQLCounter,
) -> None:
    """A string at ``sarc:<ns>:r:default``: every ``FromCache`` read paid a failing SADD,
    counted an error and logged "redis unavailable" (the breaker opened), the PEXPIRE sent
    with it kept the string alive, and ``invalidate_region`` raised WRONGTYPE."""
    key = KeyScheme(namespace).region_key("default")
    redis_client.set(key, b"planted")
    for _ in range(4):  # more than breaker_threshold
        assert name_by_query(session_factory, product) == "scratch"
    clean(cache)
    assert redis_client.smembers(key) == {b"products"}  # recorded over what was planted
    sql.reset()
    assert name_by_query(session_factory, product) == "scratch"
    assert sql.count == 0

    # met by invalidate_region: what the set recorded is lost, so every table retires
    redis_client.set(key, b"planted")
    retired = cache.invalidate_region("default")
    assert "products" in retired
    assert name_by_query(session_factory, product) == "scratch"
    assert sql.count == 1  # the entry was retired
    assert redis_client.smembers(key) == {b"products"}  # and its table recorded again
    assert cache.invalidate_region("default") == ["products"]
    clean(cache)
