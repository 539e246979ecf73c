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

Nothing read is trusted (anyone who can write to Redis can plant a body): before a single
object enters the session, :func:`prepare` checks that the body could have been made by
:func:`extract` for this statement. Each mapper name must be one the statement can return
(its entities, their relationships' targets, and sub-mappers only where the expected
mapper loads polymorphically); the object at each entity position of a row must be of the
statement's mapper there; each related object must be of its relationship's target mapper,
and the relationship must exist on its owner's mapper, as a list exactly when it is a
collection; every object must be reachable from a row; every column must have its stored
type (:class:`~sa_redis_cache.codec.RowCodec`). Anything else raises
:class:`~sa_redis_cache.codec.CodecError`, and the caller treats the entry as corrupt.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.base import instance_dict

from . import compat
from .codec import CodecError
from .models import ModelInfo, mapper_name

if TYPE_CHECKING:
    from sqlalchemy.engine import Result
    from sqlalchemy.orm.state import InstanceState

    from .codec import RowCodec

InfoOf = Callable[[Mapper[Any]], ModelInfo]
# a step of a load path: a _PathNode, or SQLAlchemy's PathRegistry (_first_reached)
_Step = TypeVar("_Step")


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


class UnservableLoading(Exception):
    """A statement's loader options give its objects what a hit cannot: a lazy loader
    whose criteria hold the values of the execution that loaded them
    (``lazyload(Category.products.and_(Product.price < limit))``). Such a statement runs
    uncached."""


@dataclass(frozen=True, slots=True)
class RowShape:
    """Which result columns are ORM entities and how the others are encoded.

    ``entity_mappers`` holds the statement's mapper at each entity position: a cached
    body is checked against them (see the module docstring). ``loading``: what the
    statement's loader options make of the attributes its rows leave unloaded
    (:func:`loading_of`); None when the mapped classes alone say it. ``root_paths``:
    when the statement has options SQLAlchemy keeps on the objects it loads
    (:func:`compat.propagated_options`), which a hit gives them too, the load path of
    each entity position; empty otherwise. ``metadata``: the statement's result metadata
    (:func:`compat.statement_result_metadata`), which hits' results share; None: made
    from ``keys`` and ``entity_positions``.
    """

    keys: tuple[str, ...]
    single_entity: bool
    entity_positions: tuple[int, ...]
    scalar_positions: tuple[int, ...]
    scalar_codec: RowCodec
    entity_mappers: tuple[Mapper[Any], ...] = ()
    loading: Loading | None = None
    root_paths: tuple[Any, ...] = ()
    metadata: Any = field(default=None, compare=False)


def identity_snapshot(session: Session) -> frozenset[Any]:
    """The identity keys present before a statement runs (empty when the map is empty)."""
    identity_map = session.identity_map
    return frozenset(identity_map.keys()) if len(identity_map) else frozenset()


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
    # by id() of the object: every object stays referenced by ``rows`` meanwhile
    index: dict[int, int] = {}
    mapper_names: list[str] = []
    mapper_index: dict[str, int] = {}
    # what each class's objects need, looked up once per body rather than per object; by
    # class, as a mapped class has one mapper: a fresh state's ``mapper`` is a memoized
    # property computed on first use, which would cost every object a Python call
    per_class: dict[type, _Extracting] = {}
    # objects met and not encoded yet, and their positions in ``objects``
    pending: list[Any] = []
    positions: list[int] = []

    def refs(targets: Sequence[Any]) -> list[int]:
        # one call per collection, not per member: a body is mostly collections
        found_all = []
        for obj in targets:
            found = index.get(id(obj))
            if found is None:
                found = index[id(obj)] = len(objects)
                objects.append(None)
                pending.append(obj)
                positions.append(found)
            found_all.append(found)
        return found_all

    if shape.single_entity:
        out_rows: list[Any] = refs(rows)
    else:
        out_rows = []
        for row in rows:
            entities = [
                refs((row[p],))[0] if row[p] is not None else None for p in shape.entity_positions
            ]
            scalars = shape.scalar_codec.dump_row([row[p] for p in shape.scalar_positions])
            out_rows.append([entities, scalars])

    while pending:
        obj = pending.pop()
        position = positions.pop()
        state = instance_state(obj)
        key = state.key
        # an empty snapshot (the usual case) needs no hash of the key
        if key is None or (preexisting and key in preexisting) or state.modified:
            raise NotCacheable("an object of the result was already in the session")
        how = per_class.get(type(obj))
        if how is None:
            info = info_of(state.mapper)
            how = per_class[type(obj)] = _extracting(info, mapper_names, mapper_index)
        # the object's own dict, as ``state.dict`` gives it without its property call
        dict_ = instance_dict(obj)
        try:
            values: Sequence[Any] = how.values(dict_)
            missing: list[int] | int = 0
        except KeyError:  # a deferred or expired column
            values, missing = _column_values(dict_, how.info)
            missing = missing or 0
        rels: dict[str, Any] | int = 0
        for rel in how.relationships:
            if rel in dict_:
                if not rels:
                    rels = {}
                rels[rel] = _relationship_ref(dict_[rel], rel, refs)  # type: ignore[index]
        objects[position] = [how.index, how.dump_row(values), missing, rels]
    return [list(shape.keys), shape.single_entity, mapper_names, objects, out_rows]


@dataclass(slots=True)
class _Extracting:
    """How :func:`extract` encodes one mapper's objects (see there)."""

    info: ModelInfo
    index: int
    # the column values in ``info.column_keys`` order (KeyError: one is not loaded)
    values: Callable[[dict[str, Any]], Sequence[Any]]
    dump_row: Callable[[Sequence[Any]], list[Any]]
    relationships: tuple[str, ...]


