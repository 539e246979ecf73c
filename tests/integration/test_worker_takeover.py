"""Worker takeover and fencing: a dead worker's partitions move on in seconds, never twice.

A replacement under the same consumer name resumes at once; one under another name once
the dead worker's lease has expired (the tests delete the lease keys and the worker-set
announcement, which is what expiry does, instead of waiting for it). A worker that lost
its partition while paused cannot apply a batch: the fencing token in ``sarc_wb_offsets``
moved, and its transaction is refused. Every step is driven with ``run_once``; nothing
waits on time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from redis.exceptions import ConnectionError as RedisConnectionError

from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.protocol import scripts
from sa_redis_cache.schema import wb_offsets
from sa_redis_cache.strategies.write_behind.worker.apply import LeaseLost
from tests.wb_support import WB_SERVERS, drain, offsets, queue, rows, update, wb_server_url

if TYPE_CHECKING:
    import uuid

    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from sa_redis_cache import FlushWorker

pytest_plugins = ["tests.wb_fixtures"]


@pytest.fixture(params=WB_SERVERS)
def wb_redis_url(request: pytest.FixtureRequest) -> str:
    """Every test here runs on a Redis server and on a Redis Cluster, both with AOF."""
    return wb_server_url(request)


def expire(client: redis.Redis, worker: FlushWorker) -> None:
    """What the passing of ``worker``'s lease does: its leases and announcement are gone."""
    for p in worker.partitions:
        client.delete(p.lease)
    for table in {p.info.table for p in worker.partitions}:
        client.zrem(worker._workers_key(table), worker.consumer)


def queue_views(factory: sessionmaker[Session], model: Any, count: int) -> list[uuid.UUID]:
    return [queue(factory, model, path=f"/t/{i}", views=i) for i in range(count)]


def test_a_replacement_under_the_same_name_resumes_at_once(
    factory: sessionmaker[Session], models: Any, make_worker: Any, worker_engine: sa.Engine
) -> None:
    page_view, _ = models
    dead = make_worker("w1")
    dead.run_once()  # takes every partition
    assert all(p.held for p in dead.partitions)
    ids = queue_views(factory, page_view, 12)
    # the dead worker never releases: its leases run for another lease_ms (5 s)
    replacement = make_worker("w1")
    assert drain(replacement) == 12
    assert set(rows(worker_engine, page_view)) == set(ids)
    assert all(p.held for p in replacement.partitions)
    # the leases now name the replacement: the dead worker's are gone
    assert dead.run_once() == 0
    assert not any(p.held for p in dead.partitions)


