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
