"""The flush worker (docs/design.md, "Write-behind"): order, exactly-once, dead letters, shared
partitions.

Every test drives :meth:`FlushWorker.run_once` deterministically; nothing waits on time.
The worker gets an engine of its own, as a worker process would. The end-to-end flush
queues its writes with a ``Session`` and with an ``AsyncSession`` (``in_mode``, see
:mod:`tests.modes`); the other tests queue with a ``Session``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis
import sqlalchemy as sa
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache.protocol import partition_of, pk_text
from sa_redis_cache.schema import dead_letters
from sa_redis_cache.strategies.write_behind.worker.flush import write_behind_info
from tests.wb_support import WB_SERVERS, drain, offsets, queue, remove, rows, update, wb_server_url

if TYPE_CHECKING:
    from tests.modes import Db, Runner

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture(params=WB_SERVERS)
def wb_redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a Redis server and on a Redis Cluster, both with AOF."""
    return wb_server_url(request)


@pytest.fixture
def mode_redis_url(wb_redis_url: str) -> str:
    """``in_mode``'s caches use the AOF server or cluster the worker drains (``attach()``
    demands AOF for these models)."""
    return wb_redis_url


def test_inserts_updates_and_deletes_reach_the_database(
    in_mode: Runner,
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    """Queued by a ``Session`` or an ``AsyncSession``, flushed by the worker, read back."""
    page_view, _ = models

    def write(db: Db) -> list[uuid.UUID]:
        ids = []
        for i in range(20):
            with db.session() as s:
                view = page_view(path=f"/p/{i}", views=i)
                s.add(view)
                s.commit()
                ids.append(view.id)
        with db.session() as s:
            s.get(page_view, ids[0]).views = 100
            s.commit()
        with db.session() as s:
            s.delete(s.get(page_view, ids[1]))
            s.commit()
        return ids

    ids, _ = in_mode(write)
    assert rows(worker_engine, page_view) == {}
    assert drain(make_worker()) == 22
    expected = {pk: (f"/p/{i}", i) for i, pk in enumerate(ids)}
    expected[ids[0]] = ("/p/0", 100)
    del expected[ids[1]]
    assert rows(worker_engine, page_view) == expected
    # flushed: no pending state left, no entity entry without a TTL, streams trimmed
    assert list(client.scan_iter(match=f"sarc:{namespace}:*:wbp:*")) == []
    assert list(client.scan_iter(match=f"sarc:{namespace}:*:e:*")) == []
    assert sum(int(client.xlen(k)) for k in client.scan_iter(match=f"sarc:{namespace}:*:wb:*")) == 0

    def read(db: Db) -> None:
        with db.session() as s:
            got = s.get(page_view, ids[0])
            assert got is not None
            assert got.views == 100
            assert s.get(page_view, ids[1]) is None

    in_mode(read)
    # the reads filled the entity entries from the database, with the model's TTL
    entity_keys = list(client.scan_iter(match=f"sarc:{namespace}:*:e:*"))
    assert entity_keys
    assert all(client.pttl(k) > 0 for k in entity_keys)


def test_put_then_delete_and_delete_then_put_keep_their_order(
    factory: sessionmaker[Session], models: Any, make_worker: Any, worker_engine: sa.Engine
) -> None:
    page_view, _ = models
    worker = make_worker()
    gone = queue(factory, page_view, path="/gone")
    back = queue(factory, page_view, path="/back")
    drain(worker)
    # one batch: a put then a delete of one row, a delete then a put of another
    update(factory, page_view, gone, views=7)
    remove(factory, page_view, gone)
    remove(factory, page_view, back)
    with factory() as s:
        s.add(page_view(id=back, path="/back-again", views=3))
        s.commit()
    drain(worker)
    assert rows(worker_engine, page_view) == {back: ("/back-again", 3)}


def test_a_batch_delivered_twice_is_applied_once(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
) -> None:
    page_view, _ = models
    pk = queue(factory, page_view, path="/once", views=1)
    crashing = make_worker("w1")

    def crash(*args: Any) -> None:
        raise RedisConnectionError("killed between the database commit and the ack")

    crashing._after_flush = crash
    assert crashing.run_once() == 0  # applied to the database, never acknowledged
    assert rows(worker_engine, page_view) == {pk: ("/once", 1)}
    assert offsets(worker_engine, namespace) == 1
    # a change the redelivery must not overwrite, as it would if the batch ran again
    with worker_engine.begin() as conn:
        conn.execute(page_view.__table__.update().values(views=99))
    crashing.release()
    restarted = make_worker("w1")  # the same consumer name: its pending entries first
    assert drain(restarted) == 1
    assert rows(worker_engine, page_view) == {pk: ("/once", 99)}
    assert offsets(worker_engine, namespace) == 1


def test_a_poison_row_goes_to_the_dead_letters_and_the_rest_lands(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
    client: redis.Redis,
) -> None:
    page_view, _ = models
    good = [queue(factory, page_view, path=f"/ok/{i}") for i in range(9)]
    poison = queue(factory, page_view, path="/poison", views=-1)  # violates the CHECK
    drain(make_worker())
    assert set(rows(worker_engine, page_view)) == set(good)
    with worker_engine.connect() as conn:
        letters = conn.execute(
            select(dead_letters).where(dead_letters.c.namespace == namespace)
        ).all()
    assert len(letters) == 1
    letter = letters[0]
    assert letter.op == "upsert"
    assert letter.table_name == "wb_page_views"
    assert "wb_views_not_negative" in letter.error
    assert letter.payload["path"] == "/poison"
    assert letter.payload["views"] == -1
    # the cache no longer pretends the row exists: the database is the truth again
    assert list(client.scan_iter(match=f"sarc:{namespace}:*:wbp:*")) == []
    with factory() as s:
        assert s.get(page_view, poison) is None


def test_two_workers_share_the_partitions_and_apply_each_write_once(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    namespace: str,
) -> None:
    page_view, _ = models
    first, second = make_worker("w1"), make_worker("w2")
    first.run_once()
    second.run_once()
    first.run_once()  # w1 gives up what exceeds its share now that w2 is alive
    second.run_once()
    held = [{p.number for p in w.partitions if p.held} for w in (first, second)]
    assert held[0]
    assert held[1]
    assert not held[0] & held[1]
    ids = [queue(factory, page_view, path=f"/s/{i}", views=i) for i in range(60)]
    for pk in ids[:10]:
        update(factory, page_view, pk, views=1000)
    assert drain(first, second) == 70
    expected = {pk: (f"/s/{i}", 1000 if i < 10 else i) for i, pk in enumerate(ids)}
    assert rows(worker_engine, page_view) == expected
    # each partition's entries came in one batch: an update coalesced with its insert
    assert offsets(worker_engine, namespace) == 60
    assert first.applied > 0
    assert second.applied > 0


def test_a_worker_announcement_scored_beyond_any_lease_is_not_counted(
    make_worker: Any, client: redis.Redis, models: Any
) -> None:
    """``ZADD <worker set> <year 2100> ghost``: a worker counted the ghost as a live worker
    for good (its own PEXPIRE kept the set) and held only its share of the partitions,
    leaving the others' queued writes unflushed."""
    worker = make_worker("w1")
    key = worker._workers_key(models[0].__tablename__)
    client.zadd(key, {"ghost": 4_102_444_800_000})  # 2100-01-01 in milliseconds
    worker.run_once()
    assert all(p.held for p in worker.partitions)
    assert client.zscore(key, "ghost") is None


def test_a_redelivered_dead_letter_never_reaches_the_cache(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
) -> None:
    page_view, _ = models
    pk = queue(factory, page_view, path="/kept", views=1)
    first = make_worker("w0")
    drain(first)
    first.release()
    update(factory, page_view, pk, views=-1)  # violates the CHECK: a dead letter
    crashing = make_worker("w1")

    def crash(*args: Any) -> None:
        raise RedisConnectionError("killed between the database commit and the ack")

    crashing._after_flush = crash
    crashing.run_once()  # dead-lettered in the database, never acknowledged
    crashing.release()
    restarted = make_worker("w1")
    assert drain(restarted) == 1  # redelivered, skipped by the offset
    assert restarted.skipped == 1
    assert rows(worker_engine, page_view) == {pk: ("/kept", 1)}
    with factory() as s:  # the cache shows the database's row, not the refused state
        got = s.get(page_view, pk)
        assert got is not None
        assert got.views == 1


def test_entries_queued_in_the_earlier_four_field_form_are_applied(
    models: Any, make_worker: Any, worker_engine: sa.Engine, client: redis.Redis
) -> None:
    """A queue written by the previous release (fields o, k, h, d) drains after an upgrade."""
    page_view, _ = models
    worker = make_worker()
    worker.run_once()
    info = write_behind_info(page_view)
    assert info.codec is not None
    pk = uuid.uuid4()
    values = (pk, "/old", 4, None, datetime(2026, 1, 1, tzinfo=timezone.utc))
    text = pk_text([pk])
    stream = worker.partitions[partition_of(text, len(worker.partitions))].stream
    client.xadd(
        stream,
        {
            "o": "u",
            "k": text,
            "h": info.schema_hash,
            "d": orjson.dumps(info.codec.dump_row(values)),
        },
    )
    assert drain(worker) == 1
    assert rows(worker_engine, page_view) == {pk: ("/old", 4)}
