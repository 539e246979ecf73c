"""Which models the local tier may hold: CachePolicy(local=...) and write-behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_redis_cache import CachePolicy
from sa_redis_cache.models import ModelInfo, build_model_info


@pytest.fixture
def infos() -> Iterator[dict[str, ModelInfo]]:
    class Base(DeclarativeBase):
        pass

    class Plain(Base):
        __tablename__ = "local_policy_plain"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Kept(Base):
        __tablename__ = "local_policy_kept"
        __cache__ = CachePolicy()
        id: Mapped[int] = mapped_column(primary_key=True)

    class OptedOut(Base):
        __tablename__ = "local_policy_out"
        __cache__ = CachePolicy(local=False)
        id: Mapped[int] = mapped_column(primary_key=True)

    class Behind(Base):
        __tablename__ = "local_policy_behind"
        __cache__ = CachePolicy(strategy="write_behind", accept_volatile=True)
        id: Mapped[int] = mapped_column(primary_key=True)

    models: list[type] = [Plain, Kept, OptedOut, Behind]
    yield {
        m.__name__: build_model_info(m.__mapper__, getattr(m, "__cache__", None))  # type: ignore[attr-defined]
        for m in models
    }
    Base.registry.dispose()


def test_the_local_tier_holds_models_unless_opted_out_or_written_behind(
    infos: dict[str, ModelInfo],
) -> None:
    assert infos["Plain"].local
    assert infos["Kept"].local
    assert not infos["OptedOut"].local
    assert not infos["Behind"].local


def test_local_must_be_a_bool() -> None:
    problems = CachePolicy(local="no").problems()  # type: ignore[arg-type]
    assert any("local='no' is not a bool" in p for p in problems)
