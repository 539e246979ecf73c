"""Redis key layout, and stable fingerprints of SQLAlchemy statements.

Every key starts with ``sarc:{namespace}:``. Keys that belong to one table carry a
Redis Cluster hash tag ``{namespace:table}`` so that every multi-key script on one table
touches one slot::

    sarc:shop:{shop:products}:v                 table version counter (INCR)
    sarc:shop:{shop:products}:w                 writers in flight (ZSET, score = expiry ms)
    sarc:shop:{shop:products}:g                 entity generation (bumped by bulk DML)
    sarc:shop:{shop:products}:rw:<pk>           row write counter (validates entity entries)
    sarc:shop:{shop:products}:e:<schema>:<scope>:<pk>
                                                entity entry of one row in one database
                                                and schema (scope: sa_redis_cache.binds)
    sarc:shop:{shop:products}:q:<digest>        query entry (tag of its first table)
    sarc:shop:f:<prefix>:<digest>               function result (cache.cached)
    sarc:shop:stats:<scope>                     hit counters of every process (HASH)

The structural part of a query key comes from SQLAlchemy's own statement cache key,
which covers loader options, but holds process-local objects (mappers, tables, anonymous
bind names). :func:`fingerprint` walks it once per statement shape and replaces those
objects with stable names, so that every process computes the same digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect
from sqlalchemy.sql.type_api import TypeEngine

from .codec import CODEC_VERSION, CodecError, dumps_tagged

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

PREFIX = "sarc"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Builds every Redis key of one namespace.

    Example::

        >>> KeyScheme("shop").version_key("products")
        'sarc:shop:{shop:products}:v'
    """

    namespace: str

    @property
    def prefix(self) -> str:
        """``sarc:{namespace}:``, the start of every key of this namespace."""
        return f"{PREFIX}:{self.namespace}:"

    def table_prefix(self, table: str) -> str:
        """The hash-tagged prefix of every key that belongs to ``table``."""
        return f"{PREFIX}:{self.namespace}:{{{self.namespace}:{table}}}:"

    def version_key(self, table: str) -> str:
        """The INCR counter every query entry on ``table`` is validated against."""
        return self.table_prefix(table) + "v"

    def writers_key(self, table: str) -> str:
        """The set of transactions that have flushed ``table`` and not yet finished."""
        return self.table_prefix(table) + "w"

    def generation_key(self, table: str) -> str:
        """The counter every entity entry of ``table`` is validated against.

        Bumped only by writes whose rows are not known (bulk and textual DML), so that
        ordinary row writes leave the other rows' entity entries alone.
        """
        return self.table_prefix(table) + "g"

    def row_write_key(self, table: str, pk_text: str) -> str:
        """Counts the writes of one row, in every database and schema alike.

        Entity entries of the row are valid only under its current value, and a
        write-through commit stores its state only if the counter is still its ticket.
        It has no scope on purpose: a write seen under one spelling of a database must
        retire the entries filled under every other.
        """
        return f"{self.table_prefix(table)}rw:{pk_text}"

    def entity_key(self, table: str, schema_hash: str, scope: str, pk_text: str) -> str:
        """The entry of one row, read by ``session.get`` and many-to-one lazy loads.

        ``scope`` names the database and schema the row lives in
        (:meth:`sa_redis_cache.binds.Binds.scope`): tenants never share an entry.

        Example::

            >>> KeyScheme("shop").entity_key("products", "ab12", "00ff", "7")
            'sarc:shop:{shop:products}:e:ab12:00ff:7'
        """
        return f"{self.table_prefix(table)}e:{schema_hash}:{scope}:{pk_text}"

    def entity_pattern(self, table: str) -> str:
        """A SCAN pattern matching every entity entry of ``table``."""
        return _escape_glob(self.table_prefix(table)) + "e:*"

    def query_key(self, table: str, digest: str) -> str:
        """The entry of one statement with its bound values."""
        return f"{self.table_prefix(table)}q:{digest}"

    def query_pattern(self, table: str) -> str:
        """A SCAN pattern matching every query entry stored under ``table``'s tag."""
        return _escape_glob(self.table_prefix(table)) + "q:*"

    def function_key(self, prefix: str, digest: str) -> str:
        """The entry of one call of a function decorated with ``cache.cached``."""
        return f"{self.prefix}f:{prefix}:{digest}"

    def function_pattern(self, prefix: str) -> str:
        """A SCAN pattern matching every entry of one decorated function."""
        return _escape_glob(f"{self.prefix}f:{prefix}:") + "*"

    def stats_key(self, scope: str) -> str:
        """The hash of one scope's counters, summed over every process that publishes.

        ``scope`` is ``total`` or a scope of ``cache.stats()`` such as ``model:Product``,
        ``region:pages`` or ``function:profile``; each field is a counter (``hits``...).

        Example::

            >>> KeyScheme("shop").stats_key("model:Product")
            'sarc:shop:stats:model:Product'
        """
        return f"{self.prefix}stats:{scope}"


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def pk_text(values: Sequence[Any]) -> str:
    """Stable, unambiguous text for a primary key tuple.

    Example::

        >>> pk_text((7,))
        '7'
    """
    if len(values) == 1 and type(values[0]) is int:
        return str(values[0])
    try:
        return _digest(dumps_tagged(list(values)))
    except CodecError as exc:
        raise TypeError(f"primary key {values!r} cannot be used in a cache key: {exc}") from exc


