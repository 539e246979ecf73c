"""A hit whose bytes are those an earlier hit decoded reuses that decoding
(``DecodedEntries``, shared by query and entity reads): the document, its stamp and the
body checked against the statement or the row's primary key. Only the work moves; what a
hit returns must stay what decoding the bytes Redis returned gives, and the objects of
two sessions must not share a mutable value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy import event, select

from examples.shop import Product
from sa_redis_cache import FromCache, hydrate
from sa_redis_cache.codec import pack, unpack
from sa_redis_cache.reads import queries

if TYPE_CHECKING:
    from collections.abc import Callable

    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from sa_redis_cache import Cache
    from tests.support import SQLCounter


def calls_of(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """Every call of ``hydrate.<name>`` from now on, by its arguments."""
    calls: list[Any] = []
    original = getattr(hydrate, name)

    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        return original(*args, **kw)

    monkeypatch.setattr(hydrate, name, counted)
    return calls


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every body the read path decodes and checks against its statement."""
    return calls_of(monkeypatch, "prepare")


@pytest.fixture
def prepared_entities(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every entity body the read path decodes and checks against its primary key."""
    return calls_of(monkeypatch, "prepare_entity")


def get(factory: sessionmaker[Session], pid: int) -> Product:
    with factory() as s:
        found = s.get(Product, pid)
        assert found is not None
        return found


def the_entity_entry(client: redis.Redis, namespace: str, pid: int) -> bytes:
    keys: list[bytes] = [
        k
        for k in client.scan_iter(match=f"sarc:*{namespace}*")
        if b":e:" in k and k.endswith(b":%d" % pid)
    ]
    assert len(keys) == 1, keys
    return keys[0]


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


def rename_in_query_body(body: Any, name: str) -> None:
    names = list(Product.__mapper__.column_attrs.keys())
    body[3][0][1][names.index("name")] = name


def rename_in_entity_body(body: Any, name: str) -> None:
    names = list(Product.__mapper__.column_attrs.keys())
    body[0][names.index("name")] = name


@dataclass
class Kind:
    """A kind of entry, as a test reads it: a ``FromCache`` query of one product, or
    ``session.get`` of it."""

    load: Callable[[Session, int], Product]
    entry: Callable[[redis.Redis, str, int], bytes]
    rename: Callable[[Any, str], None]
    # every body of this kind the read path decoded and checked
    decoded: list[Any]

    def read(self, factory: sessionmaker[Session], pid: int) -> Product:
        with factory() as session:
            return self.load(session, pid)

    def kept(
        self, factory: sessionmaker[Session], client: redis.Redis, namespace: str, pid: int
    ) -> tuple[bytes, bytes]:
        """Fill the entry, hit it (its decoding is kept): its key and its bytes."""
        self.read(factory, pid)
        self.read(factory, pid)
        key = self.entry(client, namespace, pid)
        raw = client.get(key)
        assert isinstance(raw, bytes)
        return key, raw


@pytest.fixture(params=["query", "entity"])
def kind(request: pytest.FixtureRequest, prepared: list[Any], prepared_entities: list[Any]) -> Kind:
    if request.param == "query":
        return Kind(
            lambda session, pid: session.scalars(by_id(pid)).one(),
            lambda client, namespace, _: the_entry(client, namespace),
            rename_in_query_body,
            prepared,
        )
    return Kind(
        lambda session, pid: session.get_one(Product, pid),
        the_entity_entry,
        rename_in_entity_body,
        prepared_entities,
    )


def through(session: Session, path: str) -> Session:
    if path == "pipeline":
        # another listener: the read goes through SQLAlchemy's execute pipeline
        event.listen(session, "do_orm_execute", lambda orm_context: None)
    return session


def test_a_hit_on_the_bytes_it_decoded_before_does_not_decode_them_again(
    session_factory: sessionmaker[Session], product: int, kind: Kind, sql: SQLCounter
) -> None:
    name = kind.read(session_factory, product).name  # a miss: fills
    sql.reset()
    assert kind.read(session_factory, product).name == name
    assert len(kind.decoded) == 1  # the first hit decodes
    for _ in range(3):
        assert kind.read(session_factory, product).name == name
    assert len(kind.decoded) == 1  # the next ones reuse it
    assert sql.count == 0


def test_other_bytes_under_the_same_key_are_decoded_and_served(
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    kind: Kind,
    sql: SQLCounter,
) -> None:
    key, raw = kind.kept(session_factory, redis_client, namespace, product)
    stamp, body = unpack(raw)
    kind.rename(body, "renamed in Redis")
    redis_client.set(key, pack([stamp, body]), keepttl=True)  # still valid: stamp kept
    sql.reset()
    assert kind.read(session_factory, product).name == "renamed in Redis"
    assert sql.count == 0
    assert len(kind.decoded) == 2


def test_a_write_is_seen_by_the_next_read(
    session_factory: sessionmaker[Session], product: int, kind: Kind
) -> None:
    kind.read(session_factory, product)
    kind.read(session_factory, product)
    with session_factory() as s:
        s.get_one(Product, product, populate_existing=True).name = "written"
        s.commit()
    assert kind.read(session_factory, product).name == "written"  # a miss, then a fill
    assert kind.read(session_factory, product).name == "written"  # a hit on the new bytes


@pytest.mark.parametrize("path", ["direct", "pipeline"])
def test_two_sessions_never_share_a_mutable_value(
    session_factory: sessionmaker[Session], product: int, kind: Kind, sql: SQLCounter, path: str
) -> None:
    kind.read(session_factory, product)
    kind.read(session_factory, product)  # decoded and kept
    sql.reset()
    with session_factory() as first, session_factory() as second:
        one = kind.load(through(first, path), product)
        one.attributes["seen"] = "by the first session only"  # in place, never flushed
        other = kind.load(through(second, path), product)
        assert "seen" not in other.attributes
        assert other.attributes is not one.attributes
    assert sql.count == 0  # both were hits
    assert "seen" not in kind.read(session_factory, product).attributes


def test_an_unreadable_entry_is_never_served_from_an_earlier_decoding(
    session_factory: sessionmaker[Session],
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    kind: Kind,
    sql: SQLCounter,
) -> None:
    key, _ = kind.kept(session_factory, redis_client, namespace, product)
    name = kind.read(session_factory, product).name
    redis_client.set(key, b"\x01not an entry", keepttl=True)
    sql.reset()
    assert kind.read(session_factory, product).name == name  # read from the database
    assert sql.count == 1
    assert redis_client.get(key) != b"\x01not an entry"  # deleted, then filled again


def test_an_entry_a_write_retired_is_a_plain_miss_whose_body_is_not_read(
    session_factory: sessionmaker[Session],
    cache: Cache,
    redis_client: redis.Redis,
    namespace: str,
    product: int,
    kind: Kind,
    sql: SQLCounter,
) -> None:
    key, retired = kind.kept(session_factory, redis_client, namespace, product)
    with session_factory() as s:
        s.get_one(Product, product).name = "written"
        s.commit()
    # the old bytes put back under the key: their stamp names the counters before the write
    redis_client.set(key, retired, ex=300)
    cache._reads.queries.decoded.clear()  # as a process that never read them
    decode_errors = cache.stats()["total"]["decode_errors"]
    sql.reset()
    assert kind.read(session_factory, product).name == "written"
    assert sql.count == 1
    assert len(kind.decoded) == 1  # only the first hit's decode
    assert cache.stats()["total"]["decode_errors"] == decode_errors


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


def test_forgotten_decodings_are_decoded_again(
    session_factory: sessionmaker[Session],
    cache: Cache,
    product: int,
    prepared: list[Any],
    prepared_entities: list[Any],
) -> None:
    # what benchmarks/cases_trust.py relies on to time the checks of every hit
    for _ in range(2):
        read(session_factory, product)
        get(session_factory, product)
    assert (len(prepared), len(prepared_entities)) == (1, 1)
    cache._reads.queries.decoded.clear()
    assert cache.inspector.decoded() == {"entries": 0, "bytes": 0}
    read(session_factory, product)
    get(session_factory, product)
    assert (len(prepared), len(prepared_entities)) == (2, 2)
