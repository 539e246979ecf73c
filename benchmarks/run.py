"""Entry point: ``python -m benchmarks.run [--smoke | --full] [--only CASE,...]``.

Needs ``DATABASE_URL`` (a server-level URL; a database of our own is created there and
dropped at the end) and ``REDIS_URL`` (keys live in a random namespace, removed at the
end), both on loopback. ``make bench`` and ``make bench-smoke`` provide them through
``devservices``::

    python -m devservices -- python -m benchmarks.run --smoke

Writes ``latest.md`` and the PNG plots into ``benchmarks/results/`` (``--smoke``:
``benchmarks/results/smoke/``, ignored by git) and prints the table. A missed target is
a finding, not a failure: the exit status is 0 unless a case could not run at all (the
suite has rotted) or the services are missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.cases_cluster import cluster_cases
from benchmarks.cases_failure import outage, stampede
from benchmarks.cases_local import LOCAL_CASES, local_commits, local_memory
from benchmarks.cases_reads import READ_CASES
from benchmarks.cases_scale import hit_at_scale, invalidation_at_scale
from benchmarks.cases_size import stored_sizes
from benchmarks.cases_trust import trust_costs
from benchmarks.cases_writes import WRITE_CASES
from benchmarks.env import (
    NotLoopback,
    bench_env,
    check_loopback,
    describe_machine,
    load_average,
)
from benchmarks.harness import CaseResult
from benchmarks.plan import DEFAULT, FULL, SMOKE, Plan
from benchmarks.report import Report, plot, render

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from benchmarks.env import BenchEnv

RESULTS = Path(__file__).resolve().parent / "results"
CASE_NAMES = [name for name, _ in READ_CASES + WRITE_CASES + LOCAL_CASES] + [
    "local_memory",
    "local_commit",
    "bytes",
    "scale",
    "invalidation",
    "outage",
    "stampede",
    "trust",
    "cluster",
]


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _guarded(slug: str, title: str, run: Callable[[], list[CaseResult]]) -> list[CaseResult]:
    """Run a case; an exception becomes an error row instead of ending the run."""
    _progress(f"{slug} ...")
    started = time.perf_counter()
    try:
        results = run()
    except Exception as exc:
        traceback.print_exc()
        return [CaseResult(slug=slug, title=title, error=f"{type(exc).__name__}: {exc}")]
    _progress(f"{slug} done in {time.perf_counter() - started:.1f} s")
    return results


def run_cases(env: BenchEnv, plan: Plan, only: set[str], report: Report) -> None:
    """Run the selected cases in order, filling ``report``."""
    for slug, case in READ_CASES + WRITE_CASES:
        if not only or slug in only:
            report.cases += _guarded(slug, slug, lambda case=case: [case(env, plan)])  # type: ignore[misc]
    _run_local(env, plan, only, report)
    if not only or "bytes" in only:
        try:
            report.sizes = stored_sizes(env)
        except Exception as exc:
            traceback.print_exc()
            report.cases.append(CaseResult("bytes", "stored bytes", error=repr(exc)))
    if not only or "scale" in only:

        def scale() -> list[CaseResult]:
            cases, steps = hit_at_scale(env, plan)
            report.scale = steps
            return cases

        report.cases += _guarded("scale", "scale: hits with many entries", scale)
    if not only or "invalidation" in only:
        report.cases += _guarded(
            "invalidation",
            "scale: invalidation with many cached queries",
            lambda: [invalidation_at_scale(env, plan)],
        )
    if not only or "outage" in only:
        report.cases += _guarded(
            "outage", "outage: reads with Redis stopped", lambda: [outage(env, plan)]
        )
    if not only or "stampede" in only:
        # its own readers and Postgres backends raise the load average: note it before
        report.load_marks.append(("before the stampede case", load_average()))

        def hot_key() -> list[CaseResult]:
            case, rows = stampede(env, plan)
            report.stampede = rows
            return [case]

        report.cases += _guarded("stampede", "stampede: a hot key's expiries", hot_key)
    if not only or "trust" in only:
        report.cases += _guarded(
            "trust", "decoder checks and signing on the hit path", lambda: trust_costs(env, plan)
        )
    if not only or "cluster" in only:
        # a cluster of three redis-server processes is started for these and stopped after
        report.cases += _guarded(
            "cluster", "Redis Cluster vs a single Redis", lambda: cluster_cases(env, plan)
        )
    if not only or "local_commit" in only:
        _run_local_commits(env, plan, report)


def _run_local(env: BenchEnv, plan: Plan, only: set[str], report: Report) -> None:
    """The local tier's cases (:mod:`benchmarks.cases_local`) but its commit case."""
    for slug, case in LOCAL_CASES:
        if not only or slug in only:
            report.cases += _guarded(slug, slug, lambda case=case: [case(env, plan)])  # type: ignore[misc]
    if not only or "local_memory" in only:

        def memory() -> list[CaseResult]:
            report.local_memory = local_memory(env, plan)
            return []

        report.cases += _guarded("local_memory", "local tier: memory per entry", memory)


def _run_local_commits(env: BenchEnv, plan: Plan, report: Report) -> None:
    """The local tier's commit case: it starts holder processes, so it runs last."""
    # its holder processes raise the load average: note it before
    report.load_marks.append(("before the local tier's commit case", load_average()))

    def commits() -> list[CaseResult]:
        case, rows = local_commits(env, plan)
        report.local_bound = rows
        return [case]

    report.cases += _guarded("local_commit", "local tier: commit path", commits)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny counts: seconds, for CI")
    mode.add_argument("--full", action="store_true", help="also 10^6 cached entries")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated cases to run ({', '.join(CASE_NAMES)}); "
        "writes no files unless --out is given",
    )
    parser.add_argument("--out", type=Path, help="directory for latest.md and the plots")
    parser.add_argument(
        "--allow-remote", action="store_true", help="accept services that are not on loopback"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL if args.full else DEFAULT
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - set(CASE_NAMES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {CASE_NAMES}")
    out_dir = args.out or (None if only else RESULTS / "smoke" if args.smoke else RESULTS)

    database_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if not database_url or not redis_url:
        print(
            "benchmarks need DATABASE_URL and REDIS_URL; run them through\n"
            "  python -m devservices -- python -m benchmarks.run",
            file=sys.stderr,
        )
        return 2
    if not args.allow_remote:
        try:
            check_loopback(database_url, redis_url)
        except NotLoopback as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2

    started = time.perf_counter()
    command = "python -m benchmarks.run" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    _progress(f"mode {plan.mode}: seeding a fresh database ...")
    with bench_env(database_url, redis_url, plan.sizes) as env:
        report = Report(mode=plan.mode, command=command, machine=describe_machine(env))
        run_cases(env, plan, only, report)
        marks = [f"{value} {when}" for when, value in report.load_marks]
        report.machine["load average (1 min)"] = ", ".join(
            [
                f"{report.machine['load average (1 min)']} at start",
                *marks,
                f"{load_average()} at end",
            ]
        )
    report.elapsed_s = time.perf_counter() - started

    text = render(report)
    print(text)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "latest.md").write_text(text, encoding="utf-8")
        written = plot(report, out_dir)
        _progress(f"wrote {out_dir / 'latest.md'} and {', '.join(p.name for p in written)}")
    errors = [c for c in report.cases if c.error]
    if errors:
        _progress(f"{len(errors)} case(s) could not run: {', '.join(c.slug for c in errors)}")
        return 1
    return 0


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        # the table's µ, ≤ and multiplication signs must not crash a run under an ASCII locale
        sys.stdout.reconfigure(errors="replace")
    sys.exit(main())
