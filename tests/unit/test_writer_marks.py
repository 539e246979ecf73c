"""A writer's mark may not be asked to live longer than the scripts let any mark live:
they take a mark scored beyond :data:`~sa_redis_cache.protocol.scripts.WRITER_MARK_MS`
for forged and remove it, so a longer one would be dropped as soon as it was set."""

from __future__ import annotations

from typing import Any

import pytest

from sa_redis_cache import ConfigurationError
from sa_redis_cache.protocol import KeyScheme, scripts
from sa_redis_cache.worker import replay_dead_letters


@pytest.mark.parametrize("ms", [0, -1, scripts.WRITER_MARK_MS + 1])
def test_a_mark_beyond_any_writers_is_refused(ms: int) -> None:
    with pytest.raises(ConfigurationError, match=f"writer_mark_ms={ms} must be from 1 to"):
        scripts.flush_mark(KeyScheme("t"), "products", "tok", [], bulk=True, writer_mark_ms=ms)


def test_replay_refuses_it_before_touching_anything() -> None:
    untouched: Any = object()  # neither an engine nor a client: nothing may be asked of it
    with pytest.raises(ConfigurationError, match="must be from 1 to"):
        replay_dead_letters(
            untouched, untouched, "t", [], writer_mark_ms=scripts.WRITER_MARK_MS + 1
        )


def test_the_longest_mark_is_taken() -> None:
    _, _, args = scripts.flush_mark(
        KeyScheme("t"), "products", "tok", [], bulk=True, writer_mark_ms=scripts.WRITER_MARK_MS
    )
    assert args[1] == scripts.WRITER_MARK_MS
