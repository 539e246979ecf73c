"""How the protocol's calls run on a Redis Cluster, where one script or MGET reaches one slot.

Every key of a table carries its hash tag, so every script the write path sends (one per
table) and every entity read already touches one slot. What may span several slots is
listed in docs/guarantees.md ("Redis Cluster"), and handled here as pure functions of the
call, so that :mod:`sa_redis_cache.cluster_io` only sends what they return:

* an ``MGET`` (a look, the REPEATABLE READ pin): one ``MGET`` per slot, in one pipeline
  (:func:`split_mget`): each counter is read from its own primary after every write that
  returned before, which is all a look needs;
* ``capture_versions``, ``bump_all`` and ``invalidate_entries``, which treat each key (or
  entry) on its own: one call per slot, their replies put back together (:func:`split`);
* ``fill`` of a statement over tables in several slots: the two steps of
  :func:`fill_plan` (check the foreign slots, then fill in the entry's slot);
* anything else (``wb_enqueue`` of tables in several slots): refused
  (:class:`CrossSlot`), since its atomicity is what the caller relies on.

Example::

    plan = fill_plan(call)          # for a fill.lua call over several slots
    plan.checks                     # check_versions.lua, one per foreign slot
    plan.fill                       # fill.lua with the entry's own slot's tables
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sa_redis_cache.compat import key_slot
from sa_redis_cache.errors import ConfigurationError

from . import scripts

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .scripts import Command, ScriptCall

__all__ = ["CrossSlot", "FillPlan", "Split", "fill_plan", "one_slot", "split", "split_mget"]


class CrossSlot(ConfigurationError):
    """A call whose keys span several cluster slots and that cannot be split without losing
    the atomicity it exists for.

    Example::

        raise CrossSlot("wb_enqueue", ["orders", "order_lines"])
    """


def one_slot(keys: Sequence[str]) -> bool:
    """True when every key of ``keys`` hashes to the same slot (or there are none).

    Example::

        >>> one_slot(["sarc:s:{s:t}:v", "sarc:s:{s:t}:w"])
        True
    """
    if len(keys) < 2:
        return True
    first = key_slot(keys[0])
    return all(key_slot(key) == first for key in keys[1:])


def _by_slot(keys: Sequence[str]) -> dict[int, list[int]]:
    """The positions of ``keys`` grouped by slot, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(i)
    return groups


@dataclass(frozen=True, slots=True)
class Split:
    """One call as several single-slot calls, and how their replies make the call's reply."""

    calls: list[ScriptCall]
    merge: Callable[[Sequence[Any]], Any]


def split(call: ScriptCall) -> Split:
    """``call`` (keys over several slots) as one call per slot.

    Only scripts that treat each key (or entry) on its own are split; any other raises
    :class:`CrossSlot`.

    Example::

        parts = split(scripts.capture_versions([v1, v2], [ttl, ttl]))
        parts.merge(io.run_batch(parts.calls))  # [value of v1, value of v2]
    """
    script, keys, args = call
    if script.name == "capture_versions":
        return _split_capture(call)
    if script.name == "bump_all":
        return _split_bump(call)
    if script.name == "invalidate_entries":
        pairs = _by_slot(keys[::2])
        calls = [
            (script, [k for i in at for k in (keys[2 * i], keys[2 * i + 1])], list(args))
            for at in pairs.values()
        ]
        return Split(calls, lambda replies: sum(int(r) for r in replies))
    # a hash tag is {<namespace>:<table>}
    tags = {key.partition("{")[2].partition("}")[0] for key in keys}
    tables = sorted(tag.partition(":")[2] or tag for tag in tags)
    raise CrossSlot(
        f"{script.name} needs its keys in one Redis Cluster slot, and these span "
        f"{len(_by_slot(keys))} slots (tables {', '.join(tables)}); its atomicity is what "
        "it is for, so it is not split. Write these tables in separate transactions, or "
        "use a single Redis server (docs/cluster.md, 'Not supported yet')"
    )


def _split_capture(call: ScriptCall) -> Split:
    script, keys, args = call
    groups = list(_by_slot(keys).values())
    calls = [
        (script, [keys[i] for i in at], [a for i in at for a in (args[2 * i], args[2 * i + 1])])
        for at in groups
    ]

    def merge(replies: Sequence[Any]) -> list[Any]:
        out: list[Any] = [None] * len(keys)
        for at, reply in zip(groups, replies, strict=True):
            for i, value in zip(at, reply, strict=True):
                out[i] = value
        return out

    return Split(calls, merge)


