"""Keys a command could not read: what is wrong with each, reported rather than raised.

Anyone who can write to the Redis may leave anything under the namespace's prefix: a
string where writer marks (a sorted set) are expected, a counter that is no number, bytes
that decode to no entry. A command that meets such a key reports it (``bad_keys`` in its
``--json`` document, a table in the human form: the key and what is wrong with it) and
goes on with the others, exit status 0: one bad key never hides the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from .common import one_line
from .output import Block, Table

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sa_redis_cache.redis_io import SyncClient

__all__ = [
    "MISSES",
    "NO_ENTRY",
    "bad_key",
    "bad_keys_blocks",
    "not_a_number",
    "printable_key",
    "separate_errors",
    "undecodable",
    "wrong_type",
]


MISSES = "a read treats it as a miss and deletes it"
"""What the read path does with an entry that does not decode (said after the problem)."""

NO_ENTRY = "a read finds no entry in it (MGET answers nil) and misses"
"""What the read path does with an entry key of another Redis type."""


def printable_key(key: str | bytes) -> str:
    """A key as text: bytes that are not UTF-8 are shown as ``\\xNN``.

    Keys read by SCAN are decoded with ``surrogateescape``, so that they can be sent back
    to Redis unchanged; this shows them without the surrogates.

    Example::

        >>> printable_key(b"sarc:a:\\xff")
        'sarc:a:\\\\xff'
    """
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "backslashreplace")


def bad_key(key: str | bytes, problem: str) -> dict[str, str]:
    """One entry of a document's ``bad_keys``."""
    return {"key": printable_key(key), "problem": problem}


def wrong_type(kind: bytes | str, expected: str) -> str:
    """The problem of a key of the wrong Redis type (``kind`` as TYPE answers it)."""
    shown = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
    return f"holds a Redis {shown}, not {expected}"


def not_a_number(raw: bytes, what: str) -> str:
    """The problem of a counter holding something else than an integer."""
    shown = raw[:40].decode("utf-8", "backslashreplace") + ("…" if len(raw) > 40 else "")
    return f"holds {shown!r}, not an integer {what}"


def undecodable(exc: BaseException) -> str:
    """What is wrong with a value that does not decode, in one line.

    The codec's own errors already say it (``not a sa_redis_cache value``); anything
    else that planted bytes made a decoding step raise is named with its type.
    """
    from sa_redis_cache.codec import CodecError

    text = one_line(exc)
    if isinstance(exc, CodecError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def separate_errors(
    client: SyncClient,
    requests: Sequence[tuple[str | bytes, str]],
    replies: Sequence[Any],
) -> tuple[list[Any], list[dict[str, str]]]:
    """Pipeline ``replies`` with each error reply replaced by None, and a report per error.

    ``requests`` gives, per reply, the key the command read and what it should hold (``a
    string counter``...), for the report. A ``WRONGTYPE`` error is reported with the type
    the key does hold (one more round trip, only when there are such errors).

    Example::

        replies, bad = separate_errors(client, [(key, "a string counter")],
                                       pipe.execute(raise_on_error=False))
    """
    failed = [i for i, reply in enumerate(replies) if isinstance(reply, redis.ResponseError)]
    if not failed:
        return list(replies), []
    pipe = client.pipeline(transaction=False)
    for i in failed:
        pipe.type(requests[i][0])
    kinds = pipe.execute(raise_on_error=False)
    out = list(replies)
    bad = []
    for i, kind in zip(failed, kinds, strict=True):
        key, expected = requests[i]
        error = replies[i]
        if str(error).startswith("WRONGTYPE") and isinstance(kind, bytes):
            problem = wrong_type(kind, expected)
        else:
            problem = f"cannot be read: {one_line(error)}"
        out[i] = None
        bad.append(bad_key(key, problem))
    return out, bad


def bad_keys_blocks(bad: Sequence[dict[str, str]]) -> list[Block]:
    """The human form of a document's ``bad_keys`` (nothing when there are none)."""
    if not bad:
        return []
    return [
        Table(
            ["key", "problem"],
            [[b["key"], b["problem"]] for b in bad],
            title=f"{len(bad)} key(s) could not be read",
        )
    ]
