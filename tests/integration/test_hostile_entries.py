"""Bytes planted by a party with write access to Redis are misses, never served (issue 19).

Each test fills the cache through the public API, rewrites the real entry the way an
attacker would (a well-formed value, its stamp kept so that it would validate), and checks
that the next read gives the database's answer with SQL, counts a decode error and
replaces the value; nothing of the planted value reaches the application or the session:

* finding 2: a query entry naming another class, or an object where the statement's
  mapper or a relationship's target cannot be; a column of another JSON type;
* finding 3: a ``$e`` tag that names a class through a lazy module attribute (it must not
  import), or 2,000 distinct attribute paths (they must not grow the enum registry);
* finding 9: a 50 MB value under a query, entity, function and write-behind pending key
  (read once, then deleted: it is never loaded again).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from enum import Enum
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from examples.shop import Category, Customer, Product
from sa_redis_cache import Cache, ConfigurationError, FromCache, codec
from sa_redis_cache.codec import dumps_tagged, pack, unpack
from sa_redis_cache.models import mapper_name
from sa_redis_cache.protocol import pk_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support import SQLCounter

pytest_plugins = ["tests.wb_fixtures"]

QUERY = select(Product).where(Product.id.between(10, 14)).order_by(Product.id)
ENTITY_PK = 11
COLUMNS = list(sa.inspect(Product).column_attrs.keys())
CATEGORY = mapper_name(sa.inspect(Category))
BIG = 50 * 1024 * 1024


def entry_key(client: redis.Redis, namespace: str, marker: bytes) -> bytes:
    """The one key of this test's namespace whose name holds ``marker`` (``:q:``, ``:e:``...)."""
    keys: list[bytes] = [k for k in client.scan_iter(match=f"sarc:*{namespace}*") if marker in k]
    assert len(keys) == 1, keys
    return keys[0]


def decode_errors(cache: Cache) -> int:
    return int(cache.stats()["total"]["decode_errors"])


def columns(obj: Any) -> dict[str, tuple[Any, type]]:
    """Column values of a mapped object, with their types."""
    return {key: (getattr(obj, key), type(getattr(obj, key))) for key in COLUMNS}


def loaded_graph_is_sound(obj: Any) -> bool:
    """Every loaded relationship of a Product holds what the mapping says it holds."""
    dict_ = sa.inspect(obj).dict
    return "category" not in dict_ or isinstance(dict_["category"], Category | None)


def read_query(factory: sessionmaker[Session]) -> tuple[list[Any], set[type]]:
    """The rows of QUERY through FromCache, and the classes the session then holds."""
    with factory() as s:
        got = s.scalars(QUERY.options(FromCache())).all()
        assert all(loaded_graph_is_sound(p) for p in got if isinstance(p, Product))
        held = {type(o) for o in s.identity_map.values()}
        return [(type(p), columns(p)) for p in got], held


def read_entity(factory: sessionmaker[Session]) -> tuple[list[Any], set[type]]:
    with factory() as s:
        got = s.get(Product, ENTITY_PK)
        assert got is not None
        held = {type(o) for o in s.identity_map.values()}
        return [(type(got), columns(got))], held


READERS = {"query": (read_query, b":q:"), "entity": (read_entity, b":e:")}


def assert_planted_value_is_a_counted_miss(
    kind: str,
    plant: Callable[[Any], Any],
    factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
) -> None:
    """Fill, rewrite the stored document with ``plant``, read: the database's answer."""
    read, marker = READERS[kind]
    expected = read(sessionmaker(shop_engine))
    assert read(factory) == expected  # the fill
    key = entry_key(redis_client, namespace, marker)
    good = redis_client.get(key)
    assert isinstance(good, bytes)
    redis_client.set(key, pack(plant(unpack(good))), px=600_000)
    errors = decode_errors(cache)

    sql.reset()
    assert read(factory) == expected, "the planted value was served"
    assert sql.count >= 1
    assert decode_errors(cache) == errors + 1
    stored = redis_client.get(key)
    assert stored is not None
    assert unpack(stored)[1] == unpack(good)[1], "the planted value was replaced by a fill"


# -- finding 2: a query entry must match the statement's entities --------------------------


def _as_categories(entry: list[Any]) -> list[Any]:
    """The Item→Admin forgery: the same stamp, the rows rewritten as another mapped class."""
    stamp, body = entry
    body[2] = [CATEGORY]
    body[3] = [[0, [obj[1][0], "forged"], 0, 0] for obj in body[3]]
    return [stamp, body]


def _as_customer(entry: list[Any]) -> list[Any]:
    """A class the statement cannot reach at all."""
    stamp, body = entry
    body[2] = [mapper_name(sa.inspect(Customer))]
    body[3] = [[0, [uuid.UUID(int=n).hex, "x@forged", "forged"], 0, 0] for n in range(5)]
    return [stamp, body]


