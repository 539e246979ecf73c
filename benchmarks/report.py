"""The results: a markdown report (also printed) and PNG plots.

The markdown holds one latency table (case, contender, p50, p99, ratio, target, mark),
the stored-bytes table, the scale table, the stampede table, the targets that were
missed with why, the cases that cannot run yet, and the machine the figures came from.
Ratios are ratios of medians, with a 90% bootstrap bracket over the paired rounds.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.harness import TIMES

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from benchmarks.cases_failure import StampedeRow
    from benchmarks.cases_local import BoundRow, LocalMemoryRow
    from benchmarks.cases_scale import ScaleRow
    from benchmarks.cases_size import SizeRow
    from benchmarks.harness import CaseResult, RatioResult

PASS, MISS = "✅ pass", "❌ miss"
DASH = "\u2013"  # en dash, for empty cells and ranges

# Cases the issue asks for that the library cannot run yet, with the target each will
# be held to once it can. Write-behind throughput runs on its own
# (`python -m benchmarks.cases_write_behind`, results/write_behind.md): it needs a
# dedicated worker and backlog, not the call-by-call alternation of this report.
NOT_YET_AVAILABLE: list[tuple[str, str, str]] = []


@dataclass(slots=True)
class Report:
    """Everything one run produced."""

    mode: str
    command: str
    machine: dict[str, str]
    cases: list[CaseResult] = field(default_factory=list)
    sizes: list[SizeRow] = field(default_factory=list)
    scale: list[ScaleRow] = field(default_factory=list)
    stampede: list[StampedeRow] = field(default_factory=list)
    local_memory: list[LocalMemoryRow] = field(default_factory=list)
    local_bound: list[BoundRow] = field(default_factory=list)
    # load averages taken during the run, beside the start and end ones: (when, value)
    load_marks: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0


def _us(value: float) -> str:
    if math.isnan(value):
        return DASH
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.1f} µs"


def _ratio_text(r: RatioResult) -> str:
    bracket = "" if math.isnan(r.low) else f" [{r.low:.2f}{DASH}{r.high:.2f}]"
    return f"{r.comparison.label} = **{r.ratio:.2f}{r.comparison.unit}**{bracket}"


def _target_text(ratio: RatioResult | None) -> str:
    if ratio is None or ratio.comparison.target is None:
        return ""
    return str(ratio.comparison.target)


def _mark(passed: bool | None) -> str:
    if passed is None:
        return ""
    return PASS if passed else MISS


def latency_table(cases: list[CaseResult]) -> list[str]:
    """The main table: one row per contender per case."""
    lines = [
        "| case | contender | p50 (median) | p99 | ratio of medians [90% CI] | target | mark |",
        "|---|---|--:|--:|---|---|---|",
    ]
    for case in cases:
        if case.error:
            lines.append(
                f"| {case.title} | {DASH} | {DASH} | {DASH} | error: {case.error} | | ❌ error |"
            )
            continue
        by_row: dict[str, list[RatioResult]] = {}
        for r in case.ratios:
            by_row.setdefault(r.comparison.row, []).append(r)
        first = True
        for name, summary in case.summaries.items():
            shown: list[RatioResult | None] = list(by_row.get(name, [])) or [None]
            for i, ratio in enumerate(shown):
                # a contender with several ratios: its name and latencies on the first line
                lines.append(
                    "| {case} | {name} | {p50} | {p99} | {ratio} | {target} | {mark} |".format(
                        case=case.title if first else "",
                        name="" if i else name,
                        p50="" if i else _us(summary.p50),
                        p99="" if i else _us(summary.p99),
                        ratio=_ratio_text(ratio) if ratio else "",
                        target=_target_text(ratio),
                        mark=_mark(ratio.passed) if ratio else "",
                    )
                )
                first = False
    return lines


def size_table(rows: list[SizeRow]) -> list[str]:
    """Stored bytes per entry, ours vs the recipe's pickle."""
    lines = [
        (
            "| result | ours (bytes) | pickled FrozenResult (bytes) | ours ÷ pickled | target "
            "| mark | MEMORY USAGE ours / pickled |"
        ),
        "|---|--:|--:|---|---|---|---|",
    ]
    lines.extend(
        f"| {r.title} | {r.ours_bytes:,} | {r.pickled_bytes:,} | **{r.ratio:.2f}{TIMES}** | "
        f"{r.target or ''} | {_mark(r.passed)} | {r.ours_memory:,} / {r.pickled_memory:,} |"
        for r in rows
    )
    return lines