def test_another_worker_takes_over_when_the_lease_expires(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    """Its successor applies what it read and never applied, and what it applied and
    never acknowledged, once each."""
    page_view, _ = models
    dead = make_worker("w1")
    dead.run_once()
    applied_then_killed = queue_views(factory, page_view, 8)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise RedisConnectionError("killed")

    dead._after_flush = killed
    dead.run_once()  # committed, never trimmed
    assert offsets(worker_engine, namespace) == 8
    read_then_killed = queue_views(factory, page_view, 8)
    dead.partitions[0].applier.apply = killed  # read, then killed before the transaction
    dead.run_once()
    assert dead.stats().pending > 0
    successor = make_worker("w2")
    assert successor.run_once() == 0  # the lease is alive: the partitions are not free
    expire(client, dead)
    assert drain(successor) == 16
    assert set(rows(worker_engine, page_view)) == {*applied_then_killed, *read_then_killed}
    assert offsets(worker_engine, namespace) == 16  # nothing applied twice
    assert successor.skipped == 8
    stats = successor.stats()
    assert (stats.length, stats.pending) == (0, 0)
    assert list(client.scan_iter(match=f"sarc:{namespace}:*:wbp:*")) == []


def test_a_stale_token_applies_nothing(
    factory: sessionmaker[Session], models: Any, make_worker: Any, worker_engine: sa.Engine
) -> None:
    """The database refuses a batch whose token moved on, even one of entries it never saw."""
    page_view, _ = models
    worker = make_worker("w1")
    worker.run_once()
    queue_views(factory, page_view, 6)
    part = next(p for p in worker.partitions if worker.client.xlen(p.stream))
    raw = worker.client.xrange(part.stream)
    entries = part.applier.decode_batch(raw)
    stale = part.token
    assert stale is not None
    assert part.applier.acquire(part.stream) == stale + 1  # another worker took it
    with pytest.raises(LeaseLost) as refused:
        part.applier.apply(part.stream, entries, token=stale)
    assert refused.value.found == stale + 1
    assert rows(worker_engine, page_view) == {}
    with worker_engine.connect() as conn:
        offset = conn.execute(
            sa.select(wb_offsets.c.last_id, wb_offsets.c.applied_ops).where(
                wb_offsets.c.stream == part.stream
            )
        ).one()
    assert tuple(offset) == ("0-0", 0)


def test_a_worker_paused_past_its_lease_is_fenced_off(
    factory: sessionmaker[Session],
    models: Any,
    make_worker: Any,
    worker_engine: sa.Engine,
    client: redis.Redis,
    namespace: str,
) -> None:
    """Paused between its read and its transaction while another worker took over: its
    batches are refused, it drops the partitions, and every write lands once."""
    page_view, _ = models
    paused = make_worker("w1")
    paused.run_once()
    ids = queue_views(factory, page_view, 10)
    successor = make_worker("w2")
    applier = paused.partitions[0].applier
    apply = applier.apply
    woke: list[bool] = []

    def pause_then_apply(stream: str, entries: list[Any], **kwargs: Any) -> Any:
        if not woke:  # the pause: the lease expires, the successor takes over and goes on
            woke.append(True)
            expire(client, paused)
            assert drain(successor) == 10
            update(factory, page_view, ids[0], views=500)
            assert drain(successor) == 1
        return apply(stream, entries, **kwargs)

    applier.apply = pause_then_apply  # the pause
    assert paused.run_once() == 0
    assert paused.fenced >= 1  # each partition it had read from
    assert paused.applied == 0
    expected = {pk: (f"/t/{i}", 500 if i == 0 else i) for i, pk in enumerate(ids)}
    assert rows(worker_engine, page_view) == expected
    assert offsets(worker_engine, namespace) == 11
    # on its next pass it finds every lease held by the successor: it keeps nothing
    applier.apply = apply
    assert paused.run_once() == 0
    assert not any(p.held or p.token for p in paused.partitions)


def test_a_holder_whose_token_was_moved_by_a_stale_worker_takes_it_back(
    factory: sessionmaker[Session], models: Any, make_worker: Any, worker_engine: sa.Engine
) -> None:
    """A worker that took a lease, paused and lost it can still move the token once on
    waking (between its two steps): the lease's holder is refused one batch, then moves
    the token back and goes on, rather than leaving the partition to nobody."""
    page_view, _ = models
    holder = make_worker("w1")
    holder.run_once()
    ids = queue_views(factory, page_view, 10)
    for p in holder.partitions:
        p.applier.acquire(p.stream)  # the stale worker's late token move
    assert holder.run_once() == 0  # refused
    assert holder.fenced >= 1
    assert drain(holder) == 10  # the token moved back, the lease never left
    assert set(rows(worker_engine, page_view)) == set(ids)
    assert all(p.held and p.token for p in holder.partitions)


def test_the_heartbeat_renews_the_leases_and_notices_a_lost_one(
    models: Any, make_worker: Any, client: redis.Redis
) -> None:
    worker = make_worker("w1", lease_ms=60_000)
    worker.run_once()
    first, second = worker.partitions[0], worker.partitions[1]
    client.pexpire(first.lease, 1000)
    client.set(second.lease, scripts.lease_owner("ffffffffffff", "other"), px=60_000)
    worker.heartbeat()
    assert client.pttl(first.lease) > 30_000
    assert second.lost
    worker.run_once()
    assert not second.held
    assert second.token is None
    assert first.held


def test_leases_that_cannot_be_renewed_in_time_are_refused(make_worker: Any) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_ms"):
        make_worker("w1", lease_ms=1000, heartbeat_ms=600)
    with pytest.raises(ConfigurationError, match="lease_ms"):
        make_worker("w1", lease_ms=50)
