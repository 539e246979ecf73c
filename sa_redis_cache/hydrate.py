"""Turning ORM results into cache payloads and back: the one module that uses SQLAlchemy internals.

A hit must give what the uncached query gives, with no SQL, and fast. Merging a frozen
result (the dogpile recipe) runs ``Session.merge`` per object and costs more than the
query itself; instead, objects are built straight into instance state and the session's
identity map, the way SQLAlchemy's own loader (``orm/loading.py``) does. Everything here
that touches a private SQLAlchemy name is kept in this module, and the test suite runs
against SQLAlchemy 2.0.x and 2.1.x.

Payload of an ORM result (plain JSON-able lists, encoded by :mod:`sa_redis_cache.codec`)::

    [keys, single, mapper_names, objects, rows]
    objects: [[mapper_index, column_values, missing_or_0, relationships_or_0], ...]
    rows:    single entity -> [object_index, ...]
             otherwise     -> [[entity object indices...], [scalar values...]], ...

Objects are stored once per identity (joined eager loads repeat parents), and
relationships refer to object indices, so cycles and shared many-to-one targets survive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm import context as orm_context
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.sql.selectable import SelectState

from .models import ModelInfo, mapper_name

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm.state import InstanceState

    from .codec import RowCodec

MapperLookup = Callable[[str], ModelInfo | None]
InfoOf = Callable[[Mapper[Any]], ModelInfo]


_NOT_WRITTEN: Any = object()

_ORM_DEFAULT_OPTIONS: Any = getattr(orm_context, "_ORMCompileState", None) or getattr(
    orm_context, "ORMCompileState", None
)


def canonical_statement(statement: Any) -> Any:
    """``statement`` with the compile options it had before its first execution.

    Compiling a select in a Session replaces its ``_compile_options`` in place with the
    ORM's defaults, so a statement derived from it afterwards has another structural key
    than the same statement derived before: the cache key must not depend on that.
    """
    options = getattr(statement, "_compile_options", None)
    defaults = _ORM_DEFAULT_OPTIONS.default_compile_options
    if isinstance(options, defaults) and not vars(options):
        statement = statement._clone()
        statement._compile_options = SelectState.default_select_compile_options
    return statement


def connection_timezone(session: Session) -> Any:
    """The time zone psycopg gives timestamptz values in on this session's connection.

    None when it cannot be told (another driver, no connection yet).
    """
    try:
        dbapi = session.connection().connection.dbapi_connection
    except Exception:  # noqa: BLE001 - any failure just means "unknown", handled as such
        return None
    info = getattr(dbapi, "info", None)
    return getattr(info, "timezone", None)


class NotCacheable(Exception):
    """This result cannot be stored exactly (objects already in the session, odd collections)."""


@dataclass(frozen=True, slots=True)
class RowShape:
    """Which result columns are ORM entities and how the others are encoded."""

    keys: tuple[str, ...]
    single_entity: bool
    entity_positions: tuple[int, ...]
    scalar_positions: tuple[int, ...]
    scalar_codec: RowCodec


def identity_snapshot(session: Session) -> frozenset[Any]:
    """The identity keys present before a statement runs (empty when the map is empty)."""
    identity_map = session.identity_map
    return frozenset(identity_map.keys()) if len(identity_map) else frozenset()


def autoflush_pending(session: Session) -> None:
    """Flush pending changes the way the ORM would before the statement runs."""
    if session.autoflush and not session._is_clean():
        session._autoflush()


def extract(
    rows: Sequence[Any],
    shape: RowShape,
    info_of: InfoOf,
    preexisting: frozenset[Any],
) -> list[Any]:
    """Encode frozen ORM rows as a payload body.

    Raises :class:`NotCacheable` when an object of the graph was already in the session
    before the statement ran (its attributes may predate the versions captured for this
    read) or has a collection that is not a list.
    """
    objects: list[Any] = []
    index: dict[int, int] = {}
    mapper_names: list[str] = []
    mapper_index: dict[str, int] = {}
    pending: list[tuple[int, InstanceState[Any]]] = []

    def ref(obj: object) -> int:
        state = instance_state(obj)
        found = index.get(id(state))
        if found is None:
            found = len(objects)
            index[id(state)] = found
            objects.append(None)
            pending.append((found, state))
        return found

    if shape.single_entity:
        out_rows: list[Any] = [ref(obj) for obj in rows]
    else:
        out_rows = []
        for row in rows:
            entities = [ref(row[p]) if row[p] is not None else None for p in shape.entity_positions]
            scalars = shape.scalar_codec.dump_row([row[p] for p in shape.scalar_positions])
            out_rows.append([entities, scalars])

    while pending:
        position, state = pending.pop()
        if state.key in preexisting or state.modified or state.key is None:
            raise NotCacheable("an object of the result was already in the session")
        info = info_of(state.mapper)
        if info.codec is None:
            raise NotCacheable(f"{state.class_.__name__} has no exact codec")
        name = mapper_name(state.mapper)
        m_idx = mapper_index.get(name)
        if m_idx is None:
            m_idx = mapper_index[name] = len(mapper_names)
            mapper_names.append(name)
        values, missing = _column_values(state.dict, info)
        rels = _relationship_refs(state.dict, info, ref)
        objects[position] = [m_idx, info.codec.dump_row(values), missing or 0, rels or 0]
    return [list(shape.keys), shape.single_entity, mapper_names, objects, out_rows]


def _column_values(dict_: dict[str, Any], info: ModelInfo) -> tuple[list[Any], list[int]]:
    """The object's column values in ``info.column_keys`` order, and which are not loaded."""
    values: list[Any] = []
    missing: list[int] = []
    for i, key in enumerate(info.column_keys):
        if key in dict_:
            values.append(dict_[key])
        else:
            values.append(None)
            missing.append(i)
    return values, missing