def _extracting(
    info: ModelInfo, mapper_names: list[str], mapper_index: dict[str, int]
) -> _Extracting:
    codec = info.codec
    if codec is None:
        raise NotCacheable(f"{info.mapper.class_.__name__} has no exact codec")
    name = mapper_name(info.mapper)
    m_idx = mapper_index.get(name)
    if m_idx is None:
        m_idx = mapper_index[name] = len(mapper_names)
        mapper_names.append(name)
    keys = info.column_keys
    values: Callable[[dict[str, Any]], Sequence[Any]]
    if len(keys) == 1:
        only = keys[0]
        values = lambda dict_: (dict_[only],)  # noqa: E731 - itemgetter of one key gives no tuple
    else:
        values = operator.itemgetter(*keys)
    return _Extracting(info, m_idx, values, codec.dump_row, tuple(sorted(info.relationship_keys)))


def _relationship_ref(target: Any, key: str, refs: Callable[[Sequence[Any]], list[int]]) -> Any:
    """A loaded relationship as object indices (None, an index, or a list of indices)."""
    if target is None:
        return None
    if isinstance(target, list):
        return refs(target)
    if hasattr(target, "_sa_instance_state"):
        return refs((target,))[0]
    raise NotCacheable(f"collection {key} is not a list")


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


def extract_entity(
    obj: object | None,
    info: ModelInfo,
    preexisting: frozenset[Any],
    *,
    pk: tuple[Any, ...] | None = None,
) -> Any:
    """Encode one object (or its absence) for the entity cache.

    ``pk`` is the key the entry is stored under: a row with another primary key (a
    case-insensitive or padded key the database matched) is not stored there, as the
    entry's reader would refuse it.
    """
    if obj is None:
        return None
    assert info.codec is not None
    state = instance_state(obj)
    if state.key in preexisting or state.modified:
        raise NotCacheable("the object was already in the session")
    values, missing = _column_values(state.dict, info)
    if pk is not None and tuple(values[p] for p in info.pk_positions) != pk:
        raise NotCacheable(f"the database matched the key {pk!r} to another row")
    return [info.codec.dump_row(values), missing or 0]


def identity_key_of(info: ModelInfo, values: Sequence[Any]) -> Any:
    """The identity-map key of the row ``values`` of ``info``'s mapper."""
    return compat.identity_key(info.mapper, tuple([values[p] for p in info.pk_positions]))


class _Materializer:
    """Builds objects into one session's identity map."""

    __slots__ = ("identity_map", "loaded", "new_states", "session", "session_id", "shared")

    def __init__(self, session: Session, *, shared: bool = False) -> None:
        # shared: the values are kept for other sessions too (the local tier), so mutable
        # ones are copied into each object
        self.shared = shared
        # the objects belong to the session's transaction, as a database read's do
        compat.begin_as_the_database_read_would(session)
        self.session = session
        self.identity_map = session.identity_map
        self.session_id = session.hash_key
        self.new_states: list[InstanceState[Any]] = []
        self.loaded: list[tuple[InstanceState[Any], list[str], set[str]]] = []

    def objects(
        self,
        owners: Sequence[ModelInfo],
        missings: Sequence[Sequence[int] | int],
        rows: Sequence[tuple[Any, ...]],
        keys: Sequence[Any],
        unloaded: Sequence[Unloaded | None] | None = None,
    ) -> tuple[list[Any], list[InstanceState[Any] | None]]:
        """The objects of decoded ``rows`` (one per owner, with its columns' ``missings``
        and identity ``keys``): the session's own where it holds one, else new.

        ``unloaded``: per object, what its load path's options make of the attributes
        its row leaves unloaded (:meth:`Loading.of_objects`); None, or None for an
        object, where its class alone says it.

        Returns the objects and, beside each, its state when this call made it (None for
        one the session held). One loop for every object of a body: a local hit of 250
        objects spent ~1.2 µs per object on a call per object and its look-ups
        (benchmarks/results/speed.md).
        """
        shared = self.shared
        identity_map = self.identity_map
        held = identity_map.get
        states = compat.identity_map_states(identity_map)
        add = compat.identity_map_adder(identity_map)
        session_id = self.session_id
        new_states = self.new_states
        made: list[Any] = []
        fresh: list[InstanceState[Any] | None] = []
        # equal lengths: prepare() made them together; repeat() stands for "no options"
        for info, missing, row, key, how in zip(  # noqa: B905 - repeat() has no length
            owners, missings, rows, keys, repeat(None) if unloaded is None else unloaded
        ):
            codec = info.codec
            assert codec is not None
            values = codec.thawed(row) if shared and codec.mutable else row
            column_keys = info.column_keys
            # a body's objects are mostly not in the session yet: held() only for a key it has
            existing = held(key) if key in states else None
            if existing is not None:
                self._fill_unloaded(existing, info, missing, values, how)
                made.append(existing)
                fresh.append(None)
                continue
            obj = info.mapper.class_manager.new_instance()
            state = instance_state(obj)
            dict_ = instance_dict(obj)  # state.dict, without its property call
            if isinstance(missing, list) and missing:
                absent = set(missing)
                for i, k in enumerate(column_keys):
                    if i not in absent:
                        dict_[k] = values[i]
                _leave_unloaded(state, dict_, info, missing, how, None)
            else:
                # as many values as columns: load_row checked the width
                dict_.update(zip(column_keys, values))  # noqa: B905 - checked above
            if how is not None and how.relationships:
                for _, populate in how.relationships:
                    populate(state, dict_, None)
            state.key = key
            state.identity_token = None
            state.session_id = session_id
            add(state, key)
            new_states.append(state)
            made.append(obj)
            fresh.append(state)
        return made, fresh

    def _fill_unloaded(
        self,
        existing: object,
        info: ModelInfo,
        missing: Sequence[int] | int,
        values: tuple[Any, ...],
        how: Unloaded | None,
    ) -> None:
        """The uncached query would fill an object's expired or deferred attributes from
        the row, and leave the others it did not load as its options say: so does a hit
        (``_populate_partial`` in SQLAlchemy's ``orm/loading.py``). Also when the object
        holds changes (``no_autoflush``): an attribute that was set is loaded, so its
        change is never among those filled."""
        state = instance_state(existing)
        unloaded = state.unloaded
        if not unloaded:
            return
        column_keys = info.column_keys
        absent: set[int] | tuple[()] = set(missing) if isinstance(missing, list) else ()
        keys = [k for i, k in enumerate(column_keys) if k in unloaded and i not in absent]
        dict_ = state.dict
        for i, k in enumerate(column_keys):
            if k in keys:
                dict_[k] = values[i]
        if isinstance(missing, list) and missing:
            _leave_unloaded(state, dict_, info, missing, how, unloaded)
        if how is not None and how.relationships:
            for key, populate in how.relationships:
                if key in unloaded:
                    populate(state, dict_, None)
        self.loaded.append((state, keys, unloaded))

    def finish(
        self, ordered: Callable[[], Sequence[InstanceState[Any] | None]] | None = None
    ) -> None:
        """Commit the new objects, then fire their load events: in the order ``ordered``
        gives (states, None for an object the session held; asked only when some event
        has listeners), else as they were made; then the refresh events of the objects
        the session held."""
        identity_map = self.identity_map
        new_states = self.new_states
        # whether a class has load listeners, asked once per class in a row of its objects
        # (as SQLAlchemy's loading asks once per query)
        manager: Any = None
        listened = False
        for state in new_states:
            if state.modified or state.committed_state:
                # a fresh state has nothing to commit unless something touched it
                compat.commit_new(state, identity_map)
            if state.manager is not manager:
                manager = state.manager
                listened = listened or bool(manager.dispatch.load)
        session = self.session
        # the session's loaded_as_persistent listeners see each new object after its
        # class's load listeners, as for a database load
        persistent_event = session.dispatch.loaded_as_persistent or None
        if listened or persistent_event is not None:
            manager = None
            load_event: Any = None
            for made in new_states if ordered is None else ordered():
                if made is None:
                    continue
                state = made
                if state.manager is not manager:
                    manager = state.manager
                    load_event = manager.dispatch.load or None
                if load_event is not None:
                    # reconstructors and user load listeners run as for a database
                    # load; there is no QueryContext on a hit, so they receive None
                    load_event(state, None)
                if persistent_event is not None:
                    persistent_event(session, state)
        for state, keys, unloaded in self.loaded:
            refresh = state.manager.dispatch.refresh
            if refresh:
                # as the uncached query refreshes an object it held: with the names of
                # the attributes that were unloaded, before they are committed
                refresh(state, None, unloaded)
            compat.commit_loaded(state, keys)


