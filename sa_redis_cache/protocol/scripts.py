"""The Lua scripts in ``lua/``, and one typed function per script that builds its call.

Each ``.lua`` file opens with a comment naming its KEYS and ARGV; the function of the same
name here is the one place that builds them, for the session side, the worker and
``dlq replay`` alike. A function returns a :data:`ScriptCall` (the script, its KEYS, its
ARGV), which :class:`~sa_redis_cache.redis_io.RedisIO` runs with EVALSHA, alone or several
in one round trip. Redis runs ``lua/_prelude.lua`` (the helpers that treat a key of the
wrong type or an unparsable counter as absent, and heal it) followed by the script.

The random values every call passes (where a counter that does not exist starts) are drawn
here too: a counter lost to eviction, expiry or a restart must never come back at a value
an old entry was stored under, so it never starts at 0 or 1.

Example::

    call = scripts.release_lease(KeyScheme("shop").lease_key(entry_key), token)
    io.run_script(*call)
"""

from __future__ import annotations

import enum
import hashlib
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import orjson

from sa_redis_cache.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .keys import KeyScheme

COUNTER_TTL_MS = 7 * 24 * 3600 * 1000
"""Version counters and generations outlive entries by far, but still expire: a namespace
nobody uses any more leaves nothing behind, and an expired counter only turns entries into
misses."""

ROW_COUNTER_TTL_MS = 3_600_000
"""Row write counters live an hour at least, and as long as the entity entries they validate."""

WRITER_MARK_MS = 60_000
"""How long a flush's writer mark refuses fills when its transaction never ends (a crash);
also the longest a mark may be given (:func:`flush_mark`)."""

LOCAL_LEASE_MAX_MS = 60_000
"""The longest ``Cache(local_lease=)`` accepted: no holder's lease on a table's local
entries ends later than this after the server's clock when it was taken or renewed."""

CLOCK_STEP_MS = 10_000
"""How far the Redis server's clock may step back (a failover to a node whose clock is
behind) before a genuine writer mark or holder lease reads as forged. A sorted-set member
scored further ahead than its longest life plus this can only have been written by someone
else: the scripts remove it rather than honour it until its score (lua/_prelude.lua,
``drop_forged``)."""

MARK_HORIZON_MS = WRITER_MARK_MS + CLOCK_STEP_MS
"""How far ahead of the server's clock a genuine writer mark can be scored; one further
ahead was planted (removed by the scripts, and not counted by ``stats``)."""

HOLDER_HORIZON_MS = LOCAL_LEASE_MAX_MS + CLOCK_STEP_MS
"""How far ahead of the server's clock a genuine holder's lease can be scored."""

LEASE_MS = 30_000
"""A filler that dies holding an entry's fill lease blocks other fills this long at most."""


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script as Redis runs it (the prelude, then the file) and its SHA1.

    Example::

        >>> len(script("fill").sha)
        40
    """

    name: str
    source: str
    sha: str


def _file(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


def _limits() -> str:
    """The Lua constants the prelude's checks use, from the one place they are set (here)."""
    return (
        "-- sa_redis_cache/protocol/scripts.py: how far ahead of the server's clock a writer\n"
        "-- mark, and a holder's lease, can genuinely be scored\n"
        f"local MARK_HORIZON_MS = {MARK_HORIZON_MS}\n"
        f"local HOLDER_HORIZON_MS = {HOLDER_HORIZON_MS}\n"
    )


