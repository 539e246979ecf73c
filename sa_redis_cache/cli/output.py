"""Printing: tables with rich when it is installed, plain aligned text when it is not.

rich comes with the ``cli`` extra; the commands work without it, so a bare
``pip install sa-redis-cache`` still has a usable command line. ``--json`` output never
depends on it.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import click

from sa_redis_cache.counters import parse_counter

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Block",
    "Table",
    "echo_json",
    "jsonable",
    "plain_text",
    "printable",
    "render",
    "to_rich",
]

# piped output is read by people in pagers and logs too: do not squeeze it to 80 columns
_PIPE_WIDTH = 200


@dataclass
class Table:
    """A table to print: ``right`` holds the indices of right-aligned (numeric) columns.

    Example::

        render([Table(["table", "entries"], [["products", "12"]], right={1})])
    """

    headers: Sequence[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)
    title: str | None = None
    show_header: bool = True


Block = str | Table
"""A line of text or a table; a command's output is a list of blocks."""


def printable(text: str, *, lines: bool = False) -> str:
    r"""``text`` safe to print on a terminal: control characters shown as escapes.

    Key names, table names and stored values come from Redis, where anyone with write
    access may plant an escape sequence that would recolour, retitle or rewrite the
    operator's terminal, or a newline that would fake a row of a table. With ``lines``
    (for the command's own multi-line text) newlines are kept; bytes that were not UTF-8
    (decoded with ``surrogateescape``) are shown as ``\xNN``.

    Example::

        >>> printable("a\x1b[2Jb")
        'a\\x1b[2Jb'
    """
    if text.isprintable():
        return text
    if lines:
        return "\n".join(_escape_line(line) for line in text.split("\n"))
    return _escape_line(text)


def _escape_line(line: str) -> str:
    out = []
    for ch in line:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def has_rich() -> bool:
    """True when rich can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def console(*, err: bool = False) -> Any:
    """A rich console on stdout (or stderr), wide enough when the output is piped."""
    from rich.console import Console

    probe = Console(stderr=err)
    width = None if probe.is_terminal else max(probe.width, _PIPE_WIDTH)
    return Console(stderr=err, width=width, highlight=False)


def to_rich(blocks: Sequence[Block]) -> Any:
    """The blocks as one rich renderable (for printing or for ``rich.live.Live``)."""
    from rich.box import SIMPLE_HEAVY
    from rich.console import Group
    from rich.table import Table as RichTable
    from rich.text import Text

    parts: list[Any] = []
    for block in blocks:
        if isinstance(block, str):
            parts.append(Text(printable(block, lines=True)))
            continue
        table = RichTable(
            title=None if block.title is None else printable(block.title),
            title_justify="left",
            box=SIMPLE_HEAVY,
            show_header=block.show_header,
        )
        for i, header in enumerate(block.headers):
            table.add_column(
                Text(printable(header)), justify="right" if i in block.right else "left"
            )
        for row in block.rows:
            # Text, not str: values may contain [brackets] that rich would read as markup
            table.add_row(*(Text(printable(cell)) for cell in row))
        parts.append(table)
    return Group(*parts)


def plain_text(blocks: Sequence[Block]) -> str:
    """The blocks as aligned plain text (no rich)."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, str):
            lines.append(printable(block, lines=True))
            continue
        if block.title:
            lines.append(printable(block.title))
        headers = [printable(h) for h in block.headers]
        rows = [[printable(cell) for cell in row] for row in block.rows]
        grid = [headers, *rows] if block.show_header else rows
        widths = [max((len(row[i]) for row in grid), default=0) for i in range(len(block.headers))]

        def fmt(
            row: Sequence[str], widths: list[int] = widths, right: set[int] = block.right
        ) -> str:
            cells = (
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            return "  ".join(cells).rstrip()

        if block.show_header:
            lines.append(fmt(headers))
            lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(row) for row in rows)
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def render(blocks: Sequence[Block], *, err: bool = False) -> None:
    """Print the blocks, with rich when available."""
    if has_rich():
        console(err=err).print(to_rich(blocks))
    else:
        click.echo(plain_text(blocks), err=err)


def echo_json(document: Any, *, compact: bool = False) -> None:
    """Print ``document`` as JSON (one line when ``compact``, for ``--watch``)."""
    click.echo(json.dumps(jsonable(document), indent=None if compact else 2))


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: exact decimals and ids as strings, times in ISO 8601.

    Example::

        >>> jsonable({"price": Decimal("9.99"), "tags": ("a",)})
        {'price': '9.99', 'tags': ['a']}
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return repr(value)


def human_bytes(size: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` -> ``"-"``.

    Example::

        >>> human_bytes(1536)
        '1.5 KiB'
    """
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


def human_ttl(pttl: int | None) -> str:
    """Redis ``PTTL`` as text: ``-2`` (no key), ``-1`` (no expiry) or seconds left."""
    if pttl is None or pttl == -2:
        return "-"
    if pttl == -1:
        return "no expiry"
    return f"{pttl / 1000:.1f} s"


def text_or_dash(value: Any) -> str:
    """``str(value)``, or ``"-"`` for None (an empty cell)."""
    return "-" if value is None else str(value)


def int_or_none(raw: bytes | None) -> int | None:
    """A Redis counter's value; None when missing or not a counter as Redis reads one
    (``" 7 "`` and ``"+7"`` are not: the cache treats them as absent too)."""
    return parse_counter(raw)