def _leave_unloaded(
    state: InstanceState[Any],
    dict_: dict[str, Any],
    info: ModelInfo,
    missing: Sequence[int],
    how: Unloaded | None,
    only: set[str] | None,
) -> None:
    """Give the columns a row did not hold what the uncached query gives them: expired
    (loaded on access, with the object's other expired ones), a per-object deferred or
    raising loader, or nothing (the class's own deferred loader). ``only``: just these
    keys (an object the session held)."""
    columns = (how or _class_unloaded(info.mapper)).columns
    column_keys = info.column_keys
    for i in missing:
        key = column_keys[i]
        if only is not None and key not in only:
            continue
        action = columns.get(key)
        if action is None:
            continue
        if action is _EXPIRE:
            state.expired_attributes.add(key)
        else:
            action(state, dict_, None)


# -- what a hit leaves unloaded -------------------------------------------------------------
#
# A row the uncached query reads does not hold every attribute of its object: deferred
# columns, ``load_only``, a joined-table subclass's own columns under ``select(Base)``,
# relationships not eagerly loaded. SQLAlchemy gives each one a way to load later, per
# object, as it builds it (``populators`` in orm/loading.py): a column not in the row is
# expired; a column a per-query option defers gets a per-object loader (one that raises
# for ``raiseload=True``); a relationship a per-query option loads lazily or forbids gets
# a per-object lazy loader; where the class's own strategy says it, nothing. A hit builds
# objects itself, so it does the same: which way each attribute goes depends only on the
# statement (its loader options, resolved per load path by SQLAlchemy's own lookup) and is
# worked out once per statement shape, here; a statement without loader options needs no
# resolving at all, as the classes alone say it. The SQLAlchemy internals this reads (the
# option lookup per load path, the strategies' per-object loaders) are compat's, all on
# the plan path.

_EXPIRE: Any = True  # a column's way: expired, loaded on access with the object's others

# relationship strategies that leave the attribute unloaded (a lazy loader, raising or not)
_LAZY_STRATEGIES = frozenset((True, "select", "raise", "raise_on_sql"))
# those that load it with the query: its objects are in the body, at a deeper path
_EAGER_STRATEGIES = frozenset((False, "joined", "selectin", "subquery", "immediate"))
# load paths followed from a statement's entities (a self-referential join_depth ends)
_MAX_PATH_DEPTH = 6


