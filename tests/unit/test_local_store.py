"""The local tier's store: validity under counters, the late-value race, LRU and limits."""

from __future__ import annotations

from sa_redis_cache.local import LocalStore


def _store(**limits: int) -> LocalStore:
    return LocalStore(
        max_entries=limits.get("max_entries", 100), max_bytes=limits.get("max_bytes", 1 << 20)
    )


def test_an_entry_lives_until_a_counter_it_names_is_invalidated() -> None:
    store = _store()
    mark = store.mark()
    assert store.put("e", "value", [("v", b"7")], size=10, ttl=60, mark=mark)
    got = store.get("e")
    assert got is not None
    assert got.value == "value"
    store.invalidate([b"other"])
    assert store.get("e") is not None
    store.invalidate([b"v"])
    assert store.get("e") is None


def test_invalidating_the_entry_key_drops_it() -> None:
    store = _store()
    store.put("e", 1, [], size=10, ttl=60, mark=store.mark())
    store.invalidate(["e"])
    assert store.get("e") is None
    assert store.bytes == 0


def test_a_value_read_before_an_invalidation_is_refused_after_it() -> None:
    """The client-side caching race: the look was sent, the key changed, its invalidation
    arrived, then the (older) value came back."""
    store = _store()
    mark = store.mark()
    store.invalidate([b"v"])
    assert not store.put("e", "old", [("v", b"7")], size=10, ttl=60, mark=mark)
    assert store.get("e") is None
    # a look sent after the invalidation may store
    assert store.put("e", "new", [("v", b"8")], size=10, ttl=60, mark=store.mark())


def test_an_older_value_does_not_revive_entries_under_a_newer_counter() -> None:
    store = _store()
    store.put("a", "a8", [("v", b"8")], size=10, ttl=60, mark=store.mark())
    store.put("b", "b7", [("v", b"7")], size=10, ttl=60, mark=store.mark())
    # the mirror holds the value last read: "a" (stored under 8) no longer matches
    assert store.get("a") is None
    assert store.get("b") is not None


def test_clear_refuses_every_look_sent_before_it() -> None:
    store = _store()
    mark = store.mark()
    store.put("e", 1, [], size=10, ttl=60, mark=mark)
    store.clear()
    assert len(store) == 0
    assert not store.put("e", 1, [], size=10, ttl=60, mark=mark)
    assert store.put("e", 1, [], size=10, ttl=60, mark=store.mark())


def test_least_recently_used_entries_go_first() -> None:
    store = _store(max_entries=2)
    for key in ("a", "b"):
        store.put(key, key, [], size=10, ttl=60, mark=store.mark())
    assert store.get("a") is not None  # "b" is now the least recently used
    store.put("c", "c", [], size=10, ttl=60, mark=store.mark())
    assert store.get("b") is None
    assert store.get("a") is not None
    assert store.get("c") is not None
    assert store.evictions == 1


def test_the_byte_limit_evicts_and_refuses_an_entry_larger_than_it() -> None:
    store = _store(max_bytes=100)
    store.put("a", "a", [], size=60, ttl=60, mark=store.mark())
    store.put("b", "b", [], size=60, ttl=60, mark=store.mark())
    assert store.get("a") is None
    assert store.bytes == 60
    assert not store.put("huge", "x", [], size=101, ttl=60, mark=store.mark())


def test_an_expired_entry_is_a_miss() -> None:
    store = _store()
    store.put("e", 1, [], size=10, ttl=1e-9, mark=store.mark())
    assert store.get("e") is None
    assert len(store) == 0