class Unfingerprintable(Exception):
    """A statement holds something that has no stable name across processes."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The stable identity of a statement shape and the tables its result depends on."""

    digest: str
    tables: tuple[Table, ...]


_SIMPLE = (str, int, float, bool, type(None), bytes)
_TEXTUAL = (TextClause, TextualSelect)


class _Walker:
    __slots__ = ("mappers", "out", "tables")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.tables: dict[str, Table] = {}
        self.mappers: dict[int, Mapper[Any]] = {}

    def walk(self, node: Any) -> None:
        out = self.out
        if isinstance(node, tuple):
            out.append("(")
            for item in node:
                self.walk(item)
            out.append(")")
        elif isinstance(node, _SIMPLE):
            out.append(f"{type(node).__name__}:{node!r}")
        elif isinstance(node, Table):
            self.tables[node.fullname] = node
            out.append(f"T:{node.fullname}")
        elif isinstance(node, Mapper):
            self.mappers[id(node)] = node
            out.append(f"M:{_qualified(node.class_)}")
        elif isinstance(node, type):
            if issubclass(node, _TEXTUAL):
                # text() fragments appear in the key as their SQL string: the tables
                # they read cannot be versioned
                raise Unfingerprintable("textual SQL names tables the cache cannot see")
            out.append(f"C:{_qualified(node)}")
        elif isinstance(node, Enum):
            out.append(f"E:{_qualified(type(node))}.{node.name}")
        elif isinstance(node, TypeEngine):
            out.append(f"Y:{node!r}")
        elif isinstance(node, TextClause):
            raise Unfingerprintable("textual SQL names tables the cache cannot see")
        elif callable(node) and (name := _function_name(node)) is not None:
            out.append(f"F:{name}")
        else:
            text = repr(node)
            if " at 0x" in text:
                raise Unfingerprintable(f"{type(node).__name__} has no stable name")
            out.append(f"R:{type(node).__name__}:{text}")


def _function_name(func: Any) -> str | None:
    """``module.qualname`` of a module-level function (SQL operators), else None."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}.{qualname}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint(structural_key: tuple[Any, ...]) -> Fingerprint:
    """Fingerprint the ``key`` part of a statement's ``_generate_cache_key()``.

    Raises :class:`Unfingerprintable` when the statement holds textual SQL or an object
    with no stable name; such statements run uncached.
    """
    walker = _Walker()
    walker.walk(structural_key)
    tables = dict(walker.tables)
    for mapper in walker.mappers.values():
        for table in _mapper_tables(mapper):
            tables.setdefault(table.fullname, table)
    text = "".join(walker.out) + f"|codec:{CODEC_VERSION}"
    return Fingerprint(_digest(text.encode()), tuple(tables[name] for name in sorted(tables)))


def _mapper_tables(mapper: Mapper[Any]) -> Iterable[Table]:
    for table in mapper.tables:
        if isinstance(table, Table):
            yield table
    for rel in mapper.relationships:
        if isinstance(rel.secondary, Table):
            yield rel.secondary


def values_digest(parts: Sequence[Any]) -> str:
    """Digest execute-time values (bound parameters, execution context) exactly.

    Raises :class:`~sa_redis_cache.codec.CodecError` for values that cannot be encoded
    exactly; such statements run uncached.
    """
    return _digest(dumps_tagged(list(parts)))
