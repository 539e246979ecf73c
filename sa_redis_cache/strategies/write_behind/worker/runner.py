"""Run a :class:`~sa_redis_cache.worker.FlushWorker` as a process, until SIGTERM or SIGINT.

On the signal the worker stops reading, finishes and acknowledges the batch in flight,
releases its leases and exits 0. Log lines are JSON (one per batch, with the ``wb_*``
fields), for log shippers.

A backlog found at start (more than ``--progress-threshold`` entries) is followed while it
drains (:mod:`.progress`): a rich progress bar when stderr is a TTY
or ``--progress`` is given, a log line every ``--progress-interval`` seconds otherwise,
nothing with ``--no-progress``. ``--metrics-port`` serves the worker's Prometheus metrics
(:mod:`.metrics`).

Example::

    python -m sa_redis_cache.worker --database-url postgresql+psycopg://app@db/shop \\
        --redis-url redis://cache:6379/0 --namespace shop --model myapp.models:PageView
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

    from sqlalchemy.engine import Engine

    from sa_redis_cache.redis_io import SyncClient

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


def load_models(specs: Sequence[str]) -> list[type]:
    """``module:Class`` names, or ``module:function`` returning a list of classes."""
    models: list[type] = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        if not attr:
            raise SystemExit(f"--model {spec!r}: write module:Class")
        found = getattr(importlib.import_module(module_name), attr)
        if isinstance(found, type):
            models.append(found)
        else:
            models.extend(found())
    return models


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m sa_redis_cache.worker``."""
    return _parser().parse_args(argv)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sa_redis_cache.worker")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", action="append", required=True, help="module:Class")
    parser.add_argument("--consumer", help="stable name; reuse it for a replacement worker")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lease-ms", type=int, default=30_000)
    parser.add_argument("--claim-idle-ms", type=int, default=60_000)
    parser.add_argument(
        "--max-backoff", type=float, default=5.0, help="longest wait between retries, seconds"
    )
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress", action="store_true", help="a progress bar for the backlog, even off a TTY"
    )
    shown.add_argument(
        "--no-progress", action="store_true", help="neither a bar nor backlog log lines"
    )
    parser.add_argument(
        "--progress-threshold",
        type=int,
        default=1000,
        help="entries queued at start above which the draining is followed (default 1000)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=5.0,
        help="seconds between backlog log lines when no bar is shown (default 5)",
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port")
    return parser


def _bad_url(option: str, url: str, what: str, exc: Exception) -> NoReturn:
    """Exit 2 with one line naming the option and the problem, without the URL's secrets."""
    from sa_redis_cache.redaction import redact_text, redact_url

    why = redact_text(" ".join(str(exc).split()), url)
    parser = _parser()
    # one line: the option and the problem are named, a usage block would bury them
    parser.exit(2, f"{parser.prog}: error: {option}: {redact_url(url)!r} is not {what} ({why})\n")


def _connect(args: argparse.Namespace) -> tuple[Engine, SyncClient]:
    """The engine and the Redis client of the command line's URLs (nothing connects yet,
    but a Redis Cluster client, which asks a node for the slots when it is made)."""
    from redis.exceptions import RedisClusterException
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError

    from sa_redis_cache.redis_io import client_from_url

    try:
        engine = create_engine(args.database_url, pool_pre_ping=True)
    except (ArgumentError, ValueError, ImportError) as exc:
        _bad_url("--database-url", args.database_url, "a usable database URL", exc)
    try:
        client = client_from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=2)
    except (ValueError, TypeError) as exc:
        engine.dispose()
        _bad_url("--redis-url", args.redis_url, "a Redis URL", exc)
    except RedisClusterException as exc:
        engine.dispose()
        _bad_url("--redis-url", args.redis_url, "a reachable Redis Cluster", exc)
    return engine, client


def _metrics(worker: FlushWorker, port: int, addr: str) -> None:
    try:
        from .metrics import expose_worker
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise SystemExit(
            f"--metrics-port needs prometheus-client: pip install 'sa-redis-cache[prometheus]' "
            f"({exc})"
        ) from exc
    expose_worker(worker, port=port, addr=addr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the exit status."""
    from sa_redis_cache.errors import ConfigurationError

    from .flush import FlushWorker
    from .progress import BacklogProgress, choose_mode

    args = parse(argv)
    engine, client = _connect(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logging.getLogger(__name__).info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker = FlushWorker(
            engine,
            client,
            namespace=args.namespace,
            models=load_models(args.model),
            consumer=args.consumer,
            batch_size=args.batch_size,
            lease_ms=args.lease_ms,
            claim_idle_ms=args.claim_idle_ms,
            max_backoff=args.max_backoff,
        )
    except ConfigurationError as exc:
        engine.dispose()
        client.close()
        # one line naming the problem and the fix, as for a bad option
        parser = _parser()
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.metrics_port is not None:
        _metrics(worker, args.metrics_port, args.metrics_addr)
    progress = BacklogProgress(
        worker,
        threshold=args.progress_threshold,
        mode=choose_mode(forced=args.progress, disabled=args.no_progress),
        interval=args.progress_interval,
    )
    try:
        progress.start()
        worker.run(stop, on_pass=progress.update)
    finally:
        progress.close()
        engine.dispose()
        client.close()
    return 0
