"""How calls over several cluster slots are split (sa_redis_cache/protocol/cluster.py): each
part in one slot, the replies put back in the caller's order, and what must stay atomic
refused."""

from __future__ import annotations

import pytest

from sa_redis_cache.compat import key_slot
from sa_redis_cache.protocol import KeyScheme, cluster, scripts
from sa_redis_cache.protocol.scripts import QueuedOp

KEYS = KeyScheme("s")
# three tables whose tags hash to three different slots
TABLES = ["products", "categories", "orders"]


def test_the_tables_used_here_live_in_three_slots() -> None:
    assert len({key_slot(KEYS.version_key(t)) for t in TABLES}) == 3


def test_capture_is_split_per_slot_and_merged_in_order() -> None:
    counters = [KEYS.version_key(t) for t in TABLES] + [KEYS.generation_key("products")]
    call = scripts.capture_versions(counters, [10, 20, 30, 40])
    parts = cluster.split(call)
    assert len(parts.calls) == 3
    for _, keys, args in parts.calls:
        assert cluster.one_slot(keys)
        assert len(args) == 2 * len(keys)
    # each part answers its keys' values in its key order; the merge restores the call's
    replies = [[f"{k}=".encode() for k in keys] for _, keys, _ in parts.calls]
    assert parts.merge(replies) == [f"{k}=".encode() for k in counters]
    ttl_of = {k: args[2 * i] for _, keys, args in parts.calls for i, k in enumerate(keys)}
    assert [ttl_of[k] for k in counters] == [10, 20, 30, 40]


def test_bump_all_keeps_each_counters_start_and_sums_the_replies() -> None:
    counters = [KEYS.version_key(t) for t in TABLES]
    unlink = [KEYS.entity_key("orders", "h", "s", "1")]
    call = scripts.bump_all(counters, unlink)
    starts = dict(zip(counters, call[2][2:], strict=True))
    parts = cluster.split(call)
    assert len(parts.calls) == 3
    for _, keys, args in parts.calls:
        assert cluster.one_slot(keys)
        n = args[1]
        assert [starts[k] for k in keys[:n]] == args[2:]
    orders = next(c for c in parts.calls if KEYS.version_key("orders") in c[1])
    assert unlink[0] in orders[1]
    assert parts.merge([1, 1, 1]) == 3


def test_invalidate_entries_keeps_each_entry_with_its_counter() -> None:
    entries = [KEYS.query_key(t, "d" * 32) for t in TABLES]
    parts = cluster.split(scripts.invalidate_entries(KEYS, entries, 1000))
    assert sorted(k for _, keys, _ in parts.calls for k in keys[::2]) == sorted(entries)
    for _, keys, _ in parts.calls:
        assert keys[1] == KEYS.invalidations_key(keys[0])
    assert parts.merge([1, 0, 1]) == 2


def test_a_fill_over_three_slots_checks_the_two_foreign_ones_first() -> None:
    entry = KEYS.query_key("products", "e" * 32)
    call = scripts.fill(
        KEYS,
        entry,
        [KEYS.version_key(t) for t in TABLES],
        [KEYS.writers_key(t) for t in TABLES],
        ttl_ms=1000,
        blob=b"x",
        lease_token="tok",  # noqa: S106 - a lease token, not a secret
        invalidations=None,
        captured=[b"1", b"2", b"3"],
    )
    plan = cluster.fill_plan(call)
    assert [(c[1], c[2]) for c in plan.checks] == [
        ([KEYS.version_key("categories"), KEYS.writers_key("categories")], [b"2"]),
        ([KEYS.version_key("orders"), KEYS.writers_key("orders")], [b"3"]),
    ]
    script, keys, args = plan.fill
    assert script.name == "fill"
    assert keys == [
        entry,
        KEYS.lease_key(entry),
        KEYS.invalidations_key(entry),
        KEYS.version_key("products"),
        KEYS.writers_key("products"),
    ]
    assert args[:3] == [1000, b"x", "tok"]
    assert args[5:] == [b"1"]
    assert plan.release is not None
    assert plan.release[1] == [KEYS.lease_key(entry)]


def test_an_mget_over_slots_is_one_mget_per_slot() -> None:
    keys = [KEYS.version_key(t) for t in TABLES] + [KEYS.generation_key("products")]
    commands = [("SET", "k", "v"), ("MGET", *keys)]
    sent, where = cluster.split_mget(commands)
    assert sent[0] == commands[0]
    assert len(sent) == 4  # the SET, and one MGET per slot
    assert all(cluster.one_slot(c[1:]) for c in sent[1:])
    replies = ["OK", *[[f"{k}".encode() for k in c[1:]] for c in sent[1:]]]
    assert cluster.join_mget(commands, where, replies) == ["OK", [k.encode() for k in keys]]


def test_a_write_behind_enqueue_over_two_slots_is_refused_naming_the_tables() -> None:
    ops = [
        QueuedOp(t, KEYS.stream_key(t, "x", 0), "e", "p", "u", "1", "h", b"{}", b"")
        for t in ("products", "orders")
    ]
    ops = [
        op._replace(
            entity_key=KEYS.entity_key(op.table, "h", "x", "1"),
            pending_key=KEYS.pending_key(op.table, "h", "x", "1"),
        )
        for op in ops
    ]
    with pytest.raises(cluster.CrossSlot, match=r"span 2 slots \(tables orders, products\)"):
        cluster.split(scripts.wb_enqueue(KEYS, ops, b"h"))