def scale_table(rows: list[ScaleRow]) -> list[str]:
    """Hit latency, memory and invalidate_model() cost per number of cached entries."""
    lines = [
        (
            "| cached entries | keys in the Redis db | ours p50 | ours p99 | floor p50 "
            "| ours ÷ floor | MEMORY USAGE of one entry | used_memory per added entry "
            "| invalidate_model() p50 |"
        ),
        "|--:|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    lines.extend(
        f"| {r.entries:,} | {r.dbsize:,} | {_us(r.ours.p50)} | {_us(r.ours.p99)} | "
        f"{_us(r.floor.p50)} | {r.ratio:.2f}{TIMES} | {r.entry_memory:,} B | "
        + (DASH if math.isnan(r.memory_per_entry) else f"{r.memory_per_entry:,.0f} B")
        + f" | {_us(r.invalidate_model.p50)} |"
        for r in rows
    )
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        growth = (
            f"ours p50 with {large.entries:,} entries ÷ with {small.entries:,}: "
            f"**{large.ours.p50 / small.ours.p50:.2f}{TIMES}** (floor: "
            f"{large.floor.p50 / small.floor.p50:.2f}{TIMES}). The steps run one after another, "
            "so this ratio is not noise-cancelled; ours ÷ floor within each step is."
        )
        lines += ["", growth]
    return lines


