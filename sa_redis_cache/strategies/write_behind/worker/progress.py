"""Progress while a worker drains the backlog it found at start: a bar, or log lines.

When the worker starts and its streams hold more than ``threshold`` entries (the sum of
``XLEN`` over every partition of its models, i.e. what is not yet applied, whoever
applies it), :class:`BacklogProgress` follows the draining until at most one batch is
left:

* ``mode="bar"``: a `rich <https://rich.readthedocs.io>`_ progress bar on stderr (rich
  is optional; without it, ``"log"`` is used). Log lines printed meanwhile go above the
  bar, not through it.
* ``mode="log"``: a structured log line every ``interval`` seconds (``wb_backlog``,
  ``wb_backlog_start``, ``wb_rate``, ``wb_eta_s``), the form for log shippers and for
  terminals that are not one.

Both start with ``write-behind backlog found`` and end with ``write-behind backlog
drained`` log lines; the per-batch lines go on as usual. The runner picks the bar when
stderr is a TTY or ``--progress`` is given, log lines otherwise, nothing with
``--no-progress``.

Example::

    progress = BacklogProgress(worker, threshold=1000, mode="log")
    progress.start()
    worker.run(stop, on_pass=progress.update)
    progress.close()
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING, Any

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from .flush import FlushWorker

log = logging.getLogger(__name__)

MODES = ("bar", "log", "off")


def rich_available() -> bool:
    """True when the optional ``rich`` package can be imported."""
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


def choose_mode(*, forced: bool, disabled: bool, stream: IO[str] | None = None) -> str:
    """``"off"``, ``"bar"`` (stderr is a TTY, or forced, and rich is there) or ``"log"``.

    Example::

        choose_mode(forced=False, disabled=False)  # "log" when stderr is a file
    """
    if disabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    wants_bar = forced or bool(getattr(stream, "isatty", lambda: False)())
    return "bar" if wants_bar and rich_available() else "log"


class BacklogProgress:
    """Follows the backlog of ``worker`` while it drains; see the module docstring.

    :meth:`update` is cheap to call after every pass: it looks at the queue (one pipelined
    ``XLEN`` per partition) at most every ``refresh`` seconds for the bar, ``interval``
    seconds for log lines.
    """

    def __init__(
        self,
        worker: FlushWorker,
        *,
        threshold: int = 1000,
        mode: str = "log",
        interval: float = 5.0,
        refresh: float = 0.25,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        self.worker = worker
        self.threshold = threshold
        self.mode = mode
        self.interval = interval
        self.refresh = refresh
        self.active = False
        self.start_backlog = 0
        self.left = 0
        self._started = 0.0
        self._entries_at_start = 0
        self._next = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []

    def start(self) -> bool:
        """Measure the backlog; follow it when above ``threshold``. True when following."""
        if self.mode == "off":
            return False
        try:
            backlog = self.worker.backlog()
        except RedisError as exc:
            log.warning("write-behind backlog unknown (Redis: %s); no progress shown", exc)
            return False
        if backlog <= self.threshold:
            return False
        self.active = True
        self.start_backlog = self.left = backlog
        self._started = time.monotonic()
        self._entries_at_start = self.worker.entries
        log.info(
            "write-behind backlog found: %d entries to flush",
            backlog,
            extra={"wb_backlog": backlog, "wb_progress": self.mode},
        )
        if self.mode == "bar":
            self._start_bar()
        self._next = self._started + (self.refresh if self._bar is not None else self.interval)
        return True

    def update(self) -> None:
        """Look at the backlog again (throttled); finish once at most one batch is left."""
        if not self.active:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + (self.refresh if self._bar is not None else self.interval)
        try:
            self.left = self.worker.backlog()
        except RedisError:
            return  # the worker logs Redis failures itself
        if self.left <= self.worker.batch_size:
            self.close()
            return
        elapsed = max(now - self._started, 1e-6)
        rate = (self.worker.entries - self._entries_at_start) / elapsed
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done(), total=self._total())
            return
        eta = self.left / rate if rate > 0 else None
        log.info(
            "write-behind backlog: %d of %d entries left (%.0f%%), %.0f entries/s, %s",
            self.left,
            self.start_backlog,
            100 * self._done() / self._total(),
            rate,
            f"about {eta:.0f} s to go" if eta is not None else "no progress yet",
            extra={
                "wb_backlog": self.left,
                "wb_backlog_start": self.start_backlog,
                "wb_rate": round(rate, 1),
                "wb_eta_s": None if eta is None else round(eta, 1),
            },
        )

    def close(self) -> None:
        """Stop following (drained, or the worker stops); says how it went."""
        if not self.active:
            return
        self.active = False
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done(), total=self._total())
            self._bar.stop()
            self._bar = None
            for handler, stream in self._swapped:
                handler.setStream(stream)
            self._swapped.clear()
        elapsed = time.monotonic() - self._started
        flushed = self.worker.entries - self._entries_at_start
        drained = self.left <= self.worker.batch_size
        log.info(
            "write-behind backlog %s: %d entries flushed by this worker in %.1f s",
            "drained" if drained else "not drained (stopping)",
            flushed,
            elapsed,
            extra={
                "wb_backlog": self.left,
                "wb_backlog_start": self.start_backlog,
                "wb_flushed": flushed,
                "wb_elapsed_s": round(elapsed, 2),
            },
        )

    def _total(self) -> int:
        return max(self.start_backlog, 1)

    def _done(self) -> int:
        # new writes may arrive while draining: the backlog can grow past its start
        return min(self.start_backlog, max(0, self.start_backlog - self.left))

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        original = sys.stderr
        self._bar = Progress(
            TextColumn("write-behind backlog"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=Console(file=original),
            redirect_stderr=True,
            redirect_stdout=False,
        )
        self._task = self._bar.add_task("drain", total=self.start_backlog)
        self._bar.start()
        # log handlers hold the original stderr: send their lines through the live display
        # (rich redirects sys.stderr only when it draws live, i.e. on a terminal)
        proxy = sys.stderr
        if proxy is original:
            return
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is original:
                handler.setStream(proxy)
                self._swapped.append((handler, original))
