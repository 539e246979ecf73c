"""Write-behind in a slot group on a single server: the session queues the writes under
the group's tag and the flush worker, given the models, finds them there
(docs/cluster.md, "Slot groups")."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import sessionmaker

from sa_redis_cache import Cache
from sa_redis_cache.protocol import KeyScheme
from tests.integration.test_write_behind import in_database

if TYPE_CHECKING:
    import pytest
    import redis
    import sqlalchemy as sa

pytest_plugins = ["tests.wb_fixtures"]


def test_the_worker_flushes_a_write_behind_model_of_a_slot_group(
    engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page_view, _ = models
    grouped = dataclasses.replace(page_view.__cache__, slot_group="views")
    monkeypatch.setattr(page_view, "__cache__", grouped)
    table = page_view.__table__.fullname
    cache = Cache(client, namespace=namespace)
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        with factory() as s:
            view = page_view(path="/grouped")
            s.add(view)
            s.commit()
            pk = view.id
        keys = KeyScheme(namespace, {table: "views"})
        assert list(client.scan_iter(match=keys.stream_pattern(table)))  # under the group's tag
        assert not list(client.scan_iter(match=KeyScheme(namespace).stream_pattern(table)))
        worker = make_worker()
        worker.run_once()
        assert in_database(worker_engine, page_view, pk) is not None
    finally:
        cache.detach()
