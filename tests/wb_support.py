"""Write-behind models for tests, made in a declarative base of their own on each call.

``attach()`` validates every mapped model of the process, and a write-behind model is
refused on a Redis server without AOF (the shared test server has it off): models that
outlived their test would make every later ``attach()`` of the run fail. So tests make
them with :func:`private_models`, which disposes of their registry afterwards; worker
subprocesses load them with ``--model tests.wb_support:worker_models``; commands run
in-process (``dlq replay``) load the models of the running test with
``--model tests.wb_support:active_models``.

The second half holds helpers the worker tests share; their fixtures are in
:mod:`tests.wb_fixtures`.
"""

from __future__ import annotations

import gc
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import CheckConstraint, Sequence, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import DateTime

from sa_redis_cache import CachePolicy, FlushWorker
from sa_redis_cache.protocol import partition_of, pk_text
from sa_redis_cache.schema import dead_letters, wb_offsets

if TYPE_CHECKING:
    from collections.abc import Iterator

PARTITIONS = 4
CHECK = "wb_views_not_negative"
"""PageView's CHECK (``views >= 0``), which the tests' poison rows violate."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def define_models() -> tuple[type[DeclarativeBase], Any, Any]:
    """``(Base, PageView, StockLevel)``, in a new base per call.

    PageView has UUID keys made in Python, StockLevel ids from a sequence block.
    """

    class Base(DeclarativeBase):
        pass

    class PageView(Base):
        __tablename__ = "wb_page_views"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=PARTITIONS)
        __table_args__ = (CheckConstraint("views >= 0", name=CHECK),)

        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(String(200))
        views: Mapped[int] = mapped_column(default=0)
        note: Mapped[str | None]
        viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    class StockLevel(Base):
        __tablename__ = "wb_stock_levels"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=2)

        id: Mapped[int] = mapped_column(
            Sequence("wb_stock_levels_id_seq", increment=50), primary_key=True
        )
        warehouse: Mapped[str] = mapped_column(String(40))
        quantity: Mapped[int] = mapped_column(default=0)

    return Base, PageView, StockLevel


def worker_models() -> list[Any]:
    """For ``python -m sa_redis_cache.worker --model tests.wb_support:worker_models``."""
    _, page_view, stock_level = define_models()
    return [page_view, stock_level]


_ACTIVE: list[tuple[Any, Any]] = []


def active_models() -> list[Any]:
    """The models of the innermost :func:`private_models` block (for in-process commands)."""
    return list(_ACTIVE[-1])


@contextmanager
def private_models() -> Iterator[tuple[Any, Any]]:
    """:func:`define_models` in a base disposed of when the block ends."""
    base, page_view, stock_level = define_models()
    models = (page_view, stock_level)
    _ACTIVE.append(models)
    try:
        yield models
    finally:
        _ACTIVE.pop()
        base.registry.dispose()
        del models, page_view, stock_level, base
        gc.collect()


# --------------------------------------------------------------------------- helpers


def drain(*workers: FlushWorker, limit: int = 50) -> int:
    """Run the workers in turn until a whole round processes nothing; entries processed."""
    total = 0
    for _ in range(limit):
        done = sum(worker.run_once() for worker in workers)
        total += done
        if not done:
            return total
    raise AssertionError("the workers never ran dry")


def rows(engine: sa.Engine, model: Any) -> dict[uuid.UUID, tuple[str, int]]:
    """The table of ``model`` (a PageView): ``{id: (path, views)}``."""
    table = model.__table__
    with engine.connect() as conn:
        return {r.id: (r.path, r.views) for r in conn.execute(select(table))}


def queue(factory: sessionmaker[Session], model: Any, **values: Any) -> uuid.UUID:
    """Commit a new ``model(**values)``; its id."""
    with factory() as s:
        obj = model(**values)
        s.add(obj)
        s.commit()
        return obj.id  # type: ignore[no-any-return]


def update(factory: sessionmaker[Session], model: Any, pk: uuid.UUID, **values: Any) -> None:
    """Commit new ``values`` for row ``pk``."""
    with factory() as s:
        obj = s.get(model, pk)
        assert obj is not None
        for key, value in values.items():
            setattr(obj, key, value)
        s.commit()


def remove(factory: sessionmaker[Session], model: Any, pk: uuid.UUID) -> None:
    """Commit the deletion of row ``pk``."""
    with factory() as s:
        obj = s.get(model, pk)
        assert obj is not None
        s.delete(obj)
        s.commit()


def offsets(engine: sa.Engine, namespace: str) -> int:
    """Operations the worker applied in ``namespace`` (``applied_ops`` of every partition)."""
    with engine.connect() as conn:
        stmt = select(sa.func.coalesce(sa.func.sum(wb_offsets.c.applied_ops), 0)).where(
            wb_offsets.c.stream.like(f"sarc:{namespace}:%")
        )
        return int(conn.scalar(stmt) or 0)


def letters(engine: sa.Engine, namespace: str) -> list[Any]:
    """The dead letters of ``namespace``, oldest first."""
    with engine.connect() as conn:
        stmt = select(dead_letters).where(dead_letters.c.namespace == namespace)
        return list(conn.execute(stmt.order_by(dead_letters.c.id)).all())


def reset_page_views(conn: sa.Connection) -> None:
    """Empty ``wb_page_views`` and give it back its :data:`CHECK`, which a test may have
    dropped to fix a poison row's cause (the table is shared by the run)."""
    conn.execute(text("DELETE FROM wb_page_views"))
    conn.execute(text(f"ALTER TABLE wb_page_views DROP CONSTRAINT IF EXISTS {CHECK}"))
    conn.execute(text(f"ALTER TABLE wb_page_views ADD CONSTRAINT {CHECK} CHECK (views >= 0)"))


WB_SERVERS = ("single", "cluster")
"""The parameters of a module's ``wb_redis_url`` override that runs on both."""


def wb_server_url(request: Any) -> str:
    """The URL of the module's Redis with AOF (``"single"``) or Redis Cluster with AOF
    (``"cluster"``), by ``request.param``: a module overrides ``wb_redis_url`` with

    .. code-block:: python

        @pytest.fixture(params=WB_SERVERS)
        def wb_redis_url(request: pytest.FixtureRequest) -> str:
            return wb_server_url(request)
    """
    name = "aof_cluster" if request.param == "cluster" else "aof_redis"
    url: str = request.getfixturevalue(name).url
    return url


def same_partition_keys(count: int = 2) -> tuple[uuid.UUID, ...]:
    """``count`` ids of one partition, in the worker's lock order (pk text)."""
    found: dict[int, list[uuid.UUID]] = {}
    while True:
        key = uuid.uuid4()
        group = found.setdefault(partition_of(pk_text([key]), PARTITIONS), [])
        group.append(key)
        if len(group) == count:
            return tuple(sorted(group, key=lambda k: pk_text([k])))
