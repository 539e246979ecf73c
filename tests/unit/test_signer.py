"""The signer's tags are HMAC-SHA256 bound to the key, and only verified values open."""

from __future__ import annotations

import doctest
import hmac

import pytest

from sa_redis_cache import signing
from sa_redis_cache.codec import CodecError, pack
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.protocol import HEADER
from sa_redis_cache.signing import TRAILER_BYTES, Signer

KEY = "sarc:shop:{shop:products}:e:0123456789ab:7"


def expected_tag(secret: bytes, kind: bytes, key: str, signed: bytes) -> bytes:
    name = key.encode()
    return hmac.digest(secret, kind + len(name).to_bytes(4, "big") + name + signed, "sha256")


@pytest.mark.parametrize("length", [16, 32, 63, 64, 65, 200])
def test_tags_are_hmac_sha256_of_kind_key_and_document(length: int) -> None:
    secret = bytes(range(256))[:length]
    document = pack([3, [[7, "a"], 0]])
    sealed = Signer(secret).seal(KEY, document)
    assert sealed[:-TRAILER_BYTES] == document
    assert sealed[-TRAILER_BYTES:-32] == b"E"
    assert sealed[-32:] == expected_tag(secret, b"E", KEY, document)


def scripted(stamp: bytes, body: bytes, trailer: bytes) -> bytes:
    """What lua/wb_enqueue.lua stores: header [stamp, body] trailer."""
    return HEADER + b"[" + stamp + b"," + body + b"]" + trailer


SIGNER = Signer(b"s" * 32)
DOCUMENT = pack([3, [[7, "a"], 0]])
SEALED = SIGNER.seal(KEY, DOCUMENT)
BODY = b'[[7,"a"],0]'


def test_a_sealed_value_opens_under_its_key() -> None:
    assert SIGNER.open(KEY, SEALED) == DOCUMENT


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param(KEY + "1", SEALED, id="another key"),
        pytest.param(KEY, SEALED.replace(b'"a"', b'"b"'), id="a changed byte"),
        pytest.param(KEY, DOCUMENT, id="unsigned"),
        pytest.param(KEY, b"", id="empty"),
        pytest.param(KEY, Signer(b"t" * 32).seal(KEY, DOCUMENT), id="another signing key"),
        pytest.param(KEY, SEALED[:-TRAILER_BYTES] + b"B" + SEALED[-32:], id="kind byte changed"),
        pytest.param(
            KEY,
            scripted(b"3", BODY, SIGNER.body_trailer(KEY, BODY)),
            id="a body tag where only a whole one is accepted",
        ),
    ],
)
def test_nothing_else_opens(key: str, value: bytes) -> None:
    with pytest.raises(CodecError):
        SIGNER.open(key, value)


def test_values_a_script_assembles_open_with_any_stamp_but_their_own_body() -> None:
    signer = Signer(b"s" * 32)
    body = b'[[7,"a"],0]'
    trailer = signer.body_trailer(KEY, body)
    for stamp in (b"12", b'"1700000000000-3"'):
        value = scripted(stamp, body, trailer)
        assert signer.open(KEY, value, scripted=True) == value[:-TRAILER_BYTES]
    for bad in (
        scripted(b"12", b'[[7,"b"],0]', trailer),  # another body
        scripted(b"12", body, signer.body_trailer(KEY + "1", body)),  # another row
        scripted(b"1,2", body, trailer),  # a stamp that moves the body's start
        b"[12," + body + b"]" + trailer,  # no envelope
    ):
        with pytest.raises(CodecError):
            signer.open(KEY, bad, scripted=True)


@pytest.mark.parametrize("secret", [b"short", "a str, however long it is", None, bytearray(3)])
def test_a_signing_key_is_16_bytes_or_more(secret: object) -> None:
    with pytest.raises(ConfigurationError, match="signing_key"):
        Signer(secret)  # type: ignore[arg-type]  # what a caller may pass by mistake


def test_documented_examples() -> None:
    failures, tried = doctest.testmod(signing)
    assert tried >= 4
    assert failures == 0
