"""Write-behind on the session side: flushes diverted into Redis streams at commit.

How a flush of a write-behind model emits no SQL (``before_flush``):

* Each new, modified or deleted object of such a model has its full column state captured
  (Python-side defaults and ``onupdate`` applied, primary keys from ``default=`` or a
  client-side sequence block), normalised as Postgres would return it.
* It is then taken out of the unit of work: new and modified objects are expunged, made
  transient, then ``make_transient_to_detached`` (which commits their attribute state) and
  added back, so they are *persistent and clean*: the flush has nothing to do for them,
  and the session still holds them under their identity. Deleted objects are expunged
  (detached, as after a real delete). Each expunge and add is the object's alone
  (:func:`~sa_redis_cache.compat.expunge_alone`, :func:`~sa_redis_cache.compat.add_alone`):
  ``session.expunge`` cascades along ``cascade="all"`` relationships, and would take the
  related objects, ordinary ones included, out of the flush that must write or delete
  them; ``session.add`` would bring back related objects the application expunged.
* The operations wait in per-transaction frames (savepoints get one each: released, they
  merge into the parent; rolled back, they are dropped and their objects reverted).

At the end of the outermost committed transaction, after the database commit (so a commit
that also wrote ordinary rows has committed those first), one ``lua/wb_enqueue.lua`` call
writes every operation of the commit: stream entries, entity entries and pending keys, all
or nothing. When Redis fails there, ``commit()`` raises
:class:`~sa_redis_cache.errors.CacheUnavailableError`: nothing was queued, and the ordinary
rows of that commit stay committed (the database commit cannot be undone).

Reads (``do_orm_execute``, registered before the read path's): a primary-key load of a
write-behind model (``session.get``, a many-to-one lazy load, a refresh of expired
attributes) is served from the transaction's own unqueued operations, then from the row's
pending key, and only then by the ordinary read path; the dispatcher has run the load's
autoflush before (:mod:`sa_redis_cache.sessions`), so the operations include the
session's unflushed objects. Every process therefore reads its own
and everybody's queued writes at once, whatever happened to the entity entries meanwhile.

Both Redis calls (the enqueue and the pending-key lookup) go through ``core.io()``: under
``AsyncSession`` they await the asyncio client through SQLAlchemy's greenlet bridge, so a
write-behind commit or read never blocks the event loop (:mod:`sa_redis_cache.redis_io`).
"""

from __future__ import annotations

import logging
import math
import re
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
from redis.exceptions import RedisError, ResponseError, TryAgainError
from sqlalchemy import types as sqltypes
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import make_transient, make_transient_to_detached
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.exc import StaleDataError

from sa_redis_cache import compat, hydrate
from sa_redis_cache.binds import session_translate_map, statement_translate_map
from sa_redis_cache.codec import CodecError
from sa_redis_cache.compat import key_slot
from sa_redis_cache.errors import (
    CacheUnavailableError,
    ConfigurationError,
    NotOnDiskError,
    NotReplicatedError,
)
from sa_redis_cache.models import Inexact
from sa_redis_cache.protocol import HEADER, partition_of, pk_text, scripts
from sa_redis_cache.redis_io import is_cluster
from sa_redis_cache.signing import TRAILER_BYTES
from sa_redis_cache.transaction import TransactionState, peek_transaction_state

