"""Review: stale reads after write and read shapes the history tests do not make.

Each test writes through one shape, with entries of the written rows cached in a reader's
cache (another engine, another ``Cache`` on the namespace: another process), and checks
that the reader's next read is at least as new as the committed state.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.sql.expression import ClauseElement, Executable

from examples.shop import Category, Product
from sa_redis_cache import Cache, CachePolicy, FromCache
from tests.history_checker import Read, Write, check_history, now_ns
from tests.modes import Db, Runner
from tests.support import Two, read_price

if TYPE_CHECKING:
    from collections.abc import Iterator


def warm(factory: sessionmaker[Session], pid: int) -> Decimal:
    """Fill (and hit once) the query entry and the entity entry of product ``pid``."""
    for _ in range(2):
        with factory() as s:
            stmt = select(Product).where(Product.id == pid).options(FromCache())
            price = s.scalars(stmt).one().price
            s.get(Product, pid)
    return price


def _price_cte(pid: int, price: str) -> Any:
    table: Any = Product.__table__
    return (
        table.update()
        .where(table.c.id == pid)
        .values(price=Decimal(price))
        .returning(table.c.id)
        .cte("changed")
    )


def _select_over_the_cte(pid: int, price: str) -> Any:
    return select(_price_cte(pid, price).c.id)


def _insert_from_the_cte(pid: int, price: str) -> Any:
    changed = _price_cte(pid, price)
    categories: Any = Category.__table__
    return categories.insert().from_select(
        ["name"], select(sa.func.concat("fresh-cte-", changed.c.id))
    )


def _update_of_another_table_with_the_cte(pid: int, price: str) -> Any:
    return (
        sa.update(Category)
        .where(Category.id == -1)
        .values(name="never")
        .add_cte(_price_cte(pid, price))
    )


def _textual_cte(pid: int, price: str) -> Any:
    changed = (
        sa.text("UPDATE products SET price = :price WHERE id = :pid RETURNING id")
        .bindparams(price=Decimal(price), pid=pid)
        .columns(id=sa.Integer)
        .cte("changed")
    )
    return select(changed.c.id)


CTE_SHAPES = {
    "select": _select_over_the_cte,
    "insert_from_select": _insert_from_the_cte,
    "update_with_cte": _update_of_another_table_with_the_cte,
    "textual_cte": _textual_cte,
}


@pytest.fixture
def no_cte_categories(shop_engine: sa.Engine) -> Any:
    """Deletes the categories the CTE shapes insert."""
    yield
    with shop_engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM categories WHERE name LIKE 'fresh-cte-%'"))


@pytest.mark.parametrize("via", ["engine", "session"])
@pytest.mark.parametrize("shape", sorted(CTE_SHAPES))
def test_dml_in_a_with_clause_retires_the_rows_it_writes(
    two: Two, product: int, shape: str, via: str, no_cte_categories: None
) -> None:
    """``WITH changed AS (UPDATE products ... RETURNING id) SELECT ...`` writes products,
    but the statement is a SELECT (or DML on another table): the engine listener looked at
    the outer statement only, marked nothing, and the old price stayed cached."""
    assert warm(two.read, product) == Decimal("1.00")
    statement = CTE_SHAPES[shape](product, "7.00")
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(statement)
    else:
        with two.write() as s:
            s.execute(statement)
            s.commit()
    assert read_price(two.read, product) == (Decimal("7.00"), Decimal("7.00"))


def _get(s: Session, pid: int) -> Product:
    found = s.get(Product, pid)
    assert found is not None
    return found


def _query(s: Session, pid: int) -> Product:
    return s.scalars(select(Product).where(Product.id == pid).options(FromCache())).one()


READS = {"get": _get, "query": _query}


@pytest.fixture(params=["redis", "local"])
def pair(
    request: pytest.FixtureRequest, shop_engine: sa.Engine, redis_url: str, namespace: str
) -> Iterator[tuple[sessionmaker[Session], sessionmaker[Session]]]:
    """A writer's and a reader's session factories, each on an engine and a cache of its
    own (two processes); the caches serve hits from Redis, or from their local tiers."""
    local = request.param == "local"
    engines = [sa.create_engine(shop_engine.url) for _ in range(2)]
    caches = [Cache(redis_url, namespace=namespace, local=local) for _ in range(2)]
    factories = [sessionmaker(engine) for engine in engines]
    for cache, factory in zip(caches, factories, strict=True):
        cache.attach(factory)
        tier = cache.inspector.local_tier
        assert not local or (tier is not None and tier.wait_ready(10.0))
    try:
        yield factories[0], factories[1]
    finally:
        for cache in caches:
            cache.detach()
        for engine in engines:
            engine.dispose()


@pytest.mark.parametrize("read", sorted(READS))
def test_a_rollback_expires_what_a_hit_loaded(
    pair: tuple[sessionmaker[Session], sessionmaker[Session]], product: int, read: str
) -> None:
    """A long-lived session refreshes with ``rollback()``: SQLAlchemy expires every object
    of the transaction the read began, so the next read loads the committed row. A hit
    began no transaction, ``rollback()`` did nothing, and the session kept serving the
    price from before another process's commit, by ``get`` and by a query alike."""
    write, read_with = pair
    fn = READS[read]
    for _ in range(2):
        with read_with() as s:
            fn(s, product)
    with read_with() as s:
        held = fn(s, product)  # a hit; the identity map keeps it while it is referenced
        assert held.price == Decimal("1.00")
        with write() as writer:
            _get(writer, product).price = Decimal("8.00")
            writer.commit()
        s.rollback()
        assert fn(s, product) is held
        assert held.price == Decimal("8.00")
        assert _get(s, product).price == Decimal("8.00")


