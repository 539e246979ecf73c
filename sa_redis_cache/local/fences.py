"""The writer's side of the local tier: a commit returns once no process can serve what it
changed from its local tier.

After a commit's invalidation scripts, in the same round trip, one ``fence.lua`` per table
names the processes holding a live lease on the table's local entries, and sets and
deletes a fence key that Redis's tracking sends them after the keys the commit changed.
Each holder, once it has applied everything before the fence, pushes its id onto the
commit's ack list. The writer waits (``BLPOP``, in slices shorter than the socket timeout
of the client it waits on, the asyncio one under ``AsyncSession``; with a timeout below
0.2 s, polls with ``LPOP`` and sleeps) until every holder has acknowledged or its lease
has ended: a holder whose lease expiry passes is asked about again (``holders.lua``),
since a live holder that renewed is still serving and is waited for; one whose lease
ended, or that left, is not.

A table nobody holds costs one short script in the commit's existing round trip. With
``local_consistency="bounded"`` nothing is sent and nothing waited for.

After this process saw Redis restart (a new run id), its commits wait for one lease from
that moment: a process that did not notice the restart (no connection reset reached it)
and still holds entries from the old server stops serving them within one lease, and the
new server knows no holder to wait for.

Example::

    replies = fences.run(commit_calls, {"products"}, token)
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from sa_redis_cache import compat
from sa_redis_cache.protocol import scripts
from sa_redis_cache.redis_io import ScriptsReloaded

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from sa_redis_cache.protocol.scripts import ScriptCall
    from sa_redis_cache.redis_io import Pending

    from .tier import Host

log = logging.getLogger(__name__)

# a writer never waits longer than this many leases for one commit, whatever the holders
# do: past it, a holder that keeps renewing without acknowledging is a bug, reported
_CAP_LEASES = 5
_SLICE = 0.1


class Fences:
    """The fences and acknowledgement waits of one cache's writes (module docstring)."""

    def __init__(self, core: Host, *, lease: float, strict: bool) -> None:
        self.core = core
        self.lease = lease
        self.strict = strict
        self._quiet_until = 0.0

    def run(
        self,
        calls: Sequence[ScriptCall],
        tables: Iterable[str],
        token: str | None = None,
        *,
        sent: tuple[Pending, str] | None = None,
    ) -> list[Any]:
        """Run invalidation ``calls``, then the fences of ``tables``, in one round trip;
        return the calls' replies once no local tier serves what they changed.

        ``token`` names the fences (a new one when None); ``sent``: the batch was sent
        already (:meth:`RedisIO.send_batch <sa_redis_cache.redis_io.RedisIO.send_batch>`),
        with the token of its fences. When a call met NOSCRIPT, the fences after it ran
        anyway, and a holder may have acknowledged them before the call's changes existed:
        the batch is run again with new fences, whose acknowledgements alone count.
        Raises ``RedisError``.
        """
        tables = sorted(set(tables))
        pending, token = sent if sent is not None else (None, token or secrets.token_hex(8))
        for attempt in range(2):
            try:
                if pending is not None:
                    replies = pending.replies()
                else:
                    batch = [*calls, *self.calls(token, tables)]
                    if not batch:
                        return []  # nothing changed, and no fence is asked for (bounded)
                    replies = self.core.io().run_batch(batch)
            except ScriptsReloaded:
                if attempt:
                    raise
                pending, token = None, secrets.token_hex(8)  # new fences, a new name
                continue
            if len(replies) > len(calls):
                self.wait(token, tables, replies[len(calls) :])
            return replies[: len(calls)]
        raise AssertionError("unreachable")  # pragma: no cover

    def calls(self, token: str, tables: Iterable[str]) -> list[ScriptCall]:
        """The fence scripts to send after commit ``token``'s invalidation of ``tables``."""
        if not self.strict:
            return []
        keys = self.core.keys
        return [scripts.fence(keys, table, token) for table in sorted(tables)]

    def restarted(self) -> None:
        """Redis restarted: commits wait one lease from now (see the module docstring)."""
        if self.strict:
            self._quiet_until = time.monotonic() + self.lease

    def wait(self, token: str, tables: Iterable[str], replies: Sequence[Any]) -> None:
        """Return once every holder named in ``replies`` acknowledged or lost its lease."""
        if not self.strict:
            return
        received = time.monotonic()
        if self._quiet_until <= received and all(len(reply) < 3 for reply in replies):
            return  # no table has a holder (the usual case without a local tier)
        ordered = sorted(tables)
        pending: dict[str, float] = {}
        tables_of: dict[str, list[str]] = {}
        fences_of: dict[str, set[str]] = {}
        keys = self.core.keys
        for table, reply in zip(ordered, replies, strict=True):
            now_ms = int(reply[0])
            for i in range(1, len(reply) - 1, 2):
                holder = _text(reply[i])
                ends = received + (float(reply[i + 1]) - now_ms) / 1000
                pending[holder] = max(pending.get(holder, 0.0), ends)
                tables_of.setdefault(holder, []).append(table)
                fences_of.setdefault(holder, set()).add(keys.fence_key(table, token))
        quiet = self._quiet_until - received
        if pending:
            self._wait_acks(token, pending, tables_of, fences_of)
        if quiet > 0:
            self.core.io().sleep(max(0.0, self._quiet_until - time.monotonic()))

    def _wait_acks(
        self,
        token: str,
        pending: dict[str, float],
        tables_of: dict[str, list[str]],
        fences_of: dict[str, set[str]],
    ) -> None:
        core = self.core
        counters = core.counters
        counters.incr_total("fence_waits")
        started = time.monotonic()
        cap = started + self.lease * _CAP_LEASES
        # each wait well inside the socket timeout of the client it runs on (under
        # AsyncSession the asyncio client's, which may be shorter than the sync one's);
        # Redis ends a blocked command up to ~0.1 s after its timeout, so below twice that
        # the acknowledgements are polled, the caller sleeping in between
        timeout = compat.pool_option(core.io().client, "socket_timeout")
        most = _SLICE if not timeout else min(_SLICE, float(timeout) / 2)
        blocking = most >= _SLICE
        try:
            while pending:
                now = time.monotonic()
                if now >= cap:
                    log.error(
                        "commit %s: holders %s kept their leases without acknowledging for "
                        "%.1f s; the commit returns without them",
                        token,
                        ", ".join(sorted(pending)),
                        now - started,
                    )
                    counters.incr_total("fence_timeouts")
                    return
                due = [h for h, ends in pending.items() if ends <= now]
                if due:
                    self._ask_again(due, pending, tables_of)
                    continue
                wait = max(0.001, min(min(pending.values()) - now, most))
                if blocking:
                    popped, more = core.io().pipeline(scripts.take_acks(core.keys, token, wait))
                    acked = ([popped[1]] if popped else []) + list(more or [])
                else:
                    (more,) = core.io().pipeline(scripts.poll_acks(core.keys, token))
                    acked = list(more or [])
                    if not acked:
                        core.io().sleep(wait)
                for entry in acked:
                    _acknowledged(_text(entry), pending, fences_of)
        except RedisError as exc:
            # the commit is in the database; the holders' leases are all that bounds them
            core.redis_failed(exc)
            counters.incr_total("errors")
            log.warning("commit %s: waiting for local tiers failed: %s", token, exc)

    def _ask_again(
        self, due: list[str], pending: dict[str, float], tables_of: dict[str, list[str]]
    ) -> None:
        """Holders whose leases should have ended: renewed ones are waited for again."""
        by_table: dict[str, list[str]] = {}
        for holder in due:
            for table in tables_of[holder]:
                by_table.setdefault(table, []).append(holder)
        ordered = sorted(by_table)
        calls = [scripts.holders(self.core.keys, t, by_table[t]) for t in ordered]
        received = time.monotonic()
        replies = self.core.io().run_batch(calls)
        ends_of: dict[str, float] = {}
        for table, reply in zip(ordered, replies, strict=True):
            now_ms = int(reply[0])
            for holder, score in zip(by_table[table], reply[1:], strict=True):
                expiry = float(score)
                if expiry > now_ms:
                    ends = received + (expiry - now_ms) / 1000
                    ends_of[holder] = max(ends_of.get(holder, 0.0), ends)
        for holder in due:
            if holder in ends_of:
                pending[holder] = ends_of[holder]
            else:
                pending.pop(holder, None)


def _acknowledged(entry: str, pending: dict[str, float], fences_of: dict[str, set[str]]) -> None:
    """Apply one acknowledgement: a holder's id (every fence: one server), or, on a Redis
    Cluster, ``"<holder> <fence key>"``: the holder is done once it named each of its fences,
    since each table's fence is reported by that table's node, after that node's reports
    of the commit and not after any other node's."""
    holder, _, fence = entry.partition(" ")
    if fence:
        left = fences_of.get(holder)
        if left is not None:
            left.discard(fence)
            if left:
                return
    pending.pop(holder, None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
