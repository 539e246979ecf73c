"""``CachePolicy`` validation: every problem names itself and its fix; valid policies pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import Integer
from sqlalchemy.orm import DeclarativeBase, mapped_column

from sa_redis_cache import CachePolicy, Strategy
from sa_redis_cache.models import ModelRegistry
from sa_redis_cache.policy import STRATEGIES


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ttl", [None, 1, 0.5, 600, 86_400 * 365])
def test_valid_policies_have_no_problems(strategy: str, ttl: float | None) -> None:
    assert CachePolicy(strategy=Strategy(strategy), ttl=ttl).problems() == []


def test_defaults() -> None:
    policy = CachePolicy()
    assert policy.strategy == "cache_aside"
    assert policy.ttl is None
    assert policy.entity_cache is True
    assert policy.problems() == []


def test_policy_is_immutable() -> None:
    policy = CachePolicy(ttl=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.ttl = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "strategy", ["write_around", "Write_Through", "", "cache-aside", None, 1, "write_through "]
)
def test_unknown_strategy(strategy: Any) -> None:
    problems = CachePolicy(strategy=strategy).problems()
    assert len(problems) == 1
    message = problems[0]
    assert f"strategy={strategy!r}" in message
    for name in STRATEGIES:
        assert repr(name) in message  # the fix: the valid choices


@pytest.mark.parametrize(
    "ttl",
    [0, 0.0, -1, -0.5, True, False, "60", float("nan"), float("inf"), float("-inf"), [60]],
)
def test_bad_ttl(ttl: Any) -> None:
    problems = CachePolicy(ttl=ttl).problems()
    assert len(problems) == 1
    message = problems[0]
    assert message.startswith(f"ttl={ttl!r} is not a positive")
    assert "None to use the cache default_ttl" in message


@pytest.mark.parametrize("name", ["entity_cache", "accept_volatile"])
@pytest.mark.parametrize("value", ["no", 0, 1, None])
def test_flags_must_be_bools(name: str, value: Any) -> None:
    """``entity_cache="no"`` is truthy: it would silently turn the entity cache on."""
    problems = CachePolicy(**{name: value}).problems()
    assert problems == [f"{name}={value!r} is not a bool; write {name}=True or False"]


@pytest.mark.parametrize("partitions", [0, -1, 1025, 2.0, True, "8"])
def test_bad_partitions(partitions: Any) -> None:
    problems = CachePolicy(strategy="write_behind", partitions=partitions).problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"partitions={partitions!r} is not a whole number")


def test_every_problem_is_reported_at_once() -> None:
    problems = CachePolicy(strategy="nope", ttl=-1, partitions=0, entity_cache="x").problems()  # type: ignore[arg-type]
    assert [p.split("=")[0] for p in problems] == ["strategy", "ttl", "entity_cache", "partitions"]


def test_cache_refuses_an_infinite_default_ttl() -> None:
    from sa_redis_cache import Cache, ConfigurationError

    with pytest.raises(ConfigurationError, match="default_ttl"):
        Cache("redis://127.0.0.1:1/0", namespace="unit", default_ttl=float("inf"))


def test_fromcache_refuses_an_infinite_ttl() -> None:
    from sa_redis_cache import FromCache

    with pytest.raises(ValueError, match="ttl"):
        FromCache(ttl=float("inf"))


def test_known_tables_include_models_defined_later() -> None:
    """A registry that listed the tables once still sees a model mapped afterwards (the
    list was computed once and never again: textual DML and restarts missed such tables)."""
    registry = ModelRegistry()
    before = registry.known_tables()

    class Base(DeclarativeBase):
        pass

    class LateModel(Base):
        __tablename__ = "sarc_late_model"
        id = mapped_column(Integer, primary_key=True)

    try:
        assert "sarc_late_model" not in before
        assert "sarc_late_model" in registry.known_tables()
    finally:
        Base.registry.dispose()