# --------------------------------------------------------------------------- a history


class FreshBase(DeclarativeBase):
    """The history's tables (kept apart from the shop's)."""


class FreshGroup(FreshBase):
    """A group of rows, loaded with its rows eagerly."""

    __tablename__ = "fresh_group"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    rows: Mapped[list[FreshRow]] = relationship(back_populates="group", order_by="FreshRow.id")


class FreshRow(FreshBase):
    """A hot row: ``version`` counts its committed writes."""

    __tablename__ = "fresh_row"
    __cache__ = CachePolicy(strategy="write_through")

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    group_id: Mapped[int] = mapped_column(ForeignKey("fresh_group.id"))
    version: Mapped[int]
    group: Mapped[FreshGroup] = relationship(back_populates="rows")


ROWS, GROUPS = 6, 2


def _group_of(k: int) -> int:
    return 1 + k % GROUPS


@dataclass
class FreshLog:
    """What the threads did: reads, committed writes, writes of unknown outcome."""

    reads: list[Read] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    uncertain: list[tuple[int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FreshActor:
    """One thread's reads and writes through one cache (one process's)."""

    def __init__(
        self, name: str, factory: sessionmaker[Session], engine: sa.Engine, log: FreshLog
    ) -> None:
        self.name, self.factory, self.engine, self.log = name, factory, engine, log
        self.rng = random.Random(name)
        self.held = factory(expire_on_commit=False)
        self.kept: dict[int, FreshRow] = {}  # the held session's objects, kept in its identity map

    def row(self) -> int:
        return self.rng.randint(1, ROWS)

    def seen(self, kind: str, rows: list[tuple[int, int]], start: int) -> None:
        end = now_ns()
        with self.log.lock:
            self.log.reads.extend(Read(kind, k, v, start, end, self.name, "?") for k, v in rows)

    def committed(self, kind: str, rows: list[tuple[int, int]], commit: Any) -> None:
        start = now_ns()
        try:
            commit()
        except BaseException:
            with self.log.lock:
                self.log.uncertain.extend(rows)
            raise
        end = now_ns()
        with self.log.lock:
            self.log.writes.extend(Write(kind, k, v, start, end, self.name) for k, v in rows)

    # -- reads ------------------------------------------------------------------------

    def read_get(self) -> None:
        k, start = self.row(), now_ns()
        with self.factory() as s:
            self.seen("get", [(k, _found(s.get(FreshRow, k)).version)], start)

    def read_selectin(self) -> None:
        g, start = self.rng.randint(1, GROUPS), now_ns()
        stmt = (
            select(FreshGroup)
            .where(FreshGroup.id == g)
            .options(selectinload(FreshGroup.rows), FromCache())
        )
        with self.factory() as s:
            group = s.scalars(stmt).one()
            self.seen("selectin", [(r.id, r.version) for r in group.rows], start)

    def read_joined(self) -> None:
        k, start = self.row(), now_ns()
        stmt = (
            select(FreshRow)
            .where(FreshRow.id == k)
            .options(joinedload(FreshRow.group), FromCache())
        )
        with self.factory() as s:
            self.seen("joined", [(k, s.scalars(stmt).unique().one().version)], start)

    def read_populate_existing(self) -> None:
        k, start = self.row(), now_ns()
        got = self.kept[k] = _found(self.held.get(FreshRow, k, populate_existing=True))
        self.seen("populate_existing", [(k, got.version)], start)
        self.held.rollback()

    def read_refresh(self) -> None:
        k = self.row()
        obj = self.kept[k] = _found(self.held.get(FreshRow, k))
        start = now_ns()
        self.held.refresh(obj)
        self.seen("refresh", [(k, obj.version)], start)
        self.held.rollback()

    def read_after_rollback(self) -> None:
        k = self.row()
        self.held.rollback()
        start = now_ns()
        got = self.kept[k] = _found(self.held.get(FreshRow, k))
        self.seen("after_rollback", [(k, got.version)], start)

    def read_repeatable(self) -> None:
        """A REPEATABLE READ transaction: its snapshot is taken at its first statement, so
        its reads start there."""
        k = self.row()
        with self.factory() as s:
            start = now_ns()
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            first = _found(s.get(FreshRow, k)).version
            stmt = select(FreshRow).where(FreshRow.id == k).options(FromCache())
            again = s.scalars(stmt.execution_options(populate_existing=True)).one().version
            self.seen("repeatable", [(k, first), (k, again)], start)

    # -- writes -----------------------------------------------------------------------

    def write_upsert(self) -> None:
        k = self.row()
        table: Any = FreshRow.__table__
        stmt = (
            pg_insert(table)
            .values(id=k, group_id=_group_of(k), version=1)
            .on_conflict_do_update(index_elements=["id"], set_={"version": table.c.version + 1})
            .returning(table.c.version)
        )
        with self.factory() as s:
            version = s.execute(stmt).scalar_one()
            self.committed("upsert", [(k, version)], s.commit)

    def write_merge(self) -> None:
        k = self.row()
        with self.factory() as s:
            locked = select(FreshRow.version).where(FreshRow.id == k).with_for_update()
            version = s.scalar(locked)
            assert version is not None
            s.merge(FreshRow(id=k, group_id=_group_of(k), version=version + 1))
            self.committed("merge", [(k, version + 1)], s.commit)

    def write_bulk_save(self) -> None:
        k = self.row()
        with self.factory() as s:
            obj = s.scalars(select(FreshRow).where(FreshRow.id == k).with_for_update()).one()
            s.expunge(obj)
            obj.version += 1
            s.bulk_save_objects([obj])
            self.committed("bulk_save", [(k, obj.version)], s.commit)

    def write_executemany(self) -> None:
        ks = sorted({self.row(), self.row()})
        table: Any = FreshRow.__table__
        stmt = (
            table.update()
            .where(table.c.id == sa.bindparam("k"))
            .values(version=table.c.version + 1)
        )
        with self.engine.connect() as conn:
            conn.execute(stmt, [{"k": k} for k in ks])
            got = conn.execute(select(table.c.id, table.c.version).where(table.c.id.in_(ks)))
            self.committed("executemany", [(r.id, r.version) for r in got], conn.commit)

    def write_savepoints(self) -> None:
        k = self.row()
        with self.factory() as s:
            obj = s.scalars(select(FreshRow).where(FreshRow.id == k).with_for_update()).one()
            base = obj.version
            with s.begin_nested() as undone:
                obj.version = base + 1
                s.flush()
                undone.rollback()
            with s.begin_nested():
                obj.version = base + 1
            self.committed("savepoints", [(k, base + 1)], s.commit)

    def write_cte(self) -> None:
        k = self.row()
        table: Any = FreshRow.__table__
        changed = (
            table.update()
            .where(table.c.id == k)
            .values(version=table.c.version + 1)
            .returning(table.c.version)
            .cte("changed")
        )
        with self.factory() as s:
            version = s.execute(select(changed.c.version)).scalar_one()
            self.committed("cte", [(k, version)], s.commit)

    def write_driver_sql(self) -> None:
        k = self.row()
        with self.factory() as s:
            cursor = s.connection().exec_driver_sql(
                "UPDATE fresh_row SET version = version + 1 WHERE id = %(k)s RETURNING version",
                {"k": k},
            )
            self.committed("driver_sql", [(k, cursor.scalar_one())], s.commit)

    def write_orm_fetch(self) -> None:
        k = self.row()
        stmt = (
            sa.update(FreshRow)
            .where(FreshRow.id == k)
            .values(version=FreshRow.version + 1)
            .returning(FreshRow.version)
            .execution_options(synchronize_session="fetch")
        )
        with self.factory() as s:
            self.committed("orm_fetch", [(k, s.execute(stmt).scalar_one())], s.commit)

    @staticmethod
    def one(op: Any) -> None:
        """Run ``op``; a deadlock between writers (rows locked in two orders) is let go."""
        try:
            op()
        except sa.exc.DBAPIError as exc:
            if "deadlock" not in str(exc):
                raise

    def run(self, go: threading.Event, deadline: float) -> None:
        reads = [getattr(self, name) for name in dir(self) if name.startswith("read_")]
        writes = [getattr(self, name) for name in dir(self) if name.startswith("write_")]
        go.wait(10)
        try:
            while time.monotonic() < deadline:
                # mostly reads: entries live long enough between writes to be served
                ops = writes if self.rng.random() < 0.15 else reads
                self.one(self.rng.choice(ops))
        except Exception:
            with self.log.lock:
                self.log.errors.append(f"{self.name}: {traceback.format_exc()}")
        finally:
            self.held.close()


def _found(obj: FreshRow | None) -> FreshRow:
    assert obj is not None
    return obj


@pytest.fixture
def fresh_tables(shop_engine: sa.Engine) -> Iterator[dict[int, int]]:
    """The history's tables, made afresh: every row at version 0."""
    FreshBase.metadata.drop_all(shop_engine)
    FreshBase.metadata.create_all(shop_engine)
    with Session(shop_engine) as s:
        s.add_all(FreshGroup(id=g) for g in range(1, GROUPS + 1))
        s.flush()
        s.add_all(FreshRow(id=k, group_id=_group_of(k), version=0) for k in range(1, ROWS + 1))
        s.commit()
    yield dict.fromkeys(range(1, ROWS + 1), 0)
    FreshBase.metadata.drop_all(shop_engine)


@pytest.mark.parametrize("tier", ["redis", "local"])
def test_a_history_of_the_shapes_the_other_histories_do_not_make(
    shop_engine: sa.Engine, redis_url: str, namespace: str, fresh_tables: dict[int, int], tier: str
) -> None:
    """Two caches (processes), three threads each, reading by ``get``, eager loads,
    ``populate_existing``, ``refresh``, after a ``rollback()`` and in REPEATABLE READ, and
    writing by upsert, merge, ``bulk_save_objects``, executemany, savepoints rolled back
    and released, a DML CTE, ``exec_driver_sql`` and an ORM update: no read that started
    after a ``commit()`` returned sees an older version."""
    log = FreshLog()
    engines = [sa.create_engine(shop_engine.url, pool_size=4) for _ in range(2)]
    caches = [Cache(redis_url, namespace=namespace, local=tier == "local") for _ in range(2)]
    actors = []
    for p, (engine, cache) in enumerate(zip(engines, caches, strict=True)):
        factory = sessionmaker(engine)
        cache.attach(factory)
        tier_of = cache.inspector.local_tier
        assert tier != "local" or (tier_of is not None and tier_of.wait_ready(10.0))
        actors += [FreshActor(f"p{p}t{t}", factory, engine, log) for t in range(3)]
    go = threading.Event()
    deadline = time.monotonic() + 4.0
    threads = [threading.Thread(target=a.run, args=(go, deadline)) for a in actors]
    try:
        for thread in threads:
            thread.start()
        go.set()
        for thread in threads:
            thread.join(30)
    finally:
        for cache in caches:
            cache.detach()
        for engine in engines:
            engine.dispose()
    assert not log.errors, log.errors[0]
    kinds = {w.kind for w in log.writes}
    assert len(kinds) >= 8, kinds
    found = check_history(log.reads, log.writes, fresh_tables, log.uncertain)
    origin = min(r.start for r in log.reads)
    assert not found, "\n".join(v.describe(origin) for v in found[:10])


def test_bind_arguments_naming_the_mapper_by_its_class(two: Two, category: int) -> None:
    """``bind_arguments={"mapper": Category}`` (a class, which ``Session.get_bind``
    accepts): the cache took it for a ``Mapper`` and raised ``AttributeError`` out of
    ``session.execute`` of a Core update, before the update ran."""
    binds = sessionmaker(binds={Product: two.engine, Category: two.engine})
    two.writer.attach(binds)
    table: Any = Category.__table__
    stmt = select(Category).where(Category.id == category).options(FromCache())
    with two.read() as s:
        s.scalars(stmt).one()
    with binds() as s:
        s.execute(
            table.update().where(table.c.id == category).values(name="fresh-bound"),
            bind_arguments={"mapper": Category},
        )
        s.commit()
        assert s.scalars(stmt, bind_arguments={"mapper": Category}).one().name == "fresh-bound"
    with two.read() as s:
        assert s.scalars(stmt).one().name == "fresh-bound"


@pytest.mark.parametrize(
    "mode", ["conditional_savepoint", "create_savepoint", "rollback_only", "control_fully"]
)
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_session_joined_to_an_older_snapshot_fills_nothing(
    two: Two, shop_engine: sa.Engine, product: int, level: str, mode: str
) -> None:
    """The application's REPEATABLE READ transaction took its snapshot, another process
    committed, then a session joined the transaction (``Session(bind=connection)``): its
    begin pinned the versions as they were after that commit, read the row from the older
    snapshot, and stored it as current; every later reader was served the old price."""
    stmt = select(Product).where(Product.id == product).options(FromCache())
    with shop_engine.connect().execution_options(isolation_level=level) as conn:
        conn.begin()
        conn.execute(sa.text("SELECT price FROM products WHERE id = :id"), {"id": product})
        with two.write() as w:
            _get(w, product).price = Decimal("5.00")
            w.commit()
        with two.read(bind=conn, join_transaction_mode=mode) as s:
            assert s.scalars(stmt).one().price == Decimal("1.00")  # its snapshot's
        conn.rollback()
    assert read_price(two.read, product) == (Decimal("5.00"), Decimal("5.00"))


def test_a_rollback_expires_what_a_hit_loaded_in_each_mode(in_mode: Runner, product: int) -> None:
    """:func:`test_a_rollback_expires_what_a_hit_loaded` with a ``Session`` and with an
    ``AsyncSession`` (whose ``rollback()`` is its synchronous session's)."""

    def scenario(db: Db) -> None:
        for _ in range(2):
            with db.session() as s:
                s.get(Product, product)
        with db.session() as s:
            held = s.get(Product, product)  # a hit
            with db.session() as writer:
                writer.get(Product, product).price = Decimal("8.00")
                writer.commit()
            s.rollback()
            assert s.get(Product, product) is held
            assert held.price == Decimal("8.00")

    in_mode(scenario)


@pytest.mark.parametrize("via", ["engine", "session", "cte"])
def test_dml_on_an_alias_of_the_table_retires_its_rows(two: Two, product: int, via: str) -> None:
    """``update(products.alias("p"))`` (``UPDATE products AS p ...``) names an ``Alias``,
    not a ``Table``: the engine listener and the session's bulk marking skipped it, and
    the old price stayed cached."""
    assert warm(two.read, product) == Decimal("1.00")
    table: Any = Product.__table__
    alias = table.alias("p")
    update = sa.update(alias).where(alias.c.id == product).values(price=Decimal("9.00"))
    statement: Any = update
    if via == "cte":
        statement = select(update.returning(alias.c.id).cte("changed").c.id)
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(statement)
    else:
        with two.write() as s:
            s.execute(statement)
            s.commit()
    assert read_price(two.read, product) == (Decimal("9.00"), Decimal("9.00"))


@pytest.mark.parametrize("via", ["engine", "session"])
def test_dml_through_a_lightweight_table_retires_its_rows(two: Two, product: int, via: str) -> None:
    """``update(table("products", column("id"), column("price")))``, as Alembic's data
    migrations write: a ``TableClause``, not a ``Table``, so nothing was marked and the
    old price stayed cached."""
    assert warm(two.read, product) == Decimal("1.00")
    light = sa.table("products", sa.column("id"), sa.column("price"))
    statement = sa.update(light).where(light.c.id == product).values(price=Decimal("4.00"))
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(statement)
    else:
        with two.write() as s:
            s.execute(statement)
            s.commit()
    assert read_price(two.read, product) == (Decimal("4.00"), Decimal("4.00"))


def _textual_select(pid: int, price: str) -> Any:
    return (
        sa.text("UPDATE products SET price = :price WHERE id = :pid RETURNING id")
        .bindparams(price=Decimal(price), pid=pid)
        .columns(id=sa.Integer)
    )


def _orm_from_text(pid: int, price: str) -> Any:
    return select(Product).from_statement(
        sa.text("UPDATE products SET price = :price WHERE id = :pid RETURNING *").bindparams(
            price=Decimal(price), pid=pid
        )
    )


@pytest.mark.parametrize(
    ("shape", "via"),
    [("columns", "engine"), ("columns", "session"), ("from_statement", "session")],
)
def test_textual_dml_with_typed_rows_retires_its_rows(
    two: Two, product: int, shape: str, via: str
) -> None:
    """``text("UPDATE ... RETURNING id").columns(id=Integer)`` compiles as a
    ``TextualSelect``, and ``select(Product).from_statement(text(...))`` as an ORM
    ``FromStatement``: neither is a ``TextClause``, so the textual DML check never read
    their SQL, nothing was marked, and the old price stayed cached."""
    assert warm(two.read, product) == Decimal("1.00")
    make = _textual_select if shape == "columns" else _orm_from_text
    statement = make(product, "3.00")
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(statement).all()
    else:
        with two.write() as s:
            s.execute(statement).all()
            s.commit()
    assert read_price(two.read, product) == (Decimal("3.00"), Decimal("3.00"))


class SetPrice(Executable, ClauseElement):
    """An application's own statement, compiled by :func:`_compile_set_price`."""

    inherit_cache = False

    def __init__(self, pid: int, price: str) -> None:
        self.pid, self.price = pid, Decimal(price)


@compiles(SetPrice)
def _compile_set_price(element: SetPrice, compiler: Any, **kw: Any) -> str:
    price = compiler.process(sa.literal(element.price), **kw)
    pid = compiler.process(sa.literal(element.pid), **kw)
    # both values are bound parameters, rendered by the compiler
    return f"UPDATE products SET price = {price} WHERE id = {pid}"  # noqa: S608


@pytest.mark.parametrize("via", ["engine", "session"])
def test_dml_of_a_custom_compiled_construct_retires_its_rows(
    two: Two, product: int, via: str
) -> None:
    """A ``@compiles`` construct (the recipe for a custom UPSERT or MERGE) is neither
    Core DML nor ``text()``: the engine listener took it for a read, marked nothing, and
    the old price stayed cached. Its SQL is now read as textual DML's is."""
    assert warm(two.read, product) == Decimal("1.00")
    if via == "engine":
        with two.engine.begin() as conn:
            conn.execute(SetPrice(product, "6.50"))
    else:
        with two.write() as s:
            s.execute(SetPrice(product, "6.50"))
            s.commit()
    assert read_price(two.read, product) == (Decimal("6.50"), Decimal("6.50"))
