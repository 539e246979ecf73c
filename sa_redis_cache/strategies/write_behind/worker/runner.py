"""Run a :class:`~sa_redis_cache.worker.FlushWorker` as a process, until SIGTERM or SIGINT.

On the signal the worker stops reading, finishes and acknowledges the batch in flight,
releases its leases and exits 0. Log lines are JSON (one per batch, with the ``wb_*``
fields), for log shippers.

A backlog found at start (more than ``threshold`` entries) is followed while it drains
(:mod:`.progress`): a rich progress bar when stderr is a TTY or the bar is asked for, a
log line every ``interval`` seconds otherwise, or nothing. ``metrics_port`` serves the
worker's Prometheus metrics (:mod:`.metrics`).

The command line (``sa-redis-cache worker``, ``python -m sa_redis_cache.worker``) is
``sa_redis_cache.cli.admin.worker``: it checks its input and both services, builds the
worker and calls :func:`serve`.

Example::

    worker = FlushWorker(engine, client, namespace="shop", models=[PageView])
    serve(worker)  # returns 0 after SIGTERM
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import orjson

from .progress import BacklogProgress

if TYPE_CHECKING:
    from types import FrameType

    from .flush import FlushWorker

_RECORD_FIELDS = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def log_as_json() -> None:
    """Send every log line of the process to stderr as JSON (:class:`JsonFormatter`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def serve(
    worker: FlushWorker,
    *,
    progress: str = "log",
    threshold: int = 1000,
    interval: float = 5.0,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
) -> int:
    """Run ``worker`` until SIGTERM or SIGINT; returns the exit status (0).

    ``progress`` is a mode of :class:`.progress.BacklogProgress` (``"bar"``, ``"log"`` or
    ``"off"``); with ``metrics_port``, the worker's metrics are served there (it raises
    ImportError without prometheus-client). Call :func:`log_as_json` first for JSON logs.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logging.getLogger(__name__).info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_port is not None:
        from .metrics import expose_worker

        expose_worker(worker, port=metrics_port, addr=metrics_addr)
    following = BacklogProgress(worker, threshold=threshold, mode=progress, interval=interval)
    try:
        following.start()
        worker.run(stop, on_pass=following.update)
    finally:
        following.close()
    return 0
