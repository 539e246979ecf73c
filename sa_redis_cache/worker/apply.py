"""Applying one batch of one partition's stream entries to Postgres, exactly once.

One database transaction per batch holds, together: the partition's offset row (locked
first, so two workers that both think they own the partition apply one after the other),
a set-based upsert of the rows whose last operation in the batch is a put, a delete of
those whose last operation is a delete, the dead letters, and the new offset. Entries at
or below the stored offset were applied by an earlier delivery of the same batch (a worker
that died between the database commit and the ack) and are skipped.

Coalescing keeps the *last* operation per primary key in stream order, and a put carries
the full row, so put-then-delete ends deleted and delete-then-put ends present (the
reordering of DESIGN.md §7 cannot happen).

An error that the row itself causes (SQLSTATE classes 22 and 23: bad data, a violated
constraint) fails on every attempt: the batch is applied again under savepoints, bisected
until the failing operations are isolated, and those go to ``sarc_dead_letters`` with their
error while the rest lands. Any other database error is treated as transient and raised:
the caller retries the whole batch later and acknowledges nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import orjson
from sqlalchemy import delete, func, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, StatementError

from sa_redis_cache.codec import CodecError
from sa_redis_cache.schema import dead_letters, wb_offsets
from sa_redis_cache.wb_config import column_of, pk_codec, stream_id

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Engine

    from sa_redis_cache.models import ModelInfo

_DETERMINISTIC_CLASSES = ("22", "23")
_OPS = {"u": "upsert", "d": "delete"}


@dataclass(slots=True)
class Entry:
    """One decoded stream entry; ``error`` is set when it cannot be decoded at all."""

    id: str
    op: str
    pk: str
    data: bytes
    values: tuple[Any, ...] | None = None
    error: str | None = None

    @property
    def sid(self) -> tuple[int, int]:
        """The id as an ordered pair."""
        return stream_id(self.id)


@dataclass(slots=True)
class BatchResult:
    """What one batch did; ``final`` is the last entry per primary key (skipped ones too)."""

    applied: int = 0
    skipped: int = 0
    dead: dict[str, str] = field(default_factory=dict)  # entry id -> error
    final: dict[str, Entry] = field(default_factory=dict)


def is_transient(exc: BaseException) -> bool:
    """True for database errors worth retrying as they are (anything not caused by a row)."""
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return False  # raised in Python while binding one row's values
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None) or ""
        return not state.startswith(_DETERMINISTIC_CLASSES)
    return True


class Applier:
    """Applies batches of one write-behind model's stream entries.

    Example::

        applier = Applier(engine, info, namespace="shop")
        result = applier.apply("sarc:shop:{shop:page_views}:wb:3", entries)
    """

    def __init__(self, engine: Engine, info: ModelInfo, namespace: str) -> None:
        assert info.codec is not None
        self.engine = engine
        self.info = info
        self.namespace = namespace
        self.codec = info.codec
        self.pk_codec = pk_codec(info)
        self.columns = [column_of(info, key) for key in info.column_keys]
        self.pk_columns = [self.columns[p] for p in info.pk_positions]
        table = cast("Table", info.mapper.local_table)
        stmt = insert(table)
        others = {c.name: stmt.excluded[c.name] for c in self.columns if not c.primary_key}
        self.upsert = (
            stmt.on_conflict_do_update(index_elements=self.pk_columns, set_=others)
            if others
            else stmt.on_conflict_do_nothing(index_elements=self.pk_columns)
        )
        self.table = table

    def decode(self, entry_id: bytes | str, fields: dict[bytes, bytes] | None) -> Entry:
        """Decode one stream entry; a bad one comes back with ``error`` set, never raises."""
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        fields = fields or {}
        op = fields.get(b"o", b"").decode(errors="replace")
        entry = Entry(
            text, op, fields.get(b"k", b"").decode(errors="replace"), fields.get(b"d", b"")
        )
        schema = fields.get(b"h", b"").decode(errors="replace")
        if op not in _OPS or not entry.pk:
            entry.error = f"not a write-behind operation: {fields!r}"
        elif schema != self.info.schema_hash:
            entry.error = (
                f"queued by another version of the model (schema {schema}, this worker "
                f"has {self.info.schema_hash}); replay it with the matching code"
            )
        else:
            codec = self.codec if op == "u" else self.pk_codec
            try:
                entry.values = codec.load_row(orjson.loads(entry.data))
            except (CodecError, ValueError, TypeError) as exc:
                entry.error = f"undecodable stream entry: {exc}"
        return entry

    def apply(self, stream: str, entries: list[Entry]) -> BatchResult:
        """Apply ``entries`` (in stream order) in one transaction; see the module docstring.

        Raises the database error when it is transient: nothing is then applied.
        """
        result = BatchResult()
        for entry in entries:
            result.final[entry.pk] = entry
        try:
            with self.engine.begin() as conn:
                self._run(conn, stream, entries, result, bisect=False)
        except (DBAPIError, StatementError) as exc:
            if is_transient(exc):
                raise
            result.dead.clear()
            with self.engine.begin() as conn:
                self._run(conn, stream, entries, result, bisect=True)
        return result

    def _run(
        self,
        conn: Connection,
        stream: str,
        entries: list[Entry],
        result: BatchResult,
        *,
        bisect: bool,
    ) -> None:
        last = self._lock_offset(conn, stream)
        fresh = [e for e in entries if e.sid > last]
        result.skipped = len(entries) - len(fresh)
        latest: dict[str, Entry] = {}
        for entry in fresh:
            if entry.error is not None:
                result.dead[entry.id] = entry.error
            else:
                latest[entry.pk] = entry
        ops = sorted(latest.values(), key=lambda e: e.pk)
        if bisect:
            self._bisect(conn, ops, result.dead)
        else:
            self._write(conn, ops)
        result.applied = len(ops) - sum(1 for e in ops if e.id in result.dead)
        if result.dead:
            conn.execute(
                insert(dead_letters),
                [self._dead_row(stream, e, result.dead) for e in fresh if e.id in result.dead],
            )
        if fresh:
            newest = max(fresh, key=lambda e: e.sid)
            conn.execute(
                wb_offsets.update()
                .where(wb_offsets.c.stream == stream)
                .values(
                    last_id=newest.id,
                    applied_ops=wb_offsets.c.applied_ops + result.applied,
                    updated_at=func.now(),
                )
            )

    def _lock_offset(self, conn: Connection, stream: str) -> tuple[int, int]:
        """The partition's last applied id, with its row locked until this transaction ends."""
        stmt = insert(wb_offsets).values(stream=stream, last_id="0-0")
        locked = stmt.on_conflict_do_update(
            index_elements=[wb_offsets.c.stream], set_={"stream": stmt.excluded.stream}
        ).returning(wb_offsets.c.last_id)
        return stream_id(str(conn.execute(locked).scalar_one()))

    def _write(self, conn: Connection, ops: list[Entry]) -> None:
        puts = [e for e in ops if e.op == "u"]
        removals = [e for e in ops if e.op == "d"]
        if removals:
            keys = [e.values for e in removals]
            if len(self.pk_columns) == 1:
                where = self.pk_columns[0].in_([k[0] for k in keys if k is not None])
            else:
                where = tuple_(*self.pk_columns).in_(keys)
            conn.execute(delete(self.table).where(where))
        if puts:
            names = [c.key for c in self.columns]
            conn.execute(
                self.upsert,
                [dict(zip(names, e.values or (), strict=True)) for e in puts],
            )

    def _bisect(self, conn: Connection, ops: list[Entry], dead: dict[str, str]) -> None:
        if not ops:
            return
        try:
            with conn.begin_nested():
                self._write(conn, ops)
        except (DBAPIError, StatementError) as exc:
            if is_transient(exc):
                raise
            if len(ops) == 1:
                dead[ops[0].id] = str(getattr(exc, "orig", None) or exc).strip()
                return
            middle = len(ops) // 2
            self._bisect(conn, ops[:middle], dead)
            self._bisect(conn, ops[middle:], dead)

    def _dead_row(self, stream: str, entry: Entry, dead: dict[str, str]) -> dict[str, Any]:
        payload: Any = None
        pk: Any = None
        try:
            data = orjson.loads(entry.data)
            if entry.op == "u" and isinstance(data, list):
                payload = dict(zip(self.info.column_keys, data, strict=False))
                pk = [data[p] for p in self.info.pk_positions if p < len(data)]
            else:
                pk = data
        except orjson.JSONDecodeError:
            payload = {"raw": entry.data.decode(errors="replace")}
        return {
            "namespace": self.namespace,
            "table_name": self.info.table,
            "stream": stream,
            "entry_id": entry.id,
            "op": _OPS.get(entry.op),
            "pk": pk,
            "payload": payload,
            "error": dead[entry.id],
        }
