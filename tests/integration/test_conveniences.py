"""What users of a web framework expect (issue 16): ``cached(key=, ignore=)`` with a
warning when calls cannot be cached, ``cache.clear()`` and ``cache.invalidate_region()``."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Product
from sa_redis_cache import Cache, FromCache
from tests.support import SQLCounter


class Request:
    """Stands for a web framework's request object: the codec cannot encode it."""


# --------------------------------------------------------------------------- cached


def test_ignore_leaves_a_session_argument_out_of_the_key(
    session_factory: sessionmaker[Session], cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sa_redis_cache")
    calls: list[int] = []

    @cache.cached("category_name", ignore=("db", "request"))
    def category_name(category_id: int, db: Session, request: Request) -> str:
        calls.append(category_id)
        found = db.get(Category, category_id)
        assert found is not None
        return found.name

    with session_factory() as first, session_factory() as second:
        assert category_name(1, first, Request()) == category_name(1, second, Request())
    assert calls == [1]
    assert category_name.invalidate(1, None, None)  # type: ignore[arg-type]  # ignored
    assert cache.stats()["functions"]["category_name"]["uncacheable"] == 0
    assert not caplog.records


def test_ignored_arguments_may_be_left_out_of_invalidate_and_key_for(
    session_factory: sessionmaker[Session], cache: Cache
) -> None:
    """They are no part of the key: ``invalidate(1)`` needs no session to name the call."""
    calls: list[int] = []

    @cache.cached("category_by_id", ignore=("db", "request"))
    def category_name(category_id: int, db: Session, *, request: Request | None) -> str:
        calls.append(category_id)
        return db.get_one(Category, category_id).name

    with session_factory() as s:
        category_name(1, s, request=Request())
        assert category_name.key_for(1) == category_name.key_for(1, s, request=None)  # type: ignore[call-arg]
        assert category_name.invalidate(1) is True  # type: ignore[call-arg]
        assert category_name.invalidate(category_id=1) is False  # type: ignore[call-arg]
        category_name(1, s, request=None)
    assert calls == [1, 1]
    with pytest.raises(TypeError, match="'category_id'"):
        category_name.invalidate()  # type: ignore[call-arg]  # a key's part is missing
    with pytest.raises(TypeError):
        category_name(1)  # type: ignore[call-arg]  # a call still needs every argument


def test_a_result_that_cannot_be_cached_warns_once_naming_the_function(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sa_redis_cache")

    @cache.cached("request_of")
    def request_of(user_id: int) -> Request:
        return Request()

    for user_id in range(3):
        request_of(user_id)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "cached('request_of') on " in message
    assert "logged once" in message
    assert cache.stats()["functions"]["request_of"]["uncacheable"] == 3


def test_key_builds_the_key_from_the_arguments(cache: Cache) -> None:
    calls: list[str] = []

    @cache.cached("search", key=lambda text, db: text.strip().lower())
    def search(text: str, db: object) -> list[str]:
        calls.append(text)
        return [text.strip().lower()]

    assert search("  Books", object()) == search("books ", object()) == ["books"]
    assert calls == ["  Books"]


def test_uncacheable_arguments_warn_once_naming_the_argument(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sa_redis_cache")

    @cache.cached("page")
    def page(user_id: int, request: Request) -> int:
        return user_id

    for _ in range(3):
        assert page(7, Request()) == 7
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "'request' (Request)" in message
    assert "ignore=('request',)" in message
    assert cache.stats()["functions"]["page"]["uncacheable"] == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ignore": ("dbb",)}, r"'dbb' is not a parameter of the function; it has user_id, db"),
        ({"ignore": ("db",), "key": lambda user_id, db: user_id}, "not both"),
        ({"key": "user_id"}, "key must be a function"),
    ],
)
def test_cached_arguments_are_checked(cache: Cache, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):

        @cache.cached("checked", **kwargs)
        def checked(user_id: int, db: object) -> int:
            return user_id


# --------------------------------------------------------------------------- clear


def test_clear_empties_the_namespace_but_keeps_queues_marks_and_stats(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_client: redis.Redis,
    sql: SQLCounter,
    product: int,
) -> None:
    @cache.cached("answer")
    def answer() -> int:
        return 42

    answer()
    books = select(Product).where(Product.id == product).options(FromCache())
    with session_factory() as s:
        s.scalars(books).all()
        s.get(Product, product)
    keys = cache.keys
    kept = {
        keys.prefix + "{" + cache.namespace + ":page_views}:wb:abc:0": "queued",
        keys.prefix + "{" + cache.namespace + ":page_views}:wbp:s:abc:1": "pending",
        keys.writers_key("products"): "mark",
        keys.workers_key("page_views", "s"): "workers",
        keys.ack_key("t1"): "acknowledgements",
    }
    for name, value in kept.items():
        redis_client.set(name, value, px=60_000)
    # a holder set as the local tier writes one (clear() fences its table, which replaces
    # a key of another type): a holder whose lease ends soon, which clear() waits out
    seconds, micros = redis_client.time()
    holders = keys.holders_key("products")
    redis_client.zadd(holders, {"a holder": seconds * 1000 + micros // 1000 + 1500})
    redis_client.pexpire(holders, 60_000)
    kept[holders] = "local-tier holders"
    # a primary key's text may end like a writer mark: the entry still goes
    redis_client.set(keys.entity_key("products", "h", "s", "x}:w"), "entry", px=60_000)
    redis_client.hset(keys.stats_key("total"), "hits", 1)
    assert cache.clear() >= 4  # entries, counters, the function's result
    left = {k.decode() for k in redis_client.scan_iter(match=keys.namespace_pattern)}
    # the region's tables stay too: invalidate_region must still find them; published
    # statistics stay (those of other scopes may have been published during the wait)
    stats = {k for k in left if k.startswith(keys.stats_key(""))}
    assert keys.stats_key("total") in stats
    assert left - stats == {*kept, keys.region_key("default")}
    with session_factory() as s:  # reads fill again
        sql.reset()
        s.scalars(books).all()
        s.get(Product, product)
        assert sql.count == 2


# --------------------------------------------------------------------------- regions


def test_invalidate_region_retires_its_entries_in_every_process(
    two: Any, sql: SQLCounter, product: int
) -> None:
    """``two.writer`` invalidates; ``two.reader``'s entries of the region are retired."""
    pages = select(Category).where(Category.id == 1).options(FromCache(region="pages"))
    other = select(Product).where(Product.id == product).options(FromCache(region="other"))

    def counts() -> list[int]:
        used = []
        for stmt in (pages, other):
            with two.read() as s:
                sql.reset()
                s.scalars(stmt).all()
                used.append(sql.count)
        return used

    assert counts() == [1, 1]
    assert counts() == [0, 0]
    assert two.writer.invalidate_region("pages") == ["categories"]
    assert counts() == [1, 0]  # another region, on another table, keeps its entry
    assert two.writer.invalidate_region("nothing read there") == []


def test_invalidate_region_of_a_lazy_collection(
    session_factory: sessionmaker[Session], cache: Cache, sql: SQLCounter
) -> None:
    def lazy(s: Session) -> int:
        category = s.get(Category, 1)
        assert category is not None
        return len(category.products)

    for expected in (2, 0):
        with session_factory() as s:
            sql.reset()
            lazy(s)
            assert sql.count == expected
    assert cache.invalidate_region("Category.products") == ["products"]
    with session_factory() as s:
        sql.reset()
        lazy(s)
        assert sql.count == 1


def test_invalidate_region_refuses_a_fill_that_read_before(
    session_factory: sessionmaker[Session], cache: Cache, shop_engine: sa.Engine
) -> None:
    """A read whose database query ran before the call must not store what it read."""
    stmt = select(Category).where(Category.id == 2).options(FromCache(region="late"))
    with session_factory() as s:
        s.scalars(stmt).all()  # the region knows its table
    cache.invalidate_region("late")
    fired: list[bool] = []

    def invalidate_mid_read(*_: Any) -> None:
        if not fired:
            fired.append(True)
            cache.invalidate_region("late")

    sa.event.listen(shop_engine, "after_cursor_execute", invalidate_mid_read)
    try:
        with session_factory() as s:
            s.scalars(stmt).all()
    finally:
        sa.event.remove(shop_engine, "after_cursor_execute", invalidate_mid_read)
    assert fired
    assert cache.stats()["regions"]["late"]["fill_refused"] == 1
