"""Write-behind example: page views, written at a high rate and flushed in batches.

``PageView`` rows are never inserted by the application's flush: ``commit()`` queues
them in Redis (durably, with AOF on) and a flush worker applies them to Postgres in
batches. ``session.get(PageView, id)`` returns a queued row at once, from any process.
``StockLevel`` shows the other way to get primary keys before the insert: ids reserved
in blocks of 100 from a Postgres sequence.

Example::

    from examples.telemetry import PageView, TelemetryBase
    TelemetryBase.metadata.create_all(engine)
    cache.attach(Session)                  # refuses if Redis has AOF off
    with Session() as s:
        view = PageView(path="/books/7")
        s.add(view)
        s.commit()                         # no SQL: queued in Redis
        assert s.get(PageView, view.id).path == "/books/7"

    # elsewhere, one or several worker processes:
    #   python -m sa_redis_cache.worker --database-url ... --redis-url ... \\
    #       --namespace shop --model examples.telemetry:PageView
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import CheckConstraint, Sequence, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime

from sa_redis_cache import CachePolicy


class TelemetryBase(DeclarativeBase):
    """Declarative base of the telemetry models (apart from the shop's)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


class PageView(TelemetryBase):
    """One page view; the primary key is a UUID made in Python, so no insert is needed."""

    __tablename__ = "page_views"
    __cache__ = CachePolicy(strategy="write_behind", ttl=600, partitions=4)
    __table_args__ = (CheckConstraint("duration_ms >= 0", name="duration_not_negative"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    path: Mapped[str] = mapped_column(String(300))
    product_id: Mapped[int | None]
    duration_ms: Mapped[int] = mapped_column(default=0)
    viewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class StockLevel(TelemetryBase):
    """Stock of a product in a warehouse; ids come from a sequence, 100 at a time."""

    __tablename__ = "stock_levels"
    __cache__ = CachePolicy(strategy="write_behind", ttl=600)

    id: Mapped[int] = mapped_column(
        Sequence("stock_levels_id_seq", increment=100), primary_key=True
    )
    product_id: Mapped[int]
    warehouse: Mapped[str] = mapped_column(String(40))
    quantity: Mapped[int] = mapped_column(default=0)