@dataclass(frozen=True, slots=True)
class Unloaded:
    """What an object built by a hit gets for the attributes its row did not hold, as
    the uncached query would give them at one load path.

    ``columns``: by column key, :data:`_EXPIRE` or SQLAlchemy's per-object loader setter
    (``(state, dict_, row)``); a key absent: nothing (the class's own loader).
    ``relationships``: per-object lazy loader setters, applied to every new object.

    Example::

        how = _class_unloaded(Product.__mapper__)
        how.columns.get("price")   # _EXPIRE: a column the row did not hold loads on access
    """

    columns: Mapping[str, Any]
    relationships: tuple[tuple[str, Callable[[Any, dict[str, Any], Any], None]], ...] = ()

    def same_as_class(self, mapper: Mapper[Any]) -> bool:
        """True when the class alone says as much (:func:`_class_unloaded`)."""
        return not self.relationships and self.columns == _class_unloaded(mapper).columns


@functools.lru_cache(maxsize=1024)
def _class_unloaded(mapper: Mapper[Any]) -> Unloaded:
    """What a statement without loader options leaves unloaded: a column not in the row
    is expired, unless the class defers it (its own loader then loads it) or it is a
    ``query_expression()`` (left alone)."""
    return Unloaded(
        {
            p.key: _EXPIRE
            for p in mapper.column_attrs
            if not p.deferred and not compat.is_query_expression(p)
        }
    )


class _PathNode:
    """One load path of a statement: per mapper loaded there, its :class:`Unloaded`
    (None: as the class says); per (mapper, eagerly loaded relationship), the deeper path."""

    __slots__ = ("children", "unloaded")

    def __init__(self) -> None:
        self.unloaded: dict[Mapper[Any], Unloaded | None] = {}
        self.children: dict[tuple[Mapper[Any], str], _PathNode] = {}


_NOWHERE = _PathNode()  # a path no option reaches: everything as the class says


@dataclass(frozen=True, slots=True)
class Loading:
    """What one statement's loader options make of the attributes its rows leave
    unloaded, by load path (:func:`loading_of`); the common statement without options has
    none, and its hits pay nothing for it.

    Example::

        loading = loading_of(select(Item).options(raiseload(Item.category)))
        loading.by_mapper[Item.__mapper__].relationships   # the raising lazy loader
    """

    roots: tuple[_PathNode, ...]
    # when every object of a mapper gets the same, whatever its path: by mapper
    by_mapper: Mapping[Mapper[Any], Unloaded | None] | None

    def of_objects(self, prepared: Prepared, single: bool) -> list[Unloaded | None]:
        """Per object of ``prepared``: what it gets, from the path the rows reach it by
        first (as SQLAlchemy sets an object's loaders when it first builds it)."""
        owners = prepared.owners
        by_mapper = self.by_mapper
        if by_mapper is not None:
            get = by_mapper.get
            return [get(info.mapper) for info in owners]
        nodes = _first_reached(prepared, single, self.roots, _child_node)
        # prepare() checked that the rows reach every object
        return [
            node.unloaded.get(info.mapper) if node is not None else None
            for node, info in zip(nodes, owners, strict=True)
        ]


def _child_node(node: _PathNode, mapper: Mapper[Any], key: str) -> _PathNode:
    return node.children.get((mapper, key), _NOWHERE)


def _child_path(path: Any, mapper: Mapper[Any], key: str) -> Any:
    return compat.relationship_load_path(path, mapper.relationships[key])


def _first_reached(
    prepared: Prepared,
    single: bool,
    roots: Sequence[_Step],
    descend: Callable[[_Step, Mapper[Any], str], _Step],
) -> list[_Step | None]:
    """Per object of ``prepared``: the step of the first path its rows reach it by (each
    entity position's root, then ``descend(step, mapper, relationship key)`` for the
    objects eagerly loaded below it), as SQLAlchemy settles an object's loaders and load
    path when it first builds it; None for an object no row reaches."""
    owners, objects, rows = prepared.owners, prepared.objects, prepared.rows
    steps: list[_Step | None] = [None] * len(objects)
    order: list[int] = []
    # a body's objects share a few paths: each child step is made once per call
    children: dict[tuple[int, Mapper[Any], str], _Step] = {}
    if single:
        for index in rows:
            if steps[index] is None:
                steps[index] = roots[0]
                order.append(index)
    else:
        for entities, _ in rows:
            for root, index in zip(roots, entities, strict=True):
                if index is not None and steps[index] is None:
                    steps[index] = root
                    order.append(index)
    for index in order:  # grows as related objects are reached
        rels = objects[index][3]
        if not rels:
            continue
        step = steps[index]
        assert step is not None
        mapper = owners[index].mapper
        for key, target in rels.items():
            known = (id(step), mapper, key)
            child = children.get(known)
            if child is None:
                child = children[known] = descend(step, mapper, key)
            for reached in target if isinstance(target, list) else (target,):
                if reached is not None and steps[reached] is None:
                    steps[reached] = child
                    order.append(reached)
    return steps


def root_paths(statement: Any) -> tuple[Any, ...]:
    """The load path of each entity of ``statement`` (:func:`compat.loaded_path`), once
    per statement shape: SQLAlchemy's, from the compiled statement's entities, too."""
    return tuple(compat.loaded_path(statement, e) for e in _root_entities(statement))


def _stamp_load(
    prepared: Prepared, shape: RowShape, made_here: list[InstanceState[Any] | None], statement: Any
) -> None:
    """Give the objects a hit made the options SQLAlchemy would have kept on them
    (:func:`compat.propagated_options`) with their load paths: their lazy loads and
    refreshes then apply the statement's ``with_loader_criteria()`` and loader options
    as after a database read, where without them a lazy load read unfiltered rows."""
    options = compat.propagated_options(statement)
    if not options:
        return
    paths = prepared.load_paths
    if len(paths) != len(made_here):
        # one slice assignment: another thread's hit on the same body sees all or none
        paths[:] = _first_reached(prepared, shape.single_entity, shape.root_paths, _child_path)
    stamp = compat.stamp_load
    for state, path in zip(made_here, paths, strict=True):
        if state is not None and path is not None:
            stamp(state, options, path)


