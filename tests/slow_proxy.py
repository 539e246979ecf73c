"""A TCP proxy on loopback that delays every reply of its upstream server: a slow Redis.

Requests go through at once; each chunk the upstream sends back is held until ``delay``
seconds after it arrived, then forwarded. The proxy runs in threads of its own, so it
keeps working while the test's event loop is blocked (that is what a test may want to
see happen, or not).

Example::

    with SlowProxy("127.0.0.1", 6379, delay=0.1) as proxy:
        client = redis.Redis(port=proxy.port)   # every reply ~100 ms late
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any


class SlowProxy:
    """Forwards 127.0.0.1:<port> to ``host:port``, delaying the replies by ``delay`` s."""

    def __init__(self, host: str, port: int, *, delay: float) -> None:
        self.upstream = (host, port)
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def url(self, db: int = 0) -> str:
        """A ``redis://`` URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> SlowProxy:
        self._start(self._accept)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._closed = True
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                downstream.close()  # the server is away (restarting): as a refused connection
                continue
            with self._lock:
                if self._closed:
                    downstream.close()
                    upstream.close()
                    return
                self._sockets += [downstream, upstream]
            self._start(self._pump, downstream, upstream, 0.0)
            self._start(self._pump, upstream, downstream, self.delay)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket, delay: float) -> None:
        try:
            while chunk := source.recv(65536):
                if delay:
                    # the simulated latency of this reply, counted from its arrival
                    time.sleep(delay)
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
