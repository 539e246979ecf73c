"""Every SQLAlchemy and redis-py internal the library touches exists in the installed release.

One test per symbol (``sa_redis_cache.compat.PROBES``): when a release moves one, the
failure names it and the versions, instead of a cached read going wrong somewhere deep.
"""

from __future__ import annotations

import pytest
import redis
import sqlalchemy

from sa_redis_cache import compat

FOUND = dict(compat.probe())


@pytest.mark.parametrize("symbol", compat.PROBES)
def test_the_internal_symbol_exists(symbol: str) -> None:
    assert FOUND[symbol], (
        f"{symbol} is gone in SQLAlchemy {sqlalchemy.__version__} / redis-py "
        f"{redis.__version__}: sa_redis_cache.compat must follow it"
    )


def test_every_probe_is_checked() -> None:
    assert set(FOUND) == set(compat.PROBES)


def test_script_calls_are_packed_as_redis_py_packs_them() -> None:
    """send_now frames the cache's commands in C; the bytes must be redis-py's own."""
    from sa_redis_cache.protocol import KeyScheme, scripts

    keys = KeyScheme("shop")
    row = scripts.RowCommit("k\u00e9y", "7", 3, 600_000, b"\x00\xffstate")
    calls = [
        scripts.flush_mark(keys, "products", "tok", [("e", "7")], bulk=False),
        scripts.commit(keys, "products", "tok", [row], bulk=False, scope="00ff"),
        scripts.fence(keys, "products", "tok"),
    ]
    commands = [("EVALSHA", s.sha, len(k), *k, *a) for s, k, a in calls]
    connection = redis.Connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
    assert b"".join(compat._packed(connection, commands)) == b"".join(
        connection.pack_commands(commands)  # type: ignore[no-untyped-call]  # as above
    )