def _root_entities(statement: Any) -> list[Any]:
    """The inspected entities (mappers or aliases) of ``statement``'s entity columns."""
    return [
        inspect(d["entity"])
        for d in statement.column_descriptions
        if isinstance(d["type"], type) and hasattr(d["type"], "__mapper__")
    ]


def loading_of(statement: Any) -> Loading | None:
    """What ``statement``'s loader options make of the attributes its rows leave
    unloaded; None when it has no options, or they leave everything as the classes say.

    Worked out once per statement shape (its plan). Where SQLAlchemy cannot resolve the
    options outside an execution, None too: a hit then loads such attributes as the
    classes say (a column not in the row on access), never reads them as None. Raises
    :class:`UnservableLoading` for options no hit can honour.

    Example::

        loading_of(select(Product))                          # None
        loading_of(select(Product).options(defer(Product.price, raiseload=True)))
    """
    if not compat.statement_options(statement):
        return None
    try:
        return _resolve_loading(statement)
    except UnservableLoading:
        raise
    except Exception:  # noqa: BLE001 - internals moved or an option SQLAlchemy refuses here
        return None


def _resolve_loading(statement: Any) -> Loading | None:
    compile_state = compat.loader_compile_state(statement)
    entities = _root_entities(statement)
    nodes: dict[Any, _PathNode] = {}
    # objects loaded eagerly sit at deeper paths, where a mapper of a root may be loaded
    # otherwise (a self-referential relationship): then no answer holds per mapper
    eager_paths = False

    def node_at(path: Any, mapper: Mapper[Any], depth: int) -> _PathNode | None:
        """The node of ``path`` (None when everything under it is as the classes say)."""
        nonlocal eager_paths
        if path in nodes:
            return nodes[path]
        node = nodes[path] = _PathNode()
        for sub in _accepted(mapper):  # a sub-mapper's objects load at the same path
            how = _unloaded_at(compile_state, path, sub)
            node.unloaded[sub] = None if how.same_as_class(sub) else how
            if depth >= _MAX_PATH_DEPTH:
                continue
            for rel in sub.relationships:
                strategy, _ = compat.loader_at(rel, compile_state, path)
                if compat.loader_settings(strategy).get("lazy") not in _EAGER_STRATEGIES:
                    continue
                eager_paths = True
                child = node_at(compat.relationship_load_path(path, rel), rel.mapper, depth + 1)
                if child is not None:
                    node.children[(sub, rel.key)] = child
        if node.children or any(node.unloaded.values()):
            return node
        return None

    roots = [node_at(compat.entity_load_path(e), e.mapper, 0) or _NOWHERE for e in entities]
    if all(root is _NOWHERE for root in roots):
        return None
    by_mapper: dict[Mapper[Any], Unloaded | None] | None = None if eager_paths else {}
    for root in roots if by_mapper is not None else ():
        if root.children:
            by_mapper = None
            break
        for mapper, how in root.unloaded.items():
            assert by_mapper is not None
            if by_mapper.setdefault(mapper, how) is not how:
                by_mapper = None  # one mapper at two positions, loaded two ways
                break
        if by_mapper is None:
            break
    return Loading(tuple(roots), by_mapper)


def _unloaded_at(compile_state: Any, path: Any, mapper: Mapper[Any]) -> Unloaded:
    """What the statement gives ``mapper``'s objects at ``path`` for attributes their
    rows leave unloaded (``create_row_processor`` of each strategy in strategies.py)."""
    columns: dict[str, Any] = {}
    for prop in mapper.column_attrs:
        if compat.is_query_expression(prop):
            continue  # left alone where its row does not hold it
        strategy, _ = compat.loader_at(prop, compile_state, path)
        how = compat.loader_settings(strategy)
        if not how.get("deferred"):
            columns[prop.key] = _EXPIRE  # loaded by the query: absent from its row
        elif not compat.is_class_level(strategy):
            columns[prop.key] = compat.per_object_column_loader(
                prop, raiseload=bool(how.get("raiseload"))
            )
    relationships: list[tuple[str, Any]] = []
    for rel in mapper.relationships:
        strategy, option = compat.loader_at(rel, compile_state, path)
        if option is None or compat.loader_settings(strategy).get("lazy") not in _LAZY_STRATEGIES:
            continue
        if compat.option_has_criteria(option):
            # SQLAlchemy gives each object a lazy loader holding the criteria's values of
            # the execution that loaded it; a loader made from one statement would load
            # later hits' objects with the first one's values
            raise UnservableLoading(
                f"the lazy load of {rel} has criteria (.and_()) with each execution's values"
            )
        if compat.is_class_level(strategy):
            continue
        relationships.extend(compat.per_object_lazy_loaders(strategy, path, option, mapper))
    return Unloaded(columns, tuple(relationships))


@functools.lru_cache(maxsize=1024)
def _accepted(mapper: Mapper[Any]) -> frozenset[Mapper[Any]]:
    """The mappers whose objects the ORM can load where ``mapper`` is expected.

    Sub-mappers only when ``mapper`` loads polymorphically (a discriminator, or a
    polymorphic union): otherwise a query of ``mapper`` gives ``mapper``'s class alone.
    """
    if mapper.polymorphic_on is None and not mapper.with_polymorphic:
        return frozenset((mapper,))
    return frozenset(mapper.self_and_descendants)


