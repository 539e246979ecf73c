"""The life cycle shared by the throwaway servers: a folder, a process group, a port.

A :class:`ManagedServer` owns a temporary folder and one child process in its own session,
on a loopback port that is kept across restarts. :meth:`ManagedServer.kill` SIGKILLs the
whole process group, like a crash; :meth:`ManagedServer.restart` brings the same data back.
Servers still alive at interpreter exit are stopped and their folders deleted.

Example::

    from devservices import RedisServer

    server = RedisServer().start()
    try:
        server.kill()
        server.restart()
    finally:
        server.close()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["ManagedServer", "ServerStartError", "child_env", "free_port", "user_kwargs"]

_S = TypeVar("_S", bound="ManagedServer")


class ServerStartError(RuntimeError):
    """A server started from binaries did not come up; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    Example: ``RedisServer(port=free_port())``.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


_LIVE: set[ManagedServer] = set()
_LIVE_LOCK = threading.Lock()


def _close_all_live() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            server.close()


atexit.register(_close_all_live)


class ManagedServer:
    """Lifecycle shared by both servers: a temp folder, one child process, stop/kill/restart."""

    kind: ClassVar[str]
    _stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self, *, host: str, port: int | None, run_as: str | None, startup_timeout: float
    ) -> None:
        self.host = host
        self._port = port
        self._port_chosen_by_caller = port is not None
        self._run_as = run_as
        self.startup_timeout = startup_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- what subclasses provide
    def _prepare(self) -> None:
        """Initialise a new data folder (runs once, before the first start)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    # -- public surface
    @property
    def port(self) -> int:
        """The TCP port; fixed after the first start so that restarts keep it."""
        if self._port is None:
            raise RuntimeError(f"{self.kind} server has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        """The temporary folder holding the server's data and ``server.log``."""
        if self._dir is None:
            raise RuntimeError(f"{self.kind} server has no data folder (not started, or closed)")
        return self._dir

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process id, or None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self: _S) -> _S:
        """Start the server (initialising its folder the first time) and wait until it answers."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = _make_temp_dir(f"sarc-{self.kind}-", self._run_as)
            with _LIVE_LOCK:
                _LIVE.add(self)
            self._prepare()
        # A port picked by free_port() can be taken before the server binds it: pick another.
        attempts = 1 if self._port_chosen_by_caller else 3
        for attempt in range(attempts):
            if not self._port_chosen_by_caller:
                self._port = free_port(self.host)
            try:
                self._launch()
            except ServerStartError:
                if attempt == attempts - 1:
                    raise
            else:
                self._port_chosen_by_caller = True  # restarts must keep this port
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (data is kept, so :meth:`start` or :meth:`restart` resume it)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(self._stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and every process it started, like a crash. Data is kept."""
        pgid = self._proc.pid if self._proc is not None else None
        self._kill_group()
        self._reap()
        if pgid is not None:
            # A restart must not race the dying children: Postgres refuses to start while
            # any of them still holds the old shared memory.
            _wait_for_group_exit(pgid, timeout=10.0)

    def restart(self: _S) -> _S:
        """Stop (if running) and start again on the same port with the same data."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its folder. The object cannot be restarted after this."""
        self.stop()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self: _S) -> _S:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: do not leave the folder behind
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals
    def _launch(self) -> None:
        self._log_file = (self.data_dir / "server.log").open("ab")
        command = self._command()
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=child_env(),
                # Own session: a Ctrl-C meant for the foreground command does not reach the
                # server, and kill() can take down the whole process group.
                start_new_session=True,
                **user_kwargs(self._run_as),
            )
        except OSError as exc:
            self._reap()
            raise ServerStartError(f"cannot run {command[0]}: {exc}") from exc
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            try:
                # The pause between readiness polls; it also notices an early exit.
                code = self._proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
                self.kill()
                raise ServerStartError(
                    f"{self.kind} did not answer on {self.host}:{self._port} within "
                    f"{self.startup_timeout:.0f}s{self._log_tail()}"
                ) from None
            self._reap()
            raise ServerStartError(
                f"{self.kind} exited with code {code} while starting on "
                f"{self.host}:{self._port}{self._log_tail()}"
            )

    def _kill_group(self) -> None:
        proc = self._proc
        # Only while the leader is unreaped: its pid cannot have been reused yet.
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- server log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


def _wait_for_group_exit(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the kernel's process table; there is nothing to wait on


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` is still running (zombies do not count)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: nothing to poll, trust SIGKILL
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat_line.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def user_kwargs(run_as: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that drop to ``run_as`` when we are root (else none).

    Example: ``subprocess.run(["id"], **user_kwargs("nobody"))``.
    """
    if run_as is None or os.geteuid() != 0:
        return {}
    entry = _account(run_as)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def child_env() -> dict[str, str]:
    """Our environment without ``PG*`` variables, which would redirect initdb and postgres.

    Example: ``subprocess.run([initdb, ...], env=child_env())``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # a locale missing from the machine would make initdb fail
    return env


def _account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ServerStartError(
            f"user {name!r} does not exist; as root, servers that refuse root run as it"
        ) from None


def _make_temp_dir(prefix: str, run_as: str | None) -> Path:
    base = Path(tempfile.gettempdir())
    if run_as is not None and os.geteuid() == 0:
        # The unprivileged user must be able to reach the folder through every parent.
        reachable = all(p.stat().st_mode & stat.S_IXOTH for p in (base, *base.parents))
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base if reachable else "/tmp"))
        entry = _account(run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        return path
    return Path(tempfile.mkdtemp(prefix=prefix))
