"""Exact, pickle-free encoding of cached values on orjson.

Three layers, each producing data that orjson writes natively:

* Typed column converters (:func:`column_converter`, :class:`RowCodec`): a column's
  SQLAlchemy type picks, once, how its values are stored. This is the cache-hit path.
* The tagged generic layer (:func:`encode_tagged`, :func:`dumps_tagged`): values whose type
  is not known from a column (``@cache.cached`` results, some TypeDecorators).
* The envelope (:func:`pack`, :func:`unpack`): magic ``b"\\x01S"``, one version byte,
  then the orjson document.

Decisions
---------
* Strict dump, strict load. A dump runs once per cache fill, after a database round trip;
  it checks the exact Python type (``type(v) is X``; subclasses would come back as the
  base class) and refuses with :class:`CodecError` what its load could not rebuild
  identically; the caller then does not cache that result. A wrong guess about what a
  driver returns costs a fill, never a wrong value. A load runs on every hit, on bytes
  anyone with write access to Redis may have planted: it checks the JSON type of every
  stored column exactly (a str column holds a str, an int column an int and never a bool
  or a float, a Numeric column its text...; a JSON column accepts any JSON value) and
  raises :class:`CodecError` on anything else, which the cache treats as a corrupt entry.
  The check is one C-level pass over the row (``itemgetter`` and ``map(type, ...)``
  compared with the expected tuple); rows holding NULLs take a slower per-column path.
* TypeDecorator: the impl's converter is used when the decorator cannot change result
  values (neither ``process_result_value`` nor ``result_processor`` is overridden, and the
  impl does not depend on a dialect that was not given). Otherwise the tagged generic
  layer stores each value with its type, which is exact for everything it accepts and
  raises :class:`CodecError` at dump for the rest: the Python types a
  ``process_result_value`` returns cannot be known without running it.
* datetime/time: naive and fixed-offset values are stored as ``isoformat()``. A
  ``ZoneInfo`` (what psycopg 3 returns for timestamptz) is kept by key, RFC 9557 style:
  ``2024-10-27T02:30:00+01:00[Europe/Paris]``; load converts the instant into the zone,
  which restores wall time and ``fold``. Other tzinfo classes (pytz, dateutil, named
  ``timezone``), sub-second offsets, ``fold=1`` where it means nothing, and wall times
  inside a DST gap raise :class:`CodecError`.
* float: finite values natively; ``inf``/``-inf``/``nan``/``-nan`` as words, other NaN
  payloads by bit pattern (``nan:7ff4000000000000``), so bits round-trip.
* JSON/JSONB/HSTORE: encoded once and embedded with ``orjson.Fragment``; a document that
  orjson would change (NaN/Infinity become null, ints beyond 64 bits, non-JSON types)
  raises :class:`CodecError`. Enum members with a str/int mixin inside a JSON document
  compare equal to their value and are not detected; JSON drivers never produce them.
* int columns are stored as is: orjson's range (-2**63 .. 2**64-1) covers every Postgres
  integer type, and a bigger value makes :func:`pack` raise :class:`CodecError`. The
  tagged layer stores bigger ints as ``{"$i": hex}`` (hex has no 4300-digit limit).
* Tagged values are single-key objects whose key starts with ``$``. A dict with non-str
  keys, or whose only key starts with ``$``, is stored as ``{"$m": [[key, value], ...]}``
  so every dict round-trips, in order. tuple, set, frozenset and bytearray keep their
  types; set items are sorted by their encoding so that equal values give equal bytes
  (keys are hashed from these bytes). Other types are refused.
* Enum in the generic layer: ``"module:qualname"`` plus member name. Loading resolves the
  class only from a bounded registry (:func:`register_enum`): the enum classes of the Enum
  columns of every model the cache has described, and every class this process has
  encoded. Cached bytes never cause an import, an attribute lookup or a registration, so
  whatever is planted, decoding adds nothing to memory. An unknown class is a
  :class:`CodecError`, which the cache treats as a miss; a process that reads values of a
  class it never encodes registers it once at start-up.
* Uncacheable (:class:`UncacheableType` at setup): PickleType, range types, and types with
  no known Python result type (geometry, other UserDefinedTypes).
"""

from __future__ import annotations

import binascii
import contextlib
import struct
import sys
from base64 import b64decode
from binascii import b2a_base64
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID, SafeUUID
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.mutable import Mutable

from . import compat

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlalchemy.engine import Dialect
    from sqlalchemy.types import TypeEngine

__all__ = [
    "CODEC_VERSION",
    "CodecError",
    "Converter",
    "RowCodec",
    "UncacheableType",
    "column_converter",
    "decode_tagged",
    "dumps_tagged",
    "encode_tagged",
    "loads_tagged",
    "pack",
    "register_enum",
    "type_fingerprint",
    "unpack",
]

CODEC_VERSION = 1
"""Format version written into every packed value; bump it when any stored form changes."""

_MAGIC = b"\x01S"
_HEADER = _MAGIC + bytes((CODEC_VERSION,))
# Datetimes and subclasses must reach `default` (which refuses them) instead of being
# written as strings or plain values that would load back as another type.
_ORJSON_OPTS = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson reads and writes as ints
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_ONE_US = timedelta(microseconds=1)
_UTC = timezone.utc
# the IANA names of UTC itself (tzdata's links to Etc/UTC): offset 0, no transitions
_UTC_ZONES = frozenset(
    ("UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu")
)


