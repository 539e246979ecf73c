"""Every Redis key the library and the worker use, and the invalidation channel.

Every key starts with ``sarc:{namespace}:``. Keys that belong to one table carry a
Redis Cluster hash tag ``{namespace:table}`` so that every multi-key script on one table
touches one slot::

    sarc:shop:{shop:products}:v                 table version counter (INCR)
    sarc:shop:{shop:products}:w                 writers in flight (ZSET, score = expiry ms)
    sarc:shop:{shop:products}:g                 entity generation (bumped by bulk DML)
    sarc:shop:{shop:products}:rw:<pk>           row write counter (validates entity entries)
    sarc:shop:{shop:products}:e:<schema>:<scope>:<pk>
                                                entity entry of one row in one database
                                                and schema (scope: sa_redis_cache.binds)
    sarc:shop:{shop:products}:q:<digest>        query entry (tag of its first table)
    sarc:shop:{shop:@q:3f2}:products:q:<digest> query entry spread by its digest
                                                (FromCache(spread=True))
    <entry key>:lease                           fill lease of an entry (stampede control)
    <entry key>:inv                             invalidation counter of a query entry
    sarc:shop:{shop:views}:wb:<scope>:<p>       write-behind stream of partition p
    sarc:shop:{shop:views}:wbl:<scope>:<p>      lease of partition p (worker id, PX)
    sarc:shop:{shop:views}:wbw:<scope>          workers draining those streams (ZSET)
    sarc:shop:{shop:views}:wbp:<schema>:<scope>:<pk>
                                                pending (queued, unflushed) state of a row
    sarc:shop:{shop:products}:fence:<token>     set and deleted by a commit, for the local
                                                tiers to acknowledge (never holds a value)
    sarc:shop:lh:{shop:products}                processes holding local-tier entries of the
                                                table (ZSET, score = lease expiry ms)
    sarc:shop:ack:<token>                       acknowledgements of one commit's fences (LIST)
    sarc:shop:local:<holder>                    one process's local-tier gauges (HASH)
    sarc:shop:f:<prefix>:<digest>               function result (cache.cached)
    sarc:shop:r:<region>                        tables a FromCache region's entries read (SET)
    sarc:shop:stats:<scope>                     hit counters of every process (HASH)
    sarc:shop:invalidations                     Pub/Sub channel of commit announcements

A table in a slot group (``CachePolicy(slot_group="orders")``, ``Cache(slot_groups=...)``)
carries the group's tag instead, its name after it: ``sarc:shop:{shop:@orders}:orders:v``,
``sarc:shop:lh:{shop:@orders}:orders``. Group names hold no ``:``, so a spread entry's
``@q:<hex>`` never names a group (docs/cluster.md, "Slot groups").

:class:`KeyScheme` builds them all; nothing else spells a key or a suffix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from sa_redis_cache.codec import CodecError, dumps_tagged

if TYPE_CHECKING:
    from collections.abc import Sequence

PREFIX = "sarc"
# tables whose key prefix is remembered (KeyScheme.table_prefix), emptied when full
PREFIXES_REMEMBERED = 4096

_LEASE = ":lease"
_FENCE = "fence:"
_INVALIDATIONS = ":inv"
_STREAM, _PARTITION_LEASE, _WORKERS, _PENDING = "wb:", "wbl:", "wbw:", "wbp:"
QUEUE_MARKERS = (b":wb:", b":wbp:", b":wbl:")
GROUP_MARK = "@"
"""Starts a slot group's name in a hash tag (``{shop:@orders}``), where a table's name
stands otherwise."""
"""Parts of the keys that hold writes not yet in the database (never deleted to clear)."""


_GROUP_FORBIDDEN = "{}:*?[]\\ \n@"


def group_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a slot group, with the fix; None when it can.

    Example::

        >>> group_name_problem("orders") is None
        True
        >>> group_name_problem("a:b").startswith("slot group 'a:b'")
        True
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in _GROUP_FORBIDDEN):
        return (
            f"slot group {name!r} must be a non-empty name without spaces, ':', '@', braces "
            "or glob characters (it becomes part of a Redis hash tag); use something like "
            "'orders'"
        )
    return None


class TableKey(NamedTuple):
    """A key of a table, taken apart by :meth:`KeyScheme.split_key`: the table, what
    follows its prefix, and the slot group its tag names (None: the table's own tag).

    Example::

        >>> KeyScheme("shop").split_key(b"sarc:shop:{shop:products}:v").tail
        b'v'
    """

    table: bytes
    tail: bytes
    group: bytes | None


def digest(data: bytes) -> str:
    """The 32 hex digits every digest in a key is made of (BLAKE2b, 16 bytes).

    Example::

        >>> len(digest(b"anything"))
        32
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


DIGEST_CHARS = len(digest(b""))


def query_digest(entry_key: str) -> str:
    """The statement digest that ends a query entry's key, whatever tag the key carries
    (its first table's, its slot group's, or its own when spread).

    Example::

        >>> query_digest(KeyScheme("shop").query_key("products", "0" * 32, spread=True))
        '00000000000000000000000000000000'
    """
    return entry_key[-DIGEST_CHARS:]


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Builds every Redis key of one namespace.

    ``groups`` maps a table to its slot group (docs/cluster.md, "Slot groups"); a table
    not in it is its own group. The cache fills it at ``Cache(slot_groups=...)`` and
    ``attach()`` (each model's ``CachePolicy(slot_group=...)``), before any key of the
    table is built.

    Example::

        >>> KeyScheme("shop").version_key("products")
        'sarc:shop:{shop:products}:v'
        >>> KeyScheme("shop", {"orders": "sales"}).version_key("orders")
        'sarc:shop:{shop:@sales}:orders:v'
    """

    namespace: str
    groups: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # table -> (its slot group when the prefix was built, the prefix): every key of a
    # table starts with it, so it is formatted once; the group is checked again on each
    # use because ``groups`` is a plain dict others may still add to (cli keyspace)
    _prefixes: dict[str, tuple[str | None, str]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def prefix(self) -> str:
        """``sarc:{namespace}:``, the start of every key of this namespace."""
        return f"{PREFIX}:{self.namespace}:"

    def table_prefix(self, table: str) -> str:
        """The hash-tagged prefix of every key that belongs to ``table``.

        Example::

            >>> KeyScheme("shop", {"order_lines": "sales"}).table_prefix("order_lines")
            'sarc:shop:{shop:@sales}:order_lines:'
        """
        group = self.groups.get(table)
        prefixes = self._prefixes
        found = prefixes.get(table)
        if found is not None and found[0] == group:
            return found[1]
        text = f"{self.prefix}{self.tagged_table(table)}:"
        if len(prefixes) >= PREFIXES_REMEMBERED:
            # Core and textual DML name any table, not only the models': an application
            # writing temporary or per-day tables would add one for each, for ever
            prefixes.clear()
        prefixes[table] = (group, text)
        return text

    def tagged_table(self, table: str) -> str:
        """``table``'s hash tag, followed by its name when the tag is its slot group's: the
        one place that picks a table's tag.

        Example::

            >>> KeyScheme("shop").tagged_table("products")
            '{shop:products}'
            >>> KeyScheme("shop", {"orders": "sales"}).tagged_table("orders")
            '{shop:@sales}:orders'
        """
        group = self.groups.get(table)
        if group is None:
            return f"{{{self.namespace}:{table}}}"
        return f"{{{self.namespace}:{GROUP_MARK}{group}}}:{table}"

    def split_key(self, key: bytes) -> TableKey | None:
        """The table a key of this namespace belongs to, what follows the table's prefix,
        and the slot group its tag names (None: the table's own tag); None for a key that
        belongs to no table.

        A grouped key's table is one of its group's known tables; in a group this process
        does not know (another process's configuration) it is read up to the first ``:``.
        A spread query entry's group is ``q:<hex>`` (no group name holds a ``:``).

        Example::

            >>> keys = KeyScheme("shop", {"orders": "sales"})
            >>> keys.split_key(keys.writers_key("orders").encode())
            TableKey(table=b'orders', tail=b'w', group=b'sales')
            >>> keys.split_key(b"sarc:shop:{shop:products}:rw:7")
            TableKey(table=b'products', tail=b'rw:7', group=None)
        """
        start = self.tracked_prefix.encode()
        head = f"{self.namespace}:".encode()
        if not key.startswith(start) or not key.startswith(head, len(start)):
            return None
        # the first "}:" ends the tag: a primary key's text may hold "}:" too
        end = key.find(b"}:", len(start))
        if end < 0:
            return None
        name, rest = key[len(start) + len(head) : end], key[end + 2 :]
        if not name.startswith(GROUP_MARK.encode()):
            return TableKey(name, rest, None)
        group = name[len(GROUP_MARK) :]
        text = group.decode("utf-8", "surrogateescape")
        members = sorted(
            (t.encode("utf-8", "surrogateescape") for t, g in self.groups.items() if g == text),
            key=len,
            reverse=True,
        )
        for table in members:
            if rest.startswith(table + b":"):
                return TableKey(table, rest[len(table) + 1 :], group)
        table, sep, tail = rest.partition(b":")
        return TableKey(table, tail, group) if sep else None

    # -- counters and marks ----------------------------------------------------------------

    def version_key(self, table: str) -> str:
        """The INCR counter every query entry on ``table`` is validated against."""
        return self.table_prefix(table) + "v"

    def writers_key(self, table: str) -> str:
        """The set of transactions that have flushed ``table`` and not yet finished."""
        return self.table_prefix(table) + "w"

    def generation_key(self, table: str) -> str:
        """The counter every entity entry of ``table`` is validated against.

        Bumped only by writes whose rows are not known (bulk and textual DML), so that
        ordinary row writes leave the other rows' entity entries alone.
        """
        return self.table_prefix(table) + "g"

    def row_write_key(self, table: str, pk_text: str) -> str:
        """Counts the writes of one row, in every database and schema alike.

        Entity entries of the row are valid only under its current value, and a
        write-through commit stores its state only if the counter is still its ticket.
        It has no scope on purpose: a write seen under one spelling of a database must
        retire the entries filled under every other.
        """
        return f"{self.table_prefix(table)}rw:{pk_text}"

    # -- entries ---------------------------------------------------------------------------

    def entity_key(self, table: str, schema_hash: str, scope: str, pk_text: str) -> str:
        """The entry of one row, read by ``session.get`` and many-to-one lazy loads.

        ``scope`` names the database and schema the row lives in
        (:meth:`sa_redis_cache.binds.Binds.scope`): tenants never share an entry.

        Example::

            >>> KeyScheme("shop").entity_key("products", "ab12", "00ff", "7")
            'sarc:shop:{shop:products}:e:ab12:00ff:7'
        """
        return f"{self.table_prefix(table)}e:{schema_hash}:{scope}:{pk_text}"

    def entity_pattern(self, table: str) -> str:
        """A SCAN pattern matching every entity entry of ``table``."""
        return escape_glob(self.table_prefix(table)) + "e:*"

    def row_pattern(self, table: str, schema_hash: str, pk_text: str) -> str:
        """A SCAN pattern matching one row's entity entries in every scope.

        Example::

            >>> KeyScheme("shop").row_pattern("products", "ab12", "7")
            'sarc:shop:{shop:products}:e:ab12:*:7'
        """
        head = escape_glob(self._scoped_head(table, schema_hash, pending=False))
        return f"{head}*:{escape_glob(pk_text)}"

    def row_keys_pattern(self, table: str, schema_hash: str, pk_text: str) -> str:
        """A SCAN pattern matching one row's entity entries and write-behind pending
        states in every scope, and some other keys (:meth:`row_kind` tells them apart):
        one walk of the keyspace finds both kinds.

        Example::

            >>> KeyScheme("shop").row_keys_pattern("views", "ab12", "7")
            'sarc:shop:{shop:views}:*:ab12:*:7'
        """
        head = escape_glob(self.table_prefix(table))
        return f"{head}*:{escape_glob(schema_hash)}:*:{escape_glob(pk_text)}"

    def row_kind(
        self, key: str, table: str, schema_hash: str, pk_text: str
    ) -> Literal["entity", "pending"] | None:
        """``"entity"`` when ``key`` is one of the row's entity entries (:meth:`row_pattern`
        matches it), ``"pending"`` when it is one of its pending states (the same pattern
        over :meth:`pending_key`), else None.

        Example::

            >>> keys = KeyScheme("shop")
            >>> keys.row_kind(keys.pending_key("views", "ab12", "00ff", "7"), "views", "ab12", "7")
            'pending'
            >>> other_row = keys.entity_key("views", "ab12", "00ff", "17")
            >>> keys.row_kind(other_row, "views", "ab12", "7") is None
            True
        """
        kinds: tuple[tuple[Literal["entity", "pending"], bool], ...] = (
            ("entity", False),
            ("pending", True),
        )
        for kind, pending in kinds:
            head = self._scoped_head(table, schema_hash, pending=pending)
            # the patterns' "*" matches anything, the empty text included
            if key.startswith(head) and key[len(head) :].endswith(f":{pk_text}"):
                return kind
        return None

    def _scoped_head(self, table: str, schema_hash: str, *, pending: bool) -> str:
        """What one table's entity keys (or pending keys) of ``schema_hash`` start with,
        before their scope: the two differ only in it, ``<head><scope>:<pk text>``."""
        key = self.pending_key if pending else self.entity_key
        return key(table, schema_hash, "", "")[:-1]

    def query_key(self, table: str, digest: str, *, spread: bool = False) -> str:
        """The entry of one statement with its bound values, under its first ``table``.

        ``spread`` (``FromCache(spread=True)``) tags it by its own digest instead, in one
        of 4096 slots, so that one table's statements spread over the shards of a cluster;
        ``table`` stays in the key, after the tag, as in a slot group.

        Example::

            >>> KeyScheme("shop").query_key("products", "3f2a")
            'sarc:shop:{shop:products}:q:3f2a'
            >>> KeyScheme("shop").query_key("products", "3f2a", spread=True)
            'sarc:shop:{shop:@q:3f2}:products:q:3f2a'
        """
        if spread:
            tag = f"{self.namespace}:{GROUP_MARK}q:{digest[:3]}"
            return f"{PREFIX}:{self.namespace}:{{{tag}}}:{table}:q:{digest}"
        return f"{self.table_prefix(table)}q:{digest}"

    def query_pattern(self, table: str) -> str:
        """A SCAN pattern matching every query entry stored under ``table``'s tag."""
        return escape_glob(self.table_prefix(table)) + "q:*"

    @staticmethod
    def lease_key(entry_key: str) -> str:
        """The fill lease of an entry: the token of the one caller filling it."""
        return entry_key + _LEASE

    @staticmethod
    def invalidations_key(entry_key: str) -> str:
        """The counter ``cache.invalidate_query()`` moves beside a query entry."""
        return entry_key + _INVALIDATIONS

    def function_key(self, prefix: str, digest: str) -> str:
        """The entry of one call of a function decorated with ``cache.cached``."""
        return f"{self.prefix}f:{prefix}:{digest}"

    def region_key(self, region: str) -> str:
        """The set of tables whose version retires every entry of a ``FromCache`` region.

        Example::

            >>> KeyScheme("shop").region_key("pages")
            'sarc:shop:r:pages'
        """
        return f"{self.prefix}r:{region}"

    def function_pattern(self, prefix: str) -> str:
        """A SCAN pattern matching exactly the entries of one decorated function.

        One digest after the prefix, so that prefix ``a`` leaves ``a:b``'s entries alone.
        """
        return escape_glob(f"{self.prefix}f:{prefix}:") + "?" * DIGEST_CHARS

    # -- the local tier --------------------------------------------------------------------

    @property
    def tracked_prefix(self) -> str:
        """The prefix the local tier asks Redis to track (``CLIENT TRACKING ... BCAST``).

        Every key that belongs to a table starts with it: counters, entries, fences. The
        holder sets, acknowledgements and statistics do not, so that their traffic
        reaches no process's invalidation connection.

        Example::

            >>> KeyScheme("shop").tracked_prefix
            'sarc:shop:{'
        """
        return f"{self.prefix}{{"

    def fence_key(self, table: str, token: str) -> str:
        """The key a commit on ``table`` sets and deletes for the local tiers to see."""
        return f"{self.table_prefix(table)}{_FENCE}{token}"

    def fence_token(self, key: bytes) -> str | None:
        """The commit token of a fence key of this namespace, or None for any other key.

        Example::

            >>> keys = KeyScheme("shop")
            >>> keys.fence_token(keys.fence_key("products", "t1").encode())
            't1'
            >>> keys.fence_token(keys.version_key("products").encode()) is None
            True
        """
        if b":" + _FENCE.encode() not in key:
            return None  # most keys the local tier hears of: not taken apart
        found = self.split_key(key)
        if found is None or not found.tail.startswith(_FENCE.encode()):
            return None
        return found.tail[len(_FENCE) :].decode(errors="replace")

    def holders_key(self, table: str) -> str:
        """The processes that hold local-tier entries of ``table`` (ZSET, score = expiry ms).

        Outside the tracked prefix, and in ``table``'s hash slot (the fence script reads
        it with the fence key).

        Example::

            >>> KeyScheme("shop").holders_key("products")
            'sarc:shop:lh:{shop:products}'
        """
        return f"{self.prefix}lh:{self.tagged_table(table)}"

    @property
    def holders_pattern(self) -> str:
        """A SCAN pattern matching every table's holder set."""
        return escape_glob(f"{self.prefix}lh:") + "*"

    def is_registration(self, key: bytes) -> bool:
        """True for what running processes registered once and count on finding: a
        table's holder set (a local tier holding a table does not register again before
        its lease renewal, and every commit's fences read the set) and a region's table
        set (a process records a statement's table once a day, and
        ``cache.invalidate_region`` reads the set). Deleting one would let commits stop
        waiting for a tier, or a region's invalidation miss a table. Any table or slot
        group.

        Example::

            >>> keys = KeyScheme("shop")
            >>> keys.is_registration(keys.holders_key("products").encode())
            True
            >>> keys.is_registration(keys.region_key("pages").encode())
            True
            >>> keys.is_registration(keys.version_key("products").encode())
            False
        """
        return key.startswith((self._holders_head(), self.region_key("").encode()))

    def _holders_head(self) -> bytes:
        return f"{self.prefix}lh:".encode()

    def holders_table(self, key: bytes) -> str | None:
        """The table whose holder set ``key`` is, or None for any other key (or one this
        scheme would not name so: a table in a slot group this process does not know).

        Example::

            >>> keys = KeyScheme("shop", {"orders": "sales"})
            >>> keys.holders_table(keys.holders_key("orders").encode())
            'orders'
            >>> keys.holders_table(keys.version_key("orders").encode()) is None
            True
        """
        head = self._holders_head()
        if not key.startswith(head):
            return None
        found = self.split_key(self.prefix.encode() + key[len(head) :] + b":")
        if found is None or found.tail:
            return None
        table = found.table.decode("utf-8", "surrogateescape")
        return table if self.holders_key(table).encode() == key else None

    def ack_key(self, token: str) -> str:
        """The list holders push their id onto once they have seen commit ``token``'s fences."""
        return f"{self.prefix}ack:{token}"

    def local_stats_key(self, holder: str) -> str:
        """One process's local-tier gauges, for ``sa-redis-cache stats`` (HASH, expires)."""
        return f"{self.prefix}local:{holder}"

    @property
    def local_stats_pattern(self) -> str:
        """A SCAN pattern matching every process's local-tier gauges."""
        return escape_glob(f"{self.prefix}local:") + "*"

    # -- write-behind ----------------------------------------------------------------------

    def stream_key(self, table: str, scope: str, partition: int) -> str:
        """The write-behind stream of one partition of ``table`` in one database and schema.

        Example::

            >>> KeyScheme("shop").stream_key("page_views", "00ff", 3)
            'sarc:shop:{shop:page_views}:wb:00ff:3'
        """
        return f"{self.table_prefix(table)}{_STREAM}{scope}:{partition}"

    def stream_pattern(self, table: str) -> str:
        """A SCAN pattern matching ``table``'s streams of every scope and partition."""
        return escape_glob(self.table_prefix(table)) + _STREAM + "*"

    def scope_of_stream(self, table: str, stream: str) -> str | None:
        """The scope a stream key of ``table`` names, or None when it is not one.

        Example::

            >>> stream = "sarc:shop:{shop:page_views}:wb:00ff:3"
            >>> KeyScheme("shop").scope_of_stream("page_views", stream)
            '00ff'
        """
        head = self.table_prefix(table) + _STREAM
        if not stream.startswith(head):
            return None
        scope, _, partition = stream[len(head) :].rpartition(":")
        return scope if scope and partition.isdigit() else None

    def partition_lease_key(self, table: str, scope: str, partition: int) -> str:
        """The lease a worker holds to consume one partition."""
        return f"{self.table_prefix(table)}{_PARTITION_LEASE}{scope}:{partition}"

    def workers_key(self, table: str, scope: str) -> str:
        """The workers that drain ``table``'s streams in ``scope`` (ZSET, score = expiry ms)."""
        return f"{self.table_prefix(table)}{_WORKERS}{scope}"

    def pending_key(self, table: str, schema_hash: str, scope: str, pk_text: str) -> str:
        """The newest unflushed state of one write-behind row."""
        return f"{self.table_prefix(table)}{_PENDING}{schema_hash}:{scope}:{pk_text}"

    def pending_entity_key(self, table: str, schema_hash: str, pending: str) -> str | None:
        """The entity key of the row whose pending key is ``pending`` (a queued state's
        signature is bound to it); None when ``pending`` is no pending key of the table.

        Example::

            >>> keys = KeyScheme("shop")
            >>> pending = keys.pending_key("views", "ab12", "00ff", "7")
            >>> keys.pending_entity_key("views", "ab12", pending)
            'sarc:shop:{shop:views}:e:ab12:00ff:7'
        """
        head = self._scoped_head(table, schema_hash, pending=True)
        if not pending.startswith(head):
            return None
        return self._scoped_head(table, schema_hash, pending=False) + pending[len(head) :]

    # -- the namespace ---------------------------------------------------------------------

    def stats_key(self, scope: str) -> str:
        """The hash of one scope's counters, summed over every process that publishes.

        ``scope`` is ``total`` or a scope of ``cache.stats()`` such as ``model:Product``,
        ``region:pages`` or ``function:profile``; each field is a counter (``hits``...).

        Example::

            >>> KeyScheme("shop").stats_key("model:Product")
            'sarc:shop:stats:model:Product'
        """
        return f"{self.prefix}stats:{scope}"

    @property
    def invalidation_channel(self) -> str:
        """The Pub/Sub channel every commit's invalidation is announced on.

        Example::

            >>> KeyScheme("shop").invalidation_channel
            'sarc:shop:invalidations'
        """
        return f"{self.prefix}invalidations"

    def clearable(self, key: bytes) -> bool:
        """True for a key ``cache.clear()`` deletes: entries and the counters they check.

        Kept: write-behind queues, pending states and leases (writes not yet in the
        database), writer marks (transactions in flight), the worker registries, and
        everything outside the tables' tags but function entries (published statistics,
        regions' table sets, the local tier's holder sets and acknowledgements).

        Example::

            >>> keys = KeyScheme("shop")
            >>> keys.clearable(keys.version_key("products").encode())
            True
            >>> keys.clearable(keys.writers_key("products").encode())
            False
            >>> keys.clearable(keys.function_key("profile", "0" * 32).encode())
            True
            >>> keys.clearable(keys.region_key("pages").encode())
            False
        """
        if key.startswith(f"{self.prefix}f:".encode()):
            return True
        found = None if is_queue_key(key) else self.split_key(key)
        if found is None:
            return False
        tail = found.tail
        return tail != b"w" and not tail.startswith(_WORKERS.encode())

    @property
    def namespace_pattern(self) -> str:
        """A SCAN pattern matching every key of the namespace."""
        return escape_glob(self.prefix) + "*"


def is_queue_key(key: bytes) -> bool:
    """True for write-behind streams, pending states and partition leases.

    They hold writes not yet in the database: nothing that clears the cache may delete
    them.

    Example::

        >>> is_queue_key(b"sarc:shop:{shop:views}:wb:00ff:3")
        True
    """
    return any(marker in key for marker in QUEUE_MARKERS)


def escape_glob(text: str) -> str:
    """``text`` with Redis glob characters escaped, for a SCAN pattern.

    Example::

        >>> escape_glob("a*b")
        'a\\\\*b'
    """
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def pk_text(values: Sequence[Any]) -> str:
    """Stable, unambiguous text for a primary key tuple.

    Example::

        >>> pk_text((7,))
        '7'
    """
    if len(values) == 1 and type(values[0]) is int:
        return str(values[0])
    try:
        return digest(dumps_tagged(list(values)))
    except CodecError as exc:
        raise TypeError(f"primary key {values!r} cannot be used in a cache key: {exc}") from exc