def _relationship_refs(
    dict_: dict[str, Any], info: ModelInfo, ref: Callable[[object], int]
) -> dict[str, Any]:
    """Loaded relationships as object indices (None, an index, or a list of indices)."""
    rels: dict[str, Any] = {}
    for key in info.relationship_keys:
        if key in dict_:
            target = dict_[key]
            if target is None:
                rels[key] = None
            elif isinstance(target, list):
                rels[key] = [ref(o) for o in target]
            elif hasattr(target, "_sa_instance_state"):
                rels[key] = ref(target)
            else:
                raise NotCacheable(f"collection {key} is not a list")
    return rels


def extract_entity(
    obj: object | None,
    info: ModelInfo,
    preexisting: frozenset[Any],
    *,
    allow_modified: bool = False,
    as_stored: Any = _NOT_WRITTEN,
) -> Any:
    """Encode one object (or its absence) for the entity cache.

    ``allow_modified`` and ``as_stored`` are for write-through, which encodes the state a
    flush just wrote, normalised as Postgres will return it (``as_stored`` is the
    connection's time zone, see ``ModelInfo.as_stored``).
    """
    if obj is None:
        return None
    assert info.codec is not None
    state = instance_state(obj)
    if not allow_modified and (state.key in preexisting or state.modified):
        raise NotCacheable("the object was already in the session")
    values, missing = _column_values(state.dict, info)
    if as_stored is not _NOT_WRITTEN:
        values = info.as_stored(values, as_stored)
    return [info.codec.dump_row(values), missing or 0]


class _Materializer:
    """Builds objects into one session's identity map."""

    __slots__ = ("identity_map", "loaded", "new_states", "session_id")

    def __init__(self, session: Session) -> None:
        self.identity_map = session.identity_map
        self.session_id = session.hash_key
        self.new_states: list[InstanceState[Any]] = []
        self.loaded: list[tuple[InstanceState[Any], list[str]]] = []

    def object(
        self,
        info: ModelInfo,
        dumped: Sequence[Any],
        missing: Sequence[int] | int,
        values: tuple[Any, ...] | None = None,
    ) -> Any:
        assert info.codec is not None
        mapper = info.mapper
        if values is None:
            values = info.codec.load_row(dumped)
        pk = tuple([values[p] for p in info.pk_positions])
        key = (mapper._identity_class, pk, None)
        identity_map = self.identity_map
        existing = identity_map.get(key)
        column_keys = info.column_keys
        if existing is not None:
            state = instance_state(existing)
            unloaded = state.unloaded
            if unloaded and not state.modified:
                # the uncached query would fill expired or deferred attributes from the row
                absent: set[int] | tuple[()] = set(missing) if isinstance(missing, list) else ()
                keys = [k for i, k in enumerate(column_keys) if k in unloaded and i not in absent]
                dict_ = state.dict
                for i, k in enumerate(column_keys):
                    if k in keys:
                        dict_[k] = values[i]
                self.loaded.append((state, keys))
            return existing
        obj = mapper.class_manager.new_instance()
        state = instance_state(obj)
        dict_ = state.dict
        if isinstance(missing, list) and missing:
            absent = set(missing)
            for i, k in enumerate(column_keys):
                if i not in absent:
                    dict_[k] = values[i]
        else:
            dict_.update(zip(column_keys, values, strict=True))
        state.key = key
        state.identity_token = None
        state.session_id = self.session_id
        identity_map._add_unpresent(state, key)
        self.new_states.append(state)
        return obj

    def finish(self) -> None:
        identity_map = self.identity_map
        for state in self.new_states:
            if state.modified or state.committed_state:
                # a fresh state has nothing to commit unless something touched it
                state._commit_all(state.dict, identity_map)
            load_event = state.manager.dispatch.load
            if load_event:
                # reconstructors and user load listeners run as for a database load;
                # there is no QueryContext on a hit, so they receive None
                load_event(state, None)
        for state, keys in self.loaded:
            state._commit(state.dict, keys)


