"""What the cache knows about each mapped class and table, computed once at ``attach()``."""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import CHAR, NCHAR, Column, String, Table, TypeDecorator, event, inspect
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import ColumnProperty, Mapper
from sqlalchemy.orm.instrumentation import ClassManager
from sqlalchemy.sql import sqltypes, visitors
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.selectable import SelectBase

from . import compat
from .codec import CODEC_VERSION, RowCodec, UncacheableType, type_fingerprint
from .policy import CachePolicy
from .stats import scope

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.sql.expression import TableClause
    from sqlalchemy.sql.type_api import TypeEngine

log = logging.getLogger(__name__)


def table_schema_hash(table: Table) -> str:
    """A short hash of a table's column names and types, plus the codec version.

    A deploy that changes a model changes this hash, so old-shaped entries are never read.

    Example::

        >>> from sqlalchemy import Column, Integer, MetaData, Table
        >>> len(table_schema_hash(Table("t", MetaData(), Column("id", Integer))))
        12
    """
    parts = [f"codec={CODEC_VERSION}", table.fullname]
    for column in table.columns:
        try:
            type_text = type_fingerprint(column.type)
        except UncacheableType:
            type_text = f"uncacheable:{type(column.type).__qualname__}"
        parts.append(f"{column.name}:{type_text}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()


def _expression_text(expression: Any) -> str:
    """Stable SQL text of a ``column_property`` expression, its literals rendered inline
    where they can be (``qty + 1`` and ``qty * 100`` differ only there)."""
    dialect = postgres_dialect()
    for options in ({"literal_binds": True}, {}):  # a literal without a literal form: ":p"
        try:
            return str(expression.compile(dialect=dialect, compile_kwargs=options))
        except Exception as exc:  # noqa: BLE001, PERF203 - any failure: try the next form
            log.debug("column_property %r does not compile with %s: %s", expression, options, exc)
    # a construct Postgres cannot compile (another dialect's): its class, stable at least
    return f"uncompiled:{type(expression).__qualname__}"


def model_schema_hash(table: Table, props: Sequence[ColumnProperty[Any]]) -> str:
    """The schema hash of a class's entity entries (and write-behind states): the
    table's (:func:`table_schema_hash`) when the class maps exactly the table's columns,
    else a hash of that and of what each stored position holds: a column's name,
    or a ``column_property`` expression's SQL and type.

    An entity entry holds the mapped values by position. Two versions of a class that
    map one table alike but compute a ``column_property`` differently (``qty + 1``, then
    ``qty * 100``), or leave out different columns (``exclude_properties``), would
    otherwise read each other's entries as their own rows during a rolling deploy.

    Example::

        >>> from sqlalchemy import Column, Integer, MetaData, Table
        >>> t = Table("t", MetaData(), Column("id", Integer))
        >>> model_schema_hash(t, []) != table_schema_hash(t)
        True
    """
    base = table_schema_hash(table)
    parts = [base]
    for p in props:
        column = p.columns[0]
        if isinstance(column, Column) and column.table is table:
            parts.append(column.name)
            continue
        try:
            type_text = type_fingerprint(column.type)
        except UncacheableType:
            type_text = f"uncacheable:{type(column.type).__qualname__}"
        parts.append(f"={p.key}:{_expression_text(column)}:{type_text}")
    if sorted(parts[1:]) == sorted(c.name for c in table.columns):
        # the usual case, in whatever order the mapper lists them: the keys (and queued
        # write-behind operations) of every earlier release stay valid
        return base
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()


class Inexact(Exception):
    """Postgres would return something else than this value, in a way we cannot predict."""


def _jsonb(value: Any) -> Any:
    """The document as JSONB gives it back: keys by length then bytes, numbers as numeric."""
    if isinstance(value, float):
        if not math.isfinite(value) or "e" in repr(value):
            raise Inexact("JSONB rewrites this number")  # 1e16 comes back as an int
        return value
    if isinstance(value, dict):
        ordered = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return {k: _jsonb(value[k]) for k in ordered}
    if isinstance(value, list):
        return [_jsonb(v) for v in value]
    return value


def _plain_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise Inexact("JSON cannot hold this number")
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _refuse(_value: Any, _tz: tzinfo | None) -> Any:
    raise Inexact("the database rewrites values of this type")


Normalizer = Callable[[Any, "tzinfo | None"], Any]

_DIALECT: list[Dialect] = []


def postgres_dialect() -> Dialect:
    """The dialect a ``TypeDecorator`` is asked about: the one the library writes to.

    Example::

        >>> postgres_dialect().name
        'postgresql'
    """
    if not _DIALECT:
        _DIALECT.append(postgresql.dialect())  # type: ignore[no-untyped-call]  # untyped in SA
    return _DIALECT[0]


def _overrides(t: TypeDecorator[Any], name: str) -> bool:
    return getattr(type(t), name) is not getattr(TypeDecorator, name)


def _decorator_normalizer(t: TypeDecorator[Any]) -> Normalizer | None:
    """A TypeDecorator's values come back as its impl's do, through its own hooks.

    The value Postgres stores is ``process_bind_param(value)`` as the impl stores it; a
    load gives ``process_result_value`` of what the impl returns. A decorator that changes
    neither (SQLModel's ``AutoString``) normalises as its impl; one with the documented
    hooks is run through them; one that replaces the low-level ``bind_processor`` or
    ``result_processor`` is not predicted (:class:`Inexact`).
    """
    if _overrides(t, "bind_processor") or _overrides(t, "result_processor"):
        return _refuse
    dialect = postgres_dialect()
    impl = t.load_dialect_impl(dialect)
    inner = write_normalizer(impl) if impl is not t else None
    binds = _overrides(t, "process_bind_param")
    results = _overrides(t, "process_result_value")
    if not binds and not results:
        return inner

    def through(value: Any, tz: tzinfo | None) -> Any:
        try:
            stored = t.process_bind_param(value, dialect) if binds else value
            if stored is not None and inner is not None:
                stored = inner(stored, tz)
            return t.process_result_value(stored, dialect) if results else stored
        except Inexact:
            raise
        except Exception as exc:  # the application's hook: any error means "unknown"
            raise Inexact(f"{type(t).__name__} raised {exc!r}") from exc

    return through


def write_normalizer(sqltype: TypeEngine[Any]) -> Normalizer | None:
    """How a value assigned in Python comes back from Postgres, for write-through.

    Write-through caches the state a flush wrote without reading it back, so the value
    must be the one the database will return: a Numeric is rounded to its scale, a JSONB
    document gets JSONB's key order, a timestamptz comes back in the connection's time
    zone (``tz``), a TypeDecorator's value goes through its ``process_bind_param`` and
    ``process_result_value`` around its impl's rule. Raises :class:`Inexact` when that
    cannot be predicted (a JSONB float in exponent form, a REAL, a padded CHAR, a
    TypeDecorator with its own low-level processors); None when values come back
    unchanged.

    Example::

        >>> from sqlalchemy import Numeric
        >>> write_normalizer(Numeric(10, 2))(Decimal("1.5"), None)
        Decimal('1.50')
    """
    if isinstance(sqltype, TypeDecorator):
        return _decorator_normalizer(sqltype)
    if isinstance(sqltype, sqltypes.Numeric) and not isinstance(sqltype, sqltypes.Float):
        scale = sqltype.scale
        if scale is None or not sqltype.asdecimal:
            return None
        quantum = Decimal(1).scaleb(-scale)

        def numeric(value: Any, _tz: tzinfo | None) -> Any:
            if not isinstance(value, Decimal) or not value.is_finite():
                raise Inexact("not a finite Decimal")
            return value.quantize(quantum, rounding=ROUND_HALF_UP)

        return numeric
    if isinstance(sqltype, sqltypes.Float):
        return _refuse if sqltype.precision is not None and sqltype.precision <= 24 else None
    if isinstance(sqltype, JSONB):
        return lambda value, _tz: _jsonb(value)
    if isinstance(sqltype, sqltypes.JSON):
        return lambda value, _tz: _plain_json(value)
    if isinstance(sqltype, sqltypes.DateTime) and sqltype.timezone:

        def timestamptz(value: Any, tz: tzinfo | None) -> Any:
            if tz is None or not isinstance(value, datetime) or value.utcoffset() is None:
                raise Inexact("the connection's time zone is not known")
            return value.astimezone(tz)

        return timestamptz
    if isinstance(sqltype, sqltypes.DateTime):

        def timestamp(value: Any, tz: tzinfo | None) -> Any:
            # an aware value is sent as a timestamptz, which Postgres stores in a timestamp
            # column as its wall time in the connection's time zone: naive, as it is read
            if not isinstance(value, datetime) or value.utcoffset() is None:
                return value
            if tz is None:
                raise Inexact("the connection's time zone is not known")
            return value.astimezone(tz).replace(tzinfo=None)

        return timestamp
    if isinstance(sqltype, sqltypes.CHAR) and not isinstance(sqltype, sqltypes.VARCHAR):
        return _refuse
    return None


class PrimaryKeyTypeError(ValueError):
    """A primary key value that cannot be read as its column's type (``"abc"`` for an int)."""


Coercer = Callable[[Any], Any]


def _as_int(value: Any) -> int:
    if isinstance(value, str):
        return int(value)  # Postgres reads ' 7 ' and '+7' as 7 too; int() refuses '7.5'
    if isinstance(value, float | Decimal) and value == int(value):
        return int(value)  # 7.0 = 7 in Postgres: the same row
    raise TypeError


def _as_decimal(scale: int | None) -> Coercer:
    def coerce(value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
            raise TypeError
        number = Decimal(value)
        if scale is not None:
            rounded = number.quantize(Decimal(1).scaleb(-scale))
            if rounded != number:
                raise TypeError  # 7.005 in a NUMERIC(10, 2) key matches no row
            number = rounded
        return number

    return coerce


def _as_uuid(value: Any) -> uuid.UUID:
    if isinstance(value, str):
        return uuid.UUID(value)
    raise TypeError


def has_equal_forms(sqltype: TypeEngine[Any]) -> bool:
    """Whether Postgres may take two different values of ``sqltype`` for the same key:
    ``CHAR(n)`` pads (``'ab'`` is ``'ab   '``), ``citext`` and a column collation may fold
    case. A row of such a key is cached under the form a load gives, which the
    application's own form may not be.

    Example::

        >>> from sqlalchemy import CHAR, String
        >>> has_equal_forms(CHAR(5)), has_equal_forms(String(5))
        (True, False)
    """
    if isinstance(sqltype, TypeDecorator):
        impl = sqltype.load_dialect_impl(postgres_dialect())
        return impl is not sqltype and has_equal_forms(impl)
    if isinstance(sqltype, CHAR | NCHAR) or "CITEXT" in type(sqltype).__name__.upper():
        return True
    return isinstance(sqltype, String) and sqltype.collation is not None


def pk_coercer(sqltype: TypeEngine[Any]) -> Coercer:
    """A function turning a primary key value into the value the ORM loads for its column.

    ``session.get(User, "0b1c...")`` works with a ``str`` for a UUID column: Postgres casts
    it. The cache must key the row by the value a load gives (``UUID('0b1c...')``), or the
    entry of a read would never be found again. A value of the column's Python type is
    kept; a string, or an integral number, is read as the column's type where Postgres
    would read it alike (int, UUID, Decimal, Enum names); a TypeDecorator's value goes
    through its ``process_bind_param`` and ``process_result_value``. Anything else raises
    ``TypeError`` or ``ValueError``.

    Example::

        >>> from sqlalchemy import Integer, Uuid
        >>> pk_coercer(Uuid())("00000000-0000-0000-0000-000000000001")
        UUID('00000000-0000-0000-0000-000000000001')
        >>> pk_coercer(Integer())("7")
        7
    """
    if isinstance(sqltype, TypeDecorator) and not (
        _overrides(sqltype, "bind_processor") or _overrides(sqltype, "result_processor")
    ):
        dialect = postgres_dialect()
        impl = sqltype.load_dialect_impl(dialect)
        inner = pk_coercer(impl) if impl is not sqltype else _keep
        binds = _overrides(sqltype, "process_bind_param")
        results = _overrides(sqltype, "process_result_value")
        if not binds and not results:
            return inner
        decorator = sqltype

        def through(value: Any) -> Any:
            stored = decorator.process_bind_param(value, dialect) if binds else value
            stored = inner(stored)
            return decorator.process_result_value(stored, dialect) if results else stored

        return through
    try:
        expected: Any = sqltype.python_type
    except NotImplementedError:
        return _keep
    convert: Coercer | None = None
    if expected is int:
        convert = _as_int
    elif expected is uuid.UUID:
        convert = _as_uuid
    elif expected is Decimal:
        scale = getattr(sqltype, "scale", None)
        convert = _as_decimal(scale if isinstance(scale, int) else None)
    elif isinstance(expected, type) and issubclass(expected, Enum):
        enum_class = expected

        def convert(value: Any) -> Any:
            return enum_class[value]

    def coerce(value: Any) -> Any:
        if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
            return value
        if convert is None or isinstance(value, bool):
            raise TypeError
        return convert(value)

    return coerce


def _keep(value: Any) -> Any:
    return value


def _not_null(value: Any) -> Any:
    if value is None:
        raise TypeError("no row has a NULL primary key")
    return value


class UncacheableModelWarning(UserWarning):
    """A model has a column whose values the codec cannot round-trip exactly."""


@dataclass(slots=True)
class ModelInfo:
    """Per-mapper facts the read and write paths need on every call.

    ``column_keys`` are the mapped column attributes stored for each object, in order;
    ``codec`` encodes their values; ``pk_positions`` locate the primary key among them.
    """

    mapper: Mapper[Any]
    policy: CachePolicy | None
    table: str
    schema_hash: str
    # the schema the table is declared in (None: the connection's default); the one rows
    # are read from is this one after the bind's schema_translate_map
    table_schema: str | None
    column_keys: tuple[str, ...]
    pk_positions: tuple[int, ...]
    codec: RowCodec | None
    uncacheable_reason: str | None = None
    relationship_keys: frozenset[str] = field(default_factory=frozenset)
    # relationships the mapper loads eagerly (relationship(lazy="selectin"...)): a
    # primary-key load served from an entity entry loads them after building the object
    eager_keys: tuple[str, ...] = ()
    normalizers: tuple[tuple[int, Normalizer], ...] = ()
    pk_coercers: tuple[Coercer, ...] = ()
    # a primary-key column's type takes different values for one key (has_equal_forms):
    # cache.invalidate() cannot name the row's entry, and retires the table's
    pk_equal_forms: bool = False
    # what each of ``column_keys`` reads: the column's name, or ``=key`` for an expression
    # (``column_property``); an entity entry holds these values by position
    layout: tuple[str, ...] = ()
    # why an entity entry cannot stand for the model's loaded object (entity_unfit), or
    # None; the entity cache then skips the model
    entity_unfit: str | None = None
    # the model's scope in ``cache.stats()`` (``model:<class>``): every read counts under
    # it, and the class's name does not change
    scope: str = field(init=False, repr=False, compare=False)
    # the metadata of a primary-key load's result (compat.entity_result_metadata)
    result_metadata: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scope = scope("model", self.mapper.class_.__name__)
        self.result_metadata = compat.entity_result_metadata(self.mapper.class_)

    def as_stored(self, values: list[Any], tz: tzinfo | None) -> list[Any]:
        """``values`` as Postgres will return them (see :func:`write_normalizer`).

        Raises :class:`Inexact`, naming the column, when that cannot be predicted.
        """
        for i, normalize in self.normalizers:
            if values[i] is not None:
                try:
                    values[i] = normalize(values[i], tz)
                except Inexact as exc:
                    raise Inexact(f"{self.column_keys[i]}: {exc}") from exc
        return values

    def coerce_pk(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """The primary key as the ORM loads it, each value read through its column's type.

        Every place that names a row in a key calls this (the entity cache's reads,
        write-behind's queued states, the flush marks, ``cache.invalidate``): a key built
        from ``"7"`` where loads give ``7`` would name another entry, never found again.
        Raises :class:`PrimaryKeyTypeError` (a ``ValueError``) naming the column and the
        fix when a value cannot be read as its column's type (:func:`pk_coercer`).

        Example::

            info.coerce_pk(("0b1c2d3e-...",))  # (UUID('0b1c2d3e-...'),)
        """
        if len(values) != len(self.pk_positions):
            name = self.mapper.class_.__name__
            raise PrimaryKeyTypeError(
                f"{name} has a primary key of {len(self.pk_positions)} column(s); got "
                f"{len(values)} value(s)"
            )
        out: list[Any] = []
        value = None
        try:
            for coerce, value in zip(self.pk_coercers, values, strict=True):
                out.append(coerce(_not_null(value)))
        except (TypeError, ValueError, KeyError, ArithmeticError) as exc:
            key = self.column_keys[self.pk_positions[len(out)]]
            name = f"{self.mapper.class_.__name__}.{key}"
            column = self.mapper.get_property(key).columns[0]
            raise PrimaryKeyTypeError(
                f"{name} is a {column.type} column; {value!r} ({type(value).__name__}) "
                "cannot be read as one. Pass the primary key as the ORM loads it"
            ) from exc
        return tuple(out)

    @property
    def local(self) -> bool:
        """May the local tier keep this model's rows and the queries on its table?

        Not for write-behind models: their newest state may be a queued one in Redis.
        """
        policy = self.policy
        return policy is None or (policy.local and policy.strategy != "write_behind")

    @property
    def entity_cached(self) -> bool:
        """True when ``session.get`` and many-to-one lazy loads read the entity cache."""
        return (
            self.policy is not None
            and self.policy.entity_cache
            and self.codec is not None
            and self.mapper.inherits is None
            and self.mapper.polymorphic_on is None
            and self.entity_unfit is None
        )


def clause_tables(clause: Any) -> tuple[list[Table], bool]:
    """The tables a SQL ``clause`` reads, and whether it holds a subquery.

    Example::

        clause_tables(Child.parent_id == Parent.id)  # ([children, parents], False)
    """
    tables: dict[str, Table] = {}
    subquery = False
    for element in visitors.iterate(clause):
        subquery |= isinstance(element, SelectBase)
        table = element.table if isinstance(element, ColumnClause) else element
        if isinstance(table, Table):
            tables[table.fullname] = table
    return list(tables.values()), subquery


def expression_reads(mapper: Mapper[Any]) -> tuple[list[Table], bool]:
    """What ``mapper``'s SQL-expression attributes (``column_property(select(...))``,
    ``column_property(a + b)``) read: their tables, and whether any reads rows other than
    the object's own (a subquery, or a column of a table the mapper does not map).

    Every load of the mapper reads them, though no statement that loads it names them.

    Example::

        Parent.child_count = column_property(select(func.count(Child.id))...)
        expression_reads(inspect(Parent))  # ([children, parents], True)
    """
    own = set(mapper.tables)
    tables: dict[str, Table] = {}
    other_rows = False
    for prop in mapper.column_attrs:
        for expression in prop.columns:
            if isinstance(expression, Column):
                continue
            found, subquery = clause_tables(expression)
            other_rows |= subquery or any(t not in own for t in found)
            tables.update((t.fullname, t) for t in found)
    return list(tables.values()), other_rows


# relationship(lazy=...) strategies that load the target with the parent's statement
# (lazy=False is SQLAlchemy's old spelling of "joined")
EAGER_LOADS = frozenset({"joined", "selectin", "subquery", "immediate", False})
JOINED_LOADS = frozenset({"joined", False})


def entity_unfit(mapper: Mapper[Any]) -> str | None:
    """Why an entity entry (one row of one table, retired by that row's writes) cannot
    stand for what a primary-key load of ``mapper`` gives, else None.

    Example::

        entity_unfit(inspect(Parent))  # "has a column_property that reads other rows"
    """
    if not isinstance(mapper.local_table, Table):
        # a class over a join or a select: no one table's counters cover its rows
        return "is mapped over a join or a select"
    if expression_reads(mapper)[1]:
        # their writes move neither the row's write counter nor the table's generation
        return "has a column_property that reads other rows"
    nested = sorted(
        r.key
        for r in mapper.relationships
        if r.lazy in EAGER_LOADS and any(eager_keys(m) for m in r.mapper.self_and_descendants)
    )
    if nested:
        # a hit loads them by their lazy loaders (hydrate.load_eager), which leave what
        # SQLAlchemy's eager loaders would load below them, by rules of their own
        # (reverse relationships, join_depth), unloaded
        return (
            f"loads {', '.join(nested)} eagerly (relationship(lazy=...)), and their model "
            "loads relationships eagerly in turn"
        )
    inner = sorted(r.key for r in mapper.relationships if r.lazy in JOINED_LOADS and r.innerjoin)
    if inner:
        # the load's INNER JOIN finds no row when the relationship is empty: the object
        # does not exist for a primary-key load, though its row does
        return f"loads {', '.join(inner)} with an inner join (relationship(innerjoin=True))"
    return None


def eager_keys(mapper: Mapper[Any]) -> tuple[str, ...]:
    """The relationships ``mapper`` loads with every load of its objects, by name."""
    return tuple(sorted(r.key for r in mapper.relationships if r.lazy in EAGER_LOADS))


def build_model_info(mapper: Mapper[Any], policy: CachePolicy | None) -> ModelInfo:
    """Describe ``mapper`` for the cache; warn (once) when a column makes it uncacheable."""
    props = [p for p in mapper.column_attrs if isinstance(p, ColumnProperty)]
    column_keys = tuple(p.key for p in props)
    pk_props = [mapper.get_property_by_column(col) for col in mapper.primary_key]
    pk_positions = tuple(column_keys.index(p.key) for p in pk_props)
    local = mapper.local_table
    table = local if isinstance(local, Table) else None
    codec: RowCodec | None = None
    reason: str | None = None  # why the rows are not cached, and what would let them be
    fix = ""
    name = mapper.class_.__name__
    if type(mapper.class_manager) is not ClassManager:
        # hydrate reads and builds objects through their __dict__, as SQLAlchemy's own
        # instrumentation keeps them (docs/decisions.md)
        reason = f"{name} has a custom instrumentation manager (sqlalchemy.ext.instrumentation)"
        fix = (
            "The cache reads and builds objects as SQLAlchemy's default instrumentation "
            "keeps them: map the class without __sa_instrumentation_manager__"
        )
    else:
        try:
            codec = RowCodec([p.columns[0].type for p in props])
        except UncacheableType as exc:
            reason = f"{name}: {exc}"
            fix = "Give the column a type the codec round-trips exactly"
    if reason is not None:
        warnings.warn(
            f"{reason}; rows of {name} will not be cached. {fix}, or leave the model "
            "without a CachePolicy.",
            UncacheableModelWarning,
            stacklevel=3,
        )
    return ModelInfo(
        mapper=mapper,
        policy=policy,
        table=table.fullname if table is not None else mapper.class_.__name__,
        schema_hash=model_schema_hash(table, props) if table is not None else "x",
        table_schema=table.schema if table is not None else None,
        column_keys=column_keys,
        pk_positions=pk_positions,
        codec=codec,
        uncacheable_reason=reason,
        relationship_keys=frozenset(r.key for r in mapper.relationships),
        eager_keys=eager_keys(mapper),
        layout=tuple(
            c.name if isinstance(c := p.columns[0], Column) else f"={p.key}" for p in props
        ),
        normalizers=tuple(
            (i, normalize)
            for i, p in enumerate(props)
            if (normalize := write_normalizer(p.columns[0].type)) is not None
        ),
        pk_coercers=tuple(pk_coercer(props[p].columns[0].type) for p in pk_positions),
        pk_equal_forms=any(has_equal_forms(props[p].columns[0].type) for p in pk_positions),
        entity_unfit=entity_unfit(mapper),
    )


def mapper_of(cls: type) -> Mapper[Any] | None:
    """The mapper of ``cls``, or None when it is not mapped."""
    insp: Any = inspect(cls, raiseerr=False)
    return insp if isinstance(insp, Mapper) else None


def mapper_name(mapper: Mapper[Any]) -> str:
    """The process-independent name of a mapper: its class's module and qualified name."""
    cls = mapper.class_
    return f"{cls.__module__}.{cls.__qualname__}"


def all_mappers() -> list[Mapper[Any]]:
    """Every mapper of every declarative registry in this process.

    Classes of a registry that have no mapper (a DeferredReflection class before
    ``prepare()``, the remains of a class whose mapping failed) are skipped.
    """
    return [m for m in compat.registered_classes()[0] if isinstance(m, Mapper)]


def metadata_tables() -> set[str]:
    """The ``fullname`` of every table in the ``MetaData`` of every mapped class.

    Wider than the tables the mappers name: a table declared beside the models that no
    class maps nor any relationship names as its ``secondary``.

    Example::

        "audit_log" in metadata_tables()  # declared on Base.metadata, mapped by nobody
    """
    names: set[str] = set()
    for metadata in {
        id(m.local_table.metadata): m.local_table.metadata
        for m in all_mappers()
        if isinstance(m.local_table, Table)
    }.values():
        names.update(metadata.tables)
    return names


# Bumped whenever a mapper is made or configured anywhere in the process, so that the
# tables a registry lists include models defined after its first look (a plugin
# imported late, a test's models); SQLAlchemy's own events, so no polling
_MAPPERS_CHANGED = [0]


def _mappers_changed(*_: Any) -> None:
    _MAPPERS_CHANGED[0] += 1


event.listen(Mapper, "after_mapper_constructed", _mappers_changed)
event.listen(Mapper, "mapper_configured", _mappers_changed)


def mappers_changed() -> int:
    """A number that moves whenever a mapper is made or configured in the process: what
    was worked out from the mappers before it moved may be out of date."""
    return _MAPPERS_CHANGED[0]


def shared_table_problems(infos: Iterable[ModelInfo]) -> list[str]:
    """Classes whose rows the entity cache would mix up: entity-cached models of one table
    that map different columns of it.

    An entity entry holds the mapped columns' values by position, under a key that names
    the table and the row, not the class, so each class would read the other's entries:
    as foreign when they map different numbers of columns (deleted and read again, each
    class in turn), and with values in the wrong attributes when they map as many columns
    of the same types. Classes mapping the same columns share entries safely.

    Example::

        shared_table_problems(infos)   # [] unless two layouts of one table are cached
    """
    by_table: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for info in infos:
        if info.entity_cached:
            layouts = by_table.setdefault(info.table, {})
            layouts.setdefault(info.layout, []).append(info.mapper.class_.__name__)
    problems = []
    for table, layouts in sorted(by_table.items()):
        if len(layouts) < 2:
            continue
        described = "; ".join(
            f"{', '.join(sorted(names))} map{'s' if len(names) == 1 else ''} ({', '.join(layout)})"
            for layout, names in sorted(layouts.items(), key=lambda item: sorted(item[1]))
        )
        problems.append(
            f"table {table!r} is kept in the entity cache by classes that map different "
            f"columns of it ({described}): they share its entity entries, and one would read "
            "the other's rows. Give all but one layout CachePolicy(entity_cache=False), or "
            "map the same columns in each"
        )
    return problems


class KnownTables:
    """The full names of a set of tables, indexed by their bare names (schema left off).

    One index answers every "which known tables may this name be" question: a
    ``schema_translate_map`` may put a table declared in one schema (or in none) in any
    other, so a name alone is what a write and a model's table can be matched on.

    Example::

        known = KnownTables(["products", "tenant_a.Accounts", "per_tenant.accounts"])
        known.named("accounts")  # frozenset({'per_tenant.accounts'})
        known.named("accounts", fold_case=True)  # both accounts tables
    """

    __slots__ = ("_exact", "_folded", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: list[str] = sorted(set(names))
        exact: dict[str, set[str]] = {}
        folded: dict[str, set[str]] = {}
        for full in self.names:
            bare = full.rpartition(".")[2]
            exact.setdefault(bare, set()).add(full)
            folded.setdefault(bare.lower(), set()).add(full)
        self._exact = {bare: frozenset(fulls) for bare, fulls in exact.items()}
        self._folded = {bare: frozenset(fulls) for bare, fulls in folded.items()}

    def named(self, name: str, *, fold_case: bool = False) -> frozenset[str]:
        """The tables called ``name`` in any schema; with ``fold_case``, whatever the case
        of their declared names (``name`` lower case, as the database reads an unquoted
        identifier: a mixed-case declared name that SQLAlchemy quotes is matched too)."""
        return (self._folded if fold_case else self._exact).get(name, frozenset())


class ModelRegistry:
    """The :class:`ModelInfo` of every mapper the cache has met, by mapper, name and table.

    Example::

        registry = ModelRegistry()
        registry.info_of(Product.__mapper__).table  # 'products'
    """

    def __init__(self) -> None:
        self.infos: dict[Mapper[Any], ModelInfo] = {}
        self.by_name: dict[str, ModelInfo] = {}
        self.by_table: dict[str, ModelInfo] = {}
        self.entity_infos: dict[Mapper[Any], ModelInfo] = {}
        self._schema_hashes: dict[str, str] = {}
        self._known: tuple[int, KnownTables] | None = None
        # set by the cache's first attach(): a class mapped after it is checked on first sight
        self.admit: Callable[[Mapper[Any], object], ModelInfo] | None = None

    def register(self, mapper: Mapper[Any], policy: CachePolicy | None) -> ModelInfo:
        """Describe ``mapper`` under ``policy`` and index it."""
        return self.add(build_model_info(mapper, policy))

    def add(self, info: ModelInfo) -> ModelInfo:
        """Index ``info`` (made by :func:`build_model_info`)."""
        mapper = info.mapper
        self.infos[mapper] = info
        self.by_name[mapper_name(mapper)] = info
        self.by_table.setdefault(info.table, info)
        if info.entity_cached:
            self.entity_infos[mapper] = info
        return info

    def info_of(self, mapper: Mapper[Any]) -> ModelInfo:
        """The info of ``mapper``, registered on first sight with its ``__cache__`` policy;
        after the cache's first ``attach()``, once the policy passes ``attach()``'s checks
        (:class:`ConfigurationError` otherwise: :mod:`sa_redis_cache.admission`)."""
        info = self.infos.get(mapper)
        if info is None:
            policy = getattr(mapper.class_, "__cache__", None)
            if self.admit is not None:
                return self.add(self.admit(mapper, policy))
            info = self.register(mapper, policy if isinstance(policy, CachePolicy) else None)
        return info

    def info_by_name(self, name: str) -> ModelInfo | None:
        """The info of the mapper called ``name`` (see :func:`mapper_name`), if it exists here."""
        info = self.by_name.get(name)
        if info is None:
            for mapper in all_mappers():
                if mapper_name(mapper) == name:
                    return self.info_of(mapper)
        return info

    def known_tables(self) -> list[str]:
        """Every table of every mapper in the process (with association tables), sorted."""
        return self.known().names

    def known(self) -> KnownTables:
        """Every table of every mapper in the process (with association tables), indexed by
        name. Computed again after a mapper was made or configured since the last call."""
        seen = _MAPPERS_CHANGED[0]
        known = self._known
        if known is None or known[0] != seen:
            names: set[str] = set()
            for mapper in all_mappers():
                names.update(t.fullname for t in mapper.tables if isinstance(t, Table))
                names.update(
                    r.secondary.fullname
                    for r in mapper.relationships
                    if isinstance(r.secondary, Table)
                )
            known = self._known = (seen, KnownTables(names))
        return known[1]

    def written_as(self, table: TableClause) -> set[str]:
        """The tables DML on ``table`` (a ``Table`` object, mapped or not, or a lightweight
        ``table()`` naming one) may write: its own,
        and every known table of its name in any schema. A ``schema_translate_map`` may put
        a model declared without a schema, or in SQLAlchemy's placeholder schema
        (``schema="per_tenant"``), in ``table``'s schema: an ``update()`` of a ``Table`` in a
        tenant's schema writes that model's rows. Retiring a same-named table of an
        unrelated schema costs misses; missing the model's would serve stale rows."""
        return {table.fullname, *self.known().named(table.name)}

    def aliases_of(self, tables: Iterable[str]) -> set[str]:
        """The known tables other than ``tables`` (full names) with the name of one of them:
        under a ``schema_translate_map`` they may be the same table (a model of it without a
        schema and another in the tenant's schema), so a write of one writes the others'
        rows, under keys the write does not name. Usually none."""
        known = self.known()
        found: set[str] = set()
        for table in tables:
            found |= known.named(table.rpartition(".")[2])
        return found.difference(tables)

    def table_schema(self, table: Table) -> str:
        """The memoised :func:`table_schema_hash` of ``table``."""
        found = self._schema_hashes.get(table.fullname)
        if found is None:
            found = self._schema_hashes[table.fullname] = table_schema_hash(table)
        return found
