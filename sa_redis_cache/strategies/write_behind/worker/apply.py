"""Applying one batch of one partition's stream entries to Postgres, exactly once.

One database transaction per batch holds, together: the partition's offset row (locked
first, so two workers that both think they own the partition apply one after the other),
one set-based upsert of the rows whose last operation in the batch is a put, one delete of
those whose last operation is a delete (:mod:`.sets`), the dead
letters, and the new offset. Entries at or below the stored offset were applied by an
earlier delivery of the same batch (a worker that died between the database commit and the
ack) and are skipped.

Coalescing keeps the *last* operation per primary key in stream order, and a put carries
the full row, so put-then-delete ends deleted and delete-then-put ends present (the
reordering of docs/design.md, "Known failures" cannot happen).

An error that the row itself causes (SQLSTATE classes 22 and 23: bad data, a violated
constraint) fails on every attempt: the batch is applied again under savepoints, bisected
until the failing operations are isolated, and those go to ``sarc_dead_letters`` with their
error while the rest lands. An operation is dead-lettered only after it failed alone
through SQLAlchemy's own ``executemany`` as well, so a quirk of the set-based statement can
never condemn a row. Any other database error is treated as transient and raised: the
caller retries the whole batch later and acknowledges nothing.

**Dead letters never overwrite newer writes.** When a batch applies (or dead-letters) an
operation on a row that has an open dead letter with an older stream id, that letter is
marked superseded in the same transaction (``replayed_at`` set, its ``error`` prefixed
with ``superseded by entry <id>``), so :func:`~sa_redis_cache.worker.replay_dead_letters`
will never apply it. The check costs nothing extra while no dead letter is open: the
offset update reports, in the same statement, whether the table has any.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

import orjson
from sqlalchemy import bindparam, delete, exists, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, StatementError

from sa_redis_cache.codec import CodecError
from sa_redis_cache.protocol import pk_text, stream_id
from sa_redis_cache.schema import dead_letters, wb_offsets
from sa_redis_cache.strategies.write_behind.columns import column_of, pk_codec

from .sets import SetStatements, set_based

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Engine

    from sa_redis_cache.models import ModelInfo

log = logging.getLogger(__name__)

_DETERMINISTIC_CLASSES = ("22", "23")
# the database refused the set-based statement itself (a cast, a type it cannot take in an
# array): the table falls back to executemany, which SQLAlchemy binds column by column
_STATEMENT_CLASSES = ("42", "0A")
_OPS = {"u": "upsert", "d": "delete"}
SUPERSEDED = "superseded by entry "
"""How the ``error`` of a dead letter that a newer write made obsolete begins."""

KEY_KEY = "$key"
"""Payload key holding the row's ``pk_text`` in every dead letter (it finds newer writes)."""
SCHEMA_KEY = "$schema"
ROW_KEY = "$row"
RAW_KEY = "$raw"
"""Payload keys of dead letters that could not be mapped to the model's columns."""


@dataclass(slots=True)
class Entry:
    """One decoded stream entry; ``error`` is set when it cannot be decoded at all."""

    id: str
    op: str
    pk: str
    data: bytes
    schema: str = ""
    values: tuple[Any, ...] | None = None
    error: str | None = None

    @property
    def sid(self) -> tuple[int, int]:
        """The id as the pair it is ordered by (text order is wrong: ``"9-0" > "10-0"``)."""
        return sid_of(self.id)


@dataclass(slots=True)
class BatchResult:
    """What one batch did; ``final`` is the last entry per primary key (skipped ones too)."""

    applied: int = 0
    skipped: int = 0
    dead: dict[str, str] = field(default_factory=dict)  # entry id -> error
    final: dict[str, Entry] = field(default_factory=dict)
    superseded: int = 0  # open dead letters this batch made obsolete


def superseded_note(reason: str) -> str:
    """What goes before the original error of a letter that a newer write made obsolete."""
    return f"{reason}; never replayed. It had failed with: "


