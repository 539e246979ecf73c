"""Review probes of bad input and misconfiguration, with the database as the oracle.

The standard (docs/configuration.md, docs/write-behind.md): a misconfigured model is
refused at ``attach()`` naming the model, the problem and the fix, or else works; a
corrupt entry is a miss or a reported skip, never an exception and never a lost
write-behind operation; bad arguments get an error that names them.

Models live in private declarative bases disposed of before each test ends
(:func:`tests.integration.test_attach.private_base`), so a refused one never reaches a
later test's ``attach()``.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis as redis_lib
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FlushWorker, FromCache, schema
from sa_redis_cache.protocol import partition_of, pk_text
from tests.integration.test_attach import private_base
from tests.wb_support import PARTITIONS, drain, queue, rows

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.orm import Session

pytest_plugins = ["tests.wb_fixtures"]  # aof_redis, models, factory, make_worker


@pytest.fixture
def base(engine: sa.Engine) -> Iterator[type[DeclarativeBase]]:
    """A private declarative base whose tables exist for the test and are dropped after."""
    schema.upgrade(engine)
    with private_base() as made:
        try:
            yield made
        finally:
            made.metadata.drop_all(engine)


# write-behind models on the test server (no AOF), attached to ``fresh_cache``
WB = CachePolicy(strategy="write_behind", accept_volatile=True)


@contextmanager
def _flushing(
    engine: sa.Engine, cache: Cache, namespace: str, *models: Any
) -> Iterator[FlushWorker]:
    """A worker of ``models`` on ``cache``'s Redis, released when the block ends."""
    worker = FlushWorker(engine, cache.client, namespace=namespace, models=list(models))
    try:
        yield worker
    finally:
        worker.release()


def _attached(
    base: type[DeclarativeBase], engine: sa.Engine, cache: Cache
) -> sessionmaker[Session]:
    """``base``'s tables created, and a sessionmaker ``cache`` is attached to."""
    base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    cache.attach(factory)
    return factory


# -- write-behind and SQLAlchemy features the flush skips --------------------------------


