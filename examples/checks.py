"""The claims a demo prints, and whether they held (``examples.demo``, ``examples.async_shop``).

Example::

    checks = Checks()
    checks.watch(cache)
    checks.expect(sql_count == 0, "the second read sent no SQL")
    sys.exit(1 if checks.failed else 0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from sa_redis_cache import Cache


class Checks:
    """The claims a demo prints; a failed one makes the demo exit 1.

    A claim about what Redis served is not failed when Redis did not answer meanwhile (a
    lookup past the 0.25 s timeout of a cache made from a URL, on a loaded machine,
    counted in ``errors``): the database answered instead, which is what the cache is
    built to do, and the claim is printed as degraded.
    """

    def __init__(self, say: Callable[[str], None] = print, *, only_failures: bool = False) -> None:
        self.say = say
        self.only_failures = only_failures
        self.failed: list[str] = []
        self.cache: Cache | None = None
        self._errors = 0

    def watch(self, cache: Cache | None) -> None:
        """From now on, count the Redis errors of ``cache`` between claims (None: stop)."""
        self.cache = cache
        self._errors = self._redis_errors()

    def _redis_errors(self) -> int:
        return 0 if self.cache is None else int(self.cache.stats()["total"]["errors"])

    def expect(self, ok: bool, claim: str) -> None:
        """Record ``claim``, and print it (unless it held and only failures are printed)."""
        now = self._redis_errors()
        missed, self._errors = now - self._errors, now
        if not ok and missed:
            self.say(
                f"  [degraded] {claim}: Redis did not answer {missed} lookup(s) in time, "
                "and the database answered them"
            )
            return
        if not ok:
            self.failed.append(claim)
            self.say(f"  [FAILED] {claim}")
        elif not self.only_failures:
            self.say(f"  [ok] {claim}")
