"""The connect-time checks' drivers (sa_redis_cache/outages.py): a check cut short by a
connection error must not keep the lock it holds across its bump."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING, Any

import pytest
import redis
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_redis_cache import Cache, outages

if TYPE_CHECKING:
    from collections.abc import Generator, Iterator


def check_holding(lock: threading.Lock) -> Generator[list[tuple[str, ...]], list[Any], None]:
    """A check shaped like the restart check: a first round trip, then one under the lock."""
    yield [("INFO", "server")]
    with lock:
        yield [("EVALSHA", "bump")]


class LostOnSecondTrip:
    """A connection that answers the first round trip and is lost during the second."""

    def __init__(self) -> None:
        self.sent = 0

    def send_command(self, *_: Any) -> None:
        self.sent += 1
        if self.sent == 2:
            raise redis.ConnectionError("Connection closed by server.")

    def read_response(self) -> bytes:
        return b"run_id:abc"


class AsyncLostOnSecondTrip(LostOnSecondTrip):
    async def send_command(self, *args: Any) -> None:  # type: ignore[override]
        super().send_command(*args)

    async def read_response(self) -> bytes:  # type: ignore[override]
        return super().read_response()


def test_a_check_cut_short_releases_its_lock() -> None:
    lock = threading.Lock()
    with pytest.raises(redis.ConnectionError) as caught:
        outages._drive(LostOnSecondTrip(), check_holding(lock))
    # ``caught`` keeps the traceback, and with it the driver's frame and the check, alive
    assert caught.value is not None
    assert lock.acquire(blocking=False), "the next connection would wait on the lock forever"


def test_an_async_check_cut_short_releases_its_lock() -> None:
    lock = threading.Lock()
    with pytest.raises(redis.ConnectionError) as caught:
        asyncio.run(outages._drive_async(AsyncLostOnSecondTrip(), check_holding(lock)))
    assert caught.value is not None
    assert lock.acquire(blocking=False)


# ------------------------------------------------- a cluster node's owner check, driven by hand

OWNER_A = (7000, "a1" * 20, b"a" * 40)
OWNER_B = (7001, "b2" * 20, b"b" * 40)


class NodeConnection:
    def __init__(self, port: int) -> None:
        self.host, self.port = "127.0.0.1", port


def owner_replies(run_id: str, node_id: bytes) -> list[Any]:
    """``INFO server``, ``CLUSTER MYID`` and ``CLUSTER SLOTS`` of a node serving every slot."""
    slots = [[0, 16383, [b"127.0.0.1", 7000, node_id]]]
    return [f"# Server\r\nrun_id:{run_id}\r\n".encode(), node_id, slots]


def start_owner_check(core: Any, owner: tuple[int, str, bytes]) -> tuple[Any, Any]:
    """A new connection's check, up to its bump: ``(steps, bump)`` (bump None: none)."""
    port, run_id, node_id = owner
    steps = core._owner_steps(NodeConnection(port), contextlib.nullcontext())
    next(steps)
    try:
        return steps, steps.send(owner_replies(run_id, node_id))
    except StopIteration:
        return steps, None


def land_bump(steps: Any, bump: list[Any]) -> None:
    with contextlib.suppress(StopIteration):
        steps.send([b"sha", *[1] * (len(bump) - 1)])


class Base(DeclarativeBase):
    pass


class Known(Base):
    """A mapped table: every table mapped in the process is bumped when a slot moves."""

    __tablename__ = "unit_owner_checks"
    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture
def core() -> Iterator[Any]:
    """A cache's core whose checks are driven by hand (its client never connects)."""
    cache = Cache("redis://127.0.0.1:1/0", namespace="unit-owners")
    yield cache._core
    cache.detach()


def test_a_bump_cut_short_leaves_its_tables_undelivered(core: Any) -> None:
    """The new owner's bump dies with its connection: nothing is recorded, so if the slots
    went back to the first owner, a connection to it would find nothing changed. The
    tables must wait for a delivery."""
    assert start_owner_check(core, OWNER_A)[1] is None  # first met: recorded, no bump
    steps, bump = start_owner_check(core, OWNER_B)
    assert bump is not None
    steps.close()  # what the driver does when the bump's reply raises ConnectionError
    assert Known.__tablename__ in core.undelivered
    assert start_owner_check(core, OWNER_A)[1] is None  # looks unchanged: A is recorded


def test_two_connections_meeting_one_new_owner_report_it_once(core: Any) -> None:
    """asyncio connections hold no lock across the bump: both bump, one reports."""
    start_owner_check(core, OWNER_A)
    first, first_bump = start_owner_check(core, OWNER_B)
    second, second_bump = start_owner_check(core, OWNER_B)
    assert first_bump is not None
    assert second_bump is not None  # the owner is recorded only once a bump landed
    land_bump(first, first_bump)
    land_bump(second, second_bump)
    assert core.restarts_seen == 1
    assert start_owner_check(core, OWNER_B)[1] is None
