"""The connect-time checks' drivers (sa_redis_cache/outages.py): a check cut short by a
connection error must not keep the lock it holds across its bump."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import pytest
import redis

from sa_redis_cache import outages

if TYPE_CHECKING:
    from collections.abc import Generator


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