def stampede_table(rows: list[StampedeRow]) -> list[str]:
    """Reads served, database queries and the library's counters per stampede variant."""
    first = rows[0]
    lines = [
        (
            f"{first.threads} threads read one hot FromCache query (the join + aggregate), "
            f"each read in a fresh session and followed by {first.think_s * 1000:g} ms of "
            f"other work; the entry's TTL is {first.ttl_s:g} s, so it expires several times "
            f"a second. The variants take turns in {first.slices} slice(s), each starting "
            "cold with every reader released at once. A *refresh* is one expiry of the entry "
            "as the readers saw it: a read that queries the database is charged to the "
            "refresh current when it began; *refreshing read* is the latency of those reads "
            "(database query and fill). *fills*, *lease waits*, *early refreshes* and "
            "*stale served* are the library's own counters (`cache.stats()`)."
        ),
        "",
        (
            "| variant | reads served | reads/s | DB queries | DB queries/s | refreshes "
            "| DB queries per refresh | fills | lease waits | early refreshes | stale served "
            "| read p50 | read p99 | refreshing read p50 |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines.extend(
        f"| {r.name} | {r.reads:,} | {r.reads_per_s:,.0f} | {r.db_queries:,} | "
        f"{r.queries_per_s:,.1f} | {r.refreshes:,} | {r.queries_per_refresh:.2f} | "
        f"{r.fills:,} | {r.lease_waits:,} | {r.early_refreshes:,} | {r.stale_served:,} | "
        f"{_us(r.latency.p50)} | {_us(r.latency.p99)} | {_us(r.refresh_latency.p50)} |"
        for r in rows
    )
    return lines


def local_memory_table(rows: list[LocalMemoryRow]) -> list[str]:
    """Bytes per local entry: held in the process (tracemalloc) against counted by the store."""
    lines = [
        (
            "What a local entry holds in the process, measured with tracemalloc over the "
            "entries of one kind (kept by a second read each, then dropped: *held* is what "
            "dropping them freed), beside what the store *counts* for it against "
            "`local_max_bytes` (`estimated_size` in `sa_redis_cache/local/store.py`: 4 per "
            "byte of the Redis entry, 350 per object built from it, 200 per entry). "
            "*Bookkeeping* is what emptying the store freed "
            "after that: the mirror of the counters the entries are valid under and the "
            "memo of recently invalidated keys (this process's own fills feed it through "
            "the invalidations Redis pushes back to it)."
        ),
        "",
        (
            "| entries | kept | Redis entry (bytes) | held per entry | counted per entry "
            "| counted ÷ held | bookkeeping per entry |"
        ),
        "|---|--:|--:|--:|--:|---|--:|",
    ]
    lines.extend(
        f"| {r.title} | {r.entries:,} | {r.stored_bytes:,.0f} | {r.held_bytes:,.0f} B | "
        f"{r.counted_bytes:,.0f} B | **{r.ratio:.2f}{TIMES}** | {r.bookkeeping_bytes:,.0f} B |"
        for r in rows
    )
    return lines


def _spread(values: tuple[float, float, float]) -> str:
    return " / ".join(DASH if math.isnan(v) else f"{v:,.0f}" for v in values)


def local_bound_table(rows: list[BoundRow]) -> list[str]:
    """When holder processes applied each commit's invalidations, by consistency mode."""
    first = rows[0]
    lines = [
        (
            f"{first.holders} holder processes keep reading one category row (by "
            "`session.get` and by a `FromCache` query), each time in a fresh session, and "
            "hold it locally; the writer (`local=False`) changes the row once every holder "
            "holds the current value again. Each holder notes when it *applied* each "
            "invalidation of the table's version (whichever of its threads read it), on "
            "CLOCK_MONOTONIC, which all processes share; times are in µs after the writer's "
            "`commit()` returned (negative: before). A commit bumps the version twice: at "
            "flush, before the database commit, when the holders *drop* their entries of the "
            "table (none can be kept again until the commit is done: fills are refused "
            "meanwhile), and after the database commit, the invalidation a strict commit "
            "waits for the holders to have applied. *Stale reads*: (commit, holder) pairs in "
            "which a read that started after `commit()` returned gave the value from before "
            "(reads every ~1 ms, so a window shorter than that may go unseen). *New value "
            "seen*: when the holder's first read giving the new value ended."
        ),
        "",
        (
            f"| consistency | commits {TIMES} holders | entries dropped p50 / p99 / max "
            "| commit-time invalidation applied p50 / p99 / max | applied after return "
            "| stale reads | new value seen p50 / p99 / max |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    lines.extend(
        f"| {r.consistency} | {r.commits:,} {TIMES} {r.holders} | {_spread(r.dropped)} µs | "
        f"{_spread(r.committed)} µs | {r.committed_after:.1%} | {r.stale_reads:,}"
        + ("" if math.isnan(r.stale_max_us) else f" (latest {r.stale_max_us:,.0f} µs after)")
        + f" | {_spread(r.visible)} µs |"
        for r in rows
    )
    return lines


def missed(cases: list[CaseResult], sizes: list[SizeRow]) -> list[str]:
    """One line per missed target, with the why and what would close it."""
    out = []
    for case in cases:
        for r in case.ratios:
            if r.passed is False:
                comp = r.comparison
                note = f" {comp.miss_note}." if comp.miss_note else ""
                out.append(
                    f"- **{case.title}**: {comp.label} = {r.ratio:.2f}{comp.unit} (target "
                    f"{comp.target}).{note}"
                )
    out.extend(
        f"- **stored bytes, {r.title}**: ours ÷ pickled = {r.ratio:.2f}{TIMES} (target {r.target})."
        for r in sizes
        if r.passed is False
    )
    return out


_PREAMBLE = (
    "Every case runs its contenders in one process, alternating call by call after a "
    "warm-up; each ORM call gets a fresh Session (opened and closed outside the timer). "
    "Ratios are ratios of medians; the bracket is a 90% bootstrap interval over paired "
    "rounds. *floor* = redis-py GET of the entry our cache stores + orjson decode; "
    "*dogpile recipe* = SQLAlchemy's dogpile_caching recipe (pickled FrozenResult, "
    "merge_frozen_result), written afresh in `benchmarks/dogpile_recipe.py`; *SQLAlchemy "
    "pipeline only* = a do_orm_execute hook returning a ready result, i.e. what any cache "
    "built on do_orm_execute pays before its own work (ours serves its hits before the "
    "pipeline; the recipe pays it); *bound* (misses and commits) = the "
    "same call paying only the cache's Redis round trips, at the cache's points and "
    "carrying nothing (a no-op script), i.e. what no cache work could get under."
)


def render(report: Report) -> str:
    """The whole markdown report."""
    m = report.machine
    when = m.get("date", "")
    lines = [
        "# sa_redis_cache benchmarks",
        "",
        f"{when} · mode `{report.mode}` · `{report.command}` · {report.elapsed_s:.0f} s",
        "",
        _PREAMBLE,
        "",
        "## Latency",
        "",
        *latency_table(report.cases),
    ]
    noted = [c for c in report.cases if c.notes]
    if noted:
        lines += ["", "Checks that failed (the figures of these cases are suspect):", ""]
        lines += [f"- **{c.title}**: {note}" for c in noted for note in c.notes]
    explained = [c for c in report.cases if c.breakdown]
    if explained:
        lines += ["", "## Where the time goes", ""]
        lines += [f"- **{c.title}**: {line}" for c in explained for line in c.breakdown]
    if report.sizes:
        lines += ["", "## Stored bytes per entry", "", *size_table(report.sizes)]
    if report.scale:
        lines += ["", "## Scale", "", *scale_table(report.scale)]
    if report.stampede:
        lines += ["", "## Stampede", "", *stampede_table(report.stampede)]
    if report.local_memory:
        lines += [
            "",
            "## Local tier: memory per entry",
            "",
            *local_memory_table(report.local_memory),
        ]
    if report.local_bound:
        lines += [
            "",
            "## Local tier: when other processes stop serving a commit's change",
            "",
            *local_bound_table(report.local_bound),
        ]
    misses = missed(report.cases, report.sizes)
    lines += ["", "## Targets missed", ""]
    lines += misses or ["None."]
    lines += [
        "",
        (
            "Write-behind throughput (commits per second, worker rows per second) is measured by "
            "`python -m benchmarks.cases_write_behind` into `results/write_behind.md`."
        ),
    ]
    if NOT_YET_AVAILABLE:
        lines += [
            "",
            "## Not yet available",
            "",
            "| case | target | why not yet |",
            "|---|---|---|",
            *(f"| {case} | {target} | {why} |" for case, target, why in NOT_YET_AVAILABLE),
        ]
    lines += [
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in m.items()),
        "",
    ]
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------


def plot(report: Report, out_dir: Path) -> list[Path]:
    """Write the PNG plots; return their paths."""
    import matplotlib as mpl

    mpl.use("Agg")  # no display on CI machines
    cases = [c for c in report.cases if not c.error and c.summaries]
    written = [
        _plot_latency(cases, out_dir / "latency.png"),
        _plot_targets(cases, report.sizes, out_dir / "targets.png"),
        _plot_scale(report.scale, out_dir / "scale.png"),
        _plot_sizes(report.sizes, out_dir / "bytes.png"),
    ]
    return [path for path in written if path is not None]


def _plot_latency(cases: list[CaseResult], path: Path) -> Path | None:
    """One panel per case: p50 bars and p99 ticks per contender, log scale."""
    import matplotlib.pyplot as plt

    if not cases:
        return None
    cols = 3
    rows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 2.6 * rows), squeeze=False)
    for ax, case in zip(axes.flat, cases, strict=False):
        names = list(case.summaries)
        y = list(range(len(names)))
        ax.barh(y, [case.summaries[n].p50 for n in names], color="#4c72b0", label="p50")
        ax.scatter(
            [case.summaries[n].p99 for n in names],
            y,
            color="#c44e52",
            marker="|",
            s=200,
            label="p99",
            zorder=3,
        )
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        _latency_axis(
            ax, [v for n in names for v in (case.summaries[n].p50, case.summaries[n].p99)]
        )
        ax.set_title(case.title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def _latency_axis(ax: Axes, values: list[float]) -> None:
    """Log scale only when the contenders differ by orders of magnitude; plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    low, high = min(values), max(values)
    if low > 0 and high / low > 20:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("µs (log scale)", fontsize=8)
    else:
        ax.set_xlim(left=0)
        ax.set_xlabel("µs", fontsize=8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))


def _plot_targets(cases: list[CaseResult], sizes: list[SizeRow], path: Path) -> Path | None:
    """Every targeted ratio beside its target: green when met, red when missed."""
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, float, bool]] = []
    for case in cases:
        targeted = [r for r in case.ratios if r.comparison.target is not None]
        labels = [r.comparison.label for r in targeted]
        for r in targeted:
            target = r.comparison.target
            assert target is not None
            label = r.comparison.label
            if labels.count(label) > 1:  # one target per contender: name the contender
                label = f"{textwrap.shorten(r.comparison.row, 40)}: {label}"
            title = textwrap.shorten(case.title, 48)
            bars.append((f"{title}\n{label}", r.ratio, target.value, bool(r.passed)))
    bars.extend(
        (f"stored bytes: {s.title}\nours ÷ pickled", s.ratio, s.target.value, bool(s.passed))
        for s in sizes
        if s.target is not None
    )
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(bars) + 1.2))
    y = list(range(len(bars)))
    ax.barh(y, [b[1] for b in bars], color=["#55a868" if b[3] else "#c44e52" for b in bars])
    ax.scatter([b[2] for b in bars], y, color="black", marker="|", s=300, label="target", zorder=3)
    ax.set_yticks(y, [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio of medians (green: target met, red: missed)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_scale(rows: list[ScaleRow], path: Path) -> Path | None:
    """Hit latency and invalidate_model() cost against the number of cached entries."""
    import matplotlib.pyplot as plt

    if not rows:
        return None
    entries = [r.entries for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    left.plot(entries, [r.ours.p50 for r in rows], "o-", label="ours p50")
    left.plot(entries, [r.ours.p99 for r in rows], "o--", label="ours p99")
    left.plot(entries, [r.floor.p50 for r in rows], "s-", label="floor p50")
    left.set_xscale("log")
    left.set_xlabel("cached entries")
    left.set_ylabel("µs")
    left.set_ylim(bottom=0)
    left.set_title("FromCache 1-row hit vs cached entries")
    left.legend(fontsize=8)
    right.plot(entries, [r.invalidate_model.p50 / 1000 for r in rows], "o-", color="#c44e52")
    right.set_xscale("log")
    right.set_xlabel("cached entries")
    right.set_ylabel("ms")
    right.set_title("invalidate_model() p50 (SCANs the keyspace)")
    return _save(fig, path)


def _plot_sizes(sizes: list[SizeRow], path: Path) -> Path | None:
    """Stored bytes per entry, ours vs the pickled FrozenResult."""
    import matplotlib.pyplot as plt

    if not sizes:
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    x = list(range(len(sizes)))
    ax.bar([i - 0.2 for i in x], [s.ours_bytes for s in sizes], 0.4, label="ours")
    ax.bar(
        [i + 0.2 for i in x], [s.pickled_bytes for s in sizes], 0.4, label="pickled FrozenResult"
    )
    ax.set_xticks(x, [s.title for s in sizes], fontsize=8)
    ax.set_ylabel("bytes stored")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
