"""Instruction counts of one commit: ``python -m benchmarks.callgrind_commits KIND``.

KIND is ``write_through`` (a ``Product.price`` commit, written through), ``invalidate``
(a ``Category.name`` commit, cache-aside) or ``plain-write_through`` /
``plain-invalidate`` (the same commits through a session the cache is not attached to).
One call is what a timed call of :mod:`benchmarks.cases_writes` is, with its untimed
setup and teardown: open a session, begin, load the row, change it, **commit**, close.
The row is loaded by a plain ``select()`` (not ``session.get``, which the entity cache
would answer, a hit or a miss and its fill depending on what the last commit left), so
ours and plain load alike; ``KIND-setup`` counts the same calls without the commit (the
close rolls back): ``KIND`` minus ``KIND-setup`` is about what the commit costs, against
the rollback it replaces.

Counted as :mod:`benchmarks.callgrind_reads` counts reads (its runner: main thread only,
``(I(220) - I(20)) / 200``)::

    python -m devservices -- python -m benchmarks.callgrind_commits invalidate
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sqlalchemy import select

from benchmarks.callgrind_reads import per_call
from benchmarks.cases_writes import new_name, new_price
from benchmarks.env import Sizes, bench_env
from examples.shop import Category, Product

_BASE = ("write_through", "invalidate", "plain-write_through", "plain-invalidate")
KINDS = (*_BASE, *(f"{kind}-setup" for kind in _BASE))


def run_commits(kind: str, calls: int) -> None:
    """Seed, warm up, then make ``calls`` commits of ``kind`` (what callgrind counts);
    a ``-setup`` kind does everything but the commit (the session closes, rolling back)."""
    with bench_env(
        os.environ["DATABASE_URL"],
        os.environ["REDIS_URL"],
        Sizes(products=50, customers=10, orders=20, extra_orders=0),
    ) as env:
        setup_only = kind.endswith("-setup")
        kind = kind.removesuffix("-setup")
        plain = kind.startswith("plain-")
        factory = env.plain if plain else env.cached
        model: Any = Product if kind.endswith("write_through") else Category
        mutate = new_price if model is Product else new_name
        load = select(model).where(model.id == (22 if model is Product else 2))
        for n in range(1, 21 + calls):
            with factory() as session:
                mutate(session.scalars(load).one(), n)
                if not setup_only:
                    session.commit()


def main(argv: list[str]) -> None:
    """``KIND``: print the per-commit count; ``--run KIND N``: make the commits (internal)."""
    per_call(
        argv, kinds=KINDS, run=run_commits, module="benchmarks.callgrind_commits", unit="commit"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
