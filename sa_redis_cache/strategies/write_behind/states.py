"""Object state for write-behind: defaults, foreign keys, and states served or refilled.

The helpers :mod:`.session` applies to ORM objects while it diverts them
from the unit of work and serves their queued states; public SQLAlchemy API only, apart
from what :mod:`sa_redis_cache.hydrate` already encapsulates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Sequence, inspect
from sqlalchemy.orm import UserDefinedOption
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.sql.schema import ColumnDefault

from sa_redis_cache import compat, hydrate
from sa_redis_cache.codec import CodecError, unpack
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.protocol import pk_text

from .ids import ID_BLOCKS

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState, Session

    from sa_redis_cache.models import ModelInfo


class DefaultContext:
    """What a context-sensitive Python default sees: the row's other values so far."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.current_parameters = values

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


def serve(
    orm_context: ORMExecuteState, info: ModelInfo, pk: tuple[Any, ...], values: Any
) -> Result[Any]:
    """The result of a primary-key load from a queued state (``None``: a queued delete)."""
    session = orm_context.session
    name = info.mapper.class_.__name__
    if values is None:
        return compat.make_result([name], [], single=True, metadata=info.result_metadata)
    identity = info.mapper.identity_key_from_primary_key(pk)
    existing = session.identity_map.get(identity)
    if existing is None:
        assert info.codec is not None
        body = [info.codec.dump_row(values), 0]
        result = hydrate.rehydrate_entity(session, info, body, pk)
        built = session.identity_map.get(identity)
        if built is not None:
            _load_eagerly(orm_context, info, built)
        return result
    state = instance_state(existing)
    overwrite = compat.populates_existing(orm_context)
    for key, value in zip(info.column_keys, values, strict=True):
        # attributes with unflushed changes are the session's own; never overwritten
        if key in state.unloaded or (overwrite and key not in state.committed_state):
            set_committed_value(existing, key, value)
    if overwrite:  # populate_existing: the relationships its options load, loaded again
        _load_eagerly(orm_context, info, existing, again=True)
    return compat.make_result([name], [existing], single=True, metadata=info.result_metadata)


def _load_eagerly(
    orm_context: ORMExecuteState, info: ModelInfo, obj: object, *, again: bool = False
) -> None:
    """Load what the load's options ask to load eagerly (``session.get(Author, 1,
    options=[selectinload(Author.posts)])``), as SQLAlchemy's eager loaders would with
    the row: an object built from a queued state had only its columns, and the
    relationship was left to a lazy load that asyncio refuses (``MissingGreenlet``) and
    a closed session cannot run. The object gets the load's options and path first, so
    that nested options (``.selectinload(Post.tags)``) apply to these loads, as to its
    later lazy loads. ``again``: a ``populate_existing`` load of an object the session
    holds, whose relationships the eager loaders would load again."""
    statement: Any = orm_context.statement
    if all(isinstance(o, UserDefinedOption) for o in compat.statement_options(statement)):
        return
    compile_state = compat.loader_compile_state(statement)
    path = compat.loaded_path(statement, inspect(info.mapper))
    state = instance_state(obj)
    compat.stamp_load(state, compat.propagated_options(statement), path)
    for rel in info.mapper.relationships:
        strategy, option = compat.loader_at(rel, compile_state, path)
        if option is None or compat.loader_settings(strategy).get("lazy") not in EAGER:
            continue
        if again:
            orm_context.session.expire(obj, [rel.key])
        if compat.option_has_criteria(option):
            # selectinload(Author.posts.and_(...)): the class's lazy loader knows nothing
            # of the criteria; the per-object one a lazy strategy makes from the option does
            lazy = compat.lazy_select_strategy(rel)
            for _, populate in compat.per_object_lazy_loaders(
                lazy, path, option, info.mapper, compile_state
            ):
                populate(state, state.dict, None)
        getattr(obj, rel.key)  # its lazy load, in the load's own greenlet under asyncio


# the loader strategies that load a relationship with its parent's row
EAGER = frozenset((False, "joined", "selectin", "subquery", "immediate"))


