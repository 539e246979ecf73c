"""The columns of a write-behind model: which model is one, its columns, its key codec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sa_redis_cache.codec import RowCodec
from sa_redis_cache.policy import Strategy

if TYPE_CHECKING:
    from sqlalchemy import Column

    from sa_redis_cache.models import ModelInfo


def is_write_behind(info: ModelInfo | None) -> bool:
    """True when ``info`` is a model with ``strategy="write_behind"``."""
    policy = None if info is None else info.policy
    return policy is not None and policy.strategy == Strategy.WRITE_BEHIND


def column_of(info: ModelInfo, key: str) -> Column[Any]:
    """The table column mapped by attribute ``key``."""
    column: Column[Any] = info.mapper.get_property(key).columns[0]
    return column


def pk_codec(info: ModelInfo) -> RowCodec:
    """A codec for the primary key values alone (what a queued delete carries)."""
    return RowCodec([column_of(info, info.column_keys[p]).type for p in info.pk_positions])
