"""How much each mode runs: ``smoke`` (seconds, for CI), ``default`` (minutes) and ``full``.

The default counts are sized so that the whole run takes a few minutes on two cores: a
p99 needs a few hundred samples to mean anything, and the cheap cases get more because
their samples cost microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.env import Sizes
from benchmarks.harness import Counts


@dataclass(frozen=True, slots=True)
class Plan:
    """Iteration counts, data sizes and scale steps of one mode."""

    mode: str
    sizes: Sizes
    cheap: Counts  # one-row hits, session.get: tens of microseconds each
    heavy: Counts  # 50-row graphs, the expensive query, misses: milliseconds each
    commits: Counts
    scale_entries: tuple[int, ...]  # cached entries present while hits are timed
    scale_hits: Counts
    scan_calls: Counts  # invalidate_model() SCANs the keyspace: slow at scale
    invalidation_entries: tuple[int, int]  # cached queries on the table: few vs many
    outage: Counts  # reads with Redis down: one uncached query each
    stampede_threads: int  # concurrent readers of the hot key
    stampede_seconds: float  # how long each stampede variant runs, in total
    stampede_slices: int  # the variants take turns in this many slices of that time
    local_memory_entries: tuple[int, int]  # local entries measured: 1-row kinds, graphs
    local_bound_commits: int  # commits timed for the local tier's invalidation delay


SMOKE = Plan(
    mode="smoke",
    sizes=Sizes(products=120, customers=30, orders=60, extra_orders=200),
    cheap=Counts(iterations=30, warmup=5),
    heavy=Counts(iterations=15, warmup=3),
    commits=Counts(iterations=10, warmup=2),
    scale_entries=(100, 1_000),
    scale_hits=Counts(iterations=20, warmup=5),
    scan_calls=Counts(iterations=5, warmup=1),
    invalidation_entries=(10, 100),
    outage=Counts(iterations=30, warmup=5),
    stampede_threads=6,
    stampede_seconds=0.4,
    stampede_slices=1,
    local_memory_entries=(40, 4),
    local_bound_commits=10,
)

DEFAULT = Plan(
    mode="default",
    sizes=Sizes(products=400, customers=100, orders=300, extra_orders=15_000),
    cheap=Counts(iterations=2_000, warmup=200),
    heavy=Counts(iterations=400, warmup=40),
    commits=Counts(iterations=400, warmup=40),
    scale_entries=(1_000, 100_000),
    scale_hits=Counts(iterations=1_000, warmup=100),
    scan_calls=Counts(iterations=30, warmup=3),
    invalidation_entries=(10, 10_000),
    outage=Counts(iterations=1_000, warmup=100),
    stampede_threads=32,
    stampede_seconds=3.0,
    stampede_slices=3,
    local_memory_entries=(200, 20),
    local_bound_commits=200,
)

FULL = Plan(
    mode="full",
    sizes=DEFAULT.sizes,
    cheap=DEFAULT.cheap,
    heavy=DEFAULT.heavy,
    commits=DEFAULT.commits,
    scale_entries=(1_000, 100_000, 1_000_000),
    scale_hits=DEFAULT.scale_hits,
    scan_calls=Counts(iterations=10, warmup=1),
    invalidation_entries=DEFAULT.invalidation_entries,
    outage=DEFAULT.outage,
    stampede_threads=DEFAULT.stampede_threads,
    stampede_seconds=DEFAULT.stampede_seconds,
    stampede_slices=DEFAULT.stampede_slices,
    local_memory_entries=DEFAULT.local_memory_entries,
    local_bound_commits=DEFAULT.local_bound_commits,
)
