"""Reading the cache's counters exactly as Redis reads them.

Version counters, generations, invalidation counters and row write counters are moved by
``INCR`` inside the Lua scripts. A value Python's ``int()`` accepts but ``INCR`` refuses
(``" 7 "``, ``"+7"``, ``"7_0"``, ``"07"``) would be trusted by a reader while every
writer's script fails on it: entries validated against it would outlive the writes that
should have retired them. So a counter is read with Redis's own rule (``string2ll`` in
Redis's ``util.c``): the canonical decimal form of a signed 64-bit integer, nothing
before or after it, no ``+``, no leading zero, no ``-0``. Anything else is unparsable and
treated as absent; the scripts apply the same rule (``lua/_prelude.lua``).
"""

from __future__ import annotations

_MIN = -(2**63)
_MAX = 2**63 - 1


def parse_counter(raw: object) -> int | None:
    """The value of a counter as Redis would ``INCR`` it; None when Redis could not.

    ``raw`` is what a ``GET``/``MGET`` returned (bytes or str); None, a value of any other
    type and any text that is not exactly the decimal form of a signed 64-bit integer give
    None.

    Example::

        >>> parse_counter(b"-42"), parse_counter(b"0")
        (-42, 0)
        >>> [parse_counter(v) for v in (b" 7", b"+7", b"07", b"-0", b"7_0", None)]
        [None, None, None, None, None, None]
        >>> parse_counter(b"9223372036854775808") is None
        True
    """
    if type(raw) is bytes:
        if raw.isdigit() and len(raw) <= 19 and (raw[0] != 48 or len(raw) == 1):
            # the common case, on every read: ASCII digits, no leading zero
            value = int(raw)
            return value if value <= _MAX else None
        text = raw
    elif type(raw) is str:
        try:
            text = raw.encode("ascii")
        except UnicodeEncodeError:
            return None
    else:
        return None
    if not 0 < len(text) <= 20:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    # int() also takes spaces, "+", "_" and leading zeros: only the canonical form counts
    if str(value).encode() != text or not _MIN <= value <= _MAX:
        return None
    return value
