"""The flush worker, SIGKILLing itself between some batches' commit and acknowledgement.

``python -m tests.crashing_worker --crash-rate R --crash-seed S WORKER-ARGS...`` runs
``python -m sa_redis_cache.worker WORKER-ARGS...`` with one change: each time a batch has
been applied (``Applier.apply`` returned, so its transaction is committed in Postgres),
the process draws from ``random.Random(S)`` and, with probability R (default 1), logs
``crash point after_commit: SIGKILL`` and SIGKILLs itself, before the worker acknowledges
the batch in Redis. The redelivered batch must then be skipped, not applied twice.

The fault is injected around the applier's public method from the outside: the library
has no crash point of its own.

Example::

    python -m tests.crashing_worker --crash-rate 0.1 --crash-seed 7 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1/db --redis-url redis://... \\
        --namespace shop --model tests.wb_support:worker_models
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from sa_redis_cache.cli.admin import worker_main
from sa_redis_cache.strategies.write_behind.worker.apply import Applier

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

CRASH_MESSAGE = "crash point after_commit: SIGKILL"


def crash_after_commit(rate: float, seed: str | None) -> None:
    """Make every ``Applier.apply`` of this process SIGKILL it, with probability ``rate``,
    once the batch is committed."""
    rnd = random.Random(seed)
    apply = Applier.apply
    depth = threading.local()  # apply() calls itself once after dropping set-based SQL

    def apply_then_maybe_crash(
        self: Applier, stream: str, entries: list[Any], **kwargs: Any
    ) -> Any:
        outer = not getattr(depth, "inside", False)
        depth.inside = True
        try:
            result = apply(self, stream, entries, **kwargs)
        finally:
            depth.inside = not outer
        if outer and rnd.random() < rate:
            log.warning(CRASH_MESSAGE, extra={"wb_crash_point": "after_commit"})
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Applier.apply = apply_then_maybe_crash  # type: ignore[method-assign]  # the fault


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--crash-rate`` and ``--crash-seed``; run the worker on the other arguments."""
    parser = argparse.ArgumentParser(prog="python -m tests.crashing_worker", allow_abbrev=False)
    parser.add_argument("--crash-rate", type=float, default=1.0)
    parser.add_argument("--crash-seed", default=None)
    ours, worker_args = parser.parse_known_args(argv)
    crash_after_commit(ours.crash_rate, ours.crash_seed)
    return worker_main(worker_args)


if __name__ == "__main__":
    sys.exit(main())
