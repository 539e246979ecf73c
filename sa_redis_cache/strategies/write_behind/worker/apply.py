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
constraint; P0: a trigger's RAISE EXCEPTION) fails on every attempt: the batch is
applied again under savepoints, bisected until the failing operations are isolated, and
those go to ``sarc_dead_letters`` with their error while the rest lands. An operation is
dead-lettered only after it failed alone through SQLAlchemy's own ``executemany`` as
well, so a quirk of the set-based statement can never condemn a row. Any other database
error is treated as transient and raised: the caller retries the whole batch later and
acknowledges nothing. A statement timeout (57014) is raised too: the worker reads the
batch again smaller, and an operation that keeps timing out alone goes through
:meth:`Applier.apply_alone`, which dead-letters it if it times out once more.

**Dead letters never overwrite newer writes.** When a batch applies (or dead-letters) an
operation on a row that has an open dead letter with an older stream id, that letter is
marked superseded in the same transaction (``replayed_at`` set, its ``error`` prefixed
with ``superseded by entry <id>``), so :func:`~sa_redis_cache.worker.replay_dead_letters`
will never apply it. The check costs nothing extra while no dead letter is open: the
offset update reports, in the same statement, whether the table has any.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

import orjson
from sqlalchemy import bindparam, delete, exists, func, null, select, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, DBAPIError, StatementError

from sa_redis_cache.codec import CodecError
from sa_redis_cache.protocol import pk_text, stream_id
from sa_redis_cache.schema import dead_letters, wb_offsets
from sa_redis_cache.strategies.write_behind.columns import column_of, pk_codec
from sa_redis_cache.strategies.write_behind.nulls import (
    KEEP,
    NULLS_KEY,
    after,
    as_document,
    decode_nulls,
)

from .sets import SetStatements, qualified_name, set_based

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Engine

    from sa_redis_cache.models import ModelInfo

log = logging.getLogger(__name__)

_DETERMINISTIC_CLASSES = ("22", "23", "P0")
# P0: PL/pgSQL's own errors, a trigger's plain RAISE EXCEPTION (P0001) above all: how a
# validation trigger refuses a row. Taken for transient, one such row held its partition
# for good; dead-lettered, it waits for a replay like any refused row.
# the database refused the set-based statement itself (a cast, a type it cannot take in an
# array): the table falls back to executemany, which SQLAlchemy binds column by column
_STATEMENT_CLASSES = ("42", "0A")
_OPS = {"u": "upsert", "d": "delete"}
ENTRY_FIELD = b"e"
"""The one field of a stream entry (``lua/wb_enqueue.lua``)."""
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
    data: Any  # the row or key as queued: parsed JSON, or bytes (older entries, bad ones)
    schema: str = ""
    values: tuple[Any, ...] | None = None
    error: str | None = None
    # the JSON columns whose None is no JSON null, by position (strategies/write_behind/
    # nulls.py); None when the entry names none
    nulls: dict[int, str] | None = None

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


class LeaseLost(Exception):
    """The partition's fencing token is no longer this worker's: nothing was applied.

    Another worker took the partition's lease (this one paused past its lease, or its
    lease expired while Redis was unreachable) and moved ``sarc_wb_offsets.lease_token``;
    the batch's transaction was rolled back before it wrote anything.
    """

    def __init__(self, stream: str, token: int, found: int | None) -> None:
        now = "no offset row" if found is None else f"token {found}"
        super().__init__(
            f"write-behind partition {stream} was taken over by another worker (this one "
            f"holds token {token}, the database has {now}): the batch was not applied"
        )
        self.stream = stream
        self.token = token
        self.found = found


class _Delivered(Exception):
    """Some entries of the batch are at or below the partition's offset (a redelivery)."""


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
        if not state and isinstance(exc, DataError):
            # refused by the driver before sending, for a value (a NUL in a string)
            return False
        return not state.startswith(_DETERMINISTIC_CLASSES)
    return True


