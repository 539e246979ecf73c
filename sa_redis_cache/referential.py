"""What the database writes on its own when a statement deletes rows or changes keys:
foreign keys with ``ON DELETE`` / ``ON UPDATE`` ``CASCADE``, ``SET NULL`` or ``SET
DEFAULT`` make Postgres delete or change rows of the referencing tables, which no
statement of the application names.

The usual recipe, ``relationship(passive_deletes=True)`` over ``ForeignKey(...,
ondelete="CASCADE")``, leaves the child rows to the database: the flush deletes the parent
only. The cache marks the referencing tables as written with rows it cannot name (every
entry of theirs is retired, as for Core DML), when a flush deletes rows of the referenced
table or changes a referenced column, and when Core, ORM bulk or textual DML deletes from
or updates it. The actions are read from the ``MetaData`` of the mapped tables (what the
models declare), once per change of the mappers; referencing tables that act in turn
(a cascade of cascades) are followed.

Example::

    actions = referential_actions()
    actions.on_delete("orders")        # frozenset({"order_lines"}): ON DELETE CASCADE
    actions.on_update("orders")        # the tables an update of its referenced keys writes
    actions.update_columns("orders")   # frozenset({"id"}): the columns they reference
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKeyConstraint, MetaData, Table
from sqlalchemy.exc import NoReferenceError

from sa_redis_cache import compat
from sa_redis_cache.models import mappers_changed

if TYPE_CHECKING:
    from collections.abc import Iterable

# the referential actions that write the referencing rows (NO ACTION and RESTRICT refuse)
_WRITING = frozenset(("CASCADE", "SET NULL", "SET DEFAULT"))


@dataclass(frozen=True, slots=True)
class ReferentialActions:
    """Per referenced table (by ``fullname``): the tables its deletes and key updates
    write through foreign-key actions, followed through the tables they write in turn."""

    deletes: dict[str, frozenset[str]] = field(default_factory=dict)
    updates: dict[str, frozenset[str]] = field(default_factory=dict)
    # the referenced columns whose change fires the updates' actions, by name
    referenced: dict[str, frozenset[str]] = field(default_factory=dict)

    def on_delete(self, table: str) -> frozenset[str]:
        """The tables Postgres writes when rows of ``table`` are deleted."""
        return self.deletes.get(table, frozenset())

    def on_update(self, table: str) -> frozenset[str]:
        """The tables Postgres writes when a referenced column of ``table`` changes."""
        return self.updates.get(table, frozenset())

    def update_columns(self, table: str) -> frozenset[str]:
        """The columns of ``table`` whose change makes Postgres write :meth:`on_update`."""
        return self.referenced.get(table, frozenset())

    def written_by(self, tables: Iterable[str], *, deletes: bool, updates: bool) -> set[str]:
        """The tables DML that deletes from (``deletes``) or updates (``updates``) each of
        ``tables`` may make Postgres write; empty when none acts."""
        found: set[str] = set()
        for table in tables:
            if deletes:
                found |= self.on_delete(table)
            if updates:
                found |= self.on_update(table)
        return found


_EMPTY = ReferentialActions()
_lock = threading.Lock()
_cached: tuple[int, ReferentialActions] = (-1, _EMPTY)


def referential_actions() -> ReferentialActions:
    """The foreign-key actions of every table in the ``MetaData`` of a mapped class,
    worked out again after any mapper was made or configured."""
    global _cached  # noqa: PLW0603 - one table for the process, swapped whole
    generation = mappers_changed()
    seen_generation, actions = _cached
    if seen_generation == generation:
        return actions
    with _lock:
        mappers, _ = compat.registered_classes()
        metadatas: dict[int, MetaData] = {}
        for mapper in mappers:
            table = mapper.local_table
            if isinstance(table, Table) and table.metadata is not None:
                metadatas.setdefault(id(table.metadata), table.metadata)
        actions = _read(
            table for metadata in metadatas.values() for table in metadata.tables.values()
        )
        _cached = (generation, actions)
    return actions


def _read(tables: Iterable[Table]) -> ReferentialActions:
    deletes: dict[str, set[str]] = {}
    updates: dict[str, set[str]] = {}
    referenced: dict[str, set[str]] = {}
    for table in tables:
        for constraint in table.foreign_key_constraints:
            if not isinstance(constraint, ForeignKeyConstraint) or not constraint.elements:
                continue
            try:
                target = constraint.referred_table
            except NoReferenceError:  # to a table not in the MetaData: nothing to follow
                continue
            if (constraint.ondelete or "").upper() in _WRITING:
                deletes.setdefault(target.fullname, set()).add(table.fullname)
            if (constraint.onupdate or "").upper() in _WRITING:
                updates.setdefault(target.fullname, set()).add(table.fullname)
                referenced.setdefault(target.fullname, set()).update(
                    element.column.name for element in constraint.elements
                )
    return ReferentialActions(
        {t: frozenset(_closure(t, deletes)) for t in deletes},
        {t: frozenset(_closure(t, updates)) for t in updates},
        {t: frozenset(columns) for t, columns in referenced.items()},
    )


def _closure(table: str, direct: dict[str, set[str]]) -> set[str]:
    """The tables ``direct`` reaches from ``table``: a cascaded delete (or key update)
    deletes (or updates) rows that may be referenced with actions in turn; following
    every such edge may mark a table more than needed, never less. A table that
    references itself (a tree) is among its own: the rows the action writes are not
    the ones the statement names."""
    found: set[str] = set()
    stack = [table]
    while stack:
        for child in direct.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found
