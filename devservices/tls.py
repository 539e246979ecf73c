"""TLS certificates made on the spot, for servers the tests start with ``rediss://``.

A throwaway certificate authority signs one server certificate for the loopback
addresses (``127.0.0.1``, ``::1``, ``localhost``); clients trust that authority only
(``ssl_ca_certs``). Made with ``trustme`` (a development dependency), never reused.

Example::

    from devservices import RedisServer
    from devservices.tls import make_tls_files

    files = make_tls_files(tmp_path)
    with RedisServer(tls=files) as server:
        redis.Redis.from_url(server.url).ping()   # rediss://...?ssl_ca_certs=...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["TLSFiles", "make_tls_files"]


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A server's certificate and key, and the authority that signed it (PEM files)."""

    cert: Path
    key: Path
    ca: Path


def make_tls_files(
    folder: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost")
) -> TLSFiles:
    """A new authority and a server certificate for ``hosts``, written into ``folder``."""
    import trustme

    authority = trustme.CA()
    issued = authority.issue_cert(*hosts)
    files = TLSFiles(cert=folder / "server.crt", key=folder / "server.key", ca=folder / "ca.crt")
    folder.mkdir(parents=True, exist_ok=True)
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    authority.cert_pem.write_to_path(str(files.ca))
    return files
