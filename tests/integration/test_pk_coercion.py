"""Write-behind's queued states are read by a primary key of another type too (issue 16).

``session.get(PageView, str(pk))`` is what an application holding the key as text does:
the queued (unflushed) row must be found under the key a load gives, not missed (the
database does not hold the row yet, so a miss would read nothing).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from tests.support import SQLCounter
from tests.wb_support import queue

pytest_plugins = ["tests.wb_fixtures"]


def test_a_queued_row_is_read_by_its_key_as_text(
    factory: sessionmaker[Session],
    models: Any,
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sa_redis_cache")
    page_view, _ = models
    pk = queue(factory, page_view, path="/queued", views=2)
    # the queued state alone holds the row: its entity entry evicted, the database empty
    entries = list(client.scan_iter(match=f"sarc:{namespace}:*:e:*"))
    assert len(entries) == 1
    client.unlink(*entries)
    counter = SQLCounter()
    sa.event.listen(engine, "before_cursor_execute", counter)
    try:
        with factory() as s:
            got = s.get(page_view, str(pk))
            assert got is not None
            assert (got.id, got.path, got.views) == (pk, "/queued", 2)
    finally:
        sa.event.remove(engine, "before_cursor_execute", counter)
    assert counter.count == 0
    assert not caplog.records