def pending_state(info: ModelInfo, document: bytes, pk: str) -> tuple[str, tuple[Any, ...] | None]:
    """The stream id and the row state a pending key's document holds (the state None: a
    queued delete), as reads serve it and ``sa-redis-cache inspect`` shows it.

    ``document`` is the value opened (size and signature checked, ``CacheContext.opened``);
    ``pk`` the row's pk text. Raises :class:`~sa_redis_cache.codec.CodecError` (or the
    codec's ``ValueError``, ``TypeError``, ``IndexError``) when it holds no queued state of
    ``info``'s rows, or another row's.

    Example::

        stream_id, values = pending_state(info, opened, "7")  # values None: a delete
    """
    assert info.codec is not None
    payload = unpack(document)
    if type(payload) is not list or len(payload) != 2 or type(payload[0]) is not str:
        raise CodecError("not a pending write-behind state")
    stream_id, body = payload
    if body is None:
        return stream_id, None
    values: tuple[Any, ...] = info.codec.load_row(body[0])
    if pk_text([values[p] for p in info.pk_positions]) != pk:
        raise CodecError("the pending state of another row")
    return stream_id, values


def evaluate(session: Session, default: Any, given: dict[str, Any]) -> Any:
    """A Python-side column default, or the next id of a client-side sequence block."""
    if isinstance(default, Sequence):
        return ID_BLOCKS.next(session.connection(), default)
    if isinstance(default, ColumnDefault):
        if default.is_callable:
            return default.arg(DefaultContext(dict(given)))
        if default.is_scalar:
            return default.arg
    raise ConfigurationError(f"write-behind cannot evaluate the default {default!r} in Python")


def sync_many_to_one(obj: object, info: ModelInfo) -> None:
    """Copy the key of a newly assigned many-to-one target into the foreign key columns.

    The unit of work would do it during the flush this object no longer takes part in.
    """
    state = instance_state(obj)
    for rel in info.mapper.relationships:
        history = state.attrs[rel.key].history
        if not history.has_changes():
            continue
        if rel.direction.name != "MANYTOONE" or rel.secondary is not None:
            raise ConfigurationError(
                f"{info.mapper.class_.__name__}.{rel.key}: write-behind rows are written "
                "without the unit of work; change the foreign key column instead of this "
                "relationship"
            )
        target = history.added[0] if history.added else None
        for local, remote in rel.local_remote_pairs:
            value = None
            if target is not None:
                target_state = instance_state(target)
                value = target_state.mapper.get_property_by_column(remote).key
                value = target_state.dict.get(value)
                if value is None:
                    raise ConfigurationError(
                        f"{info.mapper.class_.__name__}.{rel.key} points at an object whose "
                        "key the database has not given yet; flush that object first"
                    )
            setattr(obj, info.mapper.get_property_by_column(local).key, value)


def stored_values(session: Session, obj: object, info: ModelInfo) -> dict[str, Any]:
    """The column values of ``obj``'s row as last flushed: its attributes without their
    unflushed changes.

    For an object deleted in a row switch: SQLAlchemy's UPDATE keeps the row's values in the
    columns the new object leaves unset, never the deleted object's unflushed changes. A
    value changed while unloaded (its earlier value unknown) is loaded again, through the
    reads of queued states: the object is being deleted, so its change is dropped anyway.
    """
    state = instance_state(obj)
    values: dict[str, Any] = {}
    unknown = []
    for key in info.column_keys:
        history = state.attrs[key].history
        if history.deleted:
            values[key] = history.deleted[0]
        elif key in state.committed_state:
            unknown.append(key)
    if unknown:
        session.expire(obj, unknown)
    for key in info.column_keys:
        if key not in values:
            values[key] = getattr(obj, key)
    return values


def refill(session: Session, op: Any) -> None:
    """Give an object its queued state again after ``expire_on_commit`` expired it.

    Loading it would read the database, which does not hold the row yet.
    """
    obj = op.obj
    state = instance_state(obj)
    if state.session_id != session.hash_key or op.values is None:
        return
    unloaded = state.unloaded
    for key, value in zip(op.info.column_keys, op.values, strict=True):
        if key in unloaded:
            set_committed_value(obj, key, value)
