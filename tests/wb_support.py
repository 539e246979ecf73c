"""Write-behind models for tests, made in a declarative base of their own on each call.

``attach()`` validates every mapped model of the process, and a write-behind model is
refused on a Redis server without AOF (the shared test server has it off): models that
outlived their test would make every later ``attach()`` of the run fail. So tests make
them with :func:`private_models`, which disposes of their registry afterwards; worker
subprocesses load them with ``--model tests.wb_support:worker_models``.
"""

from __future__ import annotations

import gc
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import CheckConstraint, Sequence, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime

from sa_redis_cache import CachePolicy

if TYPE_CHECKING:
    from collections.abc import Iterator

PARTITIONS = 4


def _now() -> datetime:
    return datetime.now(timezone.utc)


def define_models(base: Any = None) -> tuple[Any, Any]:
    """``(PageView, StockLevel)``: UUID keys from Python, and ids from a sequence block."""
    if base is None:

        class base(DeclarativeBase):  # noqa: N801 - a throwaway base per call
            pass

    class PageView(base):  # type: ignore[valid-type,misc]
        __tablename__ = "wb_page_views"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=PARTITIONS)
        __table_args__ = (CheckConstraint("views >= 0", name="wb_views_not_negative"),)

        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        path: Mapped[str] = mapped_column(String(200))
        views: Mapped[int] = mapped_column(default=0)
        note: Mapped[str | None]
        viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    class StockLevel(base):  # type: ignore[valid-type,misc]
        __tablename__ = "wb_stock_levels"
        __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=2)

        id: Mapped[int] = mapped_column(
            Sequence("wb_stock_levels_id_seq", increment=50), primary_key=True
        )
        warehouse: Mapped[str] = mapped_column(String(40))
        quantity: Mapped[int] = mapped_column(default=0)

    return PageView, StockLevel


def worker_models() -> list[Any]:
    """For ``python -m sa_redis_cache.worker --model tests.wb_support:worker_models``."""
    return list(define_models())


@contextmanager
def private_models() -> Iterator[tuple[Any, Any]]:
    """:func:`define_models` in a base disposed of when the block ends."""

    class Base(DeclarativeBase):
        pass

    models = define_models(Base)
    try:
        yield models
    finally:
        Base.registry.dispose()
        del models, Base
        gc.collect()
