"""``@cache.cached(prefix, ttl=...)``: the recipe's function decorator, without pickle.

Counts the calls of the decorated function to tell hits from misses, and checks the keys,
TTLs and values that land in Redis.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
import uuid
from collections import Counter
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
import redis as redis_lib

from sa_redis_cache import Cache

if TYPE_CHECKING:
    from collections.abc import Iterator

    import redis


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


def typed(value: Any) -> Any:
    """``value`` with the type of every part spelled out, for exact comparisons."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, set | frozenset):
        return (type(value).__name__, sorted(repr(typed(v)) for v in value))
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat(), repr(value.tzinfo), value.fold)
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, repr(value))


class Spy:
    """A function that records its calls and returns a value per argument."""

    def __init__(self, results: dict[Any, Any] | None = None) -> None:
        self.calls: Counter[Any] = Counter()
        self.results = results or {}

    # object, not Any: Any would also match cached()'s overload for async functions
    def __call__(self, key: Any) -> object:
        self.calls[repr(key)] += 1
        return self.results.get(key, ("result", key))


def test_second_call_is_served_from_redis(cache: Cache) -> None:
    calls = Counter[int]()

    @cache.cached("profile", ttl=60)
    def profile(user_id: int) -> dict[str, Any]:
        calls[user_id] += 1
        return {"id": user_id, "name": f"user {user_id}"}

    assert profile(1) == {"id": 1, "name": "user 1"}
    assert profile(1) == {"id": 1, "name": "user 1"}
    assert profile(2) == {"id": 2, "name": "user 2"}
    assert calls == {1: 1, 2: 1}
    stats = cache.stats()["functions"]["profile"]
    assert (stats["hits"], stats["misses"], stats["fills"]) == (1, 2, 2)
    assert profile.__name__ == "profile"  # functools.update_wrapper


