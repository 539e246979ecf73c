"""The demos' claims (``examples.checks``): a claim about what Redis served is degraded,
not failed, when Redis did not answer meanwhile; it fails otherwise."""

from __future__ import annotations

from examples.checks import Checks
from sa_redis_cache import Cache


def test_a_claim_missed_while_redis_did_not_answer_is_degraded_not_failed() -> None:
    said: list[str] = []
    checks = Checks(said.append)
    cache = Cache("redis://127.0.0.1:1/0", namespace="checks")  # nothing listens there

    @cache.cached("square", ttl=5)
    def square(x: int) -> int:
        return x * x

    served_from_redis = False
    checks.watch(cache)
    assert square(3) == 9  # the lookup fails: counted in errors, computed instead
    checks.expect(served_from_redis, "the second call was served from Redis")
    assert checks.failed == []
    assert said[-1].startswith("  [degraded] the second call was served from Redis")

    checks.expect(served_from_redis, "the warm run sent no SQL")  # no Redis error since
    assert checks.failed == ["the warm run sent no SQL"]
    checks.expect(not served_from_redis, "the new price is read from Redis")
    assert said[-1] == "  [ok] the new price is read from Redis"
    cache.client.close()