@functools.lru_cache(maxsize=1024)
def _relationships(mapper: Mapper[Any]) -> dict[str, tuple[bool, frozenset[Mapper[Any]]]]:
    """Per relationship of ``mapper``: is it a collection, and the mappers it may hold."""
    return {rel.key: (bool(rel.uselist), _accepted(rel.mapper)) for rel in mapper.relationships}


@functools.lru_cache(maxsize=1024)
def _expected_names(roots: tuple[Mapper[Any], ...]) -> dict[str, Mapper[Any]]:
    """Every mapper a body for these entity mappers can name, by :func:`mapper_name`.

    The statement's entity mappers and, transitively, their relationships' targets (an
    eager load can reach any of them). Names are resolved here only: a body never makes
    the cache look a class up among all the process's mappers.
    """
    found: dict[str, Mapper[Any]] = {}
    stack = [m for root in roots for m in _accepted(root)]
    while stack:
        mapper = stack.pop()
        name = mapper_name(mapper)
        if name in found:
            continue
        found[name] = mapper
        for _uselist, targets in _relationships(mapper).values():
            stack.extend(targets)
    return found


def _foreign(reason: str) -> CodecError:
    return CodecError(f"not a body this statement can have: {reason}")


class _BodyCheck:
    """Validates the object graph of one query body against its statement.

    Touches no session: a body that fails any check leaves nothing behind. Every failure
    raises :class:`CodecError`. Written for the hit path: references are checked a list at
    a time, and each mapper's relationships are looked up once per body.
    """

    __slots__ = ("kinds", "mappers", "objects", "reached", "relationships_of", "stack")

    def __init__(self, objects: list[Any], kinds: list[int], infos: list[ModelInfo]) -> None:
        self.objects = objects
        self.kinds = kinds  # the mapper index of each object
        self.mappers = [infos[k].mapper for k in kinds]
        self.relationships_of = [_relationships(info.mapper) for info in infos]
        self.reached = bytearray(len(objects))
        self.stack: list[int] = []

    def reach(self, refs: Any, accepted: frozenset[Mapper[Any]]) -> None:
        """The objects ``refs`` (indices) stand where a mapper of ``accepted`` is expected."""
        mappers, reached, stack = self.mappers, self.reached, self.stack
        count = len(mappers)
        for index in refs:
            _check_index(index, count, mappers, accepted)
            if not reached[index]:
                reached[index] = 1
                stack.append(index)

    def rows(self, rows: list[Any], shape: RowShape) -> None:
        """Each row's entity at each position is of the statement's mapper there."""
        if shape.single_entity:
            self.reach(rows, _accepted(shape.entity_mappers[0]))
            return
        positions = [_accepted(m) for m in shape.entity_mappers]
        for row in rows:
            if type(row) is not list or len(row) != 2:
                raise _foreign("a row is not [entities, scalars]")
            refs = row[0]
            if type(refs) is not list or len(refs) != len(positions):
                raise _foreign("a row's entities")
            for index, accepted in zip(refs, positions, strict=True):
                if index is not None:
                    self.reach((index,), accepted)

    def relationships(self) -> None:
        """Walk the graph from the rows: each relationship exists and holds its targets."""
        objects, kinds, relationships_of, stack = (
            self.objects,
            self.kinds,
            self.relationships_of,
            self.stack,
        )
        while stack:
            index = stack.pop()
            rels = objects[index][3]
            if rels == 0 and type(rels) is int:
                continue
            if type(rels) is not dict:
                raise _foreign("relationships must be 0 or an object")
            known = relationships_of[kinds[index]]
            for key, target in rels.items():
                rel = known.get(key)
                if rel is None:
                    owner = self.mappers[index].class_.__name__
                    raise _foreign(f"{owner} has no relationship {key}")
                uselist, accepted = rel
                if uselist:
                    if type(target) is not list:
                        raise _foreign(f"collection {key} is not a list")
                    self.reach(target, accepted)
                elif target is not None:
                    self.reach((target,), accepted)  # a many-to-one: one reference
        if not all(self.reached):
            raise _foreign("an object no row reaches")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A query body checked against its statement and decoded, ready to build objects from.

    Built by :func:`prepare` from a Redis entry; the local tier keeps it and builds every
    hit's objects from it (:func:`build`), without checking or decoding again.
    """

    owners: list[ModelInfo]
    values: list[tuple[Any, ...]]
    objects: list[Any]
    rows: list[Any]
    scalars: list[tuple[Any, ...]]
    # the identity-map key of each object, computed once
    keys: list[Any]
    # each object's load path, worked out by the first hit that needs them (_stamp_load)
    load_paths: list[Any] = field(default_factory=list, compare=False)
    # the order load events fire in, worked out by the first hit that has listeners
    # (load_order), as the one item of this list; empty when it is the body's own
    event_order: list[list[int]] = field(default_factory=list, compare=False)


def prepare(body: Any, shape: RowShape, info_of: InfoOf) -> Prepared:
    """Validate a query body against the statement and decode its values.

    Touches no session; raises :class:`CodecError` (see the module docstring).
    """
    if type(body) is not list or len(body) != 5:
        raise _foreign("not [keys, single, mappers, objects, rows]")
    keys, single, names, objects, rows = body
    if single is not shape.single_entity or keys != list(shape.keys):
        raise _foreign("its columns are not the statement's")
    if type(names) is not list or type(objects) is not list or type(rows) is not list:
        raise _foreign("mappers, objects and rows must be lists")
    expected = _expected_names(shape.entity_mappers)
    infos: list[ModelInfo] = []
    for name in names:
        mapper = expected.get(name) if type(name) is str else None
        if mapper is None:
            raise _foreign(f"it names {name!r}, which the statement cannot load")
        info = info_of(mapper)
        if info.codec is None:
            raise _foreign(f"{name} has no codec")
        infos.append(info)
    kinds: list[int] = []
    width = len(infos)
    for obj in objects:
        if type(obj) is not list or len(obj) != 4:
            raise _foreign("an object is not [mapper, values, missing, relationships]")
        m = obj[0]
        if type(m) is not int or not 0 <= m < width:
            raise _foreign(f"mapper index {m!r}")
        kinds.append(m)
    if single and _unrelated(objects):
        _reach_rows(rows, [infos[k].mapper for k in kinds], _accepted(shape.entity_mappers[0]))
    else:
        check = _BodyCheck(objects, kinds, infos)
        check.rows(rows, shape)
        check.relationships()
    owners = [infos[k] for k in kinds]
    values = [_object_values(i, o[1], o[2]) for i, o in zip(owners, objects, strict=True)]
    scalars: list[Any] = []
    if not single:
        load_row = shape.scalar_codec.load_row
        scalars = [load_row(row[1]) for row in rows]
    keys = [identity_key_of(info, v) for info, v in zip(owners, values, strict=True)]
    return Prepared(owners, values, objects, rows, scalars, keys)


def _unrelated(objects: list[Any]) -> bool:
    """No object of the body holds a relationship (its fourth item is the int 0)."""
    for obj in objects:
        rels = obj[3]
        if type(rels) is not int or rels != 0:
            return False
    return True


def _check_index(
    index: Any, count: int, mappers: list[Mapper[Any]], accepted: frozenset[Any]
) -> None:
    """Raise unless ``index`` is an object's index and that object's mapper is accepted
    where the index stands (a planted entry may name any index or any mapped class)."""
    if type(index) is not int or not 0 <= index < count:
        raise _foreign(f"object index {index!r}")
    if mappers[index] not in accepted:
        raise _foreign(f"a {mappers[index].class_.__name__} where it cannot be")


def _reach_rows(rows: list[Any], mappers: list[Mapper[Any]], accepted: frozenset[Any]) -> None:
    """:class:`_BodyCheck` for a single-entity body without relationships: each row is
    the index of an object of an accepted mapper, and every object is some row's."""
    count = len(mappers)
    reached = bytearray(count)
    for index in rows:
        _check_index(index, count, mappers, accepted)
        reached[index] = 1
    if not all(reached):
        raise _foreign("an object no row reaches")