def is_timeout(exc: BaseException) -> bool:
    """The statement was cancelled (SQLSTATE 57014: ``statement_timeout``, or a cancel
    request): a smaller batch may pass where this one cannot."""
    return isinstance(exc, DBAPIError) and _sqlstate(exc) == "57014"


def condemned_at_last_attempt(exc: BaseException) -> bool:
    """An error the worker retries, counting the attempts of the operation that fails
    alone, and dead-letters at the last one (``FlushWorker(timeout_attempts=)``): a
    statement timeout (:func:`is_timeout`), or an exception that is not a database
    error at all (a column type's bind processor that raises in the worker's process).
    Either may pass on a later attempt; neither may hold the partition for good."""
    if isinstance(exc, DBAPIError | StatementError):
        return is_timeout(exc)
    return not isinstance(exc, LeaseLost | _Delivered)


def error_text(exc: BaseException) -> str:
    """What a dead letter's ``error`` says of ``exc``: the database's message, or the
    type and message of an exception raised in Python."""
    if isinstance(exc, DBAPIError | StatementError):
        return str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {exc}".strip()


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def _statement_refused(exc: BaseException) -> bool:
    """The set-based statement, not a row, is the problem (see ``_STATEMENT_CLASSES``)."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    state = _sqlstate(exc)
    # no SQLSTATE at all: the driver refused to adapt an array before sending anything;
    # not a DataError, a value's own fault, which bisection isolates (and _one confirms
    # through executemany before condemning it)
    return state.startswith(_STATEMENT_CLASSES) or (
        not state and not _is_disconnect(exc) and not isinstance(exc, DataError)
    )


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

    def __init__(
        self, engine: Engine, info: ModelInfo, namespace: str, *, idle_timeout_ms: int = 0
    ) -> None:
        assert info.codec is not None
        self.engine = engine
        # a fenced batch's transaction is ended by the database once it has waited this
        # long for its client (0: never): a worker stopped inside it (SIGSTOP, a VM pause)
        # would otherwise hold the partition's offset row, and the partition, for as long
        # as it is stopped, where its successor takes over once the lease has passed
        self.idle_timeout_ms = max(0, int(idle_timeout_ms))
        self._idle_timeout = (
            "SELECT set_config('idle_in_transaction_session_timeout', "
            f"'{self.idle_timeout_ms}', true)"
        )
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
        self._kept_sets: dict[frozenset[int], SetStatements] = {}
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
        # the usual batch, as raw SQL sent in one round trip (:meth:`_run_pipelined`)
        translate = engine.get_execution_options().get("schema_translate_map")
        offsets = qualified_name(wb_offsets, dialect, translate)
        letters = qualified_name(dead_letters, dialect, translate)
        # identifiers come quoted from the dialect; values are bound
        self._pipelined_lock = (
            f"SELECT last_id, lease_token FROM {offsets} WHERE stream = %s FOR UPDATE"  # noqa: S608
        )
        self._pipelined_advance = (
            f"UPDATE {offsets} SET last_id = %s, applied_ops = applied_ops + %s, "  # noqa: S608
            f"updated_at = now() WHERE stream = %s RETURNING EXISTS (SELECT 1 FROM {letters} "
            "WHERE namespace = %s AND table_name = %s AND replayed_at IS NULL)"
        )
        lock = insert(wb_offsets).values(stream=bindparam("stream"), last_id="0-0")
        self._lock = lock.on_conflict_do_update(
            index_elements=[wb_offsets.c.stream], set_={"stream": lock.excluded.stream}
        ).returning(wb_offsets.c.last_id)
        # a batch locks the row without writing a new version of it (the update at the end
        # of the batch does that once), and reads the token it must still hold
        self._fenced_lock = (
            select(wb_offsets.c.last_id, wb_offsets.c.lease_token)
            .where(wb_offsets.c.stream == bindparam("stream"))
            .with_for_update()
        )
        acquire = insert(wb_offsets).values(
            stream=bindparam("stream"), last_id="0-0", lease_token=1
        )
        self._acquire = acquire.on_conflict_do_update(
            index_elements=[wb_offsets.c.stream],
            set_={"lease_token": wb_offsets.c.lease_token + 1},
        ).returning(wb_offsets.c.lease_token)
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

        ``fields`` is what Redis returned for the entry: redis-py's dict, or the flat list
        of a script reply. An entry is ``{e: [op, pk text, schema hash, data]}`` (JSON),
        with a fifth element naming JSON Nones that are no JSON null when there are any;
        entries of the earlier four-field form (``o``, ``k``, ``h``, ``d``) are read too.
        """
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        found = _fields(fields)
        marks: Any = None
        if ENTRY_FIELD in found:
            raw = found[ENTRY_FIELD]
            try:
                parsed = orjson.loads(raw)
                op, pk, schema, data = parsed[:4] if len(parsed) == 5 else parsed
            except (orjson.JSONDecodeError, TypeError, ValueError):
                return Entry(text, "", "", raw, error=f"not a write-behind operation: {raw!r}")
            if not (isinstance(op, str) and isinstance(pk, str) and isinstance(schema, str)):
                return Entry(text, "", "", raw, error=f"not a write-behind operation: {raw!r}")
            entry = Entry(text, op, pk, data, schema)
            if len(parsed) == 5:
                marks = parsed[4]
        else:
            raw_op, raw_pk = found.get(b"o", b""), found.get(b"k", b"")
            raw_schema, data = found.get(b"h", b""), found.get(b"d", b"")
            entry = Entry(
                text,
                raw_op.decode(errors="replace"),
                raw_pk.decode(errors="replace"),
                data,
                raw_schema.decode(errors="replace"),
            )
        if entry.op not in _OPS or not entry.pk:
            entry.error = f"not a write-behind operation: {fields!r}"
        elif entry.schema != self.info.schema_hash:
            entry.error = (
                f"queued by another version of the model (schema {entry.schema}, this worker "
                f"has {self.info.schema_hash}); replay it with the matching code"
            )
        else:
            codec = self.codec if entry.op == "u" else self.pk_codec
            try:
                row = orjson.loads(entry.data) if isinstance(entry.data, bytes) else entry.data
                entry.values = codec.load_row(row)
                if marks is not None:
                    entry.nulls = self._nulls(marks)
            except (CodecError, ValueError, TypeError) as exc:
                entry.error = f"undecodable stream entry: {exc}"
        return entry

    def _nulls(self, document: Any) -> dict[int, str]:
        """An entry's or a letter's JSON Nones that are no JSON null (ValueError if bad)."""
        return decode_nulls(document, len(self.info.column_keys), list(self.info.pk_positions))

    def decode_batch(self, raw: list[Any]) -> list[Entry]:
        """:meth:`decode` for each ``(entry id, fields)`` of a reply, in order.

        Entries written by ``lua/wb_enqueue.lua`` for this version of the model take a
        fast path; anything else goes through :meth:`decode`.
        """
        out: list[Entry] = []
        append = out.append
        schema = self.info.schema_hash
        load_row, pk_load_row, loads = self.codec.load_row, self.pk_codec.load_row, orjson.loads
        for entry_id, fields in raw:
            if type(fields) is list and len(fields) == 2 and fields[0] == ENTRY_FIELD:
                value = fields[1]  # as Redis sends it
            elif type(fields) is dict:
                value = fields.get(ENTRY_FIELD)  # as redis-py parses it
            else:
                value = None
            if value is not None:
                try:
                    parsed = loads(value)
                    # a fifth element names JSON Nones that are no JSON null (nulls.py)
                    marks = parsed.pop() if type(parsed) is list and len(parsed) == 5 else None
                    op, pk, found, data = parsed
                    if found == schema and type(pk) is str and pk:
                        if op == "u":
                            entry = Entry(entry_id.decode(), "u", pk, data, schema, load_row(data))
                            if marks is not None:
                                entry.nulls = self._nulls(marks)
                            append(entry)
                            continue
                        if op == "d":
                            append(
                                Entry(entry_id.decode(), "d", pk, data, schema, pk_load_row(data))
                            )
                            continue
                except (CodecError, ValueError, TypeError):
                    pass
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

        A letter a worker of an earlier release wrote for an entry that names JSON nulls
        (which it could not read: ``$row`` holds the whole entry, ``$schema`` is empty) is
        read as this worker reads the entry.
        """
        if (
            isinstance(payload, dict)
            and payload.get(SCHEMA_KEY) == ""
            and isinstance(payload.get(ROW_KEY), list)
            and len(payload[ROW_KEY]) == 5
        ):
            return self.decode(entry_id, {ENTRY_FIELD: orjson.dumps(payload[ROW_KEY])})
        kind = {"upsert": "u", "delete": "d"}.get(op or "", "")
        entry = Entry(entry_id, kind, self.letter_pk(pk, payload) or "", b"")
        try:
            if kind == "d":
                entry.values = self.pk_codec.load_row(pk)
            elif kind == "u" and isinstance(payload, dict):
                entry.values = self._payload_values(payload)
                if NULLS_KEY in payload:
                    entry.nulls = self._nulls(payload[NULLS_KEY])
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
            if "\\u0000" in str(payload[RAW_KEY]):
                raise ValueError(
                    "the row holds a NUL character (\\u0000), which Postgres text cannot "
                    "store; it is kept as its JSON text in the letter's payload: write the "
                    "row yourself without the NUL, then close the letter (UPDATE "
                    "sarc_dead_letters SET replayed_at = now() WHERE id = ...)"
                )
            raise ValueError(
                "the queued entry was not JSON; its bytes are kept as text in the letter's "
                "payload: write the row yourself from them, then close the letter (UPDATE "
                "sarc_dead_letters SET replayed_at = now() WHERE id = ...)"
            )
        missing = [k for k in self.info.column_keys if k not in payload]
        if missing:
            raise KeyError(f"the model changed since: the row lacks {', '.join(missing)}")
        return self.codec.load_row([payload[k] for k in self.info.column_keys])

    # -- one batch ----------------------------------------------------------------------------

    def acquire(self, stream: str, *, lock_timeout_ms: int = 1000) -> int:
        """Take the partition's fencing token: move ``lease_token`` on; the new value.

        Called by a worker that has just taken the partition's lease in Redis. The update
        waits for a batch of the previous holder that is still in its transaction (it holds
        the row), at most ``lock_timeout_ms``; then that batch either committed before the
        token moved, or will find the token moved and apply nothing (:class:`LeaseLost`).

        Example::

            token = applier.acquire("sarc:shop:{shop:page_views}:wb:00ff:3")
        """
        with self.engine.begin() as conn:
            # a previous holder stopped (SIGSTOP) inside its transaction holds the row until
            # the database ends that transaction (idle_timeout_ms): give up and try again on
            # a later pass. This transaction holds the row too: the same timeout ends it.
            conn.exec_driver_sql(
                "SELECT set_config('lock_timeout', %(lock)s, true), "
                "set_config('idle_in_transaction_session_timeout', %(idle)s, true)",
                {"lock": str(max(1, int(lock_timeout_ms))), "idle": str(self.idle_timeout_ms)},
            )
            return int(conn.execute(self._acquire, {"stream": stream}).scalar_one())

    def apply(self, stream: str, entries: list[Entry], *, token: int | None = None) -> BatchResult:
        """Apply ``entries`` (in stream order) in one transaction; see the module docstring.

        With ``token`` (the fencing token :meth:`acquire` returned), the transaction first
        checks that the partition's token is still that one, and raises :class:`LeaseLost`
        (applying nothing) when another worker has taken the partition since.

        Raises the database error when it is transient: nothing is then applied.
        """
        result = BatchResult(final={e.pk: e for e in entries})
        try:
            try:
                with self.engine.begin() as conn:
                    if not self._run_pipelined(conn, stream, entries, result, token):
                        self._run(conn, stream, entries, result, bisect=False, token=token)
            except _Delivered:  # some entries were applied before: rolled back, done again
                result = BatchResult(final=result.final)
                with self.engine.begin() as conn:
                    self._run(conn, stream, entries, result, bisect=False, token=token)
        except (DBAPIError, StatementError) as exc:
            if self.sets is not None and _statement_refused(exc):
                self._drop_set_based(exc)
                return self.apply(stream, entries, token=token)
            if is_transient(exc):
                raise
            result = BatchResult(final=result.final)
            try:
                with self.engine.begin() as conn:
                    self._run(conn, stream, entries, result, bisect=True, token=token)
            except (DBAPIError, StatementError) as again:
                if is_transient(again):
                    raise
                # every savepoint passed and the COMMIT failed: a deferred constraint
                # (DEFERRABLE INITIALLY DEFERRED), which the same bisection would fail
                # again on every pass, holding the partition forever. Checked per
                # statement, the savepoint that violates it fails instead (a change that
                # holds only at COMMIT, a swap split between two halves, may then be
                # refused too: the price of isolating the row at all)
                result = BatchResult(final=result.final)
                with self.engine.begin() as conn:
                    self._run(
                        conn, stream, entries, result, bisect=True, token=token, immediate=True
                    )
        return result

    def apply_alone(
        self, stream: str, entry: Entry, *, token: int | None, note: str
    ) -> BatchResult:
        """The last attempt at one operation that keeps failing alone: apply it, or
        dead-letter it.

        It keeps exceeding ``statement_timeout``, or raising an error that is not the
        database's (:func:`condemned_at_last_attempt`). The partition's offset row is
        locked first, as in any batch, so the operation's own statement cannot time out
        waiting for that lock (a dead-letter replay holds it). If the operation fails so
        again, under a savepoint, it is dead-lettered in the same transaction with its
        error followed by ``note``, and the offset moves on.

        Example::

            result = applier.apply_alone(stream, entry, token=7, note=" (timed out 5 times)")
        """
        result = BatchResult(final={entry.pk: entry})
        with self.engine.begin() as conn:
            self._run(conn, stream, [entry], result, bisect=True, token=token, last_attempt=note)
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
        token: int | None,
        immediate: bool = False,
        last_attempt: str | None = None,
    ) -> None:
        if immediate:
            conn.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
        last = self.lock_offset(conn, stream, token)
        # entries come in stream order: usually all of them are newer than the offset
        fresh = (
            entries
            if not entries or entries[0].sid > last
            else [e for e in entries if e.sid > last]
        )
        result.skipped = len(entries) - len(fresh)
        latest = coalesce(fresh)  # the last operation per row
        if len(latest) < len(fresh):  # coalesced, or some entries could not be decoded
            for entry in fresh:
                if entry.error is not None:
                    result.dead[entry.id] = entry.error
        ops = sorted(latest.values(), key=attrgetter("pk"))  # one lock order for all
        instead = 0
        if bisect:
            self._bisect(conn, ops, result.dead, last_attempt)
            instead = self._earlier(conn, fresh, ops, result.dead)
        else:
            self.write(conn, ops)
        dead = result.dead
        result.applied = len(ops) - sum(1 for e in ops if e.id in dead) if dead else len(ops)
        result.applied += instead
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

    def _run_pipelined(
        self,
        conn: Connection,
        stream: str,
        entries: list[Entry],
        result: BatchResult,
        token: int | None,
    ) -> bool:
        """:meth:`_run` for the usual batch, in one round trip; False when it does not apply.

        The usual batch: fenced, set-based, every entry decoded, none applied before. Its
        statements (lock the offset row, delete, upsert, move the offset) go to Postgres in
        one psycopg pipeline rather than one round trip each; the checks that need the
        locked row come after, and undo everything by raising: :class:`LeaseLost` when the
        token moved, :class:`_Delivered` when some entries were applied before (the caller
        rolls back and runs :meth:`_run`).
        """
        sets = self.sets
        raw: Any = conn.connection.driver_connection
        if (
            token is None
            or sets is None
            or not hasattr(raw, "pipeline")
            or any(e.error is not None for e in entries)
        ):
            return False
        latest = coalesce(entries)  # the last operation per row
        ops = sorted(latest.values(), key=attrgetter("pk"))  # one lock order for all
        keys = [e.values for e in ops if e.op == "d" and e.values is not None]
        advance = (entries[-1].id, len(ops), stream, self.namespace, self.info.table)
        try:
            with raw.pipeline(), raw.cursor() as lock, raw.cursor() as moved:
                lock.execute(self._pipelined_lock, (stream,))
                if keys:
                    raw.execute(sets.delete_sql, sets.delete_arrays(keys))
                for kept, rows in self._puts(ops).items():
                    upsert = self._sets_keeping(kept)
                    raw.execute(upsert.upsert_sql, upsert.upsert_arrays(rows))
                moved.execute(self._pipelined_advance, advance)
                row = lock.fetchone()
                open_letters = bool(moved.fetchone()[0])
            if self.idle_timeout_ms:
                # a round trip of its own, after the pipeline: the server does not time the
                # idleness that follows a pipeline (set before it, or inside it, the
                # timeout never fired), only that after a statement of its own
                raw.execute(self._idle_timeout)
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(
                "write-behind batch (pipelined)",
                None,
                exc,
                self.engine.dialect.loaded_dbapi.Error,
                connection_invalidated=bool(getattr(raw, "closed", False)),
            ) from exc
        if row is None or row[1] != token:
            raise LeaseLost(stream, token, None if row is None else int(row[1]))
        if entries[0].sid <= stream_id(str(row[0])):
            raise _Delivered
        result.applied = len(ops)
        if open_letters:
            result.superseded = self.supersede(conn, latest)
        return True

    def lock_offset(
        self, conn: Connection, stream: str, token: int | None = None
    ) -> tuple[int, int]:
        """The partition's last applied id, with its row locked until this transaction ends.

        With ``token``, the row must exist and hold that fencing token, else
        :class:`LeaseLost`; without, a missing row is created (dead-letter replay).
        """
        if token is None:
            return stream_id(str(conn.execute(self._lock, {"stream": stream}).scalar_one()))
        if self.idle_timeout_ms:
            conn.exec_driver_sql(self._idle_timeout)
        row = conn.execute(self._fenced_lock, {"stream": stream}).one_or_none()
        if row is None or row.lease_token != token:
            raise LeaseLost(stream, token, None if row is None else int(row.lease_token))
        return stream_id(str(row.last_id))

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
        """Write ``ops`` (one per primary key): one delete and one upsert statement (one
        per set of JSON columns some rows keep as the database has them)."""
        keys: list[tuple[Any, ...]] = []
        for entry in ops:
            assert entry.values is not None
            if entry.op != "u":
                keys.append(entry.values)
        sets = self.sets if set_based else None
        if keys:
            if sets is not None:
                sets.delete(conn, keys)
            elif len(self.pk_columns) == 1:
                conn.execute(delete(self.table).where(self.pk_columns[0].in_([k[0] for k in keys])))
            else:
                conn.execute(delete(self.table).where(tuple_(*self.pk_columns).in_(keys)))
        for kept, puts in self._puts(ops).items():
            if sets is not None:
                self._sets_keeping(kept).upsert(conn, puts)
            else:
                names = self.names
                conn.execute(
                    self._upsert_keeping(kept),
                    [dict(zip(names, row, strict=True)) for row in puts],
                )

    def _puts(self, ops: list[Entry]) -> dict[frozenset[int], list[tuple[Any, ...]]]:
        """The rows of the puts among ``ops``, by the JSON columns they keep as the row
        has them (:data:`.nulls.KEEP`); a None that is no JSON null bound as SQL NULL."""
        groups: dict[frozenset[int], list[tuple[Any, ...]]] = {}
        for entry in ops:
            if entry.op != "u":
                continue
            assert entry.values is not None
            row, kept = entry.values, frozenset[int]()
            if entry.nulls:
                listed = list(row)
                for position in entry.nulls:
                    listed[position] = null()  # the JSON type's bind makes it SQL NULL
                row = tuple(listed)
                kept = frozenset(p for p, kind in entry.nulls.items() if kind == KEEP)
            groups.setdefault(kept, []).append(row)
        return groups

    def _sets_keeping(self, kept: frozenset[int]) -> SetStatements:
        """The set-based statements whose upsert leaves the columns ``kept`` as an existing
        row has them (SQL NULL in a new row), as SQLAlchemy's UPDATE leaves out a column
        it does not change."""
        assert self.sets is not None
        if not kept:
            return self.sets
        found = self._kept_sets.get(kept)
        if found is None:
            found = self._kept_sets[kept] = SetStatements(
                self.table,
                self.columns,
                self.pk_columns,
                self.engine.dialect,
                self.engine.get_execution_options().get("schema_translate_map"),
                kept={self.columns[p].name for p in kept},
            )
        return found

    def _upsert_keeping(self, kept: frozenset[int]) -> Any:
        """:attr:`upsert` leaving the columns ``kept`` as an existing row has them."""
        if not kept:
            return self.upsert
        names = {self.columns[p].name for p in kept}
        stmt = insert(self.table)
        others = {
            c.name: stmt.excluded[c.name]
            for c in self.columns
            if not c.primary_key and c.name not in names
        }
        if not others:
            return stmt.on_conflict_do_nothing(index_elements=self.pk_columns)
        return stmt.on_conflict_do_update(index_elements=self.pk_columns, set_=others)

    def _bisect(
        self,
        conn: Connection,
        ops: list[Entry],
        dead: dict[str, str],
        last_attempt: str | None = None,
    ) -> None:
        """Write ``ops`` under savepoints, halving until the refused ones are isolated.

        With ``last_attempt`` (:meth:`apply_alone`), an error that the worker counts
        attempts of (:func:`condemned_at_last_attempt`) condemns the operation too, its
        error followed by ``last_attempt``.
        """
        if not ops:
            return
        try:
            with conn.begin_nested():
                self.write(conn, ops)
        except Exception as exc:
            if last_attempt is not None and condemned_at_last_attempt(exc):
                self._condemn(ops, exc, dead, last_attempt)
                return
            if not isinstance(exc, DBAPIError | StatementError) or is_transient(exc):
                raise
            if len(ops) == 1:
                self._one(conn, ops[0], exc, dead)
                return
            middle = len(ops) // 2
            self._bisect(conn, ops[:middle], dead, last_attempt)
            self._bisect(conn, ops[middle:], dead, last_attempt)

    def _condemn(
        self, ops: list[Entry], exc: BaseException, dead: dict[str, str], note: str
    ) -> None:
        """The last attempt failed again: dead-letter the operation (:meth:`apply_alone`
        passes one), its error followed by ``note``."""
        if len(ops) != 1:  # never more than one on a last attempt; isolate them otherwise
            raise exc
        dead[ops[0].id] = error_text(exc) + note

    def _earlier(
        self, conn: Connection, fresh: list[Entry], ops: list[Entry], dead: dict[str, str]
    ) -> int:
        """Where a row's last operation in the batch was dead-lettered, apply its newest
        earlier one that the database takes; returns how many were applied.

        Coalescing tried only the last write of each row. Had each commit been written on
        its own, as plain SQLAlchemy writes them, the earlier ones would have landed before
        the refused one: without this they would be in neither the table nor the dead
        letters. Earlier operations refused too are dead-lettered (and superseded by the
        newer letter of their row).
        """
        refused = {e.pk for e in ops if e.id in dead}
        if not refused:
            return 0
        earlier: dict[str, list[Entry]] = {}
        for entry in fresh:  # in stream order
            if entry.pk in refused and entry.error is None and entry.id not in dead:
                earlier.setdefault(entry.pk, []).append(entry)
        applied = 0
        while earlier:
            tries = sorted((left.pop() for left in earlier.values()), key=attrgetter("pk"))
            self._bisect(conn, tries, dead)
            for entry in tries:
                if entry.id not in dead:
                    applied += 1
                if entry.id not in dead or not earlier[entry.pk]:
                    del earlier[entry.pk]
        return applied

    def _one(
        self,
        conn: Connection,
        entry: Entry,
        exc: BaseException,
        dead: dict[str, str],
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
        dead[entry.id] = error_text(exc)

    def _dead_row(self, stream: str, entry: Entry, dead: dict[str, str]) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        pk: Any = None
        data: Any = None
        try:
            data = orjson.loads(entry.data) if isinstance(entry.data, bytes) else entry.data
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
        if entry.nulls:
            payload[NULLS_KEY] = as_document(entry.nulls)
        error = dead[entry.id]
        if _has_nul([pk, payload]):
            # jsonb cannot hold U+0000: the letter's INSERT would fail, and with it the
            # batch, on every pass. The row is kept as its JSON text, NULs escaped; it
            # cannot be replayed as it is (Postgres text cannot store it either).
            if data is not None:
                text = orjson.dumps(data).decode()
            else:
                text = entry.data.decode(errors="replace").replace("\x00", "\\u0000")
            payload = {RAW_KEY: text, KEY_KEY: entry.pk.replace("\x00", "\\u0000")}
            pk = None
            error += " (the operation holds a NUL character, which Postgres cannot store)"
        return {
            "namespace": self.namespace,
            "table_name": self.info.table,
            "stream": stream,
            "entry_id": entry.id,
            "op": _OPS.get(entry.op),
            "pk": pk,
            "payload": payload,
            "error": error.replace("\x00", "\\x00"),
        }


def coalesce(entries: list[Entry]) -> dict[str, Entry]:
    """The last operation per row of ``entries`` (stream order; undecodable ones left out).

    A put that keeps some JSON columns as the row has them (:data:`.nulls.KEEP`) follows
    the row's earlier operations of the batch, never applied on their own: it takes those
    columns as the earlier one left them (its SQL NULL or JSON null; SQL NULL after a
    delete), as separate batches would have written them.
    """
    latest: dict[str, Entry] = {}
    for entry in entries:
        if entry.error is not None:
            continue
        earlier = latest.get(entry.pk)
        latest[entry.pk] = (
            _kept_over(entry, earlier)
            if earlier is not None and entry.nulls and KEEP in entry.nulls.values()
            else entry
        )
    return latest


def _kept_over(entry: Entry, earlier: Entry) -> Entry:
    """``entry`` applied as one with ``earlier``, its row's previous operation in the
    batch: the JSON columns it keeps are as ``earlier`` left them (:func:`.nulls.after`)."""
    assert entry.nulls is not None
    nulls = after(entry.nulls, earlier.op, earlier.nulls or {})
    values = entry.values
    if earlier.op == "u" and values is not None and earlier.values is not None:
        listed = list(values)
        for position, kind in entry.nulls.items():
            if kind == KEEP:
                listed[position] = earlier.values[position]
        values = tuple(listed)
    return replace(entry, nulls=nulls or None, values=values)


def _has_nul(value: Any) -> bool:
    """A NUL character in any string of ``value`` (lists and dicts, keys too)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _fields(raw: Any) -> dict[bytes, bytes]:
    """Entry fields as a dict: redis-py parses XRANGE replies, a script returns pairs."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    return dict(zip(raw[::2], raw[1::2], strict=False))