class CodecError(ValueError):
    """A value cannot be stored exactly, or stored bytes cannot be decoded.

    At dump time it means "do not cache this result"; at load time, "treat it as a miss".

    >>> unpack(b"not ours")
    Traceback (most recent call last):
    sa_redis_cache.codec.CodecError: not a sa_redis_cache value (bad magic)
    """


class UncacheableType(TypeError):
    """A column type has no exact codec; ``index`` is the column position when known.

    >>> from sqlalchemy import PickleType
    >>> column_converter(PickleType())
    Traceback (most recent call last):
    sa_redis_cache.codec.UncacheableType: PickleType: stores arbitrary pickled objects
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        super().__init__(reason if index is None else f"column {index}: {reason}")


class Converter(NamedTuple):
    """How one column's non-None values are stored: ``dump`` to JSON data, ``load`` back.

    >>> from sqlalchemy import Numeric
    >>> conv = column_converter(Numeric(12, 2))
    >>> conv.dump(Decimal("1.50")), conv.load("1.50")
    ('1.50', Decimal('1.50'))
    """

    dump: Callable[[Any], Any]
    load: Callable[[Any], Any]


def _type_name(value: Any) -> str:
    cls = type(value)
    name = cls.__qualname__
    return name if cls.__module__ == "builtins" else f"{cls.__module__}.{name}"


def _wrong(value: Any, expected: str) -> CodecError:
    return CodecError(f"expected {expected}, got {_type_name(value)}")


# --- scalars: each dump checks the exact type; a load gets its input type-checked -------
# RowCodec checks the stored JSON type of every column before its load runs (_Plan.stored);
# loads whose stored form has two types (float, timedelta) check their input themselves.

_DOUBLE, _BITS = struct.Struct(">d"), struct.Struct(">Q")
_FLOAT_WORDS = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}
_FLOAT_WORDS["-nan"] = -_FLOAT_WORDS["nan"]
_WORD_BITS = {_BITS.unpack(_DOUBLE.pack(v))[0]: w for w, v in _FLOAT_WORDS.items()}


def _float_text(v: float) -> str:
    bits = _BITS.unpack(_DOUBLE.pack(v))[0]
    return _WORD_BITS.get(bits) or f"nan:{bits:016x}"


def _float_from_text(s: Any) -> float:
    word = _FLOAT_WORDS.get(s)
    if word is not None:
        return word
    if type(s) is str and s.startswith("nan:") and len(s) == 20:
        value: float = _DOUBLE.unpack(_BITS.pack(int(s[4:], 16)))[0]
        return value
    raise CodecError(f"bad float text {s!r}")


def _dump_float(v: Any) -> Any:
    if type(v) is not float:
        raise _wrong(v, "float")
    return v if v - v == 0.0 else _float_text(v)  # v - v is nan exactly when v is not finite


def _load_float(v: Any) -> float:
    return v if type(v) is float else _float_from_text(v)


def _dump_decimal(v: Any) -> str:
    if type(v) is not Decimal:
        raise _wrong(v, "Decimal")
    return str(v)  # exact digits and exponent, -0, NaN payloads, sNaN


def _plain_offset(tz: Any) -> bool:
    # fromisoformat() rebuilds an unnamed datetime.timezone; any other tzinfo would change.
    # Sub-second offsets are refused: CPython 3.11 parses "+00:00:00.000001" as UTC, and
    # real offsets (Postgres included) are whole seconds.
    if tz is None:
        return True
    if type(tz) is not timezone:
        return False
    offset = tz.utcoffset(None)
    return offset.microseconds == 0 and tz.tzname(None) == timezone(offset).tzname(None)


def _dump_datetime(v: Any) -> str:
    if type(v) is not datetime:
        raise _wrong(v, "datetime")
    tz = v.tzinfo
    if (tz is None or tz is _UTC) and not v.fold:
        return v.isoformat()
    if _plain_offset(tz):
        if v.fold:
            raise CodecError("fold=1 on a naive or fixed-offset datetime cannot be stored")
        return v.isoformat()
    if type(tz) is ZoneInfo and tz.key:
        text = v.isoformat()
        if tz.key in _UTC_ZONES and not v.fold:
            # one offset for all time: every wall time exists once, so the check below
            # could only fail on fold=1 (Postgres's own UTC gives every timestamptz this way)
            return f"{text}[{tz.key}]"
        # Loading converts the instant back into the zone, which fixes wall time and fold;
        # refuse the values that conversion cannot reproduce (wall times in a DST gap).
        back = datetime.fromisoformat(text).astimezone(tz)
        if back.fold != v.fold or back.isoformat() != text:
            raise CodecError(f"{text} does not exist in {tz.key}; it cannot be stored")
        return f"{text}[{tz.key}]"
    raise CodecError(f"tzinfo {_type_name(tz)} cannot be restored; use ZoneInfo or timezone")


def _load_datetime(s: str) -> datetime:
    if s[-1] != "]":
        return datetime.fromisoformat(s)
    cut = s.rindex("[")
    # The stored offset fixes the instant; converting into the zone restores wall time and
    # fold, as the driver's own conversion from UTC does (also after a tzdata update).
    return datetime.fromisoformat(s[:cut]).astimezone(ZoneInfo(s[cut + 1 : -1]))


def _dump_date(v: Any) -> str:
    if type(v) is not date:
        raise _wrong(v, "date")
    return v.isoformat()


def _dump_time(v: Any) -> str:
    if type(v) is not time:
        raise _wrong(v, "time")
    if v.fold or not _plain_offset(v.tzinfo):
        raise CodecError("only naive or fixed-offset times with fold=0 can be stored")
    return v.isoformat()


def _dump_timedelta(v: Any) -> int | str:
    if type(v) is not timedelta:
        raise _wrong(v, "timedelta")
    us: int = v // _ONE_US
    return us if _I64_MIN <= us <= _I64_MAX else str(us)


def _load_timedelta(v: Any) -> timedelta:
    # int() would also take a float (truncated), a bool, " 7 " or "7_0": none of them is a
    # stored form, so none of them is accepted
    if type(v) is not int:
        if type(v) is not str or not v.lstrip("-").isdigit() or not v.isascii():
            raise CodecError(f"bad timedelta {v!r}")
        v = int(v)
    return timedelta(0, 0, v)


def _dump_uuid(v: Any) -> str:
    if type(v) is not UUID:
        raise _wrong(v, "UUID")
    return v.hex


def _make_uuid_loader() -> Callable[[str], UUID]:
    # UUID.__init__ is pure Python and parses several spellings; filling the two slots
    # directly is 2-3x faster. Used only if it reproduces UUID() exactly on this Python.
    new, put, unknown = object.__new__, object.__setattr__, SafeUUID.unknown

    def load(h: str) -> UUID:
        if len(h) != 32:
            raise CodecError(f"bad UUID {h!r}")
        u: UUID = new(UUID)
        put(u, "int", int(h, 16))
        put(u, "is_safe", unknown)
        return u

    try:
        probe = UUID("12345678-9abc-def0-1234-56789abcdef0")
        made = load(probe.hex)
        if made == probe and str(made) == str(probe) and made.is_safe is probe.is_safe:
            return load
    except (TypeError, AttributeError):  # a future UUID layout: use the public constructor
        pass
    return lambda h: UUID(hex=h)


_load_uuid = _make_uuid_loader()


def _strict_base64(x: Any) -> bytes:
    if type(x) is not str:
        raise CodecError(f"expected base64 text, got {_type_name(x)}")
    try:
        return b64decode(x, validate=True)
    except binascii.Error as exc:
        raise CodecError(f"not base64: {exc}") from exc


def _dump_bytes(v: Any) -> str:
    if type(v) is not bytes:
        raise _wrong(v, "bytes")
    return b2a_base64(v, newline=False).decode("ascii")


class _Plan(NamedTuple):
    kind: str  # part of the type fingerprint: a different stored form gives a different key
    dump: Callable[[Any], Any] | None  # None: stored as is, after checking type(v) is exact
    load: Callable[[Any], Any] | None  # None: the stored form is the value
    exact: type | None
    scalar: bool  # the stored form is never a list or dict, so ARRAY can nest on lists
    # the JSON type of every stored (non-None) value, checked before ``load`` runs; None
    # when the load checks its input itself, or when any JSON value is valid (JSON columns)
    stored: type | None


def _same(v: Any) -> Any:
    return v


_SCALAR_PLANS: dict[type, _Plan] = {
    str: _Plan("str", None, None, str, scalar=True, stored=str),
    int: _Plan("int", None, None, int, scalar=True, stored=int),
    bool: _Plan("bool", None, None, bool, scalar=True, stored=bool),
    float: _Plan("float", _dump_float, _load_float, None, scalar=True, stored=None),
    Decimal: _Plan("decimal", _dump_decimal, Decimal, None, scalar=True, stored=str),
    datetime: _Plan("datetime", _dump_datetime, _load_datetime, None, scalar=True, stored=str),
    date: _Plan("date", _dump_date, date.fromisoformat, None, scalar=True, stored=str),
    time: _Plan("time", _dump_time, time.fromisoformat, None, scalar=True, stored=str),
    timedelta: _Plan("timedelta", _dump_timedelta, _load_timedelta, None, scalar=True, stored=None),
    UUID: _Plan("uuid", _dump_uuid, _load_uuid, None, scalar=True, stored=str),
    bytes: _Plan("bytes", _dump_bytes, _strict_base64, None, scalar=True, stored=str),
}


# --- tagged generic layer ----------------------------------------------------------------

MAX_ENUM_CLASSES = 4096
"""How many enum classes :func:`register_enum` holds at most (the registry never shrinks)."""

# The only classes a "$e" tag can name: filled by register_enum(), never by decoding.
_ENUM_PATHS: dict[type, str] = {}
_ENUM_CLASSES: dict[str, type[Enum]] = {}


def _find_again(path: str) -> Any:
    """The object at ``path`` among imported modules, through ``__dict__`` lookups only.

    Used when registering a class the application itself holds, to check that another
    process can name the same class by the same path. Only ``__dict__`` lookups: a
    module's lazy ``__getattr__`` (which may import) or a class's descriptors never run.
    """
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", None)  # the attribute itself, never computed
        if not isinstance(namespace, Mapping):
            return None
        obj = namespace.get(part)
    return obj


def register_enum(cls: type[Enum]) -> str:
    """Let tagged values (``@cache.cached`` results) hold members of ``cls``; its stored path.

    Encoding a member registers its class, and so does describing a model with an Enum
    column of that class; a process that reads a function's cached enums without ever
    producing one calls this once at start-up, or its reads of those entries are misses.
    Raises :class:`CodecError` when the class cannot be named again by another process
    (defined inside a function), when another class already holds its path, or past
    :data:`MAX_ENUM_CLASSES`.

    >>> import http
    >>> register_enum(http.HTTPStatus)
    'http:HTTPStatus'
    """
    path = _ENUM_PATHS.get(cls)
    if path is not None:
        return path
    if not (isinstance(cls, type) and issubclass(cls, Enum)):
        raise CodecError(f"{cls!r} is not an Enum class")
    path = f"{cls.__module__}:{cls.__qualname__}"
    if _find_again(path) is not cls:
        raise CodecError(f"enum {path} cannot be found again by its import path")
    holder = _ENUM_CLASSES.get(path)
    if holder is not None and holder is not cls:
        raise CodecError(f"another enum class is registered as {path}")
    if len(_ENUM_CLASSES) >= MAX_ENUM_CLASSES:
        raise CodecError(f"more than {MAX_ENUM_CLASSES} enum classes: {path} is not cached")
    _ENUM_CLASSES[path] = cls
    _ENUM_PATHS[cls] = path
    return path


def _enum_path(cls: type[Enum]) -> str:
    path = _ENUM_PATHS.get(cls)
    return path if path is not None else register_enum(cls)


def _enum_name(v: Enum) -> str:
    name = v._name_
    if type(v).__members__.get(name) is not v:
        raise CodecError(f"{v!r} is not a named member of {type(v).__qualname__}")
    return name


def _load_enum(x: Any) -> Enum:
    if type(x) is not list or len(x) != 2 or type(x[0]) is not str or type(x[1]) is not str:
        raise CodecError("an enum tag holds [path, name]")
    path, name = x
    cls = _ENUM_CLASSES.get(path)
    if cls is None:
        raise CodecError(f"{path} is not an enum class this process knows (see register_enum)")
    member = cls.__members__.get(name)
    if member is None:
        raise CodecError(f"{path} has no member {name!r}")
    return member


def _enc_dict(d: dict[Any, Any]) -> dict[str, Any]:
    if len(d) == 1:
        key = next(iter(d))
        plain = type(key) is str and not key.startswith("$")
    else:
        plain = all(type(k) is str for k in d)
    if plain:
        return {k: _enc(x) for k, x in d.items()}
    return {"$m": [[_enc(k), _enc(x)] for k, x in d.items()]}


_TAGGED_SCALARS: dict[type, tuple[str, Callable[[Any], Any]]] = {
    Decimal: ("$D", _dump_decimal),
    datetime: ("$dt", _dump_datetime),
    date: ("$da", _dump_date),
    time: ("$ti", _dump_time),
    timedelta: ("$td", _dump_timedelta),
    UUID: ("$u", _dump_uuid),
    bytes: ("$b", _dump_bytes),
    bytearray: ("$ba", lambda v: b2a_base64(v, newline=False).decode("ascii")),
}
_TAGGED_COLLECTIONS: dict[type, str] = {tuple: "$t", set: "$s", frozenset: "$fs"}


def _enc(v: Any) -> Any:
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    if t is int:
        return v if _INT_MIN <= v <= _INT_MAX else {"$i": format(v, "x")}
    if t is float:
        return v if v - v == 0.0 else {"$f": _float_text(v)}
    if t is list:
        return [_enc(x) for x in v]
    if t is dict:
        return _enc_dict(v)
    scalar = _TAGGED_SCALARS.get(t)
    if scalar is not None:
        return {scalar[0]: scalar[1](v)}
    tag = _TAGGED_COLLECTIONS.get(t)
    if tag is not None:
        items = [_enc(x) for x in v]
        if t is not tuple:  # set order varies per process; sorted, equal sets give equal bytes
            items.sort(key=orjson.dumps)
        return {tag: items}
    if isinstance(v, Enum):
        return {"$e": [_enum_path(t), _enum_name(v)]}
    raise CodecError(f"cannot cache a value of type {_type_name(v)}")


def _items(x: Any) -> list[Any]:
    if type(x) is not list:
        raise CodecError(f"expected a list inside a tag, got {_type_name(x)}")
    return [_dec(y) for y in x]


def _strict(load: Callable[[str], Any]) -> Callable[[Any], Any]:
    """``load`` for a tag whose payload must be text: anything else is foreign bytes."""

    def checked(x: Any) -> Any:
        if type(x) is not str:
            raise CodecError(f"expected text inside a tag, got {_type_name(x)}")
        return load(x)

    return checked


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "$i": lambda x: int(x, 16),
    "$f": _float_from_text,
    "$D": _strict(Decimal),
    "$dt": _load_datetime,
    "$da": date.fromisoformat,
    "$ti": time.fromisoformat,
    "$td": _load_timedelta,
    "$u": _load_uuid,
    "$b": _strict_base64,
    "$ba": lambda x: bytearray(_strict_base64(x)),
    "$t": lambda x: tuple(_items(x)),
    "$s": lambda x: set(_items(x)),
    "$fs": lambda x: frozenset(_items(x)),
    "$m": lambda x: dict(_items(x)),
    "$e": _load_enum,
}


def _dec(v: Any) -> Any:
    t = type(v)
    if t is list:
        return [_dec(x) for x in v]
    if t is dict:
        if len(v) == 1:
            ((key, x),) = v.items()
            if key.startswith("$"):
                decoder = _DECODERS.get(key)
                if decoder is None:
                    raise CodecError(f"unknown tag {key!r}")
                return decoder(x)
        return {k: _dec(x) for k, x in v.items()}
    return v


def plain(values: list[Any]) -> bool:
    """True when :func:`encode_tagged` gives ``values`` back unchanged (every item a str,
    a bool, None or an int orjson writes as one): the hot path then packs them as they are.

    >>> plain([7, "a", None, True]), plain([2**64]), plain([1.5])
    (True, False, False)
    """
    for v in values:
        t = type(v)
        if t is int:
            if not _INT_MIN <= v <= _INT_MAX:
                return False
        elif t is not str and t is not bool and v is not None:
            return False
    return True


def encode_tagged(obj: Any) -> Any:
    """Turn ``obj`` into JSON data that :func:`decode_tagged` turns back into an equal,
    same-typed value; unsupported types raise :class:`CodecError`.

    >>> encode_tagged({"at": date(2024, 1, 31), "ids": (1, 2)})
    {'at': {'$da': '2024-01-31'}, 'ids': {'$t': [1, 2]}}
    """
    try:
        return _enc(obj)
    except CodecError:
        raise
    except (TypeError, ValueError, RecursionError) as exc:  # e.g. a cycle, a huge int
        raise CodecError(f"cannot encode {_type_name(obj)}: {exc!r}") from exc


def decode_tagged(tree: Any) -> Any:
    """Inverse of :func:`encode_tagged`; malformed input raises :class:`CodecError` only.

    >>> decode_tagged({"$t": [1, {"$D": "0.10"}]})
    (1, Decimal('0.10'))
    """
    try:
        return _dec(tree)
    except CodecError:
        raise
    except Exception as exc:  # any failure on foreign data must become a miss
        raise CodecError(f"cannot decode tagged value: {exc!r}") from exc


def dumps_tagged(obj: Any) -> bytes:
    """Encode any supported value as versioned bytes (see :func:`pack`).

    >>> loads_tagged(dumps_tagged({1: {"a", "b"}})) == {1: {"a", "b"}}
    True
    """
    return pack(encode_tagged(obj))


def loads_tagged(data: object) -> Any:
    """Inverse of :func:`dumps_tagged`; anything wrong raises :class:`CodecError`.

    >>> loads_tagged(dumps_tagged([float("-inf"), 2**70]))
    [-inf, 1180591620717411303424]
    """
    return decode_tagged(unpack(data))


# --- column plans -------------------------------------------------------------------------


def _no_default(v: Any) -> Any:
    raise _wrong(v, "a JSON value")


def _json_default(v: Any) -> Any:
    """A tracked container of ``sqlalchemy.ext.mutable`` (``MutableDict.as_mutable(JSONB)``,
    the usual JSONB recipe) is stored as the plain JSON the database returns: its class's
    ``load`` listener, which a hit fires as a database load does, wraps it again. Any
    other value that is not plain JSON is refused."""
    if isinstance(v, Mutable):
        if isinstance(v, dict):
            return dict(v)
        if isinstance(v, list):
            return list(v)
    return _no_default(v)


def _dump_json(v: Any) -> orjson.Fragment:
    try:
        encoded = orjson.dumps(v, default=_json_default, option=_ORJSON_OPTS)
    except orjson.JSONEncodeError as exc:
        raise CodecError(f"JSON value cannot be stored: {exc}") from exc
    # orjson writes NaN and Infinity as null and UUIDs as strings without complaint.
    if orjson.loads(encoded) != v:
        raise CodecError("JSON value holds NaN, Infinity or a type that would come back changed")
    return orjson.Fragment(encoded)  # embedded as is by pack(): encoded once


_JSON_PLAN = _Plan("json", _dump_json, None, None, scalar=False, stored=None)
_GENERIC_PLAN = _Plan("generic", _enc, _dec, None, scalar=False, stored=None)
# Postgres types without a python_type that SQLAlchemy's drivers return as str (INET and
# friends unless native_inet_types=True, which the dump check then refuses).
_PG_STR_NAMES = ("INET", "CIDR", "MACADDR", "MACADDR8", "MONEY", "REGCLASS", "REGCONFIG")
_PG_STR_TYPES = tuple(
    getattr(pg, name)
    for name in (*_PG_STR_NAMES, "TSVECTOR", "TSQUERY", "JSONPATH")
    if hasattr(pg, name)  # some arrived during 2.0.x
)


def _enum_plan(cls: type[Enum]) -> _Plan:
    members = dict(cls.__members__)
    # a model's enum column: "$e" tags of its class decode in every process; a class no
    # other process can name keeps its column working, only its tags stay unreadable
    with contextlib.suppress(CodecError):
        register_enum(cls)

    def dump(v: Any) -> str:
        if type(v) is not cls:
            raise _wrong(v, cls.__qualname__)
        name: str = v._name_
        return name

    return _Plan(
        f"enum:{cls.__module__}:{cls.__qualname__}",
        dump,
        members.__getitem__,
        None,
        scalar=True,
        stored=str,
    )


def _array_plan(t: sqltypes.ARRAY[Any], dialect: Dialect | None) -> _Plan:
    item = _plan(t.item_type, dialect)
    container: Any = tuple if t.as_tuple else list
    kind = f"array[{item.kind}]" + (":tuple" if t.as_tuple else "")
    if not item.scalar:  # item forms can be lists: nesting would be ambiguous
        plan = _JSON_PLAN if item.kind == "json" and not t.as_tuple else _GENERIC_PLAN
        return plan._replace(kind=kind)
    idump, iload, exact, istored = item.dump, item.load or _same, item.exact, item.stored

    def dump(v: Any) -> list[Any]:
        # a tracked list (MutableList.as_mutable(ARRAY(...))) is stored as the plain list
        # the database returns, as a tracked JSON container is (_json_default)
        if type(v) is not container and not (
            container is list and isinstance(v, list) and isinstance(v, Mutable)
        ):
            raise _wrong(v, container.__name__)
        out = []
        for x in v:
            if x is None or type(x) is exact:
                out.append(x)
            elif type(x) is container:
                out.append(dump(x))
            elif idump is not None:
                out.append(idump(x))
            else:
                raise _wrong(x, exact.__name__ if exact else "an array item")
        return out

    def load_item(x: Any) -> Any:
        if type(x) is list:
            return load(x)
        if x is None:
            return x
        if istored is not None and type(x) is not istored:
            raise _wrong(x, istored.__name__)
        return iload(x)

    def load(v: list[Any]) -> Any:
        out = [load_item(x) for x in v]
        return out if container is list else tuple(out)

    return _Plan(kind, dump, load, None, scalar=False, stored=list)


def _decorator_plan(t: sqltypes.TypeDecorator[Any], dialect: Dialect | None) -> _Plan:
    cls, base = type(t), sqltypes.TypeDecorator
    changes_results = (
        cls.process_result_value is not base.process_result_value
        or cls.result_processor is not base.result_processor
    )
    per_dialect = cls.load_dialect_impl is not base.load_dialect_impl
    if changes_results or (per_dialect and dialect is None):
        return _GENERIC_PLAN
    impl = t.load_dialect_impl(dialect) if per_dialect and dialect else t.impl_instance
    return _plan(impl, dialect)


def _base_plan(t: TypeEngine[Any], dialect: Dialect | None) -> _Plan:
    if isinstance(t, sqltypes.PickleType):
        raise UncacheableType("PickleType: stores arbitrary pickled objects")
    if isinstance(t, sqltypes.TypeDecorator) and not isinstance(t, sqltypes.Interval):
        return _decorator_plan(t, dialect)
    if isinstance(t, sqltypes.Enum) and t.enum_class is not None:
        return _enum_plan(t.enum_class)
    if isinstance(t, (sqltypes.JSON, pg.HSTORE)):
        return _JSON_PLAN
    if isinstance(t, sqltypes.ARRAY):
        return _array_plan(t, dialect)
    if isinstance(t, pg.DOMAIN):
        return _plan(t.data_type, dialect)
    if isinstance(t, sqltypes.NullType):  # text() and literal columns: any value
        return _GENERIC_PLAN
    if isinstance(t, _PG_STR_TYPES):
        return _SCALAR_PLANS[str]
    if isinstance(t, pg.OID):
        return _SCALAR_PLANS[int]
    try:
        py: Any = t.python_type
    except NotImplementedError:
        py = object
    plan = _SCALAR_PLANS.get(py)
    if plan is not None:
        return plan
    if isinstance(py, type) and issubclass(py, str) and py is not str:  # e.g. BIT's BitString
        return _Plan(
            f"str:{py.__module__}:{py.__qualname__}",
            _str_subclass_dump(py),
            py,
            None,
            scalar=True,
            stored=str,
        )
    raise UncacheableType(f"{type(t).__name__}: no exact codec for its values")


def _str_subclass_dump(py: type) -> Callable[[Any], str]:
    def dump(v: Any) -> str:
        if type(v) is not py:
            raise _wrong(v, py.__qualname__)
        return str.__str__(v)

    return dump


def _plan(sqltype: Any, dialect: Dialect | None) -> _Plan:
    t: TypeEngine[Any] = sqltypes.to_instance(sqltype)
    variants = compat.type_variants(t)
    if not variants:
        return _base_plan(t, dialect)
    if dialect is not None:
        return _base_plan(variants.get(dialect.name, t), dialect)
    plans = [_base_plan(t, None)] + [_base_plan(v, None) for v in variants.values()]
    return plans[0] if len({p.kind for p in plans}) == 1 else _GENERIC_PLAN


def column_converter(sqltype: TypeEngine[Any], dialect: Dialect | None = None) -> Converter | None:
    """Pick how a column of ``sqltype`` stores its values; ``None`` means stored as is.

    ``None`` columns (str, int, bool, JSON) still get their types checked by
    :class:`RowCodec` at dump. Raises :class:`UncacheableType` when no exact codec exists.
    Pass ``dialect`` to resolve ``with_variant()`` and dialect-dependent TypeDecorators.

    >>> from sqlalchemy import DateTime, Integer
    >>> column_converter(Integer()) is None
    True
    >>> column_converter(DateTime(timezone=True)).load("2024-01-31T12:00:00+00:00")
    datetime.datetime(2024, 1, 31, 12, 0, tzinfo=datetime.timezone.utc)
    """
    plan = _plan(sqltype, dialect)
    if plan.load is None:
        return None
    assert plan.dump is not None  # every plan with a load has a dump
    return Converter(plan.dump, plan.load)


_FINGERPRINT_ATTRS = (
    "length",
    "precision",
    "scale",
    "asdecimal",
    "decimal_return_scale",
    "timezone",
    "as_uuid",
    "second_precision",
    "day_precision",
    "fields",
    "dimensions",
    "as_tuple",
)


def _class_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("sqlalchemy.dialects."):
        return f"{module.split('.')[2]}.{cls.__qualname__}"
    return cls.__qualname__ if module.startswith("sqlalchemy.") else f"{module}.{cls.__qualname__}"


def _stable(value: Any) -> str:
    if value is None or type(value) in (int, bool, str):
        return repr(value)
    if type(value) in (list, tuple):
        return "[" + ",".join(_stable(v) for v in value) + "]"
    return _type_name(value)  # never a repr that could hold a memory address


def type_fingerprint(sqltype: TypeEngine[Any] | type[TypeEngine[Any]]) -> str:
    """Stable text for the schema hash: class, value-relevant parameters, stored form.

    It changes whenever a change of type could change the stored values, and never
    contains memory addresses, so every process computes the same text.

    >>> from sqlalchemy import Numeric
    >>> type_fingerprint(Numeric(12, 2))
    'Numeric(precision=12,scale=2,asdecimal=True,decimal_return_scale=None)->decimal'
    """
    t: TypeEngine[Any] = sqltypes.to_instance(sqltype)
    parts = [
        f"{name}={_stable(getattr(t, name))}" for name in _FINGERPRINT_ATTRS if hasattr(t, name)
    ]
    if isinstance(t, sqltypes.Enum):
        parts.append(f"enums={_stable(list(t.enums))}")
        if t.enum_class is not None:
            parts.append(f"members={_stable(list(t.enum_class.__members__))}")
    if isinstance(t, sqltypes.ARRAY):
        parts.append(f"item={type_fingerprint(t.item_type)}")
    if isinstance(t, sqltypes.TypeDecorator):
        parts.append(f"impl={type_fingerprint(t.impl_instance)}")
    if isinstance(t, pg.DOMAIN):
        parts.append(f"data_type={type_fingerprint(t.data_type)}")
    for dialect_name, variant in sorted(compat.type_variants(t).items()):
        parts.append(f"{dialect_name}:{type_fingerprint(variant)}")
    try:
        kind = _plan(t, None).kind
    except UncacheableType:
        kind = "uncacheable"
    return f"{_class_name(type(t))}({','.join(parts)})->{kind}"


def _thaw(value: Any) -> Any:
    """A deep copy of the containers a loaded value can hold (the leaves are immutable)."""
    kind = type(value)
    if kind is list:
        return [_thaw(v) for v in value]
    if kind is dict:
        return {k: _thaw(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(_thaw(v) for v in value)
    if kind is set or kind is bytearray:
        return kind(value)
    return value


class RowCodec:
    """Dump and load result rows for fixed column types; built once per statement shape.

    ``dump_row`` validates every value (so a fill never stores what cannot come back
    identical); ``load_row`` checks the stored JSON type of every column (bytes read from
    Redis are not trusted) and runs the converters of the columns that have one.

    >>> from sqlalchemy import Integer, Numeric, String
    >>> codec = RowCodec([Integer(), String(), Numeric(10, 2)])
    >>> codec.dump_row((1, "a", Decimal("9.99")))
    [1, 'a', '9.99']
    >>> codec.load_row(unpack(pack(codec.dump_row((1, None, Decimal("9.99"))))))
    (1, None, Decimal('9.99'))
    >>> codec.load_row(["1", "a", "9.99"])
    Traceback (most recent call last):
    sa_redis_cache.codec.CodecError: column 0: stored as str, expected int
    """

    __slots__ = ("_checks", "_dumps", "_loads", "mutable", "width")

    def __init__(self, types: Sequence[TypeEngine[Any]], dialect: Dialect | None = None) -> None:
        dumps, checks, loads, mutable = [], [], [], []
        for index, sqltype in enumerate(types):
            try:
                plan = _plan(sqltype, dialect)
            except UncacheableType as exc:
                raise UncacheableType(exc.reason, index) from exc
            if not plan.scalar:
                mutable.append(index)
            if plan.dump is not None:
                dumps.append((index, plan.dump))
            elif plan.exact is not None:
                checks.append((index, plan.exact))
            if plan.stored is not None or plan.load is not None:
                loads.append((index, plan.stored, plan.load))
        self._dumps: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(dumps)
        self._checks: tuple[tuple[int, type], ...] = tuple(checks)
        # per column read back: the JSON type its stored values have (None: any, or its
        # load checks), and its load (None: the stored value is the value)
        self._loads: tuple[tuple[int, type | None, Callable[[Any], Any] | None], ...] = tuple(loads)
        self.width = len(types)
        # columns whose loaded values are lists or dicts: a value kept for several sessions
        # (the local tier) is copied for each, as each would get its own from the database
        self.mutable: tuple[int, ...] = tuple(mutable)

    def thawed(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """``values`` with every list or dict of a mutable column copied (deeply).

        >>> from sqlalchemy import JSON, Integer
        >>> codec = RowCodec([Integer(), JSON()])
        >>> kept = (1, {"tags": ["a"]})
        >>> fresh = codec.thawed(kept)
        >>> fresh == kept, fresh[1]["tags"] is kept[1]["tags"]
        (True, False)
        """
        if not self.mutable:
            return values
        out = list(values)
        for index in self.mutable:
            out[index] = _thaw(out[index])
        return tuple(out)

    def dump_row(self, row: Sequence[Any]) -> list[Any]:
        """Encode one row; :class:`CodecError` names the column that cannot be stored."""
        if len(row) != self.width:
            raise CodecError(f"row has {len(row)} values, expected {self.width}")
        for index, exact in self._checks:
            v = row[index]
            if type(v) is not exact and v is not None:
                raise CodecError(f"column {index}: {_wrong(v, exact.__name__)}")
        out = list(row)
        index = -1
        try:
            for index, dump in self._dumps:
                v = out[index]
                if v is not None:
                    out[index] = dump(v)
        except Exception as exc:  # any refusal means "do not cache", never a crash
            raise CodecError(f"column {index}: {exc}") from exc
        return out

    def load_row(self, data: Sequence[Any]) -> tuple[Any, ...]:
        """Decode one row from :meth:`dump_row` output (after pack/unpack).

        A row of another width, or a column whose stored value has another JSON type than
        its column stores, raises :class:`CodecError`.
        """
        if type(data) is not list or len(data) != self.width:
            raise CodecError(f"stored row does not have {self.width} columns")
        return self._load(data)

    def _load(self, data: list[Any]) -> tuple[Any, ...]:
        out = data[:]
        index, v = -1, None
        stored: type | None = None
        try:
            for index, stored, load in self._loads:
                v = out[index]
                if v is not None:
                    if stored is not None and type(v) is not stored:
                        break
                    if load is not None:
                        out[index] = load(v)
            else:
                return tuple(out)
        except Exception as exc:  # foreign or corrupt data is a miss
            raise CodecError(f"column {index}: cannot decode: {exc!r}") from exc
        expected = stored.__name__ if stored is not None else "?"
        raise CodecError(f"column {index}: stored as {_type_name(v)}, expected {expected}")

    def dump_rows(self, rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """:meth:`dump_row` for each row."""
        dump_row = self.dump_row
        return [dump_row(row) for row in rows]

    def load_rows(self, data: Any) -> list[tuple[Any, ...]]:
        """:meth:`load_row` for each stored row; ``data`` must be a list."""
        if type(data) is not list:
            raise CodecError("stored rows are not a list")
        load, width = self._load, self.width
        result = []
        for row in data:
            if type(row) is not list or len(row) != width:
                raise CodecError(f"stored row does not have {width} columns")
            result.append(load(row))
        return result


def pack(payload: Any) -> bytes:
    """Encode JSON data (as produced by this module) into versioned bytes.

    Datetimes, dataclasses and subclasses are refused rather than silently stringified;
    route other values through :class:`RowCodec` or :func:`encode_tagged` first.

    >>> pack([1, "a"])
    b'\\x01S\\x01[1,"a"]'
    """
    try:
        body = orjson.dumps(payload, default=_no_default, option=_ORJSON_OPTS)
    except orjson.JSONEncodeError as exc:
        raise CodecError(f"cannot pack: {exc}") from exc
    return _HEADER + body


def unpack(data: object) -> Any:
    """Decode :func:`pack` output; anything else raises :class:`CodecError` only.

    ``data`` is typed ``object`` because it is checked here: a ``str`` (from a client with
    ``decode_responses=True``) or ``None`` is refused like any foreign value.

    >>> unpack(b'\\x01S\\x01[1,"a"]')
    [1, 'a']
    """
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise CodecError(f"expected bytes, got {_type_name(data)}")
        data = bytes(data)
    if not data.startswith(_HEADER):
        if data.startswith(_MAGIC) and len(data) > len(_MAGIC):
            raise CodecError(f"written by codec version {data[2]}, this is {CODEC_VERSION}")
        raise CodecError("not a sa_redis_cache value (bad magic)")
    try:
        return orjson.loads(memoryview(data)[len(_HEADER) :])
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CodecError(f"corrupt value: {exc}") from exc
