"""What the write-behind streams hold, beyond their keys: the consumer group, partitions,
stream ids, and the envelope the scripts put around the JSON they assemble."""

from __future__ import annotations

import zlib

from sa_redis_cache.codec import pack

GROUP = "sarc-flush"
"""The consumer group every flush worker reads the streams with."""

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
