"""Keys of tables in slot groups and of spread query entries, taken apart again: what
``cache.clear()`` keeps, the local tier's fence tokens, and the slots they hash to."""

from __future__ import annotations

from sa_redis_cache.compat import key_slot
from sa_redis_cache.protocol import KeyScheme
from sa_redis_cache.protocol.keys import TableKey, query_digest

KEYS = KeyScheme("s", {"orders": "sales", "order_lines": "sales"})
DIGEST = "0123456789abcdef" * 2


def test_a_groups_tables_share_one_slot_and_keep_distinct_keys() -> None:
    keys = [KEYS.version_key(t) for t in ("orders", "order_lines")]
    assert keys == ["sarc:s:{s:@sales}:orders:v", "sarc:s:{s:@sales}:order_lines:v"]
    everything = [
        *keys,
        KEYS.writers_key("orders"),
        KEYS.row_write_key("order_lines", "7"),
        KEYS.entity_key("orders", "ab", "cd", "7"),
        KEYS.query_key("orders", DIGEST),
        KEYS.holders_key("orders"),
        KEYS.fence_key("order_lines", "tok"),
        KEYS.stream_key("orders", "cd", 3),
    ]
    assert len({key_slot(k) for k in everything}) == 1
    assert key_slot(KEYS.version_key("products")) != key_slot(keys[0])


def test_grouped_keys_are_taken_apart_by_table() -> None:
    assert KEYS.split_key(KEYS.entity_key("order_lines", "ab", "cd", "7").encode()) == TableKey(
        b"order_lines", b"e:ab:cd:7", b"sales"
    )
    # a group this process was not told of: read up to the first ":"
    other = KeyScheme("s").split_key(b"sarc:s:{s:@billing}:invoices:w")
    assert other == TableKey(b"invoices", b"w", b"billing")
    assert KEYS.split_key(b"sarc:other:{other:t}:v") is None


def test_clear_keeps_a_groups_writer_marks_and_queues() -> None:
    assert KEYS.clearable(KEYS.version_key("orders").encode())
    assert KEYS.clearable(KEYS.query_key("orders", DIGEST, spread=True).encode())
    assert not KEYS.clearable(KEYS.writers_key("order_lines").encode())
    assert not KEYS.clearable(KEYS.workers_key("orders", "cd").encode())
    assert not KEYS.clearable(KEYS.stream_key("orders", "cd", 1).encode())


def test_fence_tokens_of_grouped_tables() -> None:
    assert KEYS.fence_token(KEYS.fence_key("orders", "t1").encode()) == "t1"
    assert KEYS.fence_token(KEYS.version_key("orders").encode()) is None


def test_spread_entries_keep_their_table_and_digest_and_spread_over_slots() -> None:
    plain = KeyScheme("s")
    key = plain.query_key("products", DIGEST, spread=True)
    assert key == f"sarc:s:{{s:@q:012}}:products:q:{DIGEST}"
    assert query_digest(key) == DIGEST == query_digest(plain.query_key("products", DIGEST))
    assert plain.split_key(key.encode()) == TableKey(b"products", b"q:" + DIGEST.encode(), b"q:012")
    slots = {
        key_slot(plain.query_key("products", f"{i:03x}" + DIGEST[3:], spread=True))
        for i in range(64)
    }
    assert len(slots) > 32


def test_memoised_table_prefixes_build_the_same_keys_as_before() -> None:
    """Each table's prefix is formatted once; the keys must stay byte-identical to the
    layout spelled out in full, also for a table given a group after its first key."""
    keys = KeyScheme("s", {"orders": "sales"})

    def spelled(table: str, group: str | None) -> str:
        tag = f"{{s:{table}}}" if group is None else f"{{s:@{group}}}:{table}"
        return f"sarc:s:{tag}:"

    for _ in range(2):  # the second round reads the memo
        for table, group in (("orders", "sales"), ("products", None)):
            head = spelled(table, group)
            assert keys.version_key(table) == head + "v"
            assert keys.writers_key(table) == head + "w"
            assert keys.generation_key(table) == head + "g"
            assert keys.row_write_key(table, "7") == head + "rw:7"
            assert keys.entity_key(table, "ab", "cd", "7") == head + "e:ab:cd:7"
            assert keys.query_key(table, DIGEST) == head + "q:" + DIGEST
            assert keys.stream_key(table, "cd", 3) == head + "wb:cd:3"
            assert keys.query_key(table, DIGEST, spread=True) == (
                f"sarc:s:{{s:@q:012}}:{table}:q:{DIGEST}"
            )
    keys.groups["products"] = "shelf"  # as the keyspace CLI learns a group late
    assert keys.version_key("products") == spelled("products", "shelf") + "v"
    del keys.groups["products"]
    assert keys.version_key("products") == spelled("products", None) + "v"
