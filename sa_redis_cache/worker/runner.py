"""Run a :class:`~sa_redis_cache.worker.FlushWorker` as a process, until SIGTERM or SIGINT.

On the signal the worker stops reading, finishes and acknowledges the batch in flight,
releases its leases and exits 0. Log lines are JSON (one per batch, with the ``wb_*``
fields), for log shippers.

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
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

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
    parser = argparse.ArgumentParser(prog="python -m sa_redis_cache.worker")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--model", action="append", required=True, help="module:Class")
    parser.add_argument("--consumer", help="stable name; reuse it for a replacement worker")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--lease-ms", type=int, default=30_000)
    parser.add_argument("--claim-idle-ms", type=int, default=60_000)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the exit status."""
    import redis
    from sqlalchemy import create_engine

    from .flush import FlushWorker

    args = parse(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        logging.getLogger("sa_redis_cache.worker").info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = create_engine(args.database_url, pool_pre_ping=True)
    client = redis.Redis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=2)
    worker = FlushWorker(
        engine,
        client,
        namespace=args.namespace,
        models=load_models(args.model),
        consumer=args.consumer,
        batch_size=args.batch_size,
        lease_ms=args.lease_ms,
        claim_idle_ms=args.claim_idle_ms,
    )
    try:
        worker.run(stop)
    finally:
        engine.dispose()
        client.close()
    return 0