VALUES: dict[str, Any] = {
    "dict": {"a": 1, "b": [1, 2.5, "x"], "nested": {"deep": {"k": None}}},
    "dict_int_keys": {1: "one", 2: "two"},
    "dict_tag_like_key": {"$t": [1, 2]},
    "list": [1, "two", 3.0, None, True],
    "tuple": (1, "a", (2, 3)),
    "empty_tuple": (),
    "decimal": Decimal("12.3400"),
    "decimal_negative_exponent": Decimal("-1E+3"),
    "naive_datetime": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
    "aware_datetime": dt.datetime(2024, 10, 27, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),
    "utc_datetime": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    "date": dt.date(1999, 12, 31),
    "time": dt.time(12, 30, 15, 5),
    "timedelta": dt.timedelta(days=-1, microseconds=3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "bytes": b"\x00\xff binary",
    "big_int": 2**100,
    "negative_big_int": -(2**70),
    "float_nan": float("nan"),
    "float_inf": float("-inf"),
    "enum": Colour.BLUE,
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "unicode": "ünïcødé ☃ 🎉 \u0000 \ud7ff",
    "mixed": [{"when": dt.date(2020, 1, 1), "amount": Decimal("0.10"), "id": uuid.UUID(int=5)}],
}
EMPTY: dict[str, Any] = {
    "none": None,
    "empty_list": [],
    "empty_dict": {},
    "empty_str": "",
    "zero": 0,
    "false": False,
    "empty_bytes": b"",
    "empty_set": set(),
}


@pytest.mark.parametrize("name", sorted(VALUES) + sorted(EMPTY))
def test_results_round_trip_exactly(cache: Cache, name: str) -> None:
    """Every result comes back equal and of the same types; empty results are cached too."""
    value = {**VALUES, **EMPTY}[name]
    calls = 0

    @cache.cached("roundtrip", ttl=60)
    def produce(which: str) -> Any:
        nonlocal calls
        calls += 1
        return value

    first = produce(name)
    second = produce(name)
    assert calls == 1, "the second call must be served from Redis"
    assert typed(second) == typed(value)
    assert typed(first) == typed(value)
    if isinstance(value, dt.datetime):
        assert second.utcoffset() == value.utcoffset()


def test_results_are_fresh_copies(cache: Cache) -> None:
    @cache.cached("copies", ttl=60)
    def listing() -> list[dict[str, int]]:
        return [{"a": 1}]

    listing()
    got = listing()
    got.append({"b": 2})
    got[0]["a"] = 99
    assert listing() == [{"a": 1}]


HOSTILE = [
    "plain",
    "with:colon",
    "sarc:other:f:prefix:0123",
    "*",
    "a*b?c[d]e\\",
    "new\nline\r\n",
    "tab\tand space ",
    "ünïcødé ☃ 🎉",
    "",
    "\x00nul",
    "x" * (1 << 20),
    "x" * (1 << 20) + "y",
]


def test_hostile_arguments_make_safe_distinct_keys(
    cache: Cache, redis_client: redis.Redis, namespace: str
) -> None:
    calls: Counter[str] = Counter()

    @cache.cached("hostile", ttl=60)
    def fn(arg: str) -> list[Any]:
        calls[arg] += 1
        return [len(arg), arg[-3:]]

    for arg in HOSTILE:
        assert fn(arg) == [len(arg), arg[-3:]]
    for arg in HOSTILE:
        assert fn(arg) == [len(arg), arg[-3:]]
    assert set(calls) == set(HOSTILE)
    assert all(count == 1 for count in calls.values())
    keys = list(redis_client.scan_iter(match=f"sarc:{namespace}:f:*"))
    assert len(keys) == len(HOSTILE)
    shape = re.compile(rb"sarc:" + namespace.encode() + rb":f:hostile:[0-9a-f]{32}")
    for key in keys:
        assert shape.fullmatch(key), key


def test_argument_boundaries_do_not_collide(cache: Cache) -> None:
    calls: list[tuple[Any, ...]] = []

    @cache.cached("pairs", ttl=60)
    def pair(a: Any, b: Any = "") -> tuple[Any, Any]:
        calls.append((a, b))
        return (a, b)

    candidates: list[tuple[Any, Any]] = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a:b:c", ""),
        (1, 2),
        ("1", "2"),
        (1.0, 2),
        (True, 2),
        ([1, 2], ""),
        ((1, 2), ""),
        ({"a": 1}, ""),
        ({"a": "1"}, ""),
        (None, ""),
        ("None", ""),
        (Decimal("1.0"), 2),
        (Decimal("1.00"), 2),
        (b"a", ""),
        ("a", ""),
    ]
    for a, b in candidates:
        assert typed(pair(a, b)) == typed((a, b))
    assert len(calls) == len(candidates), "each distinct call is its own entry"
    for a, b in candidates:
        assert typed(pair(a, b)) == typed((a, b))
    assert len(calls) == len(candidates)