def test_version_id_col_on_a_write_behind_model_is_refused_at_attach(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """``version_id_col``: SQLAlchemy sets the version in its INSERT and checks it in its
    UPDATE; write-behind runs neither (the row was queued with a NULL version, which the
    worker's insert then dead-lettered)."""

    class Doc(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_docs"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        body: Mapped[str] = mapped_column(String(40))
        version: Mapped[int] = mapped_column(Integer, nullable=False)
        __mapper_args__ = {"version_id_col": version}  # noqa: RUF012

    base.metadata.create_all(engine)
    with pytest.raises(ConfigurationError) as refused:
        fresh_cache.attach(sessionmaker(engine))
    message = str(refused.value)
    assert "Doc: version_id_col (version)" in message
    assert "strategy='write_through'" in message


def _basket_models(base: type[DeclarativeBase]) -> tuple[Any, Any]:
    """An ordinary ``Basket`` with a one-to-many ``lines`` of write-behind ``Line`` rows
    (no back reference: the collection is the only link)."""

    class Basket(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_baskets"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        lines: Mapped[list[Line]] = relationship()

    class Line(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_lines"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        basket_id: Mapped[int | None] = mapped_column(ForeignKey(Basket.id))
        sku: Mapped[str] = mapped_column(String(20))

    return Basket, Line


def _a_basket_with_a_line(factory: sessionmaker[Session], basket_cls: Any, line_cls: Any) -> None:
    """Commit basket 1 with one line, ``sku="a"``."""
    with factory() as s:
        basket = basket_cls(id=1)
        basket.lines.append(line_cls(sku="a"))
        s.add(basket)
        s.commit()


def test_a_write_behind_child_appended_to_an_ordinary_parents_collection_is_queued_with_its_key(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """``basket.lines.append(line)``: the unit of work copies the parent's key into the
    child's foreign key in the flush the queued child takes no part in (it failed with
    ``StaleDataError``, an UPDATE of a row not in the database yet)."""
    basket_cls, line_cls = _basket_models(base)
    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        basket = basket_cls(id=1)
        first = line_cls(sku="a")
        basket.lines.append(first)
        s.add(basket)
        s.commit()
        assert first.basket_id == 1
    with factory() as s:  # a persistent parent, a second child
        basket = s.get(basket_cls, 1)
        assert basket is not None
        second = line_cls(sku="b")
        basket.lines.append(second)
        s.commit()
    with factory() as s:
        got = s.get(line_cls, second.id)
        assert got is not None
        assert got.basket_id == 1
    with _flushing(engine, fresh_cache, namespace, line_cls) as worker:
        drain(worker)
    with engine.connect() as conn:
        found = conn.execute(select(line_cls.__table__.c.sku, line_cls.__table__.c.basket_id))
        assert sorted(found) == [("a", 1), ("b", 1)]


def test_a_write_behind_child_removed_from_an_ordinary_parents_collection_is_refused(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """``basket.lines.remove(line)`` is an UPDATE (or a delete-orphan DELETE) of the child
    the unit of work would run on the database behind the queue: refused, naming the fix,
    and nothing of the flush is queued or written."""
    basket_cls, line_cls = _basket_models(base)
    factory = _attached(base, engine, fresh_cache)
    _a_basket_with_a_line(factory, basket_cls, line_cls)
    with _flushing(engine, fresh_cache, namespace, line_cls) as worker:
        drain(worker)
        with factory() as s:
            basket = s.get(basket_cls, 1)
            assert basket is not None
            basket.lines.remove(basket.lines[0])
            with pytest.raises(ConfigurationError, match=r"Basket\.lines.*set Line\.basket_id"):
                s.commit()
        assert drain(worker) == 0
    with engine.connect() as conn:
        assert conn.execute(select(line_cls.__table__.c.basket_id)).scalars().all() == [1]


def test_a_write_behind_child_of_a_parent_without_a_key_yet_is_refused(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """A parent whose key only the database insert gives: the child cannot be queued with
    it, so the flush is refused naming the fix (not a NULL foreign key queued)."""

    class Cart(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_carts"
        id: Mapped[int] = mapped_column(primary_key=True)
        items: Mapped[list[Item]] = relationship()

    class Item(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_items"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        cart_id: Mapped[int | None] = mapped_column(ForeignKey(Cart.id))

    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        cart = Cart()
        cart.items.append(Item())
        s.add(cart)
        with pytest.raises(ConfigurationError, match=r"Cart\.items .*flush the Cart first"):
            s.commit()
    with engine.connect() as conn:
        assert conn.execute(select(sa.func.count()).select_from(Cart.__table__)).scalar() == 0


def test_deleting_an_ordinary_parent_of_write_behind_children_is_refused(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """Deleting ``basket`` (no delete cascade) makes the unit of work set its lines'
    foreign key to NULL with SQL, behind the queue: refused, naming the fix."""
    basket_cls, line_cls = _basket_models(base)
    factory = _attached(base, engine, fresh_cache)
    _a_basket_with_a_line(factory, basket_cls, line_cls)
    with _flushing(engine, fresh_cache, namespace, line_cls) as worker:
        drain(worker)
        with factory() as s:
            s.delete(s.get(basket_cls, 1))
            with pytest.raises(ConfigurationError, match=r"Basket\.lines.*Line\.basket_id"):
                s.commit()
        assert drain(worker) == 0
    with engine.connect() as conn:
        assert conn.execute(select(line_cls.__table__.c.basket_id)).scalars().all() == [1]


# -- garbage in the write-behind queue -----------------------------------------------------


def _in_partition(partition: int) -> uuid.UUID:
    while True:
        pk = uuid.uuid4()
        if partition_of(pk_text([pk]), PARTITIONS) == partition:
            return pk


GARBAGE: list[dict[Any, Any]] = [
    {b"e": b"\x00\xff not json"},
    {b"e": b"[1, 2]"},
    {b"e": b'["u", "x", "h", 1, 2]'},
    {b"e": b'["u", "\\u0000", "nohash", ["\\u0000"]]'},
    {b"o": b"u"},
    {b"o": b"u", b"k": b"\x00", b"h": b"\x00", b"d": b"\x00"},
    {b"zzz": b"\x00"},
]


def test_garbage_stream_entries_are_dead_lettered_and_never_block_the_good_ones(
    engine: sa.Engine, client: redis_lib.Redis, factory: Any, models: Any, make_worker: Any
) -> None:
    """Entries no commit wrote (another program's, a truncated one, an older format) go
    to the dead letters with their error, each once; the writes queued around them in
    the same partition are applied (docs/write-behind.md, "Errors": nothing is logged
    and dropped)."""
    page_view, _ = models
    worker = make_worker()
    stream = worker.partitions[1].stream
    before = queue(factory, page_view, id=_in_partition(1), path="/before")
    for fields in GARBAGE:
        client.xadd(stream, fields)
    after = queue(factory, page_view, id=_in_partition(1), path="/after")
    drain(worker)
    assert rows(engine, page_view) == {before: ("/before", 0), after: ("/after", 0)}
    assert worker.dead_letters == len(GARBAGE)
    with engine.connect() as conn:
        letters = conn.execute(
            sa.text("SELECT count(*) FROM sarc_dead_letters WHERE stream = :s"), {"s": stream}
        ).scalar()
    assert letters == len(GARBAGE)
    assert client.xlen(stream) == 0


def test_a_nul_character_in_a_text_value_is_refused_at_the_flush_and_dead_lettered_by_the_worker(
    engine: sa.Engine, client: redis_lib.Redis, factory: Any, models: Any, make_worker: Any
) -> None:
    """Postgres text cannot hold NUL, and SQLAlchemy's own flush fails on it: the flush of
    a write-behind row refuses it, naming the column (it was queued, then retried by the
    worker forever: psycopg refuses it before sending, with no SQLSTATE, which read as a
    transient error). One queued anyway (an older library, another program) is
    dead-lettered, and the row behind it applied."""
    page_view, _ = models
    with factory() as s:
        s.add(page_view(id=_in_partition(1), path="a\x00b"))
        with pytest.raises(ConfigurationError, match=r"PageView\.path: .*NUL"):
            s.commit()
    worker = make_worker()
    applier = worker.partitions[1].applier
    bad = _in_partition(1)
    row = [bad, "a\x00b", 0, None, datetime.now(timezone.utc)]
    entry = ["u", pk_text([bad]), applier.info.schema_hash, applier.codec.dump_row(row)]
    client.xadd(worker.partitions[1].stream, {b"e": orjson.dumps(entry)})
    good = queue(factory, page_view, id=_in_partition(1), path="/good")
    drain(worker)
    assert rows(engine, page_view) == {good: ("/good", 0)}
    assert worker.dead_letters == 1
    assert applier.sets is not None  # one bad value does not cost the table its arrays
    with engine.connect() as conn:
        error = conn.execute(
            sa.text("SELECT error FROM sarc_dead_letters WHERE stream = :s"),
            {"s": worker.partitions[1].stream},
        ).scalar_one()
    assert "NUL" in error


# -- Cache() arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("max_entry_bytes", "1MB"),
        ("max_entry_bytes", 0),
        ("max_entry_bytes", -1),
        ("breaker_threshold", 0),
        ("breaker_threshold", "3"),
        ("breaker_reset", -1),
        ("breaker_reset", float("nan")),
        ("hit_rate_warning", 5),
        ("hit_rate_warning", "0.8"),
        ("ttl_jitter", "0.1"),
    ],
)
def test_a_cache_argument_that_cannot_work_is_refused_naming_it(
    redis_url: str, namespace: str, argument: str, value: Any
) -> None:
    """Each argument of ``Cache()`` is refused when it cannot work, with the argument and
    the fix. They were taken as given: ``max_entry_bytes="1MB"`` raised ``TypeError`` into
    the application at the first read; 0 cached nothing, silently."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError, match=f"{argument}="):
            Cache(client, namespace=namespace, **{argument: value})
    finally:
        client.close()


@pytest.mark.parametrize(
    ("argument", "value"),
    [("local", "no"), ("lease", "false"), ("lease", 0), ("region", None), ("region", "")],
)
def test_a_from_cache_argument_of_the_wrong_type_is_refused_naming_it(
    argument: str, value: Any
) -> None:
    """``FromCache(local="no")`` was taken as ``local=True`` (``bool("no")``): the opposite
    of what it said. Like ``ttl`` and ``spread``, a wrong type is refused, naming it."""
    with pytest.raises(ValueError, match=f"FromCache\\({argument}="):
        FromCache(**{argument: value})


# -- inheritance with a policy per class ---------------------------------------------------


@pytest.mark.parametrize("single_table", [False, True], ids=["joined", "single"])
@pytest.mark.parametrize("child_strategy", ["cache_aside", "write_through"])
def test_a_child_with_another_strategy_than_its_parent_reads_what_the_database_holds(
    base: type[DeclarativeBase],
    engine: sa.Engine,
    fresh_cache: Cache,
    single_table: bool,
    child_strategy: str,
) -> None:
    """Parent ``cache_aside``, child another strategy and TTL: accepted, and every read
    (cached query of either class, ``session.get``) after a write of the child's row
    (parent-table and child-table columns) shows the committed row."""

    class Animal(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_animals"
        __cache__ = CachePolicy(ttl=60)
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(20))
        name: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "animal"}  # noqa: RUF012

    extra: dict[str, Any] = {
        "__cache__": CachePolicy(strategy=child_strategy, ttl=30),  # type: ignore[arg-type]
        "__mapper_args__": {"polymorphic_identity": "dog"},
        "__annotations__": {"bark": Mapped[str | None]},
        "bark": mapped_column(String(20), nullable=True),
    }
    if not single_table:
        extra["__tablename__"] = "review_input_dogs"
        extra["__annotations__"]["id"] = Mapped[int]
        extra["id"] = mapped_column(ForeignKey(Animal.id), primary_key=True)
    dog_cls: Any = type("Dog", (Animal,), extra)
    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        s.add(dog_cls(id=1, name="rex", bark="woof"))
        s.commit()

    def reads() -> list[Any]:
        with factory() as s:
            animals = s.scalars(select(Animal).options(FromCache())).all()
            dogs = s.scalars(select(dog_cls).options(FromCache())).all()
            got: Any = s.get(dog_cls, 1)
            return [
                [(a.name, a.bark) for a in animals],
                [(d.name, d.bark) for d in dogs],
                (got.name, got.bark),
            ]

    assert reads() == [[("rex", "woof")], [("rex", "woof")], ("rex", "woof")]
    with factory() as s:
        dog: Any = s.get(dog_cls, 1)
        dog.name, dog.bark = "max", "grr"
        s.commit()
    assert reads() == [[("max", "grr")], [("max", "grr")], ("max", "grr")]
    with factory() as s:
        s.delete(s.get(dog_cls, 1))
        s.commit()
    with factory() as s:
        assert s.scalars(select(Animal).options(FromCache())).all() == []
        assert s.get(dog_cls, 1) is None


# -- FromCache on statements it cannot serve -----------------------------------------------


def test_from_cache_on_dml_returning_always_runs_the_statement(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """``FromCache`` on an ``UPDATE ... RETURNING`` (or INSERT, DELETE): a served result
    would skip the write. Each execution must reach the database."""

    class Counter(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_counters"
        __cache__ = CachePolicy()
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        hits: Mapped[int] = mapped_column(default=0)

    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        s.add(Counter(id=1, hits=0))
        s.commit()
    bump = (
        sa.update(Counter)
        .where(Counter.id == 1)
        .values(hits=Counter.hits + 1)
        .returning(Counter.hits)
        .options(FromCache())
    )
    for expected in (1, 2, 3):
        with factory() as s:
            assert s.scalars(bump).all() == [expected]
            s.commit()
    insert = sa.insert(Counter).returning(Counter.id).options(FromCache())
    for pk in (2, 3):
        with factory() as s:
            assert s.scalars(insert, [{"id": pk, "hits": 0}]).all() == [pk]
            s.commit()
    with engine.connect() as conn:
        assert sorted(conn.execute(select(Counter.__table__)).all()) == [(1, 3), (2, 0), (3, 0)]


def test_a_write_behind_model_with_a_composite_key_round_trips(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """A composite primary key (a string and an int, set by the application): queued,
    read back, updated, deleted and flushed as the database would hold it."""

    class Seat(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_seats"
        __cache__ = WB
        hall: Mapped[str] = mapped_column(String(10), primary_key=True)
        number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        taken: Mapped[bool] = mapped_column(default=False)

    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        s.add_all([Seat(hall="a", number=1), Seat(hall="a", number=2), Seat(hall="b", number=1)])
        s.commit()
    with factory() as s:
        seat = s.get(Seat, ("a", 2))
        assert seat is not None
        seat.taken = True
        gone = s.get(Seat, {"hall": "b", "number": 1})
        assert gone is not None
        s.delete(gone)
        s.commit()
    with factory() as s:
        got = s.get(Seat, ("a", 2))
        assert got is not None
        assert got.taken is True
        assert s.get(Seat, ("b", 1)) is None
    with _flushing(engine, fresh_cache, namespace, Seat) as worker:
        drain(worker)
    with engine.connect() as conn:
        assert sorted(conn.execute(select(Seat.__table__)).all()) == [
            ("a", 1, False),
            ("a", 2, True),
        ]


def test_attach_with_redis_unreachable_reads_and_writes_the_database(
    base: type[DeclarativeBase], engine: sa.Engine, namespace: str
) -> None:
    """No Redis at all (a port nothing listens on): ``attach()`` of cache-aside and
    write-through models succeeds, and reads and writes go to the database; a write-behind
    model is refused at ``attach()`` naming Redis (it cannot tell AOF), not at a commit."""

    class Note(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_notes"
        __cache__ = CachePolicy(strategy="write_through")
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        body: Mapped[str] = mapped_column(String(20))

    base.metadata.create_all(engine)
    cache = Cache("redis://127.0.0.1:1/0", namespace=namespace)
    factory = sessionmaker(engine)
    try:
        cache.attach(factory)
        for body in ("a", "b"):
            with factory() as s:
                s.merge(Note(id=1, body=body))
                s.commit()
            with factory() as s:
                assert s.get(Note, 1).body == body  # type: ignore[union-attr]
                assert s.scalars(select(Note.body).options(FromCache())).all() == [body]

        class Late(base):  # type: ignore[misc, valid-type]
            __tablename__ = "review_input_late"
            __cache__ = CachePolicy(strategy="write_behind")
            id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)

        with pytest.raises(ConfigurationError, match=r"Late: cannot tell whether Redis"):
            cache.attach(sessionmaker(engine))
    finally:
        cache.detach()


# -- version_id_col on the strategies that take it -------------------------------------------


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
@pytest.mark.parametrize("server_side", [False, True], ids=["counter", "xmin"])
def test_version_id_col_keeps_catching_stale_writes_through_the_entity_cache(
    base: type[DeclarativeBase],
    engine: sa.Engine,
    fresh_cache: Cache,
    strategy: str,
    server_side: bool,
) -> None:
    """Objects served by the entity cache carry the version the database holds: an update
    from one succeeds, and one from an object loaded before another commit raises
    ``StaleDataError`` as without the cache."""
    from sqlalchemy.orm.exc import StaleDataError
    from sqlalchemy.schema import FetchedValue

    extra: dict[str, Any]
    if server_side:  # a BEFORE UPDATE trigger moves it; SQLAlchemy reads it back
        extra = {
            "__annotations__": {"id": Mapped[int], "body": Mapped[str], "version": Mapped[int]},
            "version": mapped_column(
                Integer, server_default=sa.text("1"), server_onupdate=FetchedValue()
            ),
        }
        extra["__mapper_args__"] = {
            "version_id_col": extra["version"],
            "version_id_generator": False,
        }
    else:
        extra = {
            "__annotations__": {"id": Mapped[int], "body": Mapped[str], "version": Mapped[int]},
            "version": mapped_column(Integer, nullable=False),
        }
        extra["__mapper_args__"] = {"version_id_col": extra["version"]}
    versioned: Any = type(
        "Versioned",
        (base,),
        {
            "__tablename__": "review_input_versioned",
            "__cache__": CachePolicy(strategy=strategy),  # type: ignore[arg-type]
            "id": mapped_column(primary_key=True, autoincrement=False),
            "body": mapped_column(String(20)),
            **extra,
        },
    )
    base.metadata.create_all(engine)
    if server_side:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION review_input_bump() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN NEW.version := OLD.version + 1; RETURN NEW; END $$; "
                    "CREATE TRIGGER review_input_bump BEFORE UPDATE ON review_input_versioned "
                    "FOR EACH ROW EXECUTE FUNCTION review_input_bump()"
                )
            )
    factory = sessionmaker(engine)
    fresh_cache.attach(factory)
    with factory() as s:
        s.add(versioned(id=1, body="a"))
        s.commit()
    for body in ("b", "c", "d"):
        with factory() as s:
            s.get(versioned, 1)  # fills the entity cache (or reads it)
        with factory() as s:
            row: Any = s.get(versioned, 1)
            row.body = body
            s.commit()
    with factory() as early, factory() as late:
        stale: Any = early.get(versioned, 1)
        fresh: Any = late.get(versioned, 1)
        fresh.body = "late"
        late.commit()
        stale.body = "early"
        with pytest.raises(StaleDataError):
            early.commit()
    with engine.begin() as conn:
        assert conn.execute(select(versioned.__table__.c.body)).scalar_one() == "late"
        conn.execute(sa.text("DROP TABLE review_input_versioned"))
        conn.execute(sa.text("DROP FUNCTION IF EXISTS review_input_bump()"))


# -- write-behind models related by a foreign key --------------------------------------------


def test_write_behind_models_related_by_a_foreign_key_are_refused_at_attach(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """A write-behind parent and child: the worker applies each table's queue on its own,
    so the child's insert reached the database before its parent's, or the parent's
    delete before its child's, whichever order the worker took them in, and the database
    refused it: dead-lettered. Refused at ``attach()``, naming the key and the fixes."""

    class Order(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_orders"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        parent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("review_input_orders.id"))

    class OrderLine(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_order_lines"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(Order.id))

    with pytest.raises(ConfigurationError) as refused:
        fresh_cache.attach(sessionmaker(engine))
    message = str(refused.value)
    assert "OrderLine: the foreign key review_input_order_lines.order_id references Order" in (
        message
    )
    assert "Order: the foreign key review_input_orders.parent_id references Order" in message
    assert "strategy='write_through'" in message


def test_an_ordinary_model_with_a_foreign_key_to_a_write_behind_table_is_refused(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """docs/write-behind.md: ordinary rows must not reference write-behind rows by foreign
    key. Such a row committed right after the one it references was refused by the
    database (the referenced row still queued), and a delete of a referenced row was
    dead-lettered: refused at ``attach()`` instead, naming both models and the fixes."""

    class Page(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_pages"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)

    class Comment(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_comments"
        id: Mapped[int] = mapped_column(primary_key=True)
        page_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(Page.id))

    with pytest.raises(ConfigurationError) as refused:
        fresh_cache.attach(sessionmaker(engine))
    message = str(refused.value)
    assert "Comment: the foreign key review_input_comments.page_id references Page" in message
    assert "IntegrityError" in message
    assert "strategy='write_through'" in message


def test_a_write_behind_child_of_a_write_through_parent_is_applied(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """The fix the refusal names: the parent written through is in the database at
    commit, so the queued child's insert finds it."""

    class Order(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_orders"
        __cache__ = CachePolicy(strategy="write_through")
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)

    class OrderLine(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_order_lines"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(Order.id))

    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        order = Order()
        s.add(order)
        s.flush()
        order_id = order.id
        s.add(OrderLine(order_id=order_id))
        s.commit()
    with _flushing(engine, fresh_cache, namespace, OrderLine) as worker:
        drain(worker)
        assert worker.dead_letters == 0
    with engine.connect() as conn:
        assert conn.execute(select(OrderLine.__table__.c.order_id)).all() == [(order_id,)]


def test_deleting_an_ordinary_parent_cascades_to_its_write_behind_children(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache, namespace: str
) -> None:
    """The other fix the refusal above names: without a FOREIGN KEY constraint (which
    would refuse the parent's delete while the children's deletes wait in the queue),
    ``cascade="all, delete-orphan"`` queues the children's deletes with it."""

    class Shelf(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_shelves"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        books: Mapped[list[Book]] = relationship(
            cascade="all, delete-orphan",
            primaryjoin=lambda: sa.orm.foreign(Book.shelf_id) == Shelf.id,
        )

    class Book(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_books"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        shelf_id: Mapped[int | None]  # no FOREIGN KEY constraint: see the refusal above

    factory = _attached(base, engine, fresh_cache)
    with factory() as s:
        shelf = Shelf(id=1)
        shelf.books.extend([Book(), Book()])
        s.add(shelf)
        s.commit()
    with _flushing(engine, fresh_cache, namespace, Book) as worker:
        drain(worker)
        with factory() as s:
            s.delete(s.get(Shelf, 1))
            s.commit()
        drain(worker)
        assert worker.dead_letters == 0
    with engine.connect() as conn:
        assert conn.execute(select(sa.func.count()).select_from(Book.__table__)).scalar() == 0
        assert conn.execute(select(sa.func.count()).select_from(Shelf.__table__)).scalar() == 0


# -- durations Redis cannot take -----------------------------------------------------------


def test_a_ttl_redis_cannot_take_is_refused_where_it_is_given(
    redis_url: str, namespace: str, fresh_cache: Cache
) -> None:
    """A TTL of 1e17 s is finite and positive, but no Redis expiry: a cached function's
    every write failed (Redis errors, opening the breaker), and reads of such a model or
    option ran uncached. Refused where it is written, with the bound."""
    assert any("at most 1e9" in p for p in CachePolicy(ttl=1e17).problems())
    assert any("at most 1e9" in p for p in CachePolicy(lease_wait=1e17).problems())
    with pytest.raises(ValueError, match=r"ttl=1e\+17.*at most 1e9"):
        FromCache(ttl=1e17)
    with pytest.raises(ValueError, match=r"stale_ttl=1e\+17.*at most 1e9"):
        FromCache(stale_ttl=1e17)
    decorate = fresh_cache.cached("huge", ttl=1e17)
    with pytest.raises(ValueError, match=r"ttl=1e\+17.*at most 1e9"):
        decorate(str)
    with pytest.raises(ConfigurationError, match=r"default_ttl=1e\+17.*at most 1e9"):
        Cache(redis_url, namespace=namespace, default_ttl=1e17)
    assert CachePolicy(ttl=1e9).problems() == []  # about 31 years is still taken


def test_a_write_behind_model_with_a_foreign_key_to_an_undeclared_table_is_taken(
    base: type[DeclarativeBase], engine: sa.Engine, fresh_cache: Cache
) -> None:
    """A foreign key to a table no ``MetaData`` of the process declares (another
    application's, created by a migration) cannot be resolved by SQLAlchemy; the
    foreign-key check of ``attach()`` must not raise on it."""

    class Visit(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_visits"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        site_id: Mapped[int] = mapped_column(ForeignKey("elsewhere_sites.id"))

    fresh_cache.attach(sessionmaker(engine))
    assert fresh_cache._core.models.infos[sa.inspect(Visit)].policy == WB
