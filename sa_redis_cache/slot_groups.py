"""Slot groups: the tables whose keys share one Redis Cluster hash tag.

A table is its own group by default (its keys carry ``{<ns>:<table>}``). A model's
``CachePolicy(slot_group="orders")``, or ``Cache(slot_groups={"orders": [...]})`` for
tables without a model, gives a table the tag ``{<ns>:@orders}`` instead
(:meth:`sa_redis_cache.protocol.KeyScheme.table_prefix`), so that statements and commits
over the group's tables touch one slot (docs/cluster.md, "Slot groups").

Example::

    groups = table_groups({"orders": ["orders", "order_lines"]})
    groups["order_lines"]  # 'orders'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table

from .errors import ConfigurationError
from .models import mapper_of
from .policy import CachePolicy
from .protocol.keys import group_name_problem

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

__all__ = ["assign", "model_groups", "policy_groups", "table_groups"]


def assign(groups: dict[str, str], table: str, group: str, source: str) -> str | None:
    """Put ``table`` in ``group`` (said by ``source``); the problem when it is in another.

    Example::

        >>> groups = {"orders": "sales"}
        >>> assign(groups, "orders", "billing", "Order") is not None
        True
    """
    known = groups.get(table)
    if known is not None and known != group:
        return (
            f"{source} puts table {table!r} in slot group {group!r}, and it is in {known!r} "
            "already; a table's keys have one hash tag, so give it one group"
        )
    groups[table] = group
    return None


def table_groups(slot_groups: Mapping[str, Iterable[str]] | None) -> dict[str, str]:
    """``Cache(slot_groups=...)`` (group -> tables) as table -> group, checked.

    Raises :class:`~sa_redis_cache.errors.ConfigurationError` naming every problem: a bad
    group name, a table given as anything but its name, a table in two groups.

    Example::

        >>> table_groups({"orders": ["orders", "order_lines"]})
        {'orders': 'orders', 'order_lines': 'orders'}
    """
    if slot_groups is None:
        return {}
    if not isinstance(slot_groups, Mapping):
        raise ConfigurationError(
            f"slot_groups={slot_groups!r}: give a dict of group name -> table names, e.g. "
            "slot_groups={'orders': ['orders', 'order_lines']}"
        )
    problems: list[str] = []
    groups: dict[str, str] = {}
    for group, tables in slot_groups.items():
        problem = group_name_problem(group)
        if problem is not None:
            problems.append(problem)
            continue
        if isinstance(tables, str) or not isinstance(tables, Iterable):
            problems.append(
                f"slot_groups[{group!r}] is {tables!r}: give a list of table names "
                "(Table.fullname: 'schema.name' for a table in a schema)"
            )
            continue
        for table in tables:
            if not isinstance(table, str) or not table:
                problems.append(f"slot_groups[{group!r}] holds {table!r}: give table names")
                continue
            problem = assign(groups, table, group, f"slot_groups[{group!r}]")
            if problem is not None:
                problems.append(problem)
    if problems:
        raise ConfigurationError("Cache(slot_groups=...):\n  - " + "\n  - ".join(problems))
    return groups


def policy_groups(mappers: Iterable[Mapper[Any]], groups: dict[str, str]) -> list[str]:
    """Add each model's ``CachePolicy(slot_group=...)`` (its own table) to ``groups``;
    the problems found (a table put in two groups).

    Example::

        problems = policy_groups(all_mappers(), cache.keys.groups)
    """
    problems: list[str] = []
    for mapper in mappers:
        policy = getattr(mapper.class_, "__cache__", None)
        if not isinstance(policy, CachePolicy) or not isinstance(policy.slot_group, str):
            continue
        if group_name_problem(policy.slot_group) is not None:
            continue  # CachePolicy.problems() reports it
        table = mapper.local_table
        if isinstance(table, Table):
            problem = assign(groups, table.fullname, policy.slot_group, mapper.class_.__name__)
            if problem is not None:
                problems.append(problem)
    return problems


def model_groups(models: Iterable[type]) -> dict[str, str]:
    """The slot groups the policies of ``models`` declare, table -> group: what the flush
    worker and dead-letter replay, which are given models and no cache, key tables by.

    Example::

        KeyScheme("shop", model_groups([Order, OrderLine]))
    """
    groups: dict[str, str] = {}
    mappers = [m for m in map(mapper_of, models) if m is not None]
    problems = policy_groups(mappers, groups)
    if problems:
        raise ConfigurationError("\n".join(problems))
    return groups