def test_positional_keyword_and_default_binding_share_an_entry(cache: Cache) -> None:
    calls = 0

    @cache.cached("binding", ttl=60)
    def profile(user_id: int, *, verbose: bool = False, **extra: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        return [user_id, verbose, extra]

    assert profile(7) == [7, False, {}]
    assert profile(user_id=7) == [7, False, {}]
    assert profile(7, verbose=False) == [7, False, {}]
    assert calls == 1
    assert profile(7, verbose=True) == [7, True, {}]
    assert calls == 2
    assert profile(7, a=1, b=2) == [7, False, {"a": 1, "b": 2}]
    assert profile(7, b=2, a=1) == [7, False, {"a": 1, "b": 2}]
    assert calls == 3


def test_invalidate_removes_exactly_that_call(
    cache: Cache, redis_client: redis.Redis, namespace: str
) -> None:
    spy = Spy()
    fn = cache.cached("inval", ttl=60)(spy)

    @cache.cached("inval:other", ttl=60)
    def other(key: Any) -> str:
        return "other"

    for arg in ("a", "b", "with:colon"):
        fn(arg)
    other("a")
    assert fn.invalidate("a") is True
    assert fn.invalidate("a") is False
    assert fn.invalidate(key="with:colon") is True  # keyword form of a positional call
    for arg in ("a", "b", "with:colon"):
        fn(arg)
    assert spy.calls == {"'a'": 2, "'b'": 1, "'with:colon'": 2}
    # invalidate_all of prefix "inval" leaves prefix "inval:other" alone
    assert fn.invalidate_all() == 3
    assert other.invalidate_all() == 1
    assert list(redis_client.scan_iter(match=f"sarc:{namespace}:f:*")) == []


def test_every_key_has_a_ttl(cache: Cache, redis_client: redis.Redis, namespace: str) -> None:
    @cache.cached("short", ttl=30)
    def short(x: int) -> int:
        return x

    @cache.cached("default")
    def default(x: int) -> int:
        return x

    for x in range(5):
        short(x)
        default(x)
    pttls = {
        key: redis_client.pttl(key) for key in redis_client.scan_iter(match=f"sarc:{namespace}:*")
    }
    assert len(pttls) == 10
    for key, pttl in pttls.items():
        limit = 30_000 if b":f:short:" in key else int(cache.default_ttl * 1000)
        assert 0 < pttl <= limit, (key, pttl)


class Opaque:
    """A result the codec refuses: nothing pickled, ever."""


def test_unserialisable_result_is_returned_but_not_cached(
    cache: Cache, redis_client: redis.Redis, namespace: str
) -> None:
    made: list[Opaque] = []

    @cache.cached("opaque", ttl=60)
    def make() -> Any:
        made.append(Opaque())
        return {"obj": made[-1]}

    first = make()
    second = make()
    assert len(made) == 2
    assert first["obj"] is made[0]
    assert second["obj"] is made[1]
    assert list(redis_client.scan_iter(match=f"sarc:{namespace}:f:*")) == []
    assert cache.stats()["functions"]["opaque"]["uncacheable"] == 2


def test_unencodable_argument_calls_uncached(cache: Cache) -> None:
    calls = 0

    @cache.cached("opaque_arg", ttl=60)
    def use(arg: Any) -> int:
        nonlocal calls
        calls += 1
        return 1

    obj = Opaque()
    assert use(obj) == 1
    assert use(obj) == 1
    assert calls == 2
    assert cache.stats()["functions"]["opaque_arg"]["uncacheable"] == 2


def test_wrong_arguments_raise_like_the_function(cache: Cache) -> None:
    @cache.cached("arity", ttl=60)
    def one(x: int) -> int:
        return x

    with pytest.raises(TypeError):
        one(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        one.invalidate()  # type: ignore[call-arg]  # the signature is one's: x is missing


def test_exceptions_are_not_cached(cache: Cache) -> None:
    calls = 0

    @cache.cached("failing", ttl=60)
    def fail() -> int:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            fail()
    assert calls == 2


def test_oversize_result_is_not_cached(redis_url: str, namespace: str) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    try:
        small = Cache(client, namespace=namespace, max_entry_bytes=1000)
        calls = 0

        @small.cached("big", ttl=60)
        def big(n: int) -> str:
            nonlocal calls
            calls += 1
            return "x" * n

        big(10)
        big(10)
        big(5000)
        big(5000)
        assert calls == 3
        stats = small.stats()["functions"]["big"]
        assert stats["oversize"] == 2
    finally:
        client.close()


GARBAGE = [
    b"",
    b"garbage",
    b"\x01F",
    b"\x01F\x01S\x01[1,",
    b"\x01F\x01S\x09[1]",  # another codec version
    b'\x01F\x01S\x01{"$dt":5}',
    b'\x01F\x01S\x01{"$nosuchtag":1}',
    b'\x01F\x01S\x01{"$e":["builtins:int","real"]}',
    b'\x01S\x01["a query entry, not a function result"]',
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_under_the_key_is_a_counted_miss(
    cache: Cache, redis_client: redis.Redis, garbage: bytes
) -> None:
    spy = Spy()
    fn = cache.cached("garbage", ttl=60)(spy)
    assert fn("k") == ("result", "k")
    key = fn.key_for("k")
    good = redis_client.get(key)
    redis_client.set(key, garbage, px=60_000)
    assert fn("k") == ("result", "k")
    assert spy.calls["'k'"] == 2
    assert cache.stats()["functions"]["garbage"]["decode_errors"] == 1
    assert redis_client.get(key) == good  # replaced by the refill
    assert fn("k") == ("result", "k")
    assert spy.calls["'k'"] == 2


@pytest.mark.parametrize("redis_type", ["list", "hash", "zset"])
def test_key_of_the_wrong_redis_type_is_a_counted_miss(
    cache: Cache, redis_client: redis.Redis, redis_type: str
) -> None:
    spy = Spy()
    fn = cache.cached("wrongtype", ttl=60)(spy)
    key = fn.key_for("k")
    if redis_type == "list":
        redis_client.rpush(key, b"x")
    elif redis_type == "hash":
        redis_client.hset(key, "f", b"x")
    else:
        redis_client.zadd(key, {b"x": 1})
    assert fn("k") == ("result", "k")
    assert cache.stats()["functions"]["wrongtype"]["decode_errors"] == 1
    assert redis_client.type(key) == b"string"
    assert 0 < redis_client.pttl(key) <= 60_000
    assert fn("k") == ("result", "k")
    assert spy.calls["'k'"] == 1


@pytest.fixture
def dead_redis_cache(namespace: str) -> Iterator[Cache]:
    """A cache whose Redis refuses connections (nothing listens on port 1).

    Built from a URL, so with the library's short timeouts: a ``redis.Redis(host=...)``
    client of redis-py 8 retries ten times with backoff (seconds per call) instead.
    """
    cache = Cache("redis://127.0.0.1:1/0", namespace=namespace)
    yield cache
    cache.client.close()


def test_redis_down_calls_the_function(dead_redis_cache: Cache) -> None:
    spy = Spy()
    fn = dead_redis_cache.cached("down", ttl=60)(spy)
    assert fn("k") == ("result", "k")
    assert fn("k") == ("result", "k")
    assert spy.calls["'k'"] == 2
    assert dead_redis_cache.stats()["functions"]["down"]["errors"] == 2
    assert fn.invalidate("k") is False


@pytest.mark.parametrize("prefix", ["", "has space", "glob*", "brace{", "new\nline"])
def test_bad_prefix_is_refused(cache: Cache, prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        cache.cached(prefix)(lambda: 1)


@pytest.mark.parametrize("ttl", [0, -1, True, float("inf"), float("nan"), "60"])
def test_bad_ttl_is_refused(cache: Cache, ttl: Any) -> None:
    """An infinite TTL used to raise OverflowError on every call; 0 or less meant 1 ms."""
    with pytest.raises(ValueError, match=r"ttl must be a positive, finite number"):
        cache.cached("bad_ttl", ttl=ttl)(lambda: 1)


@pytest.mark.parametrize("document", [b'{"$b":"!!"}', b'{"$D":5}'], ids=["bytes", "decimal"])
def test_malformed_tag_payload_is_a_counted_miss(
    cache: Cache, redis_client: redis.Redis, document: bytes
) -> None:
    spy = Spy()
    fn = cache.cached("tags", ttl=60)(spy)
    key = fn.key_for("k")
    redis_client.set(key, b"\x01F\x01S\x01" + document, px=60_000)
    assert fn("k") == ("result", "k")
    assert cache.stats()["functions"]["tags"]["decode_errors"] == 1