@cache
def script(name: str) -> Script:
    """``lua/<name>.lua`` with the shared prelude, loaded once per process."""
    source = _limits() + _file("_prelude") + _file(name)
    return Script(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


ScriptCall = tuple[Script, list[str], list[Any]]
"""A script with its KEYS and ARGV, as :class:`~sa_redis_cache.redis_io.RedisIO` runs it."""

Command = tuple[Any, ...]
"""One plain Redis command as its words, e.g. ``("SET", key, value, "NX", "PX", 1000)``."""


def start() -> int:
    """A random value for a counter to start at when it does not exist (62 bits)."""
    return random.getrandbits(62)


# -- reads ---------------------------------------------------------------------------------


def capture_versions(counters: Sequence[str], ttls_ms: Sequence[int]) -> ScriptCall:
    """Read (and create, where missing) the counters an entry is validated against.

    Example::

        call = capture_versions([keys.version_key("products")], [COUNTER_TTL_MS])
    """
    args = [a for ttl in ttls_ms for a in (ttl, str(start()))]
    return script("capture_versions"), list(counters), args


class NoCounter(enum.Enum):
    """The type of :data:`NO_COUNTER`."""

    NO_COUNTER = "no counter"


NO_COUNTER = NoCounter.NO_COUNTER
"""``invalidations`` of :func:`fill` for an entry that has no invalidation counter (an
entity entry): the fill does not compare one."""


def fill(
    keys: KeyScheme,
    entry_key: str,
    version_keys: Sequence[str],
    writers_keys: Sequence[str],
    *,
    ttl_ms: int,
    blob: bytes,
    lease_token: str,
    invalidations: bytes | NoCounter | None,
    captured: Sequence[bytes],
) -> ScriptCall:
    """The compare-and-set fill of an entry, releasing the caller's fill lease.

    ``invalidations`` is the entry's invalidation counter as the caller read it before
    its database read (None: it did not exist), or :data:`NO_COUNTER` for an entry that
    has none (an entity entry). ``captured`` are the version counters read before the
    database read, in ``version_keys`` order.
    """
    # 'n': no counter to compare; '=' and the counter as read ('=' alone: it was absent)
    seen = b"n" if invalidations is NO_COUNTER else b"=" + (invalidations or b"")
    return (
        script("fill"),
        [
            entry_key,
            keys.lease_key(entry_key),
            keys.invalidations_key(entry_key),
            *version_keys,
            *writers_keys,
        ],
        [ttl_ms, blob, lease_token, seen, start(), *captured],
    )


def check_versions(
    version_keys: Sequence[str], writers_keys: Sequence[str], captured: Sequence[bytes]
) -> ScriptCall:
    """Step 1 of a fill on a Redis Cluster: 1 when the counters of these tables (all in one
    slot) still equal ``captured`` and none of them has a live writer mark, else 0
    (:mod:`sa_redis_cache.protocol.cluster`).

    Example::

        call = check_versions([keys.version_key("t")], [keys.writers_key("t")], [b"41"])
    """
    return script("check_versions"), [*version_keys, *writers_keys], list(captured)


def release_lease(lease_key: str, token: str) -> ScriptCall:
    """Release a fill lease if the caller still holds it (a fill that was not attempted)."""
    return script("release_lease"), [lease_key], [token]


def refresh_lease(keys: KeyScheme, entry_key: str, token: str, seen: bytes) -> ScriptCall:
    """Ask for an entry's fill lease to refresh it, unless the entry changed since the look
    that read ``seen`` (its stored bytes): the lease and the second look are one script, so
    a refresh that landed between the look and the request is never repeated.

    The reply: 1 the lease is the caller's, 0 another caller holds it, -1 the entry changed.

    Example::

        call = refresh_lease(KeyScheme("shop"), entry_key, token, raw_entry)
    """
    digest = hashlib.sha1(seen, usedforsecurity=False).hexdigest()
    return (
        script("refresh_lease"),
        [entry_key, keys.lease_key(entry_key)],
        [token, LEASE_MS, digest],
    )


def look(keys: Sequence[str], lease_key: str, token: str) -> ScriptCall:
    """Read ``keys`` (an entry first, then what it is validated against) and take the
    entry's fill lease (``lease_key``) when the entry is absent, in one script.

    The reply is the values as ``MGET`` gives them, then 1 when the lease is the caller's.

    Example::

        call = look([entry_key, keys.invalidations_key(entry_key), version_key], lease, token)
    """
    return script("look"), [keys[0], lease_key, *keys[1:]], [token, LEASE_MS]


def take_lease(lease_key: str, token: str) -> Command:
    """The command that asks for an entry's fill lease (sent with a look, one round trip)."""
    return ("SET", lease_key, token, "NX", "PX", LEASE_MS)


# -- regions -------------------------------------------------------------------------------


def note_region(keys: KeyScheme, region: str, table: str) -> ScriptCall:
    """Record ``table`` as the one whose version retires an entry of ``region`` (the set
    lives as long as the counters; a key of another Redis type there is replaced).

    Example::

        call = note_region(KeyScheme("shop"), "pages", "products")
    """
    return script("note_region"), [keys.region_key(region)], [table, COUNTER_TTL_MS]


def region_tables(keys: KeyScheme, region: str) -> ScriptCall:
    """The tables recorded for ``region``: the reply is ``[1, table, ...]``, or ``[0]`` when
    the region's key held another Redis type (deleted: what it recorded is lost).

    Example::

        call = region_tables(KeyScheme("shop"), "pages")
    """
    return script("region_tables"), [keys.region_key(region)], []


# -- invalidation --------------------------------------------------------------------------


def invalidate_entries(keys: KeyScheme, entry_keys: Sequence[str], ttl_ms: int) -> ScriptCall:
    """Delete query entries and move their invalidation counters (``invalidate_query``)."""
    paired = [k for key in entry_keys for k in (key, keys.invalidations_key(key))]
    return script("invalidate_entries"), paired, [ttl_ms, start()]


def evalsha(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Command:
    """A script call as the plain command that runs it by SHA1 (for a pipeline, or a
    connection the cache writes to directly).

    Example::

        evalsha(*invalidate_entries(keys, [entry_key], 1000))   # ("EVALSHA", sha, 2, ...)
    """
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def load_and_run(call: ScriptCall) -> list[Command]:
    """A script call as two plain commands, load then run by SHA1, for a connection that
    cannot retry on NOSCRIPT (the restart bump, sent while the connection is being made,
    on a server that may have just lost its scripts). Both are sent before either reply is
    read."""
    return [("SCRIPT", "LOAD", call[0].source), evalsha(*call)]


def bump_all(
    counters: Sequence[str], unlink: Sequence[str] = (), ttl_ms: int = COUNTER_TTL_MS
) -> ScriptCall:
    """Bump ``counters`` (versions, generations, row write counters), deleting ``unlink``.

    Give the keys of one table per call (one cluster slot).
    """
    starts = [start() for _ in counters]
    return script("bump_all"), [*counters, *unlink], [ttl_ms, len(counters), *starts]


# -- a session's writes --------------------------------------------------------------------


def release_writer_mark(keys: KeyScheme, table: str, token: str) -> Command:
    """The command that drops transaction ``token``'s writer mark on ``table`` (a rollback)."""
    return ("ZREM", keys.writers_key(table), token)


def checked_writer_mark_ms(writer_mark_ms: int) -> int:
    """``writer_mark_ms`` when a writer's mark may live that long: 1 ms to
    :data:`WRITER_MARK_MS`. A mark scored further ahead is taken for forged, and removed by
    the next script that meets it; a longer one raises ``ConfigurationError``.

    Example::

        >>> checked_writer_mark_ms(5_000)
        5000
    """
    if not 0 < writer_mark_ms <= WRITER_MARK_MS:
        raise ConfigurationError(
            f"writer_mark_ms={writer_mark_ms} must be from 1 to {WRITER_MARK_MS}: the scripts "
            "remove a writer mark scored further ahead, as no writer's is"
        )
    return writer_mark_ms


def flush_mark(
    keys: KeyScheme,
    table: str,
    token: str,
    rows: Iterable[tuple[str, str]],
    *,
    bulk: bool,
    writer_mark_ms: int = WRITER_MARK_MS,
) -> ScriptCall:
    """Mark ``table`` as written by the transaction ``token``, before its database commit.

    ``rows`` are ``(entity key, pk text)`` of the rows written; ``bulk`` says the rows are
    not known (bulk or textual DML). The reply: the entity generation, then each row's
    write ticket. ``writer_mark_ms`` is at most :data:`WRITER_MARK_MS`: a mark scored
    further ahead is taken for forged and removed by the next script that meets it.
    """
    checked_writer_mark_ms(writer_mark_ms)
    row_keys = [k for entity, pk in rows for k in (entity, keys.row_write_key(table, pk))]
    return (
        script("flush_mark"),
        [keys.version_key(table), keys.writers_key(table), keys.generation_key(table), *row_keys],
        [token, writer_mark_ms, ROW_COUNTER_TTL_MS, start(), 1 if bulk else 0, COUNTER_TTL_MS],
    )


class RowCommit(NamedTuple):
    """One row of :func:`commit`: its entity entry, pk text, write ticket, TTL and state.

    ``state`` is the new encoded entity entry (write-through), or ``b""`` to delete it.
    """

    entity_key: str
    pk: str
    ticket: int
    ttl_ms: int
    state: bytes


def commit(
    keys: KeyScheme,
    table: str,
    token: str,
    rows: Sequence[RowCommit],
    *,
    bulk: bool,
    scope: str,
    announced: Sequence[str] | None = None,
) -> ScriptCall:
    """The post-commit work for ``table``: bump, release the mark, write or delete the rows'
    entries, and announce the commit on the namespace's invalidation channel.

    The announcement names the table, the ``scope`` (database and schema) the rows live
    in, the primary keys ``announced`` (default: every row's) and whether rows were
    written that cannot be named (``bulk``).
    """
    row_keys: list[str] = []
    row_args: list[Any] = []
    for row in rows:
        row_keys += [row.entity_key, keys.row_write_key(table, row.pk)]
        row_args += [row.ticket, row.ttl_ms, row.state]
    pks = [row.pk for row in rows] if announced is None else list(announced)
    announcement = orjson.dumps({"t": table, "s": scope, "pk": pks, "bulk": bulk})
    return (
        script("commit"),
        [keys.version_key(table), keys.writers_key(table), keys.generation_key(table), *row_keys],
        [
            token,
            keys.invalidation_channel,
            announcement,
            1 if bulk else 0,
            COUNTER_TTL_MS,
            start(),
            *row_args,
        ],
    )


# -- write-behind --------------------------------------------------------------------------


class QueuedOp(NamedTuple):
    """One operation of :func:`wb_enqueue`."""

    table: str
    stream: str
    entity_key: str
    pending_key: str
    kind: str  # "u" (upsert with the full row) or "d" (delete)
    pk: str
    schema_hash: str
    data: bytes  # the encoded row ("u") or primary key ("d"), as JSON
    trailer: bytes  # appended to both values (a signature), b"" when unsigned
    # the entry's fifth element with its leading comma (which JSON Nones are no JSON null:
    # strategies/write_behind/nulls.py), b"" when none
    nulls: bytes = b""


def wb_enqueue(keys: KeyScheme, ops: Sequence[QueuedOp], header: bytes) -> ScriptCall:
    """Queue one commit's write-behind operations, atomically; the reply is their stream ids.

    ``header`` is the codec envelope the script puts before the JSON it assembles.
    """
    tables: list[str] = []
    index: dict[str, int] = {}
    op_keys: list[str] = []
    op_args: list[Any] = []
    for op in ops:
        if op.table not in index:
            tables.append(op.table)
            index[op.table] = len(tables)
        op_keys += [op.stream, op.entity_key, op.pending_key, keys.row_write_key(op.table, op.pk)]
        pk = orjson.dumps(op.pk)  # the script puts it in the entry's JSON as it is
        op_args += [index[op.table], op.kind, pk, op.schema_hash, op.data, op.trailer, op.nulls]
    return (
        script("wb_enqueue"),
        [*(keys.generation_key(t) for t in tables), *op_keys],
        [
            len(tables),
            header,
            COUNTER_TTL_MS,
            ROW_COUNTER_TTL_MS,
            start(),
            *(start() for _ in tables),
            *op_args,
        ],
    )


def wait_for_fsync(timeout_ms: int) -> Command:
    """The command that waits until the Redis server has written every earlier write of
    this connection to its append-only file on disk, at most ``timeout_ms`` (Redis 7.2+);
    its reply is ``[local copies on disk (0 or 1), replicas]``.

    Example::

        io.pipeline([wait_for_fsync(200)])  # [[1, 0]] once on disk
    """
    return ("WAITAOF", 1, 0, timeout_ms)


def wait_for_replicas(replicas: int, timeout_ms: int) -> Command:
    """The command that waits until ``replicas`` replicas have acknowledged every earlier
    write of this connection, at most ``timeout_ms``; its reply is how many did.

    Example::

        io.run_then(wb_enqueue(...), [wait_for_replicas(1, 200)])  # [ids, 1] once copied
    """
    return ("WAIT", replicas, timeout_ms)


class FlushedRow(NamedTuple):
    """One row of :func:`wb_flushed`: its keys and the id of its last operation in the batch."""

    pending_key: str
    entity_key: str
    last_id: str
    # the row's write counter (KeyScheme.row_write_key), moved when the pending key goes
    write_key: str


def wb_flushed(
    keys: KeyScheme,
    table: str,
    stream: str,
    rows: Sequence[FlushedRow],
    *,
    trim_below: str,
    header: bytes,
) -> ScriptCall:
    """After a flush committed: bump the table's version, remove the pending keys (and the
    entity entries) of flushed rows that have no newer queued state and move their row
    write counters, and trim the stream below ``trim_below`` (the acknowledgement: workers
    read from the stream's head)."""
    row_keys = [k for r in rows for k in (r.pending_key, r.entity_key, r.write_key)]
    return (
        script("wb_flushed"),
        [stream, keys.version_key(table), *row_keys],
        [
            trim_below,
            header,
            COUNTER_TTL_MS,
            start(),
            ROW_COUNTER_TTL_MS,
            start(),
            *(r.last_id for r in rows),
        ],
    )


LeaseMode = Literal["take", "renew", "release"]
"""What :func:`wb_lease` does with a partition lease."""


def wb_lease(
    lease_key: str,
    stream: str,
    *,
    mode: LeaseMode,
    owner: str,
    name: str,
    lease_ms: int,
) -> ScriptCall:
    """Take (``"take"``), extend (``"renew"``) or give up (``"release"``) a partition lease.

    ``owner`` is the worker's instance id and consumer ``name``, space-separated (see
    :func:`lease_owner`).

    Example::

        call = wb_lease(lease, stream, mode="take", owner=lease_owner("a1b2", "w1"),
                        name="w1", lease_ms=5000)
    """
    return script("wb_lease"), [lease_key, stream], [mode, owner, name, lease_ms]


def lease_owner(instance: str, name: str) -> str:
    """What a partition lease holds to name its worker: ``instance`` (no space), a space,
    the consumer ``name``.

    Example::

        >>> lease_owner("a1b2c3", "w1")
        'a1b2c3 w1'
    """
    if not instance or " " in instance:
        raise ValueError(f"a lease owner cannot be made of {instance!r} and {name!r}")
    return f"{instance} {name}"


def parse_lease(value: bytes | str | None) -> tuple[str, str] | None:
    """A lease value as ``(instance, consumer name)``; None if absent or not a lease this
    library wrote.

    Example::

        >>> parse_lease(b"a1b2c3 w1")
        ('a1b2c3', 'w1')
    """
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    instance, space, name = text.partition(" ")
    if not space or not instance:
        return None
    return instance, name


# -- the local tier ------------------------------------------------------------------------


def hold(keys: KeyScheme, table: str, holder: str, lease_ms: int, *, renew: bool) -> ScriptCall:
    """Register (or, ``renew``, extend) ``holder``'s lease on ``table``'s local entries.

    Replies ``[server time ms, 1 held | 0 gone]``: a renewal that finds the holder gone
    (its lease lapsed and was pruned) must empty the local tier before holding again.

    Example::

        call = hold(keys, "products", "host:42:ab12", 2000, renew=False)
    """
    return script("hold"), [keys.holders_key(table)], [holder, lease_ms, "1" if renew else "0"]


VOUCHING_SCRIPTS = frozenset({"fence"})
"""Scripts whose effect vouches for the calls sent before them in the same batch: a fence
tells the holders that the commit's changes were applied. When one of those calls met
NOSCRIPT, the fence after it ran anyway, so a batch holding one is never sent again as it
was (:class:`~sa_redis_cache.redis_io.ScriptsReloaded`): its sender builds new fences."""


def fence(keys: KeyScheme, table: str, token: str) -> ScriptCall:
    """After commit ``token``'s invalidation of ``table``: the live holders to wait for.

    Replies ``[server time ms, holder, expiry ms, holder, expiry ms, ...]``; sent in the
    same round trip as, and after, the scripts that changed the table's keys.
    """
    return script("fence"), [keys.holders_key(table), keys.fence_key(table, token)], []


def holders(keys: KeyScheme, table: str, ids: Sequence[str]) -> ScriptCall:
    """Where holders ``ids`` of ``table`` stand: ``[server time ms, expiry ms or -1, ...]``."""
    return script("holders"), [keys.holders_key(table)], list(ids)


def ack(
    keys: KeyScheme, token: str, holder: str, ttl_ms: int, *, fence: str | None = None
) -> list[Command]:
    """The commands a holder sends once it has seen commit ``token``'s fence.

    On one server the holder's id acknowledges every fence of the commit (they come on one
    connection, after everything the commit changed); on a Redis Cluster each fence comes
    from its own node and is acknowledged by name, ``"<holder> <fence key>"``.
    """
    key = keys.ack_key(token)
    entry = holder if fence is None else f"{holder} {fence}"
    return [("RPUSH", key, entry), ("PEXPIRE", key, ttl_ms)]


def take_acks(keys: KeyScheme, token: str, timeout: float) -> list[Command]:
    """Wait up to ``timeout`` seconds for an acknowledgement, then take all that came."""
    key = keys.ack_key(token)
    return [("BLPOP", key, f"{timeout:.3f}"), ("LPOP", key, 1000)]


def poll_acks(keys: KeyScheme, token: str) -> list[Command]:
    """Take the acknowledgements that came, without waiting for one."""
    return [("LPOP", keys.ack_key(token), 1000)]


def function_fill(entry_key: str, blob: bytes, ttl_ms: int, generation: bytes) -> ScriptCall:
    """Store a ``cache.cached`` result unless ``invalidate()`` moved the key's generation
    since the caller read it (``generation``, as ``cached_functions.generation_of`` reads
    it). The reply: 1 stored, 0 refused.

    Example::

        call = function_fill(key, blob, 60_000, b"0" * 16)
    """
    return script("function_fill"), [entry_key], [ttl_ms, blob, generation]


def function_invalidate(entry_key: str, ttl_ms: int, generation: str) -> ScriptCall:
    """Replace a ``cache.cached`` key's value with a tombstone of a new ``generation``
    (16 hex characters), for ``ttl_ms``; the reply is 1 when a result was stored there.

    Example::

        call = function_invalidate(key, 30_000, f"{random.getrandbits(64):016x}")
    """
    return script("function_invalidate"), [entry_key], [ttl_ms, generation]
