"""Randomized history check of read-after-write across processes (docs/design.md, "Consistency",
issue 4).

Worker processes with several threads each read and write a hot set of rows at random; no
read that started after a write's ``commit()`` returned may see an older version of the row
(see :mod:`tests.history_checker`). Each run must also be meaningful: enough writes of each
kind (ORM, ORM bulk, Core in ``engine.begin()``, Core commit-as-you-go, ``text()``), and
enough reads of each kind (``session.get``, ``FromCache`` by id and of every row) served by
the cache, or it proves nothing.

It found one bug already: an ORM bulk ``update()`` marked its table (moving the entity
generation) before its statement ran; a write-through commit of the same row that landed in
between stored its state under the new generation, and the bulk write, committed after it,
left that older state readable by ``session.get`` (fixed in 74a9d59: commit.lua bumps the
generation again after a bulk write). Before the fix, a 3 s run caught it about 3 times in 4.

``SARC_HISTORY_SECONDS`` lengthens the runs (3 s each by default); for long runs by hand,
``python -m tests.history_checker --seconds 60``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from tests.history_checker import (
    DEFAULT_WRITES,
    HistoryRun,
    Read,
    Write,
    check_history,
    run_history,
)

if TYPE_CHECKING:
    from collections.abc import Callable

SECONDS = float(os.environ.get("SARC_HISTORY_SECONDS", "3"))
PROCESSES = 2
THREADS = 3
MIN_WRITES = 10  # of each kind
MIN_CACHED_READS = 50  # of each kind
READ_KINDS = ("get", "query", "list")
ATTEMPTS = 3


def check(run: HistoryRun) -> None:
    """0 stale reads and no operation errors in ``run``."""
    print(run.summary())  # shown with -s or -rA: the run's size and hit counts
    if run.violations() or run.errors:
        pytest.fail(run.report(), pytrace=False)


def until_meaningful(run_once: Callable[[], HistoryRun]) -> HistoryRun:
    """``run_once`` until, together, the runs wrote each kind, served each kind of read
    from the cache and hit as often as one run must to mean something (at most
    :data:`ATTEMPTS`: a loaded machine, or a parallel test run, makes thin runs of the
    same seconds). Every run is checked on its own. Returns the last."""
    written: Counter[str] = Counter()
    served: Counter[str] = Counter()
    hits = 0
    for _ in range(ATTEMPTS):
        run = run_once()
        check(run)
        written.update(w.kind for w in run.writes)
        served.update({kind: run.reads_by[(kind, "cache")] for kind in READ_KINDS})
        hits += run.counter("total", "hits")
        if (
            all(written[kind] >= MIN_WRITES for kind in run.config.writes)
            and all(served[kind] >= MIN_CACHED_READS for kind in READ_KINDS)
            and hits >= 3 * MIN_CACHED_READS
        ):
            return run
    pytest.fail(
        f"{ATTEMPTS} runs wrote {dict(written)}, served {dict(served)} from the cache and "
        f"hit {hits} times: too thin to mean anything"
    )


@pytest.mark.parametrize("strategy", ["cache_aside", "write_through"])
def test_no_read_sees_a_version_older_than_a_returned_commit(
    database_url: str, redis_url: str, namespace: str, strategy: str
) -> None:
    until_meaningful(
        lambda: run_history(
            database_url,
            redis_url,
            namespace,
            strategy=strategy,
            processes=PROCESSES,
            threads=THREADS,
            seconds=SECONDS,
            writes=DEFAULT_WRITES,
        )
    )


def test_the_check_catches_writes_the_cache_never_hears_of(
    database_url: str, redis_url: str, namespace: str
) -> None:
    """End to end, the harness sees staleness: writes through a session not attached."""
    run = run_history(
        database_url,
        redis_url,
        namespace,
        strategy="cache_aside",
        processes=PROCESSES,
        threads=2,
        seconds=min(SECONDS, 1.5),
        bypass_writes=True,
    )
    stale = [v for v in run.violations() if v.kind == "stale"]
    assert stale, run.report()
    assert {v.kind for v in run.violations()} == {"stale"}, run.report()
    assert any(v.read.source == "cache" for v in stale), run.report()
    assert all(v.read.source == "cache" for v in stale), run.report()


# --------------------------------------------------------------------------- the checker


def w(row: int, version: int, start: int, end: int) -> Write:
    return Write("orm", row, version, start, end, "p0t0")


def r(row: int, version: int, start: int, end: int) -> Read:
    return Read("get", row, version, start, end, "p1t0", "cache")


def test_checker_reports_a_read_older_than_a_returned_commit() -> None:
    writes = [w(1, 1, 100, 200), w(1, 2, 300, 400), w(2, 1, 100, 200)]
    reads = [
        r(1, 0, 150, 160),  # overlaps the first commit: either version is fine
        r(1, 1, 250, 260),  # after the first commit returned: saw it
        r(1, 1, 350, 450),  # overlaps the second commit
        r(1, 1, 401, 420),  # started after the second commit returned: stale
        r(2, 0, 500, 510),  # row 2 at version 0 after its write returned: stale
        r(1, 2, 500, 510),
    ]
    found = check_history(reads, writes, {1: 0, 2: 0})
    assert [(v.kind, v.read, v.write) for v in found] == [
        ("stale", reads[3], writes[1]),
        ("stale", reads[4], writes[2]),
    ]
    text = found[0].describe(origin=0)
    assert "row 1" in text
    assert "version 1" in text
    assert "version 2" in text


def test_checker_compares_with_the_newest_returned_write_not_the_last_to_return() -> None:
    # version 2's commit returned before version 1's (the post-commit work of 1 was slow)
    writes = [w(1, 1, 100, 500), w(1, 2, 200, 300)]
    found = check_history([r(1, 1, 600, 610)], writes, {1: 0})
    assert [(v.kind, v.write) for v in found] == [("stale", writes[1])]


def test_checker_reports_impossible_reads() -> None:
    writes = [w(1, 1, 100, 200)]
    reads = [r(1, 1, 10, 50), r(1, 7, 300, 310)]
    found = check_history(reads, writes, {1: 0}, uncertain=[(1, 2)])
    assert [(v.kind, v.read) for v in found] == [("future", reads[0]), ("unknown", reads[1])]
    assert check_history([r(1, 2, 300, 310)], writes, {1: 0}, uncertain=[(1, 2)]) == []
