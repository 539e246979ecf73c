"""The circuit breaker's states, driven by a fake clock."""

from __future__ import annotations

from sa_redis_cache.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_probes_after_reset() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, reset_after=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state is CLOSED
    breaker.failure()
    assert breaker.state is OPEN
    assert not breaker.allow()
    clock.now += 5.0
    assert breaker.allow()  # the one probe
    assert breaker.state is HALF_OPEN
    assert not breaker.allow()  # others wait for the probe
    breaker.success()
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert breaker.opened == 1


def test_failed_probe_opens_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, reset_after=5.0, clock=clock)
    breaker.failure()
    clock.now += 5.0
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is OPEN
    assert not breaker.allow()
    assert breaker.opened == 2


def test_a_probe_that_never_reports_does_not_keep_it_shut() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, reset_after=5.0, clock=clock)
    breaker.failure()
    clock.now += 5.0
    assert breaker.allow()
    assert not breaker.allow()
    clock.now += 5.1
    assert breaker.allow()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(threshold=2, reset_after=5.0, clock=Clock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state is CLOSED


def test_refusing_says_what_allow_would_without_taking_the_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, reset_after=5.0, clock=clock)
    assert not breaker.refusing()  # closed
    breaker.failure()
    assert breaker.refusing()  # open, not yet due
    assert not breaker.allow()
    clock.now += 5.0
    assert not breaker.refusing()  # due: the next allow() may probe
    assert not breaker.refusing()  # asking twice took nothing
    assert breaker.state is OPEN
    assert breaker.allow()  # the probe is still there for the read that asks
    assert not breaker.allow()


def test_an_observer_sees_half_open_once_the_probe_is_due_without_taking_it() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, reset_after=5.0, clock=clock)
    breaker.failure()
    assert breaker.observed_state() is OPEN
    clock.now += 5.0
    assert breaker.observed_state() is HALF_OPEN  # no call has asked allow() yet
    assert breaker.state is OPEN
    assert breaker.allow()  # the probe is still there for the next caller
    breaker.success()
    assert breaker.observed_state() is CLOSED
