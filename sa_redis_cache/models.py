"""What the cache knows about each mapped class and table, computed once at ``attach()``."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, inspect
from sqlalchemy.orm import ColumnProperty, Mapper, mapperlib

from .codec import CODEC_VERSION, RowCodec, UncacheableType, type_fingerprint
from .policy import CachePolicy


def table_schema_hash(table: Table) -> str:
    """A short hash of a table's column names and types, plus the codec version.

    A deploy that changes a model changes this hash, so old-shaped entries are never read.

    Example::

        >>> len(table_schema_hash(Product.__table__))
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
    column_keys: tuple[str, ...]
    pk_positions: tuple[int, ...]
    codec: RowCodec | None
    uncacheable_reason: str | None = None
    relationship_keys: frozenset[str] = field(default_factory=frozenset)

    @property
    def entity_cached(self) -> bool:
        """True when ``session.get`` and many-to-one lazy loads read the entity cache."""
        return (
            self.policy is not None
            and self.policy.entity_cache
            and self.codec is not None
            and self.mapper.inherits is None
            and self.mapper.polymorphic_on is None
        )


def build_model_info(mapper: Mapper[Any], policy: CachePolicy | None) -> ModelInfo:
    """Describe ``mapper`` for the cache; warn (once) when a column makes it uncacheable."""
    props = [p for p in mapper.column_attrs if isinstance(p, ColumnProperty)]
    column_keys = tuple(p.key for p in props)
    pk_props = [mapper.get_property_by_column(col) for col in mapper.primary_key]
    pk_positions = tuple(column_keys.index(p.key) for p in pk_props)
    local = mapper.local_table
    table = local if isinstance(local, Table) else None
    codec: RowCodec | None
    reason: str | None = None
    try:
        codec = RowCodec([p.columns[0].type for p in props])
    except UncacheableType as exc:
        codec = None
        reason = f"{mapper.class_.__name__}: {exc}"
        warnings.warn(
            f"{reason}; rows of {mapper.class_.__name__} will not be cached. Give the column "
            "a type the codec round-trips exactly, or leave the model without a CachePolicy.",
            UncacheableModelWarning,
            stacklevel=3,
        )
    return ModelInfo(
        mapper=mapper,
        policy=policy,
        table=table.fullname if table is not None else mapper.class_.__name__,
        schema_hash=table_schema_hash(table) if table is not None else "x",
        column_keys=column_keys,
        pk_positions=pk_positions,
        codec=codec,
        uncacheable_reason=reason,
        relationship_keys=frozenset(r.key for r in mapper.relationships),
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
    """Every mapper of every declarative registry in this process."""
    registries = list(mapperlib._mapper_registries)
    return [mapper for registry in registries for mapper in registry.mappers]


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
        self._known_tables: list[str] | None = None

    def register(self, mapper: Mapper[Any], policy: CachePolicy | None) -> ModelInfo:
        """Describe ``mapper`` under ``policy`` and index it."""
        info = build_model_info(mapper, policy)
        self.infos[mapper] = info
        self.by_name[mapper_name(mapper)] = info
        self.by_table.setdefault(info.table, info)
        if info.entity_cached:
            self.entity_infos[mapper] = info
        return info

    def info_of(self, mapper: Mapper[Any]) -> ModelInfo:
        """The info of ``mapper``, registered on first sight with its ``__cache__`` policy."""
        info = self.infos.get(mapper)
        if info is None:
            policy = getattr(mapper.class_, "__cache__", None)
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
        if self._known_tables is None:
            names: set[str] = set()
            for mapper in all_mappers():
                names.update(t.fullname for t in mapper.tables if isinstance(t, Table))
                names.update(
                    r.secondary.fullname
                    for r in mapper.relationships
                    if isinstance(r.secondary, Table)
                )
            self._known_tables = sorted(names)
        return self._known_tables

    def table_schema(self, table: Table) -> str:
        """The memoised :func:`table_schema_hash` of ``table``."""
        found = self._schema_hashes.get(table.fullname)
        if found is None:
            found = self._schema_hashes[table.fullname] = table_schema_hash(table)
        return found
