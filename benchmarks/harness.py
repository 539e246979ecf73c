"""Alternating measurement of contenders, percentiles, and ratios with their targets.

A case hands :func:`alternate` a list of :class:`Contender`. Every round calls each
contender once, starting from a different one each round, so that no contender always
runs right after the same neighbour (a neighbour that warms the connection pool or the
CPU caches would otherwise flatter it). Only ``call`` is timed: ``setup`` and
``teardown`` do the per-call work that is not part of what is measured, such as opening
a fresh Session (so the identity map never short-circuits a load) or removing the entry a
miss must not find.

Ratios are ratios of medians. Their spread is estimated by resampling whole rounds (the
samples of one round were taken under the same machine conditions), which gives the
bracket printed beside each ratio.
"""

from __future__ import annotations

import gc
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

TIMES = "\u00d7"  # the multiplication sign, escaped because ruff flags it as ambiguous


def _nothing() -> None:
    return None


def _discard(_state: Any) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Contender:
    """One way of doing the thing a case measures.

    ``setup()`` returns the state that ``call(state)`` uses; ``teardown(state)`` cleans up.
    Only ``call`` is inside the timer.
    """

    name: str
    call: Callable[[Any], object]
    setup: Callable[[], Any] = _nothing
    teardown: Callable[[Any], None] = _discard


@dataclass(frozen=True, slots=True)
class Counts:
    """How many rounds a case runs: ``warmup`` untimed, then ``iterations`` timed."""

    iterations: int
    warmup: int


def alternate(contenders: Sequence[Contender], counts: Counts) -> dict[str, list[int]]:
    """Run the contenders round-robin; return each one's timed latencies in nanoseconds.

    ``samples[name][i]`` of every contender come from the same round ``i``, which is what
    :func:`ratio_bracket` resamples.
    """
    samples: dict[str, list[int]] = {c.name: [] for c in contenders}
    order = list(contenders)
    clock = time.perf_counter_ns
    # Collect the garbage of earlier cases now, so that it is not charged to this one;
    # the collector stays on, as it is in applications: allocation-heavy contenders pay
    # for the collections they trigger.
    gc.collect()
    for round_no in range(counts.warmup + counts.iterations):
        start = round_no % len(order)
        for contender in order[start:] + order[:start]:
            state = contender.setup()
            try:
                t0 = clock()
                contender.call(state)
                t1 = clock()
            finally:
                contender.teardown(state)
            if round_no >= counts.warmup:
                samples[contender.name].append(t1 - t0)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """Latency percentiles of one contender, in microseconds."""

    n: int
    p50: float
    p99: float
    mean: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Summary:
        """Summarise nanosecond samples."""
        us = [s / 1000 for s in samples_ns]
        mean = sum(us) / len(us) if us else math.nan
        return cls(n=len(us), p50=percentile(us, 50), p99=percentile(us, 99), mean=mean)


def ratio_bracket(
    numerator: Sequence[int], denominator: Sequence[int], *, resamples: int = 200
) -> tuple[float, float]:
    """A 90% bootstrap interval of median(numerator) / median(denominator).

    Rounds are resampled as pairs, so the noise both contenders shared in a round stays
    shared. Deterministic (fixed seed) so that two reports of the same samples agree.
    """
    n = min(len(numerator), len(denominator))
    if n < 5:
        return (math.nan, math.nan)
    rng = random.Random(12345)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        num = percentile([numerator[i] for i in picks], 50)
        den = percentile([denominator[i] for i in picks], 50)
        ratios.append(num / den if den else math.nan)
    return (percentile(ratios, 5), percentile(ratios, 95))


@dataclass(frozen=True, slots=True)
class Target:
    """A goal for a ratio: ``<= value`` or ``>= value``.

    ``unit`` follows the value when printed: the multiplication sign for a ratio, empty
    for a plain number (database queries per refresh).
    """

    op: Literal["<=", ">="]
    value: float
    unit: str = TIMES

    def met(self, ratio: float) -> bool:
        """True when ``ratio`` meets the goal."""
        if math.isnan(ratio):
            return False
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'} {self.value:g}{self.unit}"


@dataclass(frozen=True, slots=True)
class Comparison:
    """A ratio of two contenders' medians, shown on the row of ``row``.

    ``label`` names the ratio as a reader should read it ("ours ÷ floor" for an overhead,
    "dogpile ÷ ours" for a speed-up). ``miss_note`` says why a missed target is missed and
    what would close it; it is printed only when the target is missed. ``unit`` follows
    the figure (the multiplication sign for a ratio, empty for a plain number).
    """

    row: str
    numerator: str
    denominator: str
    label: str
    target: Target | None = None
    miss_note: str = ""
    unit: str = TIMES


@dataclass(frozen=True, slots=True)
class RatioResult:
    """A computed :class:`Comparison`."""

    comparison: Comparison
    ratio: float
    low: float
    high: float

    @property
    def passed(self) -> bool | None:
        """None when the comparison has no target."""
        target = self.comparison.target
        return None if target is None else target.met(self.ratio)


@dataclass(slots=True)
class CaseResult:
    """What one case measured, ready for the report."""

    slug: str
    title: str
    summaries: dict[str, Summary] = field(default_factory=dict)
    samples: dict[str, list[int]] = field(default_factory=dict)
    ratios: list[RatioResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # failed checks: figures are suspect
    breakdown: list[str] = field(default_factory=list)  # where the time goes, from the figures
    error: str | None = None


def evaluate(
    slug: str,
    title: str,
    samples: dict[str, list[int]],
    comparisons: Sequence[Comparison],
) -> CaseResult:
    """Summarise the samples of a case and compute its comparisons."""
    result = CaseResult(slug=slug, title=title, samples=samples)
    for name, values in samples.items():
        result.summaries[name] = Summary.of(values)
    for comp in comparisons:
        num, den = samples[comp.numerator], samples[comp.denominator]
        den_p50 = percentile(den, 50)
        ratio = percentile(num, 50) / den_p50 if den_p50 else math.nan
        low, high = ratio_bracket(num, den)
        result.ratios.append(RatioResult(comp, ratio, low, high))
    return result


def measure(
    slug: str,
    title: str,
    contenders: Sequence[Contender],
    counts: Counts,
    comparisons: Sequence[Comparison],
) -> CaseResult:
    """:func:`alternate` then :func:`evaluate`."""
    return evaluate(slug, title, alternate(contenders, counts), comparisons)
