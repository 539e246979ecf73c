"""Stable fingerprints of SQLAlchemy statements, for query keys.

The structural part of a query key comes from SQLAlchemy's own statement cache key,
which covers loader options, but holds process-local objects (mappers, tables, anonymous
bind names). :func:`fingerprint` walks it once per statement shape and replaces those
objects with stable names, so that every process computes the same digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath
from types import CodeType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table
from sqlalchemy.orm import Mapper, MapperProperty
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import Function, FunctionElement
from sqlalchemy.sql.selectable import ForUpdateArg, TableClause, TextualSelect
from sqlalchemy.sql.type_api import TypeEngine

from .codec import CODEC_VERSION, dumps_tagged, pack, plain
from .models import EAGER_LOADS, clause_tables, expression_reads
from .protocol.keys import digest

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


class Unfingerprintable(Exception):
    """A statement holds something that has no stable name across processes."""


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The stable identity of a statement shape and the tables its result depends on;
    ``volatile`` when it calls a SQL function whose value changes with no write (the
    clock, ``random()``, a sequence)."""

    digest: str
    tables: tuple[Table, ...]
    volatile: bool = False


# SQL functions whose result changes with no write to any table: a statement calling one
# is never the same twice, so caching it every time (cache_queries) would freeze it
VOLATILE_FUNCTIONS = frozenset(
    (
        "now",
        "current_timestamp",
        "current_time",
        "current_date",
        "localtime",
        "localtimestamp",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "random",
        "gen_random_uuid",
        "uuid_generate_v4",
        "nextval",
        "currval",
        "next_value",
        "txid_current",
        "pg_current_xact_id",
    )
)


_SIMPLE = (str, int, float, bool, type(None), bytes)
_TEXTUAL = (TextClause, TextualSelect)
# what a literal_column() may say without reading a table: a name (dotted, quoted), "*"
# (func.count() and exists() make one), a number
_PLAIN_LITERAL = re.compile(
    r'\*|-?\d+(\.\d+)?|("[^"]+"|[A-Za-z_][\w$]*)(\.("[^"]+"|[A-Za-z_][\w$]*|\*))*'
)


def _literal_sql(node: tuple[Any, ...]) -> bool:
    """Whether ``node`` is the key of a ``literal_column()`` whose text is more than a name:
    SQL written out, such as ``(SELECT count(*) FROM tags)``, whose tables the cache
    cannot see."""
    if len(node) < 4 or node[1] is not ColumnClause:
        return False
    # the key alternates attribute names and values: ..., "name", text, ..., "is_literal", True
    values = {node[i]: node[i + 1] for i in range(2, len(node) - 1) if type(node[i]) is str}
    if values.get("is_literal") is not True:
        return False
    text = values.get("name")
    return not (isinstance(text, str) and _PLAIN_LITERAL.fullmatch(text))


def _called_function(node: tuple[Any, ...]) -> str | None:
    """The name of the SQL function whose key ``node`` is (lower case), else None."""
    if len(node) < 2 or not isinstance(node[1], type) or not issubclass(node[1], FunctionElement):
        return None
    if node[1] is Function:  # func.anything(): its name is in the key
        values = {node[i]: node[i + 1] for i in range(2, len(node) - 1) if type(node[i]) is str}
        name = values.get("name")
        return name.lower() if isinstance(name, str) else None
    # a known function (func.now(), Sequence.next_value()): its class says which
    return str(getattr(node[1], "identifier", node[1].__name__)).lower()


class _Walker:
    __slots__ = ("mappers", "out", "tables", "volatile")

    def __init__(self) -> None:
        self.out: list[str] = []
        self.tables: dict[str, Table] = {}
        self.mappers: dict[int, Mapper[Any]] = {}
        self.volatile = False

    def walk(self, node: Any) -> None:
        out = self.out
        if isinstance(node, tuple):
            if _literal_sql(node):
                raise Unfingerprintable("literal_column() SQL names tables the cache cannot see")
            if not self.volatile and _called_function(node) in VOLATILE_FUNCTIONS:
                self.volatile = True
            out.append("(")
            self.walk_items(node)
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
            _check_class(node)
            out.append(f"C:{_qualified(node)}")
        elif isinstance(node, Enum):
            out.append(f"E:{_qualified(type(node))}.{node.name}")
        elif isinstance(node, TypeEngine):
            out.append(f"Y:{node!r}")
        elif isinstance(node, TextClause):
            raise Unfingerprintable("textual SQL names tables the cache cannot see")
        elif isinstance(node, MapperProperty):
            # a loader path (a lazy load's current path names its relationship)
            out.append(f"P:{_qualified(node.parent.class_)}.{node.key}")
        elif isinstance(node, CodeType):
            # a lambda_stmt() (the ORM's lazy loaders build theirs so): SQLAlchemy keys it
            # by its code object, the tracked elements follow in the key
            out.append(f"K:{_code_name(node)}")
        elif callable(node) and (name := _function_name(node)) is not None:
            out.append(f"F:{name}")
        else:
            text = repr(node)
            if " at 0x" in text:
                raise Unfingerprintable(f"{type(node).__name__} has no stable name")
            out.append(f"R:{type(node).__name__}:{text}")

    def walk_items(self, node: tuple[Any, ...]) -> None:
        """Walk a key tuple's items, leaving out an empty ``_with_options``: options that
        add nothing to the key (``FromCache`` alone) leave the statement what it is
        without them, as ``cache_queries`` runs it and ``invalidate_query()`` names it."""
        items = iter(node)
        for item in items:
            if type(item) is str and item == "_with_options":
                options = next(items, ())
                if type(options) is tuple and not options:
                    continue
                self.walk(item)
                self.walk(options)
            else:
                self.walk(item)


