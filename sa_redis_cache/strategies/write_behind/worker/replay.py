"""Replaying dead letters: write-behind operations applied again once their cause is fixed.

:func:`replay_dead_letters` (and ``sa-redis-cache dlq replay``) takes the open dead letters
of a namespace (``replayed_at IS NULL``), oldest stream id first per partition, and for
each one:

* **superseded**: a newer operation on the same row exists, so the letter is never applied
  (a dead letter must not overwrite a newer state). Newer means a larger stream id for the
  same primary key. Applied newer operations are recorded by the worker itself: when it
  applies (or dead-letters) an operation on a row with an older open letter, it marks that
  letter superseded in the same transaction (see :mod:`.apply`).
  Among the letters, an older open letter of a row that has a newer open letter is
  superseded here. A superseded letter gets ``replayed_at`` and an ``error`` that begins
  with ``superseded by``; it leaves ``dlq list`` (``--all`` shows it).
* **replayed**: its operation (the full row for an upsert, the key for a delete) is
  applied with the worker's own statement, and the letter gets ``replayed_at``.
* **failed**: the database refuses it again (the cause is not fixed); the letter stays
  open with the new error, one more attempt, and a new ``failed_at``.

A newer operation that is still queued (not yet applied) does not stop a replay: the
worker applies it afterwards, so the row still ends at its newest write.

Each partition's letters are replayed in one transaction that first locks the partition's
offset row, as a flush worker's batch does: a worker flushing that partition waits, so a
letter is never applied after a newer operation that a concurrent batch is applying.

The cache is told like any other write: before the database commit, the table's version
is bumped, a writer mark refuses fills, and the rows' entity entries are deleted
(``lua/flush_mark.lua``); after it, ``lua/commit.lua`` releases the mark and announces the
rows. Redis must therefore be reachable: without it nothing is replayed (cached copies of
the rows could otherwise stay stale).

Example::

    from sa_redis_cache.worker import replay_dead_letters

    result = replay_dead_letters(engine, redis.Redis(), "shop", [PageView])
    print(result.replayed, result.superseded, result.failed)
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import DBAPIError, StatementError

from sa_redis_cache.binds import Binds, translate_map_of
from sa_redis_cache.cluster_io import io_for
from sa_redis_cache.errors import ConfigurationError
from sa_redis_cache.models import ModelRegistry
from sa_redis_cache.protocol import KeyScheme, scripts
from sa_redis_cache.schema import dead_letters
from sa_redis_cache.slot_groups import model_groups

from .apply import SUPERSEDED, Applier, Entry, is_transient, sid_of, superseded_note
from .flush import write_behind_info

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import redis
    from sqlalchemy.engine import Connection, Engine, Row

__all__ = ["Letter", "ReplayResult", "open_dead_letters", "replay_dead_letters"]


@dataclass(frozen=True, slots=True)
class Letter:
    """An open dead letter, as :func:`open_dead_letters` lists it."""

    id: int
    table: str
    stream: str
    entry_id: str
    op: str | None
    pk: Any
    error: str


@dataclass(slots=True)
class ReplayResult:
    """What a replay did, by dead letter id.

    ``replayed``: applied. ``superseded``: never to be applied (why). ``failed``: refused
    again, left open (the new error). ``skipped``: not touched (why: already replayed, not
    found, no model given for its table). ``cache_error``: the database has the rows but
    Redis failed after the commit; cached copies expire with their TTL (and fills of the
    table are refused until the writer mark expires).

    Example::

        result = replay_dead_letters(engine, client, "shop", [PageView])
        if not result.ok:
            print(result.failed)
    """

    replayed: list[int] = field(default_factory=list)
    superseded: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    cache_error: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed and self.cache_error is None


def open_dead_letters(
    engine: Engine,
    namespace: str,
    *,
    ids: Sequence[int] | None = None,
    table: str | None = None,
) -> list[Letter]:
    """The open dead letters of ``namespace`` (optionally: these ids, this table), by id.

    Example::

        for letter in open_dead_letters(engine, "shop", table="page_views"):
            print(letter.id, letter.error)
    """
    stmt = select(dead_letters).where(
        dead_letters.c.namespace == namespace, dead_letters.c.replayed_at.is_(None)
    )
    if ids is not None:
        stmt = stmt.where(dead_letters.c.id.in_(list(ids)))
    if table is not None:
        stmt = stmt.where(dead_letters.c.table_name == table)
    with engine.connect() as conn:
        rows = conn.execute(stmt.order_by(dead_letters.c.id)).all()
    return [_letter(row) for row in rows]


def _letter(row: Row[Any]) -> Letter:
    return Letter(row.id, row.table_name, row.stream, row.entry_id, row.op, row.pk, row.error)


def replay_dead_letters(
    engine: Engine,
    redis_client: redis.Redis,
    namespace: str,
    models: Iterable[type],
    *,
    ids: Sequence[int] | None = None,
    table: str | None = None,
    writer_mark_ms: int = scripts.WRITER_MARK_MS,
) -> ReplayResult:
    """Apply the open dead letters of ``namespace`` again; see the module docstring.

    ``models`` are the write-behind classes whose letters may be replayed (letters of other
    tables are skipped); ``ids`` and ``table`` narrow the selection. A second call finds
    nothing left to do. Raises :class:`ConfigurationError` when ``table`` is not the table
    of one of ``models``, or ``writer_mark_ms`` is longer than any writer's mark may be
    (``scripts.WRITER_MARK_MS``: the scripts remove a mark scored further ahead).

    Example::

        result = replay_dead_letters(engine, client, "shop", [PageView], ids=[12, 13])
        assert result.ok, result.failed
    """
    scripts.checked_writer_mark_ms(writer_mark_ms)
    registry = ModelRegistry()
    appliers = {}
    binds = Binds()
    database = binds.database_of_engine(engine)
    if database is None:
        raise ConfigurationError("cannot tell which database the engine reaches; is it up?")
    translate = translate_map_of(engine)
    scopes: dict[str, str] = {}
    for model in models:
        info = write_behind_info(model, registry)
        appliers[info.table] = Applier(engine, info, namespace)
        scopes[info.table] = binds.scope(database, info.table_schema, translate)
    if table is not None and table not in appliers:
        raise ConfigurationError(
            f"no write-behind model given for table {table!r} (given: "
            f"{', '.join(sorted(appliers)) or 'none'})"
        )
    result = ReplayResult()
    letters = open_dead_letters(engine, namespace, ids=ids, table=table)
    if ids is not None:
        _explain_missing(engine, namespace, ids, {letter.id for letter in letters}, result)
    groups: dict[tuple[str, str], list[Letter]] = {}
    keys = KeyScheme(namespace, model_groups(models))
    for letter in letters:
        if letter.table not in appliers:
            result.skipped[letter.id] = (
                f"no write-behind model given for table {letter.table!r}; pass its class"
            )
            continue
        if keys.scope_of_stream(letter.table, letter.stream) != scopes[letter.table]:
            result.skipped[letter.id] = (
                f"queued for another database or schema than this engine writes to (stream "
                f"{letter.stream}); replay it with an engine on that database and schema"
            )
            continue
        groups.setdefault((letter.table, letter.stream), []).append(letter)
    replay = _Replay(redis_client, keys, writer_mark_ms, result)
    for (table_name, stream), group in sorted(groups.items()):
        scope = scopes[table_name]
        replay.partition(appliers[table_name], scope, stream, [letter.id for letter in group])
    return result


def _explain_missing(
    engine: Engine, namespace: str, ids: Sequence[int], found: set[int], result: ReplayResult
) -> None:
    missing = [i for i in ids if i not in found]
    if not missing:
        return
    stmt = select(dead_letters.c.id, dead_letters.c.replayed_at, dead_letters.c.error).where(
        dead_letters.c.namespace == namespace, dead_letters.c.id.in_(missing)
    )
    with engine.connect() as conn:
        known = {row.id: row for row in conn.execute(stmt)}
    for letter_id in missing:
        row = known.get(letter_id)
        if row is None:
            result.skipped[letter_id] = f"no dead letter {letter_id} in namespace {namespace!r}"
        elif row.error.startswith(SUPERSEDED):
            result.skipped[letter_id] = f"already resolved: {row.error.splitlines()[0]}"
        else:
            when = row.replayed_at.isoformat(timespec="seconds")
            result.skipped[letter_id] = f"already replayed at {when}"


class _Replay:
    """The per-partition work of one :func:`replay_dead_letters` call."""

    def __init__(
        self, client: redis.Redis, keys: KeyScheme, writer_mark_ms: int, result: ReplayResult
    ) -> None:
        self.client = client
        self.keys = keys
        self.io = io_for(client)
        self.writer_mark_ms = writer_mark_ms
        self.result = result

    def partition(self, applier: Applier, scope: str, stream: str, letter_ids: list[int]) -> None:
        """Replay the given letters of one partition, in one transaction."""
        result = self.result
        token = secrets.token_hex(8)
        marked: list[str] = []
        tickets: dict[str, int] = {}
        outcome: _Outcome | None = None
        try:
            with applier.engine.begin() as conn:
                # each letter's savepoint must see its own deferred constraint violation:
                # at COMMIT it would fail the whole partition's replay, every time
                conn.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
                applier.lock_offset(conn, stream)
                outcome = self._decide(conn, applier, letter_ids)
                marked = [entry.pk for _, entry in outcome.to_apply]
                tickets = self._mark(applier, scope, token, marked)
                for letter_id, entry in outcome.to_apply:
                    error = _apply_one(conn, applier, entry)
                    if error is None:
                        outcome.replayed.append(letter_id)
                    else:
                        outcome.failed[letter_id] = error
                _record(conn, outcome)
        except (DBAPIError, StatementError) as exc:
            message = f"the database failed, nothing of this partition was replayed: {exc}"
            self._fail(letter_ids, message, applier, token, marked)
            return
        except RedisError as exc:
            message = (
                f"Redis failed ({exc}): nothing of this partition was replayed, since the "
                "cached copies of its rows could not be invalidated; retry when it is back"
            )
            self._fail(letter_ids, message, applier, token, marked)
            return
        assert outcome is not None
        result.replayed += outcome.replayed
        result.superseded.update(outcome.superseded)
        result.failed.update(outcome.failed)
        result.skipped.update(outcome.skipped)
        replayed_pks = [
            pk for letter_id, pk in outcome.pks.items() if letter_id in outcome.replayed
        ]
        try:
            self._commit(applier, scope, token, marked, tickets, replayed_pks)
        except RedisError as exc:
            result.cache_error = (
                f"the rows are in the database, but Redis failed after the commit ({exc}); "
                "cached copies of them expire with their TTL"
            )

    def _decide(self, conn: Connection, applier: Applier, letter_ids: list[int]) -> _Outcome:
        """Which letters to apply, in stream order; which are superseded or undecodable."""
        outcome = _Outcome()
        rows = conn.execute(
            select(dead_letters)
            .where(dead_letters.c.id.in_(letter_ids), dead_letters.c.replayed_at.is_(None))
            .with_for_update()
        ).all()
        for letter_id in set(letter_ids) - {row.id for row in rows}:
            outcome.skipped[letter_id] = "replayed or superseded meanwhile"
        # the newest open letter of each row (any of this table's partitions)
        newest: dict[str, tuple[tuple[int, int], int, str]] = {}
        for other_id, entry_id, pk, payload in conn.execute(applier.open_letters):
            text = applier.letter_pk(pk, payload)
            if text is None:
                continue
            sid = sid_of(entry_id)
            if text not in newest or sid > newest[text][0]:
                newest[text] = (sid, other_id, entry_id)
        entries = [
            (row.id, applier.from_letter(row.entry_id, row.op, row.pk, row.payload)) for row in rows
        ]
        for letter_id, entry in sorted(entries, key=lambda pair: pair[1].sid):
            if entry.error is not None:
                outcome.failed[letter_id] = entry.error
                continue
            newer = newest.get(entry.pk)
            if newer is not None and newer[0] > entry.sid:
                outcome.superseded[letter_id] = (
                    f"{SUPERSEDED}{newer[2]} (dead letter {newer[1]}), a newer write of this row"
                )
                continue
            outcome.to_apply.append((letter_id, entry))
            outcome.pks[letter_id] = entry.pk
        return outcome

    def _mark(self, applier: Applier, scope: str, token: str, pks: list[str]) -> dict[str, int]:
        """``lua/flush_mark.lua`` for the rows about to be written; their write tickets."""
        if not pks:
            return {}
        info = applier.info
        keys = self.keys
        rows = [(keys.entity_key(info.table, info.schema_hash, scope, pk), pk) for pk in pks]
        call = scripts.flush_mark(
            keys, info.table, token, rows, bulk=False, writer_mark_ms=self.writer_mark_ms
        )
        reply = self.io.run_script(*call)
        return dict(zip(pks, (int(t) for t in reply[1:]), strict=True))

    def _commit(
        self,
        applier: Applier,
        scope: str,
        token: str,
        marked: list[str],
        tickets: dict[str, int],
        replayed: list[str],
    ) -> None:
        """``lua/commit.lua``: bump, release the mark, delete and announce the rows."""
        if not marked:
            return
        info = applier.info
        keys = self.keys
        rows = [
            # no state: the entry is deleted
            scripts.RowCommit(
                keys.entity_key(info.table, info.schema_hash, scope, pk),
                pk,
                tickets.get(pk, 0),
                1,
                b"",
            )
            for pk in marked
        ]
        call = scripts.commit(
            keys, info.table, token, rows, bulk=False, scope=scope, announced=replayed
        )
        self.io.run_script(*call)

    def _fail(
        self, letter_ids: list[int], message: str, applier: Applier, token: str, marked: list[str]
    ) -> None:
        for letter_id in letter_ids:
            self.result.failed[letter_id] = message
        if marked:  # release the writer mark at once rather than when it expires
            with contextlib.suppress(RedisError):
                self.client.zrem(self.keys.writers_key(applier.info.table), token)


@dataclass(slots=True)
class _Outcome:
    to_apply: list[tuple[int, Entry]] = field(default_factory=list)
    pks: dict[int, str] = field(default_factory=dict)
    replayed: list[int] = field(default_factory=list)
    superseded: dict[int, str] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)


def _apply_one(conn: Connection, applier: Applier, entry: Entry) -> str | None:
    """Write one letter's operation under a savepoint; the error when it is refused."""
    try:
        with conn.begin_nested():
            applier.write(conn, [entry], set_based=False)
    except (DBAPIError, StatementError) as exc:
        if is_transient(exc):
            raise
        return str(getattr(exc, "orig", None) or exc).strip()
    return None


def _record(conn: Connection, outcome: _Outcome) -> None:
    """Write each letter's outcome in the same transaction as the rows."""
    table = dead_letters
    if outcome.replayed:
        conn.execute(
            table.update()
            .where(table.c.id.in_(outcome.replayed))
            .values(replayed_at=func.now(), attempts=table.c.attempts + 1)
        )
    if outcome.superseded:
        conn.execute(
            table.update()
            .where(table.c.id == bindparam("letter_id"))
            .values(replayed_at=func.now(), error=bindparam("note") + table.c.error),
            [
                {"letter_id": i, "note": superseded_note(reason)}
                for i, reason in outcome.superseded.items()
            ],
        )
    if outcome.failed:
        conn.execute(
            table.update()
            .where(table.c.id == bindparam("letter_id"))
            .values(
                error=bindparam("new_error"),
                attempts=table.c.attempts + 1,
                failed_at=func.now(),
            ),
            [{"letter_id": i, "new_error": error} for i, error in outcome.failed.items()],
        )
