"""Instruction counts of one read: ``python -m benchmarks.callgrind_reads KIND``.

KIND is ``hit`` (a 1-row ``FromCache`` hit), ``get`` (a ``session.get`` hit),
``miss`` (a 1-row ``FromCache`` miss and its fill), or ``local-hit`` / ``local-get`` (the
first two served by a ``Cache(local=True)``'s local tier). Wall-clock medians move with whatever
else the machine runs; instruction counts do not, so decisions about the read path's own
work are made on them. The script runs the read 20 times and then 220 times under
``valgrind --tool=callgrind`` and prints ``(I(220) - I(20)) / 200``: start-up, seeding
and warm-up cancel out. Instructions of the main thread only (``--separate-threads``):
the cache's and redis-py's background threads work per second, not per read, and a
slower (busier) machine would count more of their work. Redis and Postgres are other
processes. Needs ``DATABASE_URL`` and ``REDIS_URL`` as :mod:`benchmarks.run` does::

    python -m devservices -- python -m benchmarks.callgrind_reads hit

benchmarks/results/speed.md quotes its output.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from typing import TYPE_CHECKING

from sqlalchemy import select

from benchmarks.cases_local import local_side
from benchmarks.env import Sizes, bench_env
from examples.shop import Product
from sa_redis_cache import FromCache

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

KINDS = ("hit", "get", "miss", "local-hit", "local-get")
FEW, MANY = 20, 220
PRODUCT = 7


def run_reads(kind: str, calls: int) -> None:
    """Seed, warm up, then make ``calls`` reads of ``kind`` (what callgrind counts)."""
    with bench_env(
        os.environ["DATABASE_URL"],
        os.environ["REDIS_URL"],
        Sizes(products=50, customers=10, orders=20, extra_orders=0),
    ) as env:
        cached = select(Product).where(Product.id == PRODUCT).options(FromCache())
        cache = env.cache
        with ExitStack() as stack:
            sessions = env.cached
            if kind.startswith("local-"):
                # a lease that outlasts the run and no stats thread: under callgrind the
                # threads take turns on one core, and a renewal late by a whole lease
                # would empty the tier (every read after it a miss, counted as a hit's)
                side = local_side(env, "callgrind", local_lease=60.0, stats_publish_interval=0)
                sessions = stack.enter_context(side).factory

            def hit() -> None:
                with sessions() as s:
                    s.scalars(cached).all()

            def get() -> None:
                with sessions() as s:
                    s.get(Product, PRODUCT)

            def miss() -> None:
                cache.invalidate_query(cached)  # the entry is gone: the read misses and fills
                hit()

            read: Callable[[], None] = {"hit": hit, "get": get, "miss": miss}[
                kind.removeprefix("local-")
            ]
            # the local tier keeps an entry at its second read (a fill, then a Redis hit)
            for _ in range(20):
                read()
            # what the warm-up and seeding left is frozen out of the collector's view: a
            # full collection walks only what the reads made, so one falling inside one
            # count's window and not the other's no longer swings a count by ~10%
            gc.collect()
            gc.freeze()
            for _ in range(calls):
                read()


def instructions(kind: str, calls: int, module: str = "benchmarks.callgrind_reads") -> int:
    """Instructions callgrind counts in the main thread of ``python -m module --run kind
    calls`` (this module's: a process making ``calls`` reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                module,
                "--run",
                kind,
                str(calls),
            ],
            check=True,
            capture_output=True,
        )
        # with --separate-threads the main thread's counts are in <out>-01
        with open(f"{out}-01", encoding="utf-8") as f:
            summary = re.search(r"^summary: (\d+)", f.read(), re.MULTILINE)
    if summary is None:
        raise RuntimeError("callgrind wrote no summary line")
    return int(summary.group(1))


def per_call(
    argv: list[str],
    *,
    kinds: Sequence[str],
    run: Callable[[str, int], None],
    module: str,
    unit: str,
    few: int = FEW,
    many: int = MANY,
) -> None:
    """The command line of a callgrind script: ``KIND`` prints the instructions per call
    of that kind, ``(I(many) - I(few)) / (many - few)``; ``--run KIND N`` makes N calls
    (what callgrind runs, in a process of its own)."""
    if argv[:1] == ["--run"]:
        run(argv[1], int(argv[2]))
        return
    if len(argv) != 1 or argv[0] not in kinds:
        raise SystemExit(f"usage: python -m {module} {{{'|'.join(kinds)}}}")
    low, high = instructions(argv[0], few, module), instructions(argv[0], many, module)
    print(f"{argv[0]}: {(high - low) / (many - few):,.0f} instructions per {unit}")


def main(argv: list[str]) -> None:
    """``KIND``: print the per-read count; ``--run KIND N``: make the reads (internal)."""
    per_call(argv, kinds=KINDS, run=run_reads, module="benchmarks.callgrind_reads", unit="read")


if __name__ == "__main__":
    main(sys.argv[1:])