def _check_class(node: type) -> None:
    """Refuse a statement whose key names an element class the cache cannot serve."""
    if issubclass(node, _TEXTUAL) or node is TableClause:
        # text() fragments appear in the key as their SQL string, and a lightweight
        # table("name", column(...)) by its name, not as a Table of the models'
        # MetaData: the tables they read cannot be versioned
        raise Unfingerprintable("textual SQL names tables the cache cannot see")
    if issubclass(node, UpdateBase):
        # a data-modifying CTE, the SELECT of an UPDATE ... RETURNING: the statement
        # writes, and a hit would skip its write
        raise Unfingerprintable("an INSERT, UPDATE or DELETE inside it writes")
    if issubclass(node, ForUpdateArg):
        # FOR UPDATE in a subquery or a from_statement() (the SKIP LOCKED job claim):
        # a hit would take no lock, and skip no row another transaction holds
        raise Unfingerprintable("a locking clause inside it: a cached row takes no lock")


def _function_name(func: Any) -> str | None:
    """``module.qualname`` of a module-level function (SQL operators), else None."""
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    return f"{module}.{qualname}"


def _code_name(code: CodeType) -> str:
    """Where a code object is defined: its file (last two parts), line and name."""
    where = "/".join(PurePath(code.co_filename).parts[-2:])
    return f"{where}:{code.co_firstlineno}:{getattr(code, 'co_qualname', code.co_name)}"


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def fingerprint(structural_key: tuple[Any, ...]) -> Fingerprint:
    """Fingerprint the ``key`` part of a statement's cache key (``compat.statement_cache_key``).

    Raises :class:`Unfingerprintable` when the statement holds textual SQL, an object
    with no stable name, an ``INSERT``/``UPDATE``/``DELETE`` (a data-modifying CTE:
    the statement writes) or a locking clause (``FOR UPDATE`` in a subquery); such
    statements run uncached.
    """
    walker = _Walker()
    walker.walk(structural_key)
    tables = dict(walker.tables)
    for table in _mapper_tables(walker.mappers.values()):
        tables.setdefault(table.fullname, table)
    text = "".join(walker.out) + f"|codec:{CODEC_VERSION}"
    return Fingerprint(
        digest(text.encode()),
        tuple(tables[name] for name in sorted(tables)),
        walker.volatile,
    )


def _mapper_tables(named: Iterable[Mapper[Any]]) -> Iterable[Table]:
    """The tables a load of the ``named`` mappers' objects may read though the statement
    does not name them: their own; their subclasses' (a base's load brings their columns
    along with ``polymorphic_load`` or the mapper's ``with_polymorphic``); those their
    ``column_property`` expressions and relationship conditions read; and, through each
    relationship the mapper itself loads eagerly (``relationship(lazy="selectin")``), the
    same of its target's."""
    todo = list(named)
    seen: set[Mapper[Any]] = set()
    while todo:
        mapper = todo.pop()
        if mapper in seen:
            continue
        seen.add(mapper)
        for each in mapper.self_and_descendants:
            for table in each.tables:
                if isinstance(table, Table):
                    yield table
            yield from expression_reads(each)[0]
            for rel in each.relationships:
                if rel.lazy in EAGER_LOADS:
                    todo.append(rel.mapper)
                # the association table, and any third table the join conditions read
                # (a secondaryjoin that filters with a subquery): loads of the
                # relationship read them, named by the relationship alone. The two
                # sides' own tables are left to the mappers loaded, so that a lazy
                # relationship does not make the parent's queries depend on its target
                sides = {*each.tables, *rel.mapper.tables}
                for clause in (rel.secondary, rel.primaryjoin, rel.secondaryjoin):
                    if clause is not None:
                        found = clause_tables(clause)[0]
                        yield from (t for t in found if t not in sides)


def values_digest(parts: Sequence[Any]) -> str:
    """Digest execute-time values (bound parameters, execution context) exactly.

    Raises :class:`~sa_redis_cache.codec.CodecError` for values that cannot be encoded
    exactly; such statements run uncached.
    """
    items = list(parts)
    # most statements bind only plain values (str, bool, None, ints orjson writes), whose
    # tagged encoding is the values themselves: the same bytes, without the tagged walk
    if all(plain(p) if type(p) is list else plain([p]) for p in items):
        return digest(pack(items))
    return digest(dumps_tagged(items))