def is_transient(exc: BaseException) -> bool:
    """True for database errors worth retrying as they are (anything not caused by a row)."""
    if isinstance(exc, StatementError) and not isinstance(exc, DBAPIError):
        return False  # raised in Python while binding one row's values
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = _sqlstate(exc)
        return not state.startswith(_DETERMINISTIC_CLASSES)
    return True


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def _statement_refused(exc: BaseException) -> bool:
    """The set-based statement, not a row, is the problem (see ``_STATEMENT_CLASSES``)."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    state = _sqlstate(exc)
    # no SQLSTATE at all: the driver refused to adapt an array before sending anything
    return state.startswith(_STATEMENT_CLASSES) or (not state and not _is_disconnect(exc))


def _is_disconnect(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError)


def sid_of(entry_id: str) -> tuple[int, int]:
    """A stream id as its ordered pair; ``(-1, -1)`` for something that is not one."""
    try:
        return stream_id(entry_id)
    except ValueError:
        return (-1, -1)


class Applier:
    """Applies batches of one write-behind model's stream entries.

    Example::

        applier = Applier(engine, info, namespace="shop")
        result = applier.apply("sarc:shop:{shop:page_views}:wb:00ff:3", entries)
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
        self.names = [c.key for c in self.columns]
        table = cast("Table", info.mapper.local_table)
        self.table = table
        stmt = insert(table)
        others = {c.name: stmt.excluded[c.name] for c in self.columns if not c.primary_key}
        self.upsert = (
            stmt.on_conflict_do_update(index_elements=self.pk_columns, set_=others)
            if others
            else stmt.on_conflict_do_nothing(index_elements=self.pk_columns)
        )
        self._schema_bytes = info.schema_hash.encode()
        dialect = engine.dialect
        self.sets: SetStatements | None = (
            SetStatements(
                table,
                self.columns,
                self.pk_columns,
                dialect,
                engine.get_execution_options().get("schema_translate_map"),
            )
            if set_based(self.columns, dialect)
            else None
        )
        lock = insert(wb_offsets).values(stream=bindparam("stream"), last_id="0-0")
        self._lock = lock.on_conflict_do_update(
            index_elements=[wb_offsets.c.stream], set_={"stream": lock.excluded.stream}
        ).returning(wb_offsets.c.last_id)
        self.open_letters = self._letters_where(
            select(
                dead_letters.c.id,
                dead_letters.c.entry_id,
                dead_letters.c.pk,
                dead_letters.c.payload,
            )
        )
        has_open = exists().where(*self._letter_filter()).label("open_letters")
        self._advance = (
            wb_offsets.update()
            .where(wb_offsets.c.stream == bindparam("stream_key"))
            .values(
                last_id=bindparam("last"),
                applied_ops=wb_offsets.c.applied_ops + bindparam("applied"),
                updated_at=func.now(),
            )
            .returning(has_open)
        )
        self._supersede_stmt = (
            dead_letters.update()
            .where(dead_letters.c.id == bindparam("letter_id"))
            .values(replayed_at=func.now(), error=bindparam("note") + dead_letters.c.error)
        )

    # -- decoding --------------------------------------------------------------------------

    def decode(self, entry_id: bytes | str, fields: Any) -> Entry:
        """Decode one stream entry; a bad one comes back with ``error`` set, never raises.

        ``fields`` is what Redis returned: the flat ``[b"o", op, b"k", pk, ...]`` list of
        a script reply, or redis-py's dict.
        """
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if (
            type(fields) is list
            and len(fields) == 8
            and fields[0] == b"o"
            and fields[2] == b"k"
            and fields[4] == b"h"
            and fields[6] == b"d"
        ):
            raw_op, raw_pk, raw_schema, data = fields[1], fields[3], fields[5], fields[7]
        else:
            found = _fields(fields)
            raw_op, raw_pk = found.get(b"o", b""), found.get(b"k", b"")
            raw_schema, data = found.get(b"h", b""), found.get(b"d", b"")
        op = "u" if raw_op == b"u" else "d" if raw_op == b"d" else raw_op.decode(errors="replace")
        entry = Entry(
            text, op, raw_pk.decode(errors="replace"), data, raw_schema.decode(errors="replace")
        )
        if op not in _OPS or not entry.pk:
            entry.error = f"not a write-behind operation: {fields!r}"
        elif entry.schema != self.info.schema_hash:
            entry.error = (
                f"queued by another version of the model (schema {entry.schema}, this worker "
                f"has {self.info.schema_hash}); replay it with the matching code"
            )
        else:
            codec = self.codec if op == "u" else self.pk_codec
            try:
                entry.values = codec.load_row(orjson.loads(data))
            except (CodecError, ValueError, TypeError) as exc:
                entry.error = f"undecodable stream entry: {exc}"
        return entry

    def decode_batch(self, raw: list[Any]) -> list[Entry]:
        """:meth:`decode` for each ``(entry id, fields)`` of a reply, in order.

        Entries written by ``lua/wb_enqueue.lua`` for this version of the model take a
        fast path; anything else goes through :meth:`decode`.
        """
        out: list[Entry] = []
        append = out.append
        schema, schema_text = self._schema_bytes, self.info.schema_hash
        load_row, pk_load_row, loads = self.codec.load_row, self.pk_codec.load_row, orjson.loads
        for entry_id, fields in raw:
            if (
                type(fields) is list
                and len(fields) == 8
                and fields[5] == schema
                and fields[0] == b"o"
                and fields[2] == b"k"
                and fields[6] == b"d"
                and fields[3]
            ):
                op = fields[1]
                try:
                    if op == b"u":
                        values = load_row(loads(fields[7]))
                    elif op == b"d":
                        values = pk_load_row(loads(fields[7]))
                    else:
                        append(self.decode(entry_id, fields))
                        continue
                except (CodecError, ValueError, TypeError):
                    append(self.decode(entry_id, fields))
                    continue
                append(
                    Entry(
                        entry_id.decode() if type(entry_id) is bytes else entry_id,
                        "u" if op == b"u" else "d",
                        fields[3].decode(errors="replace"),
                        fields[7],
                        schema_text,
                        values,
                    )
                )
            else:
                append(self.decode(entry_id, fields))
        return out

    def letter_pk(self, pk: Any, payload: Any = None) -> str | None:
        """The ``pk_text`` of a dead letter (from its payload, else its ``pk`` column).

        None when neither tells: such a letter cannot be matched with newer writes.
        """
        if isinstance(payload, dict) and isinstance(payload.get(KEY_KEY), str):
            return payload[KEY_KEY] or None
        try:
            return pk_text(self.pk_codec.load_row(pk))
        except (CodecError, TypeError, ValueError):
            return None

    def from_letter(self, entry_id: str, op: str | None, pk: Any, payload: Any) -> Entry:
        """The operation a dead letter holds, decoded as the worker would (``error`` if not).

        Example::

            entry = applier.from_letter("1700000000000-0", "upsert", [7], {"id": 7, ...})
        """
        kind = {"upsert": "u", "delete": "d"}.get(op or "", "")
        entry = Entry(entry_id, kind, self.letter_pk(pk, payload) or "", b"")
        try:
            if kind == "d":
                entry.values = self.pk_codec.load_row(pk)
            elif kind == "u" and isinstance(payload, dict):
                entry.values = self._payload_values(payload)
            else:
                entry.error = f"the dead letter holds no operation this worker can apply ({op})"
                return entry
        except (CodecError, TypeError, ValueError, KeyError) as exc:
            entry.error = f"cannot decode the dead letter: {exc}"
            return entry
        values = entry.values
        entry.pk = pk_text([values[p] for p in self.info.pk_positions] if kind == "u" else values)
        return entry

    def _payload_values(self, payload: dict[str, Any]) -> tuple[Any, ...]:
        if SCHEMA_KEY in payload:
            if payload[SCHEMA_KEY] != self.info.schema_hash:
                raise ValueError(
                    f"queued by another version of the model (schema {payload[SCHEMA_KEY]}, "
                    f"this code has {self.info.schema_hash}); replay it with the matching code"
                )
            return self.codec.load_row(payload[ROW_KEY])
        if RAW_KEY in payload:
            raise ValueError("the queued entry was not JSON")
        missing = [k for k in self.info.column_keys if k not in payload]
        if missing:
            raise KeyError(f"the model changed since: the row lacks {', '.join(missing)}")
        return self.codec.load_row([payload[k] for k in self.info.column_keys])

    # -- one batch ----------------------------------------------------------------------------

    def apply(self, stream: str, entries: list[Entry]) -> BatchResult:
        """Apply ``entries`` (in stream order) in one transaction; see the module docstring.

        Raises the database error when it is transient: nothing is then applied.
        """
        result = BatchResult(final={e.pk: e for e in entries})
        try:
            with self.engine.begin() as conn:
                self._run(conn, stream, entries, result, bisect=False)
        except (DBAPIError, StatementError) as exc:
            if self.sets is not None and _statement_refused(exc):
                self._drop_set_based(exc)
                return self.apply(stream, entries)
            if is_transient(exc):
                raise
            result.dead.clear()
            with self.engine.begin() as conn:
                self._run(conn, stream, entries, result, bisect=True)
        return result

    def _drop_set_based(self, exc: BaseException) -> None:
        log.warning(
            "write-behind: the set-based statements of %s were refused (%s); this table "
            "uses executemany from now on",
            self.info.table,
            str(getattr(exc, "orig", None) or exc).strip().splitlines()[0],
        )
        self.sets = None

    def _run(
        self,
        conn: Connection,
        stream: str,
        entries: list[Entry],
        result: BatchResult,
        *,
        bisect: bool,
    ) -> None:
        last = self.lock_offset(conn, stream)
        # entries come in stream order: usually all of them are newer than the offset
        fresh = (
            entries
            if not entries or entries[0].sid > last
            else [e for e in entries if e.sid > last]
        )
        result.skipped = len(entries) - len(fresh)
        latest = {e.pk: e for e in fresh if e.error is None}  # the last operation per row
        if len(latest) < len(fresh):  # coalesced, or some entries could not be decoded
            for entry in fresh:
                if entry.error is not None:
                    result.dead[entry.id] = entry.error
        ops = sorted(latest.values(), key=attrgetter("pk"))  # one lock order for all
        if bisect:
            self._bisect(conn, ops, result.dead)
        else:
            self.write(conn, ops)
        dead = result.dead
        result.applied = len(ops) - sum(1 for e in ops if e.id in dead) if dead else len(ops)
        if result.dead:
            conn.execute(
                insert(dead_letters),
                [self._dead_row(stream, e, result.dead) for e in fresh if e.id in result.dead],
            )
        if fresh:
            open_letters = conn.execute(
                self._advance,
                {"stream_key": stream, "last": fresh[-1].id, "applied": result.applied},
            ).scalar_one()
            if open_letters:
                result.superseded = self.supersede(conn, {e.pk: e for e in fresh if e.pk})

    def lock_offset(self, conn: Connection, stream: str) -> tuple[int, int]:
        """The partition's last applied id, with its row locked until this transaction ends."""
        return stream_id(str(conn.execute(self._lock, {"stream": stream}).scalar_one()))

    def supersede(self, conn: Connection, newest: dict[str, Entry]) -> int:
        """Mark the open dead letters older than ``newest[their pk]``; returns how many."""
        marks = []
        for letter_id, entry_id, pk, payload in conn.execute(self.open_letters):
            text = self.letter_pk(pk, payload)
            newer = newest.get(text) if text is not None else None
            if newer is not None and newer.id != entry_id and newer.sid > sid_of(entry_id):
                reason = f"{SUPERSEDED}{newer.id}, a newer write of this row"
                marks.append({"letter_id": letter_id, "note": superseded_note(reason)})
        if marks:
            conn.execute(self._supersede_stmt, marks)
        return len(marks)

    def _letter_filter(self) -> tuple[Any, ...]:
        return (
            dead_letters.c.namespace == self.namespace,
            dead_letters.c.table_name == self.info.table,
            dead_letters.c.replayed_at.is_(None),
        )

    def _letters_where(self, stmt: Any) -> Any:
        return stmt.where(*self._letter_filter())

    def write(self, conn: Connection, ops: list[Entry], *, set_based: bool = True) -> None:
        """Write ``ops`` (one per primary key): one delete and one upsert statement."""
        puts: list[tuple[Any, ...]] = []
        keys: list[tuple[Any, ...]] = []
        for entry in ops:
            assert entry.values is not None
            (puts if entry.op == "u" else keys).append(entry.values)
        sets = self.sets if set_based else None
        if keys:
            if sets is not None:
                sets.delete(conn, keys)
            elif len(self.pk_columns) == 1:
                conn.execute(delete(self.table).where(self.pk_columns[0].in_([k[0] for k in keys])))
            else:
                conn.execute(delete(self.table).where(tuple_(*self.pk_columns).in_(keys)))
        if puts:
            if sets is not None:
                sets.upsert(conn, puts)
            else:
                names = self.names
                conn.execute(self.upsert, [dict(zip(names, row, strict=True)) for row in puts])

    def _bisect(self, conn: Connection, ops: list[Entry], dead: dict[str, str]) -> None:
        if not ops:
            return
        try:
            with conn.begin_nested():
                self.write(conn, ops)
        except (DBAPIError, StatementError) as exc:
            if is_transient(exc):
                raise
            if len(ops) == 1:
                self._one(conn, ops[0], exc, dead)
                return
            middle = len(ops) // 2
            self._bisect(conn, ops[:middle], dead)
            self._bisect(conn, ops[middle:], dead)

    def _one(
        self, conn: Connection, entry: Entry, exc: BaseException, dead: dict[str, str]
    ) -> None:
        """An operation failed alone: confirm through executemany before condemning it."""
        if self.sets is not None:
            try:
                with conn.begin_nested():
                    self.write(conn, [entry], set_based=False)
            except (DBAPIError, StatementError) as again:
                if is_transient(again):
                    raise
                exc = again
            else:
                self._drop_set_based(exc)
                return
        dead[entry.id] = str(getattr(exc, "orig", None) or exc).strip()

    def _dead_row(self, stream: str, entry: Entry, dead: dict[str, str]) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        pk: Any = None
        try:
            data = orjson.loads(entry.data)
        except orjson.JSONDecodeError:
            payload = {RAW_KEY: entry.data.decode(errors="replace")}
        else:
            if entry.schema != self.info.schema_hash:
                # another version of the model: its columns are not ours to name
                payload = {SCHEMA_KEY: entry.schema, ROW_KEY: data}
            elif entry.op == "u" and isinstance(data, list):
                payload = dict(zip(self.info.column_keys, data, strict=False))
                pk = [data[p] for p in self.info.pk_positions if p < len(data)]
            else:
                pk = data
        payload[KEY_KEY] = entry.pk
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


def _fields(raw: Any) -> dict[bytes, bytes]:
    """Entry fields as a dict: redis-py parses XREADGROUP replies, a script returns pairs."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2], strict=False))
