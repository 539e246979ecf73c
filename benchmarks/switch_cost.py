"""What a Redis round trip costs between two Postgres round trips, on this machine:
``python -m benchmarks.switch_cost [N]``.

A miss or a commit of ours sends its Redis calls between the database's statements, and
the bound rows of :mod:`benchmarks.run` (the same call paying only our round trips) price
them there. On a small virtual machine a round trip to a server that sat idle while the
client talked to another costs more than the same round trip in a loop: the idle
server's CPU must be woken. This measures, alternated call by call in one process
(medians of N rounds, 5,000 by default), with the raw drivers (no SQLAlchemy, no cache):

* ``GET``: redis-py ``GET`` of a 200-byte value, back to back;
* ``SELECT 1``: psycopg ``SELECT 1`` on an autocommit connection, back to back;
* ``SELECT 1 then GET``: one of each, as a miss's look follows the session's BEGIN or a
  commit's script follows its ``UPDATE``.

``SELECT 1 then GET`` minus the two alone is what switching servers adds per pair.
Needs ``DATABASE_URL`` and ``REDIS_URL`` as :mod:`benchmarks.run` does
(``python -m devservices -- ...``); writes one key under ``sarc:bench-switch:`` and
removes it.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

import psycopg
import redis
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from collections.abc import Callable

WARMUP = 500
KEY = "sarc:bench-switch:value"


def medians(rounds: int) -> dict[str, float]:
    """The median of each contender, in microseconds."""
    url = make_url(os.environ["DATABASE_URL"])
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    database = psycopg.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
    )
    try:
        client.set(KEY, b"v" * 200, ex=600)

        def get() -> None:
            client.get(KEY)

        def select_one() -> None:
            database.execute("SELECT 1").fetchall()

        def select_then_get() -> None:
            select_one()
            get()

        contenders: dict[str, Callable[[], None]] = {
            "GET": get,
            "SELECT 1": select_one,
            "SELECT 1 then GET": select_then_get,
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        # each contender runs a short burst in turn: back to back within the burst (what
        # "alone" means), alternated between bursts (drift affects all alike)
        burst = 10
        for i in range(WARMUP // burst + rounds // burst):
            for name, call in contenders.items():
                for _ in range(burst):
                    started = time.perf_counter()
                    call()
                    took = time.perf_counter() - started
                    if i >= WARMUP // burst:
                        times[name].append(took)
        return {name: statistics.median(t) * 1e6 for name, t in times.items()}
    finally:
        client.delete(KEY)
        client.close()
        database.close()


def main() -> None:
    """Print the medians as a markdown table, and what switching servers adds."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    med = medians(rounds)
    print("| contender | median |\n|---|--:|")
    for name, value in med.items():
        print(f"| {name} | {value:.1f} µs |")
    alone = med["GET"] + med["SELECT 1"]
    added = med["SELECT 1 then GET"] - alone
    share = added / med["GET"]
    print(f"\nswitching servers adds {added:.1f} µs per pair ({share:.2f}x a GET alone)")


if __name__ == "__main__":
    main()