from . import joined
from .columns import column_of, is_write_behind, pk_codec
from .nulls import encode_nulls, inherit_nulls, null_kind
from .states import (
    evaluate,
    pending_state,
    refill,
    serve,
    stored_values,
    sync_many_to_one,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from sqlalchemy.engine import Connection, Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

    from sa_redis_cache.context import CacheContext
    from sa_redis_cache.models import ModelInfo
    from sa_redis_cache.protocol.scripts import ScriptCall
    from sa_redis_cache.redis_io import RedisIO

log = logging.getLogger(__name__)

# What the pending key and the entity entry add around a queued row: the codec header, a
# stamp (a stream id of up to 41 characters, or a generation), brackets, and the 33 bytes
# of a signature; at most 87 in all.
_WRAPPING_BYTES = 128

_NOTHING: Any = object()


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """A pending key this process cannot read (``reason``): signed with another
    ``signing_key`` (a process of the namespace configured otherwise, or a key changed in a
    rolling deploy), larger than this process's ``max_entry_bytes``, or not decodable. It
    may hold another process's queued state: never deleted by a read, and a flush that
    would write its row over it refuses (:meth:`WriteBehind._newest_rows`)."""

    key: str
    reason: str


@dataclass(slots=True)
class Op:
    """One queued operation: the newest state of one row in one transaction frame."""

    info: ModelInfo
    pk: str
    kind: str  # "u" (upsert with the full row) or "d" (delete)
    data: bytes  # the encoded row ("u") or primary key ("d"), as JSON
    values: tuple[Any, ...] | None  # the row's Python values ("u"), for reads and refills
    obj: Any
    created: bool  # the object was new in this frame: a rollback makes it transient again
    scope: str = ""  # the database and schema the row belongs in (sa_redis_cache.binds)
    # the JSON columns (by position) whose None is no JSON ``null``, as SQLAlchemy writes
    # them (sa_redis_cache.strategies.write_behind.nulls): SQL NULL, or the row's own
    nulls: dict[int, str] = field(default_factory=dict)
    # on a connection the application holds in a transaction (a joined session): the
    # savepoints open at the flush, whose rollback undoes it (joined.py)
    savepoints: frozenset[str] = frozenset()
    # the row's operation this one replaced in its frame, flushed under other savepoints:
    # what the transaction keeps when a rollback undoes this one (joined.surviving)
    earlier: Op | None = None
    # a delete: the object's own write it followed, in any open frame; a rollback of that
    # write's frame leaves the object showing rolled-back values (revert expires it)
    written: Op | None = None


class WriteBehind:
    """The session side of ``strategy="write_behind"`` for one cache.

    :mod:`sa_redis_cache.sessions` calls it: :meth:`divert` at every flush,
    :meth:`serve_queued` before the read path, :meth:`revert` when a savepoint or the
    transaction rolls back, :meth:`queue_commit` after the outermost commit.

    Example::

        wb = WriteBehind(core)
        wb.queue_commit(session, ops)  # what the dispatcher does after a commit
    """

    def __init__(self, core: CacheContext) -> None:
        self.core = core

    def _info(self, mapper: Any) -> ModelInfo | None:
        info = self.core.models.infos.get(mapper)
        return info if is_write_behind(info) else None

    # -- flush: capture and divert ----------------------------------------------------------

    def divert(self, session: Session, state: TransactionState) -> None:
        """Take every write-behind object out of this flush, keeping its state for commit."""
        if not any(is_write_behind(i) for i in self.core.models.infos.values()):
            return
        self._sync_collections_into_queue(session)
        work, switched = self._work(session)
        if not work:
            return
        if is_cluster(self.core.client):
            self._refuse_several_slots(state, [info for _, info, _ in work])
        # refused before this flush changes anything (a two-phase transaction); asked once
        # per table, not per object
        infos = {info.table: info for _, info, _ in work}
        connections = {
            table: joined.joined_connection(session, info.mapper) for table, info in infos.items()
        }
        queued = state.frame().queued
        tz: Any = None
        scopes: dict[str, str] = {}
        tags: dict[str, frozenset[str]] = {}
        for table, info in infos.items():
            connection = connections[table]
            tags[table] = frozenset()
            if connection is not None:
                # the session takes the connection now, as its flush's first statement
                # would without the cache (the rows' SQL is diverted): a create_savepoint
                # session opens its savepoint first, which tags the rows (its rollback, at
                # the session's close, undoes them), and the session's end knows whether
                # it left the application's transaction open with them (rollback_only)
                session.connection(bind_arguments={"mapper": info.mapper})
                tags[table] = joined.watch(self, connection)
                # one connection queues them all: a commit is one enqueue
                state.joined = connection
            found = self._scope(session, info, {"mapper": info.mapper})
            if found is None:
                raise CacheUnavailableError(
                    f"write-behind: cannot tell which database {info.mapper.class_.__name__}"
                    " rows go to (the server did not answer); nothing was queued"
                )
            scopes[table] = found
        # the newest rows of changed objects and of row switches' deleted ones: the objects
        # may hold them older than the queue does
        switched_out = {id(gone) for gone, _ in switched.values()}
        rows = self._newest_rows(
            session,
            state,
            [
                (obj, info, scopes[info.table])
                for obj, info, kind in work
                if kind == "dirty" or id(obj) in switched_out
            ],
        )
        for obj, info, kind in work:
            scope = scopes[info.table]
            if kind == "deleted":
                op = self._delete_op(obj, info)
                prior = state.find_queued(info.table, op.pk)
                # deleted in the transaction that created it: a rollback of that creation
                # leaves it transient, as any other rollback leaves it persistent
                if prior is not None and prior.obj is obj:
                    op.created, op.written = prior.created, prior
                state.frame().removed.append(op)
                compat.expunge_alone(session, obj)
            else:
                nulls: dict[int, str] = {}
                values, tz = self._capture(
                    session,
                    obj,
                    info,
                    created=kind == "new",
                    tz=tz,
                    old=_old_row(info, switched.get(id(obj)), rows),
                    row=rows.get(id(obj)),
                    nulls=nulls,
                )
                op = self._upsert_op(obj, info, values, created=kind == "new")
                prior = state.find_queued(info.table, op.pk)
                op.created = op.created or (prior is not None and prior.created)
                # this transaction's earlier write of the row is replaced, never queued:
                # a column this one leaves as the row has it is as that write left it
                op.nulls = inherit_nulls(nulls, prior)
                compat.expunge_alone(session, obj)
                if kind == "dirty":
                    make_transient(obj)
                make_transient_to_detached(obj)
                compat.add_alone(session, obj)
            op.scope = scope
            op.savepoints = tags[info.table]
            replaced = queued.get((info.table, op.pk))
            if replaced is not None and replaced.savepoints != op.savepoints:
                # a rollback to a savepoint the earlier flush was outside of undoes this
                # write only, as it would the row's SQL
                op.earlier = replaced
            queued[(info.table, op.pk)] = op

    def _collections_into_queue(self, mapper: Mapper[Any], memo: dict[Any, list[Any]]) -> list[Any]:
        """The one-to-many relationships of ``mapper``, an ordinary model, whose children
        are write-behind rows and which the unit of work writes through (``memo``: by
        mapper, for one flush)."""
        found = memo.get(mapper)
        if found is None:
            found = memo[mapper] = (
                []  # a write-behind object's own relationships: sync_many_to_one
                if self._info(mapper) is not None
                else [
                    rel
                    for rel in mapper.relationships
                    if not rel.viewonly
                    and rel.direction.name == "ONETOMANY"
                    and self._info(rel.mapper) is not None
                ]
            )
        return found

    def _sync_collections_into_queue(self, session: Session) -> None:
        """Copy the key of another model's object into the foreign key of the write-behind
        objects added to its one-to-many collection (``basket.lines.append(line)``), as
        the unit of work would; refuse what it would write otherwise.

        The unit of work writes such a change as an UPDATE (or, for ``delete-orphan``, a
        DELETE) of the children, run after this hook: on a queued row it matched nothing
        (``StaleDataError``); on a flushed one it changed the database behind the queue.
        Set here, the key is captured with the child and the unit of work finds nothing
        left to write.
        """
        memo: dict[Any, list[Any]] = {}
        for obj in session.deleted:
            for rel in self._collections_into_queue(instance_state(obj).mapper, memo):
                if not rel.cascade.delete and not rel.passive_deletes:
                    _refuse_orphaned(session, obj, rel)
        for obj in [*session.new, *session.dirty]:
            state = instance_state(obj)
            for rel in self._collections_into_queue(state.mapper, memo):
                history = state.attrs[rel.key].history
                parent = f"{state.mapper.class_.__name__}.{rel.key}"
                child = rel.mapper.class_.__name__
                keys = [
                    (
                        state.mapper.get_property_by_column(local).key,
                        rel.mapper.get_property_by_column(remote).key,
                    )
                    for local, remote in rel.local_remote_pairs
                ]
                if history.deleted:
                    fks = ", ".join(f"{child}.{key}" for _, key in keys)
                    raise ConfigurationError(
                        f"{parent}: a write-behind {child} was removed from it, which the "
                        "unit of work writes with SQL that queued rows take no part in; "
                        f"set {fks} (or delete the {child}) instead"
                    )
                for added in history.added:
                    for local_key, remote_key in keys:
                        value = getattr(obj, local_key)
                        if value is None:
                            raise ConfigurationError(
                                f"{parent} holds a write-behind {child}, and {local_key} is "
                                "not known before the database insert gives it; flush the "
                                f"{state.mapper.class_.__name__} first, or set its "
                                f"{local_key} before the flush"
                            )
                        if getattr(added, remote_key) != value:
                            setattr(added, remote_key, value)

    def _work(
        self, session: Session
    ) -> tuple[list[tuple[object, ModelInfo, str]], dict[int, tuple[object, dict[str, Any]]]]:
        """The write-behind objects of this flush, deleted ones first, and its row switches:
        by the new object's ``id()``, the deleted object and its row as it holds it.

        A new object with the key of one deleted in this flush (what SQLAlchemy turns into
        an UPDATE of the row, a "row switch") is added back under that key once the
        deleted one is out, and its operation replaces the delete's.
        """
        work: list[tuple[object, ModelInfo, str]] = []
        deleted: dict[tuple[Any, ...], object] = {}
        for obj in session.deleted:
            gone = instance_state(obj)
            info = self._info(gone.mapper)
            if info is not None:
                work.append((obj, info, "deleted"))
                assert gone.key is not None
                deleted[gone.key[:2]] = obj
        # read before the deleted objects leave the session
        switched: dict[int, tuple[object, dict[str, Any]]] = {}
        for kind, objects in (("new", session.new), ("dirty", session.dirty)):
            for obj in objects:
                info = self._info(instance_state(obj).mapper)
                if info is not None and (kind == "new" or session.is_modified(obj)):
                    work.append((obj, info, kind))
                    old = None
                    if kind == "new" and deleted:
                        old = deleted.get(_pending_key(obj, info))
                    if old is not None:
                        switched[id(obj)] = (old, stored_values(session, old, info))
        return work, switched

    def _refuse_several_slots(self, state: TransactionState, infos: list[ModelInfo]) -> None:
        """On a cluster, refuse a flush that would make the commit's queued operations span
        several slots: ``wb_enqueue.lua`` queues them all or none, in one call, which a
        cluster runs in one slot only. Raised before this flush changes anything.

        The slot is the one of the keys the enqueue writes (each table's generation; every
        other key of the table shares its hash tag), so tables that share a tag (a slot
        group) pass.
        """
        models: dict[int, set[str]] = {}
        queued = [op.info for frame in state.frames for op in frame.queued.values()]
        tables = {info.table: info.mapper.class_.__name__ for info in [*infos, *queued]}
        for table, name in tables.items():
            models.setdefault(key_slot(self.core.keys.generation_key(table)), set()).add(name)
        if len(models) > 1:
            names = ", ".join(sorted(name for group in models.values() for name in group))
            raise ConfigurationError(
                f"write-behind on a Redis Cluster: this transaction writes {names}, whose "
                f"keys lie in {len(models)} cluster slots; a commit's queued writes are "
                "enqueued atomically, in one slot. Give these models one slot group "
                "(CachePolicy(slot_group=...), docs/cluster.md#write-behind), or write them "
                "in separate transactions. Nothing of this flush was queued"
            )

    def _scope(
        self,
        session: Session,
        info: ModelInfo,
        bind_arguments: Any,
        reading: ORMExecuteState | None = None,
    ) -> str | None:
        """The scope of ``info``'s rows for this session (None when it cannot be told),
        under the options of the statement ``reading`` executes, when one does."""
        core = self.core
        bind = session.get_bind(**bind_arguments)
        database = core.binds.database_for(session, bind, bind_arguments)
        if database is None:
            return None
        if reading is None:
            translate = session_translate_map(session, bind)
        else:
            translate = statement_translate_map(reading, bind)
        return core.entity_scope(info, database, translate)

    def _capture(
        self,
        session: Session,
        obj: object,
        info: ModelInfo,
        *,
        created: bool,
        tz: Any,
        old: dict[str, Any] | None = None,
        row: tuple[Any, ...] | None = None,
        nulls: dict[int, str] | None = None,
    ) -> tuple[tuple[Any, ...], Any]:
        """The object's full column state, as the database will hold it after the insert.

        ``old``: the row a new object replaces in a row switch (its key's object deleted in
        the same flush). SQLAlchemy updates that row with the columns the new object set;
        the others keep the old row's values, or take their ``onupdate``.

        ``row``: a changed object's row as queued now (:meth:`_newest_rows`). SQLAlchemy's
        UPDATE sets the changed columns only: the others keep the row's values, which the
        object may hold older (loaded by a query, from the database, before the worker
        flushed a later commit).

        ``nulls`` receives the JSON columns whose None SQLAlchemy would not write as JSON
        ``null`` (:func:`.nulls.null_kind`).
        """
        state = instance_state(obj)
        sync_many_to_one(obj, info)
        dict_ = state.dict
        given = _known_values(state, info, row)
        unset = {key for key in info.column_keys if key not in given}
        pk_keys = {info.column_keys[p] for p in info.pk_positions}
        for key in info.column_keys:
            column = column_of(info, key)
            if old is not None:
                # the UPDATE sets what the new object was given (every attribute set on a
                # pending object is recorded in its committed_state)
                missing = key not in state.committed_state
                default = column.onupdate
            elif created:
                # SQLAlchemy's INSERT leaves out a None it does not evaluate (a column
                # type other than JSON's), so the column's default applies as if unset
                missing = key not in given or (
                    given[key] is None and (key in pk_keys or not column.type.should_evaluate_none)
                )
                default = column.default
            else:
                # the ORM fills onupdate only for columns the UPDATE does not set itself
                missing = key not in state.committed_state
                default = column.onupdate
            if missing and default is not None:
                given[key] = evaluate(session, default, given)
        for key in info.column_keys:
            if key not in given:
                if old is not None:
                    given[key] = old[key]
                else:
                    # an unloaded column of a loaded row: load it now (pending state first)
                    given[key] = getattr(obj, key) if not created else None
        values = [given[k] for k in info.column_keys]
        if nulls is not None:
            nulls.update(_nulls(info, values, state, inserted=created and old is None, unset=unset))
        if any(values[p] is None for p in info.pk_positions):
            raise ConfigurationError(
                f"{info.mapper.class_.__name__} was flushed without a primary key; "
                "write-behind needs it before the insert: set it, or give it a Python default"
            )
        try:
            stored = info.as_stored(list(values), tz)
        except Inexact:
            if tz is None:
                tz = _zone(session, info)
            try:
                stored = info.as_stored(list(values), tz)
            except Inexact:
                stored = values  # the database keeps the same value in another form
        for key, after in zip(info.column_keys, stored, strict=True):
            # normalised, defaulted, loaded, or taken from the queued row
            if dict_.get(key, _NOTHING) is not after:
                dict_[key] = after
        return tuple(stored), tz

    def _upsert_op(
        self, obj: object, info: ModelInfo, values: tuple[Any, ...], *, created: bool
    ) -> Op:
        assert info.codec is not None
        try:
            data = orjson.dumps(info.codec.dump_row(values))
        except (CodecError, TypeError) as exc:
            raise ConfigurationError(
                f"{info.mapper.class_.__name__}: a value cannot be queued exactly ({exc}); "
                "write-behind stores the row in Redis until the worker inserts it"
            ) from exc
        if b"\\u0000" in data:  # orjson's escape of a NUL; rare, then looked at exactly
            _refuse_nul(info, values)
        # the pending key and the entity entry wrap the row in a stamp (and a signature):
        # reads refuse values above max_entry_bytes, so a row that would make one is refused
        size = len(data) + _WRAPPING_BYTES
        if size > self.core.max_entry_bytes:
            raise ConfigurationError(
                f"{info.mapper.class_.__name__}: this row takes {size} bytes queued, above "
                f"max_entry_bytes={self.core.max_entry_bytes}; write-behind keeps every queued "
                "row in Redis until the worker inserts it: raise max_entry_bytes, or write "
                "this model with another strategy"
            )
        pk_values = [values[p] for p in info.pk_positions]
        return Op(info, pk_text(pk_values), "u", data, values, obj, created)

    def _delete_op(self, obj: object, info: ModelInfo) -> Op:
        key = instance_state(obj).key
        assert key is not None
        pk_values = list(key[1])
        data = orjson.dumps(pk_codec(info).dump_row(pk_values))
        return Op(info, pk_text(pk_values), "d", data, None, obj, created=False)

    # -- transaction boundaries ------------------------------------------------------------

    def queue_commit(self, session: Session, ops: list[Op], removed: Iterable[Op] = ()) -> None:
        """The outermost transaction committed: queue its operations, all or none.

        Called once SQLAlchemy has closed the transaction, so the session stays usable after
        :class:`CacheUnavailableError`. Nothing queued, the objects are left as a failed
        commit and SQLAlchemy's rollback leave them: created ones transient, changed ones
        expired, and the deleted ones (``removed``, the transaction's deletes) back in the
        session, persistent and expired.
        """
        try:
            self._enqueue_measured(ops)
        except (NotOnDiskError, NotReplicatedError):
            # queued all the same: the objects keep their committed state
            self.core.counters.incr_total("errors")
            self.keep_committed(session, ops)
            raise
        except RedisError as exc:
            self.core.counters.incr_total("errors")
            # a rollback's: a created object expunged since its flush is transient again too
            self.revert(session, ops, None, removed, rollback=True)
            _values_back(ops)
            raise CacheUnavailableError(
                f"write-behind: Redis did not take this commit's {len(ops)} queued "
                f"write(s) ({exc}); {_outcome(exc)}. Rows of other models in the same "
                "commit are committed to the database. Retry the writes when Redis is back"
            ) from exc
        self.keep_committed(session, ops)

    def hand_over(self, connection: Connection, ops: list[Op]) -> None:
        """Queue a joined session's operations when the application commits the
        transaction it holds on ``connection`` (:mod:`.joined`)."""
        joined.hand_over(self, connection, ops)

    def forget_engines(self) -> None:
        """The cache is detached: it follows no application's transaction any more."""
        joined.forget(self)

    def pending_joined(self) -> int:
        """Operations of joined sessions that wait for an application's commit."""
        return joined.pending(self)

    def queue_handed(self, ops: list[Op]) -> None:
        """Queue the operations of sessions joined to a transaction the application has
        just committed (the database committed first, :mod:`.joined`); an error reaches
        the application's ``commit()``, saying the transaction is committed."""
        try:
            self._enqueue_measured(ops)
        except (NotOnDiskError, NotReplicatedError):
            self.core.counters.incr_total("errors")
            raise
        except RedisError as exc:
            self.core.counters.incr_total("errors")
            raise CacheUnavailableError(
                f"write-behind: Redis did not take the {len(ops)} queued write(s) of the "
                f"sessions joined to this transaction ({exc}); {_outcome(exc)}. The "
                "transaction is committed to the database. Retry the writes when Redis "
                "is back"
            ) from exc

    @staticmethod
    def keep_committed(session: Session, ops: list[Op]) -> None:
        """Give the operations' objects their queued state again (``expire_on_commit``)."""
        for op in ops:
            if op.kind == "u":
                refill(session, op)

    def _enqueue_measured(self, ops: list[Op]) -> None:
        with self.core.measure_tables({op.info.table for op in ops}, "write_behind_enqueue"):
            self.enqueue(ops)

    @staticmethod
    def revert(
        session: Session,
        ops: Iterable[Op],
        outer: TransactionState | None,
        removed: Iterable[Op] = (),
        *,
        rollback: bool = False,
    ) -> None:
        """Objects of operations that will not be queued: created ones become transient again.

        ``outer`` holds the frames that remain (a savepoint rolled back): an object that an
        outer frame wrote was not created by the rolled-back one, and is expired instead, so
        that its next access reads the outer frame's state.

        ``rollback``: a rollback, or a failed enqueue (as SQLAlchemy's failed commit and
        its rollback), not the end of a closed session. As SQLAlchemy's, it makes a
        created object transient also when the application expunged it since (added
        again, it is new: SQLAlchemy inserts it).

        ``removed``: the rolled-back frame's deletes. Their objects left the session at the
        flush (:meth:`divert`), where SQLAlchemy's own rollback does not look for them: they
        come back persistent, as SQLAlchemy restores a deleted object, unless the rollback
        also undoes their creation (then transient). As SQLAlchemy's, a savepoint's rollback
        expires only those with changes of their own or a write it undid; the
        transaction's, all. After the writes, whose created objects free their keys first
        (a delete then an add of one key).
        """
        for op in ops:
            if op.kind != "u":
                continue
            owner = instance_state(op.obj).session_id
            if owner == session.hash_key:
                if _creation_undone(op, outer):
                    # alone, as SQLAlchemy's rollback expunges its new objects
                    compat.expunge_alone(session, op.obj)
                    make_transient(op.obj)
                else:
                    session.expire(op.obj)
            elif owner is None and rollback and _creation_undone(op, outer):
                make_transient(op.obj)
        for op in removed:
            state = instance_state(op.obj)
            if state.session_id is not None or state.key is None:
                continue  # added again meanwhile, here or to another session
            if _creation_undone(op, outer):
                make_transient(op.obj)
            elif session.identity_map.get(state.key) is None:
                # alone, as SQLAlchemy's rollback restores the objects its flushes deleted
                compat.add_alone(session, op.obj)
                undone = op.written is not None and (
                    outer is None or outer.find_queued(op.info.table, op.pk) is not op.written
                )
                if outer is None or state.modified or undone:
                    session.expire(op.obj)

    def enqueue(self, ops: list[Op]) -> list[bytes]:
        """Queue ``ops`` with one ``lua/wb_enqueue.lua`` call; returns their stream ids.

        One call, so every operation of the commit is queued or none is. On a cluster,
        the flush already refused operations in several slots
        (:meth:`_refuse_several_slots`); the call runs on the slot's primary, followed
        there by ``WAIT`` for its replicas.
        """
        core = self.core
        keys = core.keys
        signer = core.signer
        queued = []
        for op in ops:
            info = op.info
            assert info.policy is not None
            table = info.table
            entity_key = keys.entity_key(table, info.schema_hash, op.scope, op.pk)
            # the script wraps this body in a stamp of its own; the signature covers the
            # body, bound to the entity key (see sa_redis_cache.signing)
            trailer = b""
            if signer is not None:
                body = b"[" + op.data + b",0]" if op.kind == "u" else b"null"
                trailer = signer.body_trailer(entity_key, body)
            queued.append(
                scripts.QueuedOp(
                    table=table,
                    stream=keys.stream_key(
                        table, op.scope, partition_of(op.pk, info.policy.partitions)
                    ),
                    entity_key=entity_key,
                    pending_key=keys.pending_key(table, info.schema_hash, op.scope, op.pk),
                    kind=op.kind,
                    pk=op.pk,
                    schema_hash=info.schema_hash,
                    data=op.data,
                    trailer=trailer,
                    nulls=encode_nulls(op.nulls),
                )
            )
        io = core.io()
        call = scripts.wb_enqueue(keys, queued, HEADER)
        durable = any(op.info.policy is not None and op.info.policy.durable for op in ops)
        replicas = io.replicas_of(call[1][0])
        try:
            if durable or replicas:
                ids = _enqueue_confirmed(io, call, len(ops), durable=durable, replicas=replicas)
            else:
                ids = io.run_script(*call)
        except (NotOnDiskError, NotReplicatedError):
            # queued all the same (only not confirmed): the worker will flush them
            self._count_queued(ops)
            raise
        self._count_queued(ops)
        return cast("list[bytes]", ids)

    def _count_queued(self, ops: list[Op]) -> None:
        counters = self.core.counters
        for op in ops:
            counters.incr(op.info.scope, "queued")

    # -- reads -------------------------------------------------------------------------------

    def serves_queued(self, mapper: Mapper[Any]) -> bool:
        """Whether a SELECT about ``mapper`` must first go to :meth:`serve_queued` (a
        write-behind model's rows: their queued state wins over any other)."""
        return self._queued_info(mapper) is not None

    def _queued_info(self, mapper: Mapper[Any] | None) -> ModelInfo | None:
        info = self._info(mapper) if mapper is not None else None
        return None if info is None or info.codec is None else info

    def serve_queued(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        """Serve primary-key loads of write-behind rows from their unflushed state."""
        if not orm_context.is_select:
            return None
        info = self._queued_info(compat.bind_mapper(orm_context))
        if info is None:
            return None
        if compat.is_locking(orm_context.statement):
            raise ConfigurationError(
                f"{info.mapper.class_.__name__} is write-behind: a locking read "
                "(with_for_update) cannot serialize its writes (a row's newest state is its "
                "queued one, which no database lock covers, and its writes reach the "
                "database later, from the queue); nothing was read. Read without "
                "with_for_update() (concurrent writes of a row keep the later commit), or "
                "give the model another strategy"
            )
        pk = compat.get_clause_pk(orm_context.statement, info.mapper, orm_context.parameters)
        if pk is None or None in pk:
            return None
        try:
            pk = info.coerce_pk(pk)  # keyed as the queued state holds it: "7" reads as 7
            text = pk_text(pk)
        except (TypeError, ValueError):
            return None
        session = orm_context.session
        state = peek_transaction_state(session)
        op = None if state is None else state.find_queued(info.table, text)
        if op is None and joined.any_handed():
            bind = session.get_bind(mapper=info.mapper)
            op = joined.handed_op(self, bind, info.table, text)
        if op is not None:
            values: Any = op.values
        else:
            scope = self._scope(session, info, orm_context.bind_arguments, orm_context)
            if scope is None:
                return None
            values = self._pending_values(info, scope, text)
            if values is _NOTHING or isinstance(values, _Unreadable):
                return None
        return serve(orm_context, info, pk, values)

    def _newest_rows(
        self, session: Session, state: TransactionState, changed: list[tuple[Any, ModelInfo, str]]
    ) -> dict[int, tuple[Any, ...]]:
        """The rows of changed objects as queued now (by the object's ``id()``), looked up
        as a load by primary key would (:meth:`serve_queued`): this transaction's
        operations, a joined transaction's, then the pending keys, in one round trip.
        Rows with no queued state are left out (the object holds what the database has).

        Raises SQLAlchemy's :class:`~sqlalchemy.orm.exc.StaleDataError` for an object
        whose row is deleted in the queue, as its UPDATE would match no row.
        """
        found: dict[int, Any] = {}
        asked: list[tuple[Any, ModelInfo, str, str]] = []
        for obj, info, scope in changed:
            key = instance_state(obj).key
            assert key is not None
            text = pk_text(list(key[1]))
            op = state.find_queued(info.table, text)
            if op is None and joined.any_handed():
                bind = session.get_bind(mapper=info.mapper)
                op = joined.handed_op(self, bind, info.table, text)
            if op is not None:
                found[id(obj)] = op.values
            else:
                asked.append((obj, info, scope, text))
        if asked:
            queued = self._pending_rows(
                [(info, scope, text) for _, info, scope, text in asked], strict=True
            )
            for (obj, info, _, _), values in zip(asked, queued, strict=True):
                if isinstance(values, _Unreadable):
                    # composing the change over the database's row would overwrite the
                    # queued change the key may hold, once the worker applied both
                    raise ConfigurationError(
                        f"{info.mapper.class_.__name__} {obj!r}: the row's queued "
                        f"write-behind state ({values.key}) cannot be read by this process "
                        f"({values.reason}); nothing of this flush was queued, as it would "
                        "overwrite that queued change. Every process of a namespace must "
                        "use the same signing_key and max_entry_bytes (to change the key, "
                        "drain the write-behind queues first: docs/write-behind.md); if no "
                        "process of the namespace wrote that key, delete it"
                    )
                if values is not _NOTHING:
                    found[id(obj)] = values
        for obj, info, _ in changed:
            if id(obj) in found and found[id(obj)] is None:
                raise StaleDataError(
                    f"UPDATE statement on table '{info.table}' expected to update 1 row(s); "
                    f"0 were matched: {info.mapper.class_.__name__} {obj!r} is deleted (a "
                    "queued write-behind delete); nothing of this flush was queued"
                )
        return found

    def _pending_values(self, info: ModelInfo, row_scope: str, pk: str) -> Any:
        """The row's queued state; None for a queued delete; ``_NOTHING`` when none is
        queued; an :class:`_Unreadable` when its pending key cannot be read.

        ``row_scope`` names the database and schema of the row (``sa_redis_cache.binds``).
        """
        return self._pending_rows([(info, row_scope, pk)])[0]

    def _pending_rows(
        self, rows: list[tuple[ModelInfo, str, str]], *, strict: bool = False
    ) -> list[Any]:
        """:meth:`_pending_values` of each ``(info, row scope, pk text)``, in one round trip.

        When Redis fails, a read goes on as if nothing were queued (the database answers);
        ``strict`` (a flush composing changes over the rows' queued states) raises
        :class:`CacheUnavailableError` instead: composed over the database's row, the
        change would overwrite a queued one once the worker applied both.
        """
        core = self.core
        keys = [
            core.keys.pending_key(info.table, info.schema_hash, scope, pk)
            for info, scope, pk in rows
        ]
        try:
            # MGET reads a key of another Redis type as absent, where GET would fail (and
            # count against the breaker): only strings are queued there, so it holds none
            raws = core.io().mget(keys)
        except RedisError as exc:
            core.redis_failed(exc)
            for scope in {info.scope for info, _, _ in rows}:  # one failed call
                core.counters.incr(scope, "errors")
            if strict:
                names = sorted({info.mapper.class_.__name__ for info, _, _ in rows})
                raise CacheUnavailableError(
                    f"write-behind: cannot read the queued state of the changed {', '.join(names)}"
                    f" rows ({exc}); nothing was queued, as the changes would overwrite what "
                    "is queued for those rows. Retry the transaction"
                ) from exc
            return [_NOTHING] * len(rows)
        return [
            self._opened_pending(info, scope, pk, key, raw)
            for (info, scope, pk), key, raw in zip(rows, keys, raws, strict=True)
        ]

    def _opened_pending(
        self, info: ModelInfo, row_scope: str, pk: str, key: str, raw: bytes | None
    ) -> Any:
        """The queued state a pending key's value holds (see :meth:`_pending_values`)."""
        core = self.core
        assert info.codec is not None
        entity = core.keys.entity_key(info.table, info.schema_hash, row_scope, pk)
        scope = info.scope
        if raw is None:
            return _NOTHING
        try:
            document = core.opened(entity, raw, scripted=True)
        except CodecError as exc:
            core.counters.incr(scope, "decode_errors")
            if len(raw) <= core.max_entry_bytes and _queued_by_a_script(raw):
                # a state queued by a process of the namespace with another signing_key
                # (or none): never deleted here (the worker's acknowledgement removes it
                # once its entry is applied)
                log.warning("unverifiable pending write-behind state %s kept: %s", key, exc)
                return _Unreadable(key, str(exc))
            # oversized, or not what a write-behind script assembles: never a queued state
            log.warning("pending write-behind state %s deleted: %s", key, exc)
            try:
                core.io().unlink(key)
            except RedisError as err:
                core.redis_failed(err)
                core.counters.incr_total("errors")
            return _NOTHING
        try:
            _, values = pending_state(info, document, pk)
        except (CodecError, ValueError, TypeError, IndexError) as exc:
            # never deleted here: it may be the only copy of a queued state the worker has
            log.warning("unreadable pending write-behind state %s: %s", key, exc)
            core.counters.incr(scope, "decode_errors")
            if core.signer is None and _queued_by_a_script(raw, signed=True):
                return _Unreadable(key, "signed with a signing_key, and this process has none")
            return _NOTHING
        core.counters.incr(scope, "pending_hits")
        return values


_SCRIPTED_PENDING = re.compile(re.escape(HEADER) + rb'\["\d+-\d+",')


def _queued_by_a_script(raw: bytes, *, signed: bool = False) -> bool:
    """Whether ``raw`` has the form ``lua/wb_enqueue.lua`` gives a pending key (the head
    the worker's acknowledgement matches), signed (a body trailer) when ``signed``."""
    if _SCRIPTED_PENDING.match(raw) is None:
        return False
    return not signed or raw[-TRAILER_BYTES : -TRAILER_BYTES + 1] == b"B"


DURABLE_WAIT_S = 5.0
"""How long a commit waits for Redis to confirm its queued writes: on disk (``durable``)
and, on a cluster, on every replica of the shard."""


def _enqueue_confirmed(
    io: RedisIO, call: ScriptCall, count: int, *, durable: bool, replicas: int
) -> Any:
    """Queue the commit's writes and wait, at most :data:`DURABLE_WAIT_S`, until Redis has
    them on disk (``WAITAOF``, with ``durable``) and on ``replicas`` replicas (``WAIT``,
    on a cluster); the stream ids. Raises
    :class:`~sa_redis_cache.errors.NotReplicatedError` or
    :class:`~sa_redis_cache.errors.NotOnDiskError` when either is not confirmed: the
    writes are queued all the same.

    ``WAITAOF`` and ``WAIT`` wait for the writes of their own connection only (on another
    connection they would confirm at once), so the waits follow the script on its
    connection, in its round trip (``io.run_then``). Each wait is kept well below the
    client's socket timeout (the server checks a blocked command's timeout only about
    every 100 ms) and the next one queued behind it; once one confirms, the rest answer
    at once.
    """
    timeout = compat.pool_option(io.client, "socket_timeout")
    step_ms = 1000 if not timeout else max(1, min(1000, int(timeout * 400)))
    waits = max(1, math.ceil(DURABLE_WAIT_S * 1000 / step_ms))
    copies = [scripts.wait_for_replicas(replicas, step_ms)] * waits if replicas else []
    disk = [scripts.wait_for_fsync(step_ms)] * waits if durable else []
    replies = io.run_then(call, [*copies, *disk])
    if isinstance(replies[0], Exception):
        raise replies[0]  # nothing was queued
    if copies and not _confirmed(replies[1 : 1 + waits], lambda r: int(r) >= replicas):
        raise NotReplicatedError(
            f"write-behind: this commit's {count} write(s) are queued and will be flushed, "
            f"but fewer than the {replicas} replica(s) of their Redis Cluster shard "
            f"confirmed them within {DURABLE_WAIT_S:g} s ({_why(replies[1 : 1 + waits])}); "
            "a failover before they are copied would lose them. Check the shard's replicas "
            "(down, paused or far behind)"
        )
    if disk and not _confirmed(replies[1 + len(copies) :], lambda r: int(r[0]) >= 1):
        raise NotOnDiskError(
            f"write-behind: this commit's {count} write(s) are queued and will be "
            f"flushed, but Redis did not confirm writing them to disk within "
            f"{DURABLE_WAIT_S:g} s ({_why(replies[1 + len(copies) :])}; "
            "CachePolicy(durable=True)); a crash of the Redis host before its next fsync "
            "would lose them. Check its disk, and that appendfsync is everysec or always "
            "(appendfsync no never fsyncs on its own)"
        )
    return replies[0]


def _confirmed(replies: list[Any], enough: Callable[[Any], bool]) -> bool:
    """Whether any of a run of waits' replies confirmed (an error reply never does)."""
    return any(not isinstance(reply, Exception) and enough(reply) for reply in replies)


def _why(replies: list[Any]) -> str:
    """Why a run of waits did not confirm, for the error message."""
    failed = [reply for reply in replies if isinstance(reply, Exception)]
    return f"the wait failed: {failed[-1]}" if failed else "it did not confirm"


def _refuse_orphaned(session: Session, obj: object, rel: Any) -> None:
    """Refuse deleting ``obj`` while ``rel`` (no delete cascade) holds write-behind rows
    that stay: the unit of work would set their foreign key to NULL with SQL."""
    loaded: Any = getattr(obj, rel.key)  # the unit of work loads them too
    if not rel.uselist:
        children = [loaded]
    else:
        children = list(loaded.values() if isinstance(loaded, dict) else loaded)
    if any(c is not None and c not in session.deleted for c in children):
        parent = type(obj).__name__
        child = rel.mapper.class_.__name__
        fks = ", ".join(
            f"{child}.{rel.mapper.get_property_by_column(remote).key}"
            for _, remote in rel.local_remote_pairs
        )
        raise ConfigurationError(
            f"{parent}.{rel.key}: deleting a {parent} makes the unit of work set {fks} of "
            f"its write-behind {child} rows to NULL with SQL, behind their queue; delete (or "
            f"move) the {child} rows first, and the {parent} once the worker has applied that "
            "(or, without a FOREIGN KEY constraint, cascade='all, delete-orphan' on the "
            "relationship queues their deletes with it)"
        )


def _old_row(
    info: ModelInfo,
    switch: tuple[object, dict[str, Any]] | None,
    rows: dict[int, tuple[Any, ...]],
) -> dict[str, Any] | None:
    """The row a row switch's new object updates: as queued now when it is queued, else as
    its deleted object holds it (which a query may have read before a later commit)."""
    if switch is None:
        return None
    gone, held = switch
    newest = rows.get(id(gone))
    return held if newest is None else dict(zip(info.column_keys, newest, strict=True))


def _nulls(
    info: ModelInfo, values: list[Any], state: Any, *, inserted: bool, unset: set[str]
) -> dict[int, str]:
    """The JSON Nones of a captured row that SQLAlchemy would not write as JSON null, by
    position (:func:`.nulls.null_kind`); ``unset``: the columns the object was never
    given."""
    found: dict[int, str] = {}
    for position, key in enumerate(info.column_keys):
        if values[position] is None and position not in info.pk_positions:
            kind = null_kind(
                column_of(info, key),
                inserted=inserted,
                unset=key in unset,
                unchanged=key not in state.committed_state,
            )
            if kind is not None:
                found[position] = kind
    return found


def _known_values(state: Any, info: ModelInfo, row: tuple[Any, ...] | None) -> dict[str, Any]:
    """The object's loaded column values; with ``row`` (its row as queued now), those of the
    columns it has not changed since its last flush are the row's."""
    dict_ = state.dict
    given = {key: dict_[key] for key in info.column_keys if key in dict_}
    if row is not None:
        unchanged = state.committed_state
        given.update(
            {k: v for k, v in zip(info.column_keys, row, strict=True) if k not in unchanged}
        )
    return given


def _values_back(ops: Iterable[Op]) -> None:
    """Give created objects that a failed enqueue made transient their values again.

    The commit's ``expire_on_commit`` had expired them before the enqueue ran; where
    SQLAlchemy's commit fails, nothing is expired, and its rollback leaves a new object
    transient with the values it was flushed with (Python defaults included): the
    operation's captured row holds exactly those.
    """
    for op in ops:
        state = instance_state(op.obj)
        if op.kind != "u" or op.values is None or state.key is not None or state.session_id:
            continue  # not made transient here: kept, or expired to be read again
        for key, value in zip(op.info.column_keys, op.values, strict=True):
            if key not in state.dict:
                set_committed_value(op.obj, key, value)


def _creation_undone(op: Op, outer: TransactionState | None) -> bool:
    """Whether a rollback undoes the creation of ``op``'s object: it was created in the
    frames rolled back, and no frame that remains (``outer``) wrote it. A remaining
    operation of another object of that key (deleted, or replaced, before the rolled-back
    frames made this one) does not keep it."""
    if not op.created:
        return False
    kept = None if outer is None else outer.find_queued(op.info.table, op.pk)
    return kept is None or kept.obj is not op.obj


def _pending_key(obj: object, info: ModelInfo) -> tuple[Any, ...]:
    """The class and primary key a pending object will be flushed under, as the first two
    parts of an identity key (SQLAlchemy's row switch matches them exactly, as here)."""
    dict_ = instance_state(obj).dict
    return (info.mapper.class_, tuple(dict_.get(info.column_keys[p]) for p in info.pk_positions))


_ZONES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _zone(session: Session, info: ModelInfo) -> Any:
    """The time zone the database gives ``timestamptz`` values in, remembered per engine.

    Read once from a connection (``hydrate.connection_timezone``): checking a connection
    out of the pool on every commit would cost a write-behind commit a third of its time.
    A connection whose ``TimeZone`` an application changes afterwards returns the same
    instants in another zone; the queued value is equal to it, only its ``tzinfo`` differs.
    """
    bind = session.get_bind(info.mapper)
    engine = getattr(bind, "engine", bind)
    zone = _ZONES.get(engine)
    if zone is None:
        zone = hydrate.connection_timezone(session)
        if zone is not None:
            _ZONES[engine] = zone
    return zone


def _outcome(exc: RedisError) -> str:
    """What a failed enqueue left in Redis."""
    if isinstance(exc, TryAgainError):
        # redis-py's bare "Multiple keys request during rehashing of slot" reads as a fault
        return (
            "none of them was queued: their table's cluster slot is being moved between "
            "cluster nodes (a reshard), and Redis refuses a script over keys on both nodes "
            "until the move ends; retry once it has (docs/cluster.md#write-behind)"
        )
    if isinstance(exc, ResponseError) or compat.failed_to_connect(exc):
        # the script refused (it writes all or none), or it was never sent
        return "none of them was queued"
    # the connection failed, maybe after the script was sent
    return (
        "whether they were queued is unknown: the connection failed, maybe after "
        "Redis ran the enqueue (then the worker flushes them)"
    )


def _refuse_nul(info: ModelInfo, values: tuple[Any, ...]) -> None:
    """Refuse a NUL character where the column's Postgres type cannot store one, as the
    database would: text (a string column), ``jsonb`` (in a string or a key of the
    document), ``hstore``, and arrays of those.

    SQLAlchemy's INSERT fails at the flush (the driver refuses a NUL in text; ``jsonb``
    refuses the ``\\u0000`` escape). Queued, the row could never be written, and the
    worker could only dead-letter it; caught here, the application gets the error at its
    commit, as without write-behind. A ``json`` column keeps the escape as it is, and is
    left alone.
    """
    for key, value in zip(info.column_keys, values, strict=True):
        if value is None or not _has_nul(value):
            continue
        kind = _nul_refused_by(column_of(info, key).type)
        if kind is not None:
            raise ConfigurationError(
                f"{info.mapper.class_.__name__}.{key}: the value holds a NUL character "
                f"(\\x00), which a Postgres {kind} column cannot store; the INSERT would fail"
            )


def _nul_refused_by(sqltype: Any, depth: int = 0) -> str | None:
    """The Postgres type of a column that cannot store a NUL in ``sqltype``'s values
    (``text``, ``jsonb``, ``hstore``, arrays of them); None for any other."""
    t = compat.type_variants(sqltype).get("postgresql", sqltype)
    while isinstance(t, sqltypes.TypeDecorator) and depth < 10:
        t, depth = t.impl_instance, depth + 1
    if isinstance(t, pg.JSONB):
        return "jsonb"
    if isinstance(t, pg.HSTORE):
        return "hstore"
    if isinstance(t, sqltypes.String):
        return "text"
    if isinstance(t, sqltypes.ARRAY) and depth < 10:
        inner = _nul_refused_by(t.item_type, depth + 1)
        return None if inner is None else f"{inner}[]"
    return None  # json (keeps the escape), and types whose values are not text


def _has_nul(value: Any) -> bool:
    """A NUL character in a string of ``value``: in lists, tuples, dicts (keys too)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False