def rehydrate(
    session: Session, body: Sequence[Any], lookup: MapperLookup, shape: RowShape
) -> Result[Any]:
    """Build the result of a cached ORM query into ``session``.

    Raises ``KeyError``/``ValueError``/``TypeError`` on payloads that do not fit this
    process's models; callers treat those as misses.
    """
    keys, single, mapper_names, objects, rows = body
    infos: list[ModelInfo] = []
    for name in mapper_names:
        info = lookup(name)
        if info is None or info.codec is None:
            raise KeyError(name)
        infos.append(info)
    mat = _Materializer(session)
    made = [mat.object(infos[o[0]], o[1], o[2]) for o in objects]
    new_ids = {id(s) for s in mat.new_states}
    for obj, (_, _, _, rels) in zip(made, objects, strict=True):
        if not rels:
            continue
        state = instance_state(obj)
        fresh = id(state) in new_ids
        dict_ = state.dict
        for key, target in rels.items():
            if not fresh and key in dict_:
                continue  # never overwrite what the session already holds
            if target is None:
                value: Any = None
            elif isinstance(target, list):
                value = [made[i] for i in target]
            else:
                value = made[target]
            set_committed_value(obj, key, value)
    mat.finish()
    if single:
        data: list[Any] = [made[i] for i in rows]
    else:
        data = rows_with_scalars(rows, made, shape, len(keys))
    return make_result(keys, data, single=single)


def rows_with_scalars(
    data: list[Any], made: list[Any], shape: RowShape, width: int
) -> list[tuple[Any, ...]]:
    """Assemble mixed entity/column rows from object indices and encoded scalars."""
    out = []
    for entities, scalars in data:
        row: list[Any] = [None] * width
        for pos, idx in zip(shape.entity_positions, entities, strict=True):
            row[pos] = made[idx] if idx is not None else None
        for pos, value in zip(
            shape.scalar_positions, shape.scalar_codec.load_row(scalars), strict=True
        ):
            row[pos] = value
        out.append(tuple(row))
    return out


def make_result(keys: Sequence[str], data: list[Any], *, single: bool) -> Result[Any]:
    """A result that behaves like the ORM's own for ``scalars()``, ``all()``, ``unique()``."""
    result: IteratorResult[Any] = IteratorResult(SimpleResultMetaData(list(keys)), iter(data))
    result._source_supports_scalars = single
    return result


def rehydrate_entity(
    session: Session, info: ModelInfo, body: Any, pk: tuple[Any, ...]
) -> Result[Any]:
    """Build the result of a primary-key load from an entity entry (``None`` = no row).

    Raises ``ValueError`` when the entry holds another row than ``pk`` (foreign bytes).
    """
    if body is None:
        return make_result([info.mapper.class_.__name__], [], single=True)
    assert info.codec is not None
    values = info.codec.load_row(body[0])
    if tuple(values[p] for p in info.pk_positions) != pk:
        raise ValueError("the entry holds another row")
    mat = _Materializer(session)
    obj = mat.object(info, body[0], body[1], values)
    mat.finish()
    return make_result([info.mapper.class_.__name__], [obj], single=True)


def get_clause_pk(statement: Any, mapper: Mapper[Any], params: Any) -> tuple[Any, ...] | None:
    """The primary key of a ``session.get``/many-to-one lazy load statement, else None.

    Recognised by the ORM's own primary-key criterion object, which both paths reuse.
    """
    where = statement._where_criteria
    if len(where) != 1 or params is None:
        return None
    get_clause, get_params = mapper._get_clause
    clause = where[0]
    # SQLAlchemy 2.1 reuses the criterion; 2.0 uses an annotated copy of it
    if clause is not get_clause and getattr(clause, "_Annotated__element", None) is not get_clause:
        return None
    try:
        return tuple(params[get_params[col].key] for col in mapper.primary_key)
    except (KeyError, TypeError):
        return None
