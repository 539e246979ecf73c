"""Bytes stored per entry: ours against the recipe's pickled ``FrozenResult``.

Both caches hold the same results, filled by the hit cases (``BenchEnv.entries``). The
stored length (STRLEN) is what crosses the network on every hit; ``MEMORY USAGE`` adds
what Redis spends on the key and its bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.harness import Target

if TYPE_CHECKING:
    from benchmarks.env import BenchEnv

_TARGET = Target("<=", 0.5)
_TITLES = {
    "hit_1row": ("1 row (Product)", True),
    "hit_50rows": ("50 orders + 200 lines", True),
    "hit_expensive": ("aggregate, 8 rows of scalars", False),
}


@dataclass(frozen=True, slots=True)
class SizeRow:
    """Stored sizes of one result in both caches."""

    title: str
    ours_bytes: int
    pickled_bytes: int
    ours_memory: int
    pickled_memory: int
    target: Target | None

    @property
    def ratio(self) -> float:
        """ours ÷ pickled, in stored bytes."""
        return self.ours_bytes / self.pickled_bytes

    @property
    def passed(self) -> bool | None:
        """None when no target applies."""
        return None if self.target is None else self.target.met(self.ratio)


def stored_sizes(env: BenchEnv) -> list[SizeRow]:
    """One row per result the hit cases cached in both caches."""
    out = []
    for slug, (ours_key, recipe_key) in env.entries.items():
        title, has_target = _TITLES.get(slug, (slug, False))
        pipe = env.client.pipeline(transaction=False)
        pipe.strlen(ours_key)
        pipe.strlen(recipe_key)
        pipe.memory_usage(ours_key, samples=0)
        pipe.memory_usage(recipe_key, samples=0)
        ours_len, recipe_len, ours_mem, recipe_mem = pipe.execute()
        if not ours_len or not recipe_len:
            continue  # an entry expired or was invalidated since its case ran
        out.append(
            SizeRow(
                title=title,
                ours_bytes=int(ours_len),
                pickled_bytes=int(recipe_len),
                ours_memory=int(ours_mem or 0),
                pickled_memory=int(recipe_mem or 0),
                target=_TARGET if has_target else None,
            )
        )
    return out