def _split_bump(call: ScriptCall) -> Split:
    script, keys, args = call
    ttl, n, starts = args[0], int(args[1]), args[2:]
    counters = _by_slot(keys[:n])
    unlinks = _by_slot(keys[n:])
    calls: list[ScriptCall] = []
    for slot in list(counters) + [s for s in unlinks if s not in counters]:
        mine = counters.get(slot, [])
        calls.append(
            (
                script,
                [keys[i] for i in mine] + [keys[n + j] for j in unlinks.get(slot, [])],
                [ttl, len(mine), *(starts[i] for i in mine)],
            )
        )
    return Split(calls, lambda replies: sum(int(r) for r in replies))


@dataclass(frozen=True, slots=True)
class FillPlan:
    """A fill over several slots: ``checks`` first (all in one round trip), then ``fill``
    only if every check answered 1; else ``release`` (the lease, when the caller held one).
    """

    checks: list[ScriptCall]
    fill: ScriptCall
    release: ScriptCall | None


def fill_plan(call: ScriptCall) -> FillPlan:
    """The two steps of a ``fill.lua`` call whose tables are not all in the entry's slot.

    Step 1, ``check_versions.lua`` once per foreign slot: every version still equals its
    capture and no writer mark is live there. Step 2, ``fill.lua`` in the entry's slot with
    the tables of that slot only (none, when the entry is spread away from its tables): the
    entry's stamp still lists every table's capture, and every look compares them all, so
    a write after step 1 retires the entry at read time (docs/guarantees.md, "Redis
    Cluster").

    Example::

        plan = fill_plan(scripts.fill(keys, entry, [v1, v2], [w1, w2], ...))
        len(plan.checks)  # 1: the slot of the second table
    """
    script, keys, args = call
    entry, lease, invalidations = keys[0], keys[1], keys[2]
    n = (len(keys) - 3) // 2
    versions, writers = keys[3 : 3 + n], keys[3 + n :]
    head, captured = args[:5], args[5:]
    home = key_slot(entry)
    local: list[int] = []
    foreign: dict[int, list[int]] = {}
    for i, key in enumerate(versions):
        slot = key_slot(key)
        if slot == home:
            local.append(i)
        else:
            foreign.setdefault(slot, []).append(i)
    checks = [
        scripts.check_versions(
            [versions[i] for i in at], [writers[i] for i in at], [captured[i] for i in at]
        )
        for at in foreign.values()
    ]
    fill = (
        script,
        [
            entry,
            lease,
            invalidations,
            *(versions[i] for i in local),
            *(writers[i] for i in local),
        ],
        [*head, *(captured[i] for i in local)],
    )
    token = args[2]
    release = scripts.release_lease(lease, token) if token else None
    return FillPlan(checks, fill, release)


def split_mget(
    commands: Sequence[Command],
) -> tuple[list[Command], list[tuple[int, list[list[int]] | None]]]:
    """``commands`` with every ``MGET`` over several slots as one ``MGET`` per slot.

    Returns the commands to send and, for each given command, where its reply starts among
    theirs and, for a split ``MGET``, the positions of its keys in each part;
    :func:`join_mget` puts the replies back.

    Example::

        sent, where = split_mget([("MGET", "{a}x", "{b}y")])
        # sent: [("MGET", "{a}x"), ("MGET", "{b}y")], where: [(0, [[0], [1]])]
    """
    sent: list[Command] = []
    where: list[tuple[int, list[list[int]] | None]] = []
    for command in commands:
        name = command[0]
        groups = None
        if isinstance(name, str) and name.upper() == "MGET" and len(command) > 2:
            found = list(_by_slot(command[1:]).values())
            groups = found if len(found) > 1 else None
        where.append((len(sent), groups))
        if groups is None:
            sent.append(command)
        else:
            sent += [("MGET", *(command[1 + i] for i in positions)) for positions in groups]
    return sent, where


def join_mget(
    commands: Sequence[Command],
    where: Sequence[tuple[int, list[list[int]] | None]],
    replies: Sequence[Any],
) -> list[Any]:
    """The replies of the commands given to :func:`split_mget`, from those of the ones sent.

    Example::

        join_mget([("MGET", "{a}x", "{b}y")], [(0, [[0], [1]])], [[b"1"], [b"2"]])
        # [[b"1", b"2"]]
    """
    out: list[Any] = []
    for command, (at, groups) in zip(commands, where, strict=True):
        if groups is None:
            out.append(replies[at])
            continue
        values: list[Any] = [None] * (len(command) - 1)
        for part, positions in enumerate(groups):
            for i, value in zip(positions, replies[at + part], strict=True):
                values[i] = value
        out.append(values)
    return out
