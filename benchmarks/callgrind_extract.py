"""Instruction counts of ``hydrate.extract`` alone: ``python -m benchmarks.callgrind_extract BODY``.

BODY is ``graph`` (50 orders with their 200 lines, the ``miss_50rows`` body) or ``one``
(one ``Product``, the ``miss_1row`` body). The rows are read once, then extracted 5 and
55 times under ``valgrind --tool=callgrind`` (main thread only), and the script prints
``(I(55) - I(5)) / 50``: what a fill spends turning the database's objects into an entry
before packing it. Needs ``DATABASE_URL`` and ``REDIS_URL`` as :mod:`benchmarks.run`
does::

    python -m devservices -- python -m benchmarks.callgrind_extract graph

benchmarks/results/speed.md quotes its output.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from benchmarks.callgrind_reads import per_call
from benchmarks.env import Sizes, bench_env
from examples.shop import Order, Product
from sa_redis_cache import hydrate
from sa_redis_cache.reads.queries import _row_shape

BODIES = ("graph", "one")
FEW, MANY = 5, 55


def statement(body: str) -> Any:
    """The statement whose result the body holds."""
    if body == "graph":
        return select(Order).options(selectinload(Order.lines)).order_by(Order.id).limit(50)
    return select(Product).where(Product.id == 7)


def run_extracts(body: str, calls: int) -> None:
    """Seed, read the rows once, then extract them ``calls`` times (what callgrind counts)."""
    with bench_env(
        os.environ["DATABASE_URL"],
        os.environ["REDIS_URL"],
        Sizes(products=50, customers=10, orders=60, extra_orders=0),
    ) as env:
        stmt = statement(body)
        shape = _row_shape(stmt)
        # extract() is internal: the benchmark reaches the registry the read path uses
        info_of = env.cache._core.models.info_of
        with env.plain() as s:
            rows = s.execute(stmt).freeze().data
            for _ in range(calls):
                hydrate.extract(rows, shape, info_of, frozenset())


def main(argv: list[str]) -> None:
    """``BODY``: print the per-extract count; ``--run BODY N``: make the extracts (internal)."""
    per_call(
        argv,
        kinds=BODIES,
        run=run_extracts,
        module="benchmarks.callgrind_extract",
        unit="extract",
        few=FEW,
        many=MANY,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
