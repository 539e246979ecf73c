"""Helpers shared by test modules (fixtures live in the conftest files)."""

from __future__ import annotations

from typing import Any


class SQLCounter:
    """Statements sent to the database while it listens."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    @property
    def count(self) -> int:
        """How many statements ran."""
        return len(self.statements)

    def reset(self) -> None:
        """Forget what ran so far."""
        self.statements.clear()