def _object_values(info: ModelInfo, dumped: Any, missing: Any) -> tuple[Any, ...]:
    """An object's column values, type-checked; its primary key must be complete."""
    codec = info.codec
    assert codec is not None
    values = codec.load_row(dumped)
    if missing != 0 or type(missing) is not int:
        width = codec.width
        if type(missing) is not list or not all(type(i) is int and 0 <= i < width for i in missing):
            raise _foreign("missing columns")
    for p in info.pk_positions:
        if values[p] is None:
            raise _foreign("an object without its primary key")
    return values


def rehydrate(session: Session, body: Any, info_of: InfoOf, shape: RowShape) -> Result[Any]:
    """Build the result of a cached ORM query into ``session``.

    The whole body is checked against the statement before any object is built
    (:func:`prepare`); :class:`CodecError` means a corrupt or foreign entry, and
    ``session`` is left untouched.
    """
    return build(session, prepare(body, shape, info_of), shape)


def build(
    session: Session,
    prepared: Prepared,
    shape: RowShape,
    *,
    shared: bool = False,
    statement: Any = None,
) -> Result[Any]:
    """Build the result of a prepared query body into ``session``.

    ``shared``: ``prepared`` is kept for other sessions too (the local tier); mutable
    values are copied into each object, and nothing of it is modified. ``statement``:
    the statement as executed, whose propagating options the new objects keep (needed
    when ``shape.root_paths`` says it has some).
    """
    objects, rows = prepared.objects, prepared.rows
    mat = _Materializer(session, shared=shared)
    loading = shape.loading
    made, made_here = mat.objects(
        prepared.owners,
        [o[2] for o in objects],
        prepared.values,
        prepared.keys,
        None if loading is None else loading.of_objects(prepared, shape.single_entity),
    )
    for obj, made_state, (_, _, _, rels) in zip(made, made_here, objects, strict=True):
        if not rels:
            continue
        dict_ = instance_dict(obj)
        for key, target in rels.items():
            if made_state is None and key in dict_:
                continue  # never overwrite what the session already holds
            if target is None:
                value: Any = None
            elif isinstance(target, list):
                value = [made[i] for i in target]
            else:
                value = made[target]
            set_committed_value(obj, key, value)
    if shape.root_paths and statement is not None:
        _stamp_load(prepared, shape, made_here, statement)
    mat.finish(lambda: [made_here[i] for i in load_order(prepared, shape)] or made_here)
    if shape.single_entity:
        data: list[Any] = [made[i] for i in rows]
    else:
        scalars = prepared.scalars
        if shared and shape.scalar_codec.mutable:
            scalars = [shape.scalar_codec.thawed(row) for row in scalars]
        data = rows_with_scalars(rows, scalars, made, shape)
    return compat.make_result(
        shape.keys,
        data,
        single=shape.single_entity,
        entity_positions=shape.entity_positions,
        metadata=shape.metadata,
    )


