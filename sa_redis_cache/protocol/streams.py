"""What the write-behind streams hold, beyond their keys: partitions, stream ids, and the
envelope the scripts put around the JSON they assemble.

Workers read the streams with ``XRANGE`` (no consumer group since sarc_0002; releases
before it left a group named ``sarc-flush`` on each stream, which nothing reads now)."""

from __future__ import annotations

import zlib

from sa_redis_cache.codec import pack

HEADER: bytes = pack(0)[:-1]
"""The codec envelope (magic and version) that Lua prepends to JSON it assembles."""


def partition_of(pk: str, partitions: int) -> int:
    """The partition of a row: CRC-32 of its ``pk_text``, stable across processes and runs.

    Example::

        >>> partition_of("7", 8)
        2
    """
    return zlib.crc32(pk.encode()) % partitions


def stream_id(text: str | bytes) -> tuple[int, int]:
    """A stream id as the pair it is ordered by (text order is wrong: ``"9-0" > "10-0"``).

    Example::

        >>> stream_id(b"10-0") > stream_id("9-5")
        True
    """
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
