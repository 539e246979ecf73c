"""Turning command-line text into the exact values keys are built from."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from sa_redis_cache.binds import Binds
from sa_redis_cache.models import ModelInfo, mapper_of
from sa_redis_cache.protocol import pk_text

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.sql.type_api import TypeEngine

    from sa_redis_cache.binds import Database
    from sa_redis_cache.cache import Cache

__all__ = ["RowKeys", "parse_pk", "parse_value", "row_key_in", "row_keys"]


class RowKeys(NamedTuple):
    """One row's keys in every database and schema, each list sorted."""

    entries: list[str]
    """Its entity entries."""
    pending: list[str]
    """Its write-behind pending states."""


def row_keys(cache: Cache, info: ModelInfo, pk: tuple[Any, ...]) -> RowKeys:
    """The keys of one row's entity entries and pending states, in every database and
    schema (one SCAN).

    Entity entries (and pending states) carry the scope (database and schema) they were
    written in, which a process that read nothing cannot compute: the command line finds
    them by pattern. The one place the command line names them without a database URL
    (``inspect`` and ``invalidate`` both ask here). One walk finds both kinds: ``MATCH``
    filters after the server has walked the whole keyspace.

    Example::

        info, pk = parse_pk(cache, Product, ("7",))
        row_keys(cache, info, pk).entries  # ['sarc:shop:{shop:products}:e:40824c7d8343:9f..:7']
    """
    keys, text = cache.keys, pk_text(pk)
    found = RowKeys([], [])
    pattern = keys.row_keys_pattern(info.table, info.schema_hash, text)
    for raw in cache.client.scan_iter(match=pattern, count=1000):
        # the wider pattern matches other keys too, whose bytes may be anything
        key = raw.decode("utf-8", "surrogateescape")
        kind = keys.row_kind(key, info.table, info.schema_hash, text)
        if kind is not None:
            (found.entries if kind == "entity" else found.pending).append(raw.decode())
    found.entries.sort()
    found.pending.sort()
    return found


def row_key_in(
    cache: Cache, info: ModelInfo, pk: tuple[Any, ...], database: Database, schema: str | None
) -> str:
    """The key of one row's entity entry in ``database``, in ``schema`` when the
    application translates the table's schema to it.

    Example::

        row_key_in(cache, info, (7,), settings.database(), None)
    """
    translate = None if schema is None else {info.table_schema: schema}
    scope = Binds().scope(database, info.table_schema, translate)
    return cache.keys.entity_key(info.table, info.schema_hash, scope, pk_text(pk))


def parse_pk(cache: Cache, cls: type, texts: tuple[str, ...]) -> tuple[ModelInfo, tuple[Any, ...]]:
    """The model's info and its primary key parsed from ``texts``, one per column.

    A wrong number of values, or a value that does not fit its column, is a usage error.

    Example::

        info, pk = parse_pk(cache, Product, ("7",))  # pk == (7,)
    """
    mapper = mapper_of(cls)
    assert mapper is not None  # resolve_model returns mapped classes only
    info = cache.inspector.model(cls)
    columns = list(mapper.primary_key)
    attrs = [mapper.get_property_by_column(c).key for c in columns]
    if len(texts) != len(columns):
        raise click.BadParameter(
            f"{cls.__name__} has a primary key of {len(columns)} column(s) "
            f"({', '.join(attrs)}); got {len(texts)} value(s)",
            param_hint="PK",
        )
    values = tuple(
        parse_value(text, column.type, f"{cls.__name__}.{attr}", param_hint="PK")
        for text, column, attr in zip(texts, columns, attrs, strict=True)
    )
    return info, values


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def parse_value(text: str, sqltype: TypeEngine[Any], what: str, *, param_hint: str) -> Any:
    """``text`` as the Python value a column of ``sqltype`` holds (what the ORM loads).

    Keys are built from exact values: ``"7"`` and ``7`` name different entries, so the
    text is converted by the column's type, and refused when it does not fit.

    Example::

        parse_value("7", Product.__table__.c.id.type, "Product.id", param_hint="PK")  # 7
    """
    try:
        python_type: type = sqltype.python_type
    except NotImplementedError:
        return text
    try:
        return _convert(text, python_type)
    except (ValueError, InvalidOperation, KeyError) as exc:
        raise click.BadParameter(
            f"{text!r} is not a valid {python_type.__name__} for {what}", param_hint=param_hint
        ) from exc
    except TypeError as exc:
        raise click.BadParameter(
            f"{what} holds {python_type.__name__} values, which cannot be given on the "
            "command line",
            param_hint=param_hint,
        ) from exc


def _convert(text: str, python_type: type) -> Any:
    if python_type is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(text)
    if python_type is str:
        return text
    if issubclass(python_type, enum.Enum):
        members = python_type.__members__
        if text in members:
            return members[text]
        return python_type(text)
    simple: dict[type, Callable[[str], Any]] = {
        int: int,
        float: float,
        Decimal: Decimal,
        uuid.UUID: uuid.UUID,
        datetime: datetime.fromisoformat,
        date: date.fromisoformat,
        time: time.fromisoformat,
        bytes: bytes.fromhex,
    }
    convert = simple.get(python_type)
    if convert is not None:
        return convert(text)
    if python_type is timedelta:
        return timedelta(seconds=float(text))
    raise TypeError(python_type)