def load_order(prepared: Prepared, shape: RowShape) -> list[int]:
    """The order in which a database load of ``prepared``'s rows would fire its objects'
    load events, as near as a body says (it does not record which relationships were
    joined or selectin-loaded): each object after the objects its many-to-one
    relationships hold (a joined load builds those first, so a reconstructor may read
    them), the rows' objects in row order, then the objects of their collections, level
    by level (a selectin load's order). Empty when that is the body's own order. Worked
    out once per decoded body and kept with it.

    Example::

        load_order(prepared, shape)  # [2, 0, 3, 1]: object 2 is held by object 0
    """
    if prepared.event_order:
        return prepared.event_order[0]
    objects = prepared.objects
    if shape.single_entity:
        queue = list(prepared.rows)
    else:
        queue = [i for entities, _ in prepared.rows for i in entities if i is not None]
    order: list[int] = []
    seen: set[int] = set()
    emitted = 0
    for root in queue:  # grows while it is walked: the collections' objects join it
        if root not in seen:
            seen.add(root)
            # the many-to-one targets first, without recursion (a chain may be long)
            stack = [(root, _scalar_targets(objects[root]))]
            while stack:
                node, targets = stack[-1]
                for target in targets:
                    if target not in seen:
                        seen.add(target)
                        stack.append((target, _scalar_targets(objects[target])))
                        break
                else:
                    stack.pop()
                    order.append(node)
        while emitted < len(order):
            rels = objects[order[emitted]][3]
            emitted += 1
            if rels:
                queue.extend(c for t in rels.values() if type(t) is list for c in t)
    order.extend(i for i in range(len(objects)) if i not in seen)
    if order == list(range(len(objects))):
        order = []
    prepared.event_order[:] = [order]
    return order


def _scalar_targets(entry: Any) -> Iterator[int]:
    """The objects a body's object holds in many-to-one (scalar) relationships."""
    rels = entry[3]
    return iter([t for t in rels.values() if type(t) is int] if rels else ())


def rows_with_scalars(
    data: list[Any], scalars: list[tuple[Any, ...]], made: list[Any], shape: RowShape
) -> list[tuple[Any, ...]]:
    """Assemble mixed entity/column rows from object indices and decoded scalars."""
    out = []
    width = len(shape.keys)
    for (entities, _), values in zip(data, scalars, strict=True):
        row: list[Any] = [None] * width
        for pos, idx in zip(shape.entity_positions, entities, strict=True):
            row[pos] = made[idx] if idx is not None else None
        for pos, value in zip(shape.scalar_positions, values, strict=True):
            row[pos] = value
        out.append(tuple(row))
    return out


PreparedEntity = tuple[tuple[Any, ...], Any, Any, ModelInfo] | None
"""An entity body checked and decoded: ``(values, missing, identity key, model)``, the
model being the one it was checked against; or None for "no such row"."""


def prepare_entity(info: ModelInfo, body: Any, pk: tuple[Any, ...]) -> PreparedEntity:
    """Check and decode an entity entry's body (``None`` = no row).

    Raises :class:`CodecError` when the body is not ``[values, missing]`` with every
    column of its stored type, or holds another row than ``pk`` (foreign bytes).
    """
    if body is None:
        return None
    if type(body) is not list or len(body) != 2:
        raise _foreign("an entity body is [values, missing]")
    values = _object_values(info, body[0], body[1])
    if tuple([values[p] for p in info.pk_positions]) != pk:
        raise _foreign("the entry holds another row")
    return values, body[1], compat.identity_key(info.mapper, pk), info


def entity_prepared_for(prepared: PreparedEntity, info: ModelInfo) -> bool:
    """Whether ``prepared``, kept from an earlier read (the decodings hits reuse, the local
    tier), may be built as ``info``'s object: it was checked against that model, or it
    says "no such row". Two classes may map one table, and then share its entity keys;
    what one class's read decoded holds its own columns and identity key.

    Example::

        if not entity_prepared_for(entry.value, info):
            ...  # decode the bytes again for this model
    """
    return prepared is None or prepared[3] is info


def build_entity(
    session: Session, info: ModelInfo, prepared: PreparedEntity, *, shared: bool = False
) -> object | None:
    """The object of a prepared entity body, built into ``session`` (None: no row).
    ``prepared`` must be ``info``'s (:func:`entity_prepared_for`)."""
    if prepared is None:
        return None
    values, missing, key, _ = prepared
    mat = _Materializer(session, shared=shared)
    obj: object = mat.objects([info], [missing], [values], [key])[0][0]
    mat.finish()
    if info.eager_keys:
        load_eager(obj, info)
    return obj


def load_eager(obj: object, info: ModelInfo) -> None:
    """Load the relationships ``info``'s mapper loads eagerly and ``obj`` lacks, as a
    primary-key load of the database would have: an entity entry holds one row, and the
    application may read them with no session to load them (closed, or under asyncio,
    where a lazy load raises). Each is loaded by its lazy loader through the session, so a
    cached collection or a many-to-one target is itself read through the cache.

    Example::

        obj = build_entity(session, info, prepared)  # calls it: box.items is loaded
    """
    unloaded = instance_state(obj).unloaded
    for key in info.eager_keys:
        if key in unloaded:
            getattr(obj, key)


def entity_result(info: ModelInfo, obj: object | None) -> Result[Any]:
    """The result a primary-key load of ``obj`` gives (empty for None)."""
    return compat.make_result(
        [info.mapper.class_.__name__],
        [] if obj is None else [obj],
        single=True,
        metadata=info.result_metadata,
    )


def rehydrate_entity(
    session: Session, info: ModelInfo, body: Any, pk: tuple[Any, ...]
) -> Result[Any]:
    """Build the result of a primary-key load from an entity entry (``None`` = no row).

    Raises :class:`CodecError` as :func:`prepare_entity` does; ``session`` is then left
    untouched.
    """
    obj = build_entity(session, info, prepare_entity(info, body, pk))
    return entity_result(info, obj)
