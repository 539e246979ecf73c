"""``python -m devservices [--print] [--no-env] [-- CMD ARGS...]``.

Brings the services up, runs CMD with ``DATABASE_URL`` and ``REDIS_URL`` exported, stops
what it started, and exits with CMD's exit code. Example::

    python -m devservices -- python -m examples.demo
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from devservices import ServicesUnavailable, bring_up, log, redact

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

    from devservices import Services

__all__ = ["main"]


def _run_command(command: Sequence[str], services: Services) -> int:
    env = {**os.environ, "DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url}
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"devservices: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        # The terminal sends Ctrl-C to the child too; let it decide, then tear down after it.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_term = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    try:
        code = child.wait()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)
    return 128 - code if code < 0 else code


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so the context managers stop the throwaway servers.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devservices [--print] [-- CMD ARGS...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in args:
        split = args.index("--")
        args, command = args[:split], args[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m devservices",
        description="Find or start Postgres and Redis, then run CMD with DATABASE_URL and "
        "REDIS_URL exported; throwaway servers are stopped when CMD exits.",
        usage="%(prog)s [--print] [--no-env] [-- CMD [ARGS...]]",
    )
    parser.add_argument("--print", action="store_true", dest="show", help="print what was found")
    parser.add_argument("--no-env", action="store_true", help="ignore DATABASE_URL and REDIS_URL")
    options = parser.parse_args(args)
    if not command and not options.show:
        parser.error("give --print, or a command after --")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("devservices: %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with bring_up(use_env=not options.no_env) as services:
            if options.show:
                print(f"DATABASE_URL={redact(services.database_url)}")
                print(f"REDIS_URL={redact(services.redis_url)}")
                print(f"STARTED={','.join(services.started)}")
                if services.started:
                    print("(throwaway servers stop when this command exits)", file=sys.stderr)
            return _run_command(command, services) if command else 0
    except ServicesUnavailable as exc:
        print(f"devservices: {exc}", file=sys.stderr)
        return 1
    finally:
        log.removeHandler(handler)
        log.setLevel(previous_level)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_term)