def _with_unreached_object(entry: list[Any]) -> list[Any]:
    """Genuine rows plus an object no row refers to: it would only land in the session."""
    stamp, body = entry
    body[2].append(CATEGORY)
    body[3].append([len(body[2]) - 1, [999, "forged"], 0, 0])
    return [stamp, body]


def _relationship_to_wrong_class(entry: list[Any]) -> list[Any]:
    """Product.category pointing at another Product."""
    stamp, body = entry
    body[3][0][3] = {"category": 1}
    return [stamp, body]


def _unknown_relationship(entry: list[Any]) -> list[Any]:
    stamp, body = entry
    body[3][0][3] = {"no_such_relationship": 1}
    return [stamp, body]


def _scalar_relationship_as_list(entry: list[Any]) -> list[Any]:
    stamp, body = entry
    body[2].append(CATEGORY)
    body[3].append([len(body[2]) - 1, [1, "forged"], 0, 0])
    body[3][0][3] = {"category": [len(body[3]) - 1]}
    return [stamp, body]


FORGERIES = {
    "another_class": _as_categories,
    "an_unreachable_class": _as_customer,
    "an_object_no_row_reaches": _with_unreached_object,
    "a_relationship_to_the_wrong_class": _relationship_to_wrong_class,
    "an_unknown_relationship": _unknown_relationship,
    "a_scalar_relationship_as_a_list": _scalar_relationship_as_list,
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_query_entry_must_match_the_statements_entities(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
    forgery: str,
) -> None:
    """The rows, and the classes the reading session holds, are the database's."""
    assert_planted_value_is_a_counted_miss(
        "query",
        FORGERIES[forgery],
        session_factory,
        shop_engine,
        cache,
        redis_client,
        namespace,
        sql,
    )


def test_a_mixed_row_must_have_the_statements_entity_at_each_position(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
) -> None:
    stmt = (
        select(Product, Category)
        .join(Product.category)
        .where(Product.id.between(10, 12))
        .order_by(Product.id)
    )

    def read(factory: sessionmaker[Session]) -> list[Any]:
        with factory() as s:
            rows = s.execute(stmt.options(FromCache())).all()
            return [(type(p), p.id, type(c), c.id) for p, c in rows]

    expected = read(sessionmaker(shop_engine))
    read(session_factory)
    key = entry_key(redis_client, namespace, b":q:")
    stamp, body = unpack(redis_client.get(key))
    for row in body[4]:
        row[0].reverse()  # a Category where the Product is, and the other way round
    redis_client.set(key, pack([stamp, body]), px=600_000)
    sql.reset()
    assert read(session_factory) == expected
    assert sql.count >= 1
    assert decode_errors(cache) == 1


# -- finding 2: every column has its stored type ---------------------------------------------

WRONG_TYPES = {
    "int_as_string": ("category_id", "1"),
    "int_as_list": ("category_id", [1]),
    "int_as_float": ("category_id", 1.0),
    "int_as_bool": ("category_id", True),
    "primary_key_as_float": ("id", None),  # the row's own id, as a float
    "string_as_int": ("name", 7),
    "decimal_as_float": ("price", 9.5),
}


@pytest.mark.parametrize("kind", ["query", "entity"])
@pytest.mark.parametrize("wrong", sorted(WRONG_TYPES))
def test_a_column_of_another_type_is_a_counted_miss(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
    kind: str,
    wrong: str,
) -> None:
    column, value = WRONG_TYPES[wrong]
    at = COLUMNS.index(column)

    def plant(entry: list[Any]) -> list[Any]:
        stamp, body = entry
        rows = [body[0]] if kind == "entity" else [obj[1] for obj in body[3]]
        for row in rows:
            row[at] = float(row[at]) if value is None else value
        return [stamp, body]

    assert_planted_value_is_a_counted_miss(
        kind, plant, session_factory, shop_engine, cache, redis_client, namespace, sql
    )


# -- finding 3: "$e" never imports, and planted paths never grow memory --------------------


class Colour(Enum):
    RED = "r"
    GREEN = "g"
    BLUE = "b"


def test_an_enum_tag_never_imports_a_module(redis_url: str, namespace: str, tmp_path: Any) -> None:
    """In a fresh interpreter: ``concurrent.futures`` is imported, its lazily imported
    submodule is not, and decoding a planted tag that names a class through the package's
    ``__getattr__`` must leave it so (it would also import multiprocessing.connection)."""
    script = textwrap.dedent(
        f"""
        import concurrent.futures
        import json
        import sys

        import redis

        from sa_redis_cache import Cache
        from sa_redis_cache.codec import pack

        lazy = "concurrent.futures.process"
        before = lazy in sys.modules
        client = redis.Redis.from_url({redis_url!r})
        cache = Cache(client, namespace={namespace!r})
        calls = []

        @cache.cached("planted_enum")
        def produce(n: int) -> int:
            calls.append(n)
            return n

        planted = {{"$e": ["concurrent.futures:ProcessPoolExecutor", "X"]}}
        client.set(produce.key_for(1), b"\\x01F" + pack(planted), px=60_000)
        result = produce(1)
        print(json.dumps({{
            "before": before,
            "after": lazy in sys.modules,
            "result": result,
            "calls": calls,
            "decode_errors": cache.stats()["total"]["decode_errors"],
        }}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] is False, "the probe needs a process without the submodule"
    assert report == {
        "before": False,
        "after": False,
        "result": 1,
        "calls": [1],
        "decode_errors": 1,
    }


def test_enums_of_model_columns_decode_in_a_process_that_never_encoded_them(
    shop_engine: sa.Engine, database_url: str, redis_url: str, namespace: str, cache: Cache
) -> None:
    """The registry holds the enum classes of the models' Enum columns once a cache is
    attached: another process reads a function's ProductStatus at once. A class it has
    neither mapped nor encoded (HTTPStatus, imported there all the same) is a miss there
    until it stores one itself."""
    from examples.shop import ProductStatus

    @cache.cached("statuses")
    def statuses(n: int) -> Any:
        return [ProductStatus.ACTIVE, HTTPStatus.OK][n]

    assert (statuses(0), statuses(1)) == (ProductStatus.ACTIVE, HTTPStatus.OK)
    script = textwrap.dedent(
        f"""
        import json
        from http import HTTPStatus

        import redis
        import sqlalchemy as sa
        from sqlalchemy.orm import sessionmaker

        import examples.shop  # the application's models
        from sa_redis_cache import Cache

        cache = Cache(redis.Redis.from_url({redis_url!r}), namespace={namespace!r})
        factory = sessionmaker(sa.create_engine({database_url!r}))
        cache.attach(factory)  # describes the shop's models, ProductStatus among them
        calls = []

        @cache.cached("statuses")
        def statuses(n):
            calls.append(n)
            return ["computed", HTTPStatus.OK][n]

        first = [repr(statuses(0)), repr(statuses(1)), repr(statuses(1))]
        cache.detach()
        print(json.dumps({{"got": first, "calls": calls}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "got": [repr(ProductStatus.ACTIVE), repr(HTTPStatus.OK), repr(HTTPStatus.OK)],
        "calls": [1],  # HTTPStatus: one miss, then its own entry is a hit
    }


def _walk(n: int) -> str:
    """A distinct attribute path from Colour back to Colour (member, then its class)."""
    steps = []
    for _ in range(7):
        n, digit = divmod(n, 3)
        steps.append(f".{list(Colour)[digit].name}.__class__")
    return f"{Colour.__module__}:Colour" + "".join(steps)


def test_planted_enum_paths_leave_the_registry_as_it_was(
    cache: Cache, redis_client: redis.Redis
) -> None:
    @cache.cached("colour")
    def colour(n: int) -> Colour:
        return Colour.GREEN

    assert colour(0) is Colour.GREEN  # stored: the class is registered by encoding it
    assert colour(0) is Colour.GREEN  # and read back
    size = len(codec._ENUM_CLASSES)
    paths = [_walk(n) for n in range(2_000)]
    assert len(set(paths)) == 2_000
    for path in paths:
        redis_client.set(colour.key_for(0), b"\x01F" + pack({"$e": [path, "RED"]}), px=60_000)
        assert colour(0) is Colour.GREEN
    assert len(codec._ENUM_CLASSES) == size
    assert decode_errors(cache) == 2_000
    assert colour(0) is Colour.GREEN


# -- finding 9: no value above max_entry_bytes is decoded, and it is deleted -----------------


@pytest.mark.parametrize("kind", ["query", "entity"])
def test_a_50_mb_entry_is_read_once_then_deleted(
    session_factory: sessionmaker[Session],
    shop_engine: sa.Engine,
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    sql: SQLCounter,
    kind: str,
) -> None:
    at = COLUMNS.index("name")

    def plant(entry: list[Any]) -> list[Any]:
        stamp, body = entry  # a valid entry, of the right types, that is just very large
        rows = [body[0]] if kind == "entity" else [obj[1] for obj in body[3]]
        rows[0][at] = "x" * BIG
        return [stamp, body]

    assert_planted_value_is_a_counted_miss(
        kind, plant, session_factory, shop_engine, cache, redis_client, namespace, sql
    )
    key = entry_key(redis_client, namespace, READERS[kind][1])
    assert redis_client.strlen(key) < cache._core.max_entry_bytes
    sql.reset()
    READERS[kind][0](session_factory)
    assert sql.count == 0, "the refilled entry is a hit"


def test_a_50_mb_function_entry_is_read_once_then_deleted(
    cache: Cache, redis_client: redis.Redis
) -> None:
    calls: list[int] = []

    @cache.cached("big")
    def produce(n: int) -> str:
        calls.append(n)
        return "small"

    key = produce.key_for(1)
    redis_client.set(key, b"\x01F" + dumps_tagged("x" * BIG), px=60_000)
    assert produce(1) == "small"
    assert calls == [1]
    assert decode_errors(cache) == 1
    assert redis_client.strlen(key) < 100
    assert produce(1) == "small"
    assert calls == [1]


@pytest.fixture
def wb_cache(
    engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> Iterator[tuple[Cache, sessionmaker[Session]]]:
    """A cache on the AOF Redis of tests.wb_fixtures, attached to a sessionmaker."""
    made = Cache(client, namespace=namespace)
    factory = sessionmaker(engine)
    made.attach(factory)
    yield made, factory
    made.detach()


def test_a_50_mb_pending_key_is_read_once_then_deleted(
    wb_cache: tuple[Cache, sessionmaker[Session]],
    client: redis.Redis,
    models: Any,
    namespace: str,
) -> None:
    cache, factory = wb_cache
    page_view = models[0]
    with factory() as s:
        row = page_view(path="/genuine", views=3)
        s.add(row)
        s.commit()
        pk = row.id
    key = entry_key(client, namespace, b":wbp:")
    queued_id, body = unpack(client.get(key))
    path_at = list(sa.inspect(page_view).column_attrs.keys()).index("path")
    body[0][path_at] = "x" * BIG
    client.set(key, pack([queued_id, body]))

    with factory() as s:
        got = s.get(page_view, pk)
        assert got is not None
        assert got.path == "/genuine"  # from the entity entry the enqueue also wrote
    assert decode_errors(cache) == 1
    assert not client.exists(key)


def test_write_through_never_stores_a_state_reads_would_refuse(
    shop_engine: sa.Engine, redis_url: str, namespace: str, product: int, sql: SQLCounter
) -> None:
    client = redis.Redis.from_url(redis_url)
    small = Cache(client, namespace=namespace, max_entry_bytes=600)
    factory = sessionmaker(shop_engine)
    small.attach(factory)
    try:
        with factory() as s:
            p = s.get(Product, product)
            assert p is not None
            p.name = "n" * 100  # fits
            s.commit()
        assert entry_key(client, namespace, b":e:")
        with factory() as s:
            p = s.get(Product, product)
            assert p is not None
            p.name = "n" * 119  # the entry would pass 600 bytes: deleted instead of written
            p.attributes = {"long": "a" * 500}
            s.commit()
        assert not [k for k in client.scan_iter(match=f"sarc:*{namespace}*") if b":e:" in k]
        assert small.stats()["models"]["Product"]["oversize"] >= 1
        sql.reset()
        with factory() as s:
            got = s.get(Product, product)
            assert got is not None
            assert got.name == "n" * 119
        assert sql.count == 1
    finally:
        small.detach()
        client.close()


def test_write_behind_refuses_a_row_reads_would_refuse(
    engine: sa.Engine, client: redis.Redis, namespace: str, models: Any
) -> None:
    small = Cache(client, namespace=namespace, max_entry_bytes=600)
    factory = sessionmaker(engine)
    small.attach(factory)
    try:
        page_view = models[0]
        with factory() as s:
            s.add(page_view(path="/big", note="n" * 1000))
            with pytest.raises(ConfigurationError, match="max_entry_bytes"):
                s.commit()
        assert not list(client.scan_iter(match=f"sarc:*{namespace}*:wbp:*"))
    finally:
        small.detach()


def test_a_pending_key_holding_another_rows_state_is_not_served(
    wb_cache: tuple[Cache, sessionmaker[Session]], client: redis.Redis, models: Any
) -> None:
    cache, factory = wb_cache
    page_view = models[0]
    with factory() as s:
        mine, theirs = page_view(path="/mine"), page_view(path="/theirs")
        s.add_all([mine, theirs])
        s.commit()
        ids = (mine.id, theirs.id)
    mine_key, theirs_key = (
        next(client.scan_iter(match=f"sarc:*{cache.namespace}*:wbp:*:{pk_text((pk,))}"))
        for pk in ids
    )
    client.set(mine_key, client.get(theirs_key) or b"")
    with factory() as s:
        got = s.get(page_view, ids[0])
        assert got is not None
        assert (got.id, got.path) == (ids[0], "/mine")  # from its entity entry
    assert decode_errors(cache) == 1
