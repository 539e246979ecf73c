"""``KeysMade``: which bound values an entry key is remembered by (docs/decisions.md,
"An entry key is remembered by the values it was made of")."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from sa_redis_cache.reads.queries import (
    KEY_TEXT_REMEMBERED,
    KEY_VALUES_REMEMBERED,
    KEYS_REMEMBERED,
    KeysMade,
)

PLAN: Any = SimpleNamespace(entry_prefix="sarc:ns:{ns:products}:q:", digest="d" * 32)
DATABASE: Any = SimpleNamespace(name="postgresql://db")


@pytest.mark.parametrize(
    "values",
    [
        [7, "a", None, True],
        [2**64 - 1, -(2**63)],
        ["x" * KEY_TEXT_REMEMBERED],
        list(range(KEY_VALUES_REMEMBERED)),
        [],
    ],
)
def test_plain_values_are_remembered(values: list[Any]) -> None:
    assert KeysMade.memo_of(PLAN, DATABASE, values, spread=False) is not None


@pytest.mark.parametrize(
    "values",
    [
        [1.0],  # 0.0 == -0.0: a float never is
        [Decimal("1.0")],
        [b"bytes"],
        [[1, 2]],
        [2**64],  # ints past 64 bits: memory
        [-(2**63) - 1],
        ["x" * (KEY_TEXT_REMEMBERED + 1)],
        ["x" * 200, "y" * 57],
        list(range(KEY_VALUES_REMEMBERED + 1)),
    ],
)
def test_other_values_are_keyed_every_time(values: list[Any]) -> None:
    assert KeysMade.memo_of(PLAN, DATABASE, values, spread=False) is None


def test_values_equal_in_python_are_told_apart_by_type() -> None:
    assert KeysMade.memo_of(PLAN, DATABASE, [1], spread=False) != KeysMade.memo_of(
        PLAN, DATABASE, [True], spread=False
    )
    assert KeysMade.memo_of(PLAN, DATABASE, [1], spread=False) != KeysMade.memo_of(
        PLAN, DATABASE, [1], spread=True
    )


def test_full_it_forgets_everything() -> None:
    made = KeysMade()
    for n in range(KEYS_REMEMBERED):
        memo = KeysMade.memo_of(PLAN, DATABASE, [n], spread=False)
        assert memo is not None
        made.put(memo, f"key-{n}")
    first = KeysMade.memo_of(PLAN, DATABASE, [0], spread=False)
    assert first is not None
    assert made.get(first) == "key-0"
    last = KeysMade.memo_of(PLAN, DATABASE, [KEYS_REMEMBERED], spread=False)
    assert last is not None
    made.put(last, "key-last")
    assert made.get(first) is None
    assert made.get(last) == "key-last"
