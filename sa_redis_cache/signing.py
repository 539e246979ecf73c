"""Optional entry signing: an HMAC-SHA256 over every entry the library writes.

For deployments where Redis is shared with writers the application does not trust as much
as itself (``Cache(..., signing_key=...)``). Every value is the codec's document (magic,
version, JSON) followed by a 33-byte trailer: one byte saying what the tag covers, then
the 32-byte tag. The tag is computed over that byte, the Redis key the value is written
under (length-prefixed) and the signed bytes, so a value moved to another key, or with one
byte changed, fails verification. A value that fails, or has no trailer, is a corrupt
entry: a miss, counted, logged and deleted; except a write-behind pending key in the form
the enqueue script writes, which is kept (another process of the namespace, with another
key, may have queued it: ``strategies/write_behind/session.py``).

What the tag covers:

* ``E``, the whole document: every value the client assembles (query and entity fills,
  write-through states, ``@cache.cached`` results). Their stamps (versions, generation,
  timing) are signed with their bodies.
* ``B``, the body alone: entity entries and pending keys that ``lua/wb_enqueue.lua``
  assembles as ``header [stamp, body] trailer``. The stamp (the
  generation, or the stream id) is read or made inside the script, after the client has
  signed; the client signs the body it sends, bound to the row's entity key, and the
  script appends the trailer it is given. The unsigned stamp is checked against the live
  counters like every stamp: the key never goes to Redis (arguments show in ``SLOWLOG``
  and ``MONITOR``), and signing the stamp would add nothing, since version counters are
  plain Redis integers that a party with write access can set back to an old value anyway
  (see docs/guarantees.md, "Threat model").

Example::

    signer = Signer(secrets.token_bytes(32))
    stored = signer.seal("sarc:shop:...:e:7", pack([3, body]))
    signer.open("sarc:shop:...:e:7", stored)  # the document; CodecError under another key
"""

from __future__ import annotations

import hashlib
import hmac

from .codec import CodecError
from .errors import ConfigurationError
from .protocol import HEADER

__all__ = ["MIN_KEY_BYTES", "TRAILER_BYTES", "Signer"]

MIN_KEY_BYTES = 16
"""The shortest signing key accepted (use 32 random bytes: ``secrets.token_bytes(32)``)."""

_WHOLE = b"E"  # the tag covers the whole document
_BODY = b"B"  # the tag covers the body a write-behind script wrapped in its stamp
_TAG_BYTES = 32
TRAILER_BYTES = 1 + _TAG_BYTES
"""What signing adds to every value: the kind byte and the HMAC-SHA256 tag."""
_SCRIPTED_OPENING = HEADER + b"["


class Signer:
    """Seals values with an HMAC bound to their Redis key, and opens them again.

    Example::

        >>> signer = Signer(b"0123456789abcdef")
        >>> sealed = signer.seal("k1", b"document")
        >>> signer.open("k1", sealed)
        b'document'
        >>> signer.open("k2", sealed)
        Traceback (most recent call last):
        sa_redis_cache.codec.CodecError: signature does not match the key it is stored under
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        advice = "use secrets.token_bytes(32), the same in every process of the namespace"
        if not isinstance(key, bytes | bytearray):
            raise ConfigurationError(
                f"signing_key must be bytes, not {type(key).__name__}; {advice}"
            )
        if len(key) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"signing_key has {len(key)} bytes, fewer than {MIN_KEY_BYTES}; {advice}"
            )
        # HMAC-SHA256 (RFC 2104) with its two padded-key states hashed once, here: a tag
        # then costs two copies of a hash state instead of a key schedule per value, about
        # half of hmac.digest() on a small entry (tests/unit/test_signing.py checks equality)
        block = hashlib.sha256().block_size
        padded = (hashlib.sha256(key).digest() if len(key) > block else bytes(key)).ljust(
            block, b"\0"
        )
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def _tag(self, kind: bytes, key: str, signed: bytes) -> bytes:
        name = key.encode()
        inner = self._inner.copy()
        # length-prefixed: no key and signed bytes can be split another way
        inner.update(kind + len(name).to_bytes(4, "big") + name)
        inner.update(signed)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def seal(self, key: str, document: bytes) -> bytes:
        """``document`` followed by its trailer, for storing under ``key``."""
        return document + _WHOLE + self._tag(_WHOLE, key, document)

    def body_trailer(self, entity_key: str, body: bytes) -> bytes:
        """The trailer a write-behind script appends to the value it builds around ``body``."""
        return _BODY + self._tag(_BODY, entity_key, body)

    def open(self, key: str, raw: bytes, *, scripted: bool = False) -> bytes:
        """The document of a value read under ``key``; :class:`CodecError` unless verified.

        ``scripted`` also accepts a value a write-behind script assembled, whose tag covers
        its body alone (entity entries and pending keys; ``key`` is then the entity key).
        """
        cut = len(raw) - TRAILER_BYTES
        if cut <= 0:
            raise CodecError("unsigned value (this cache signs its entries)")
        document = raw[:cut]
        kind = raw[cut : cut + 1]
        if kind == _WHOLE:
            signed = document
        elif kind == _BODY and scripted:
            signed = _scripted_body(document)
        else:
            raise CodecError("unsigned value (this cache signs its entries)")
        if not hmac.compare_digest(self._tag(kind, key, signed), raw[cut + 1 :]):
            raise CodecError("signature does not match the key it is stored under")
        return document


def _scripted_body(document: bytes) -> bytes:
    """The body of ``header [stamp, body]``. The stamp is a quoted stream id (a pending
    key) or ``[generation,row_writes]`` (an entity entry): neither holds a comma outside
    its brackets, so the body starts after the first comma past the stamp's end."""
    start = len(_SCRIPTED_OPENING)
    end = document.find(b"]", start) if document[start : start + 1] == b"[" else start
    comma = document.find(b",", end) if end >= 0 else -1
    if not document.startswith(_SCRIPTED_OPENING) or comma < 0 or document[-1:] != b"]":
        raise CodecError("not a value a write-behind script assembled")
    return document[comma + 1 : -1]
