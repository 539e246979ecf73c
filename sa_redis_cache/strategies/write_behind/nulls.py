"""Which None of a queued row's JSON column is no JSON ``null``.

A JSON (or JSONB) column without ``none_as_null`` writes Python's None as JSON ``null``
when SQLAlchemy's INSERT or UPDATE sets it; a column the statement leaves out is SQL NULL
(an INSERT with no default for it) or keeps what the row holds (an UPDATE that did not
change it). Reads return None for all three, and a queued row holds None for all three,
so the worker cannot tell them from the row: each operation says, by column position,
which of its JSON Nones are

* :data:`SQL_NULL` (``"n"``): SQL NULL, as an INSERT that leaves the column out writes it;
* :data:`KEEP` (``"k"``): what the row holds, as an UPDATE that leaves the column out
  keeps it (SQL NULL if the row is new to the database);

every other None of such a column being JSON ``null``. Columns whose type does not
evaluate None (``JSON(none_as_null=True)``, any type but JSON's) are never named: the
worker writes SQL NULL for their None, as SQLAlchemy does.

The stream entry carries them as a fifth element, ``{"n": [positions], "k": [positions]}``,
only when there are any; dead letters under ``$nulls``. A worker older than this format
dead-letters such an entry, so deploy workers before the processes that queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sqlalchemy import Column

SQL_NULL = "n"
"""The column is SQL NULL: SQLAlchemy's INSERT left it out, with no default for it."""
KEEP = "k"
"""The column keeps the row's value: SQLAlchemy's UPDATE left it out (SQL NULL when the
database has no row yet)."""
NULLS_KEY = "$nulls"
"""Dead-letter payload key holding an operation's :func:`encode_nulls` form."""


def null_kind(column: Column[Any], *, inserted: bool, unset: bool, unchanged: bool) -> str | None:
    """What SQLAlchemy writes for a None of ``column``, when it is not JSON ``null``.

    ``inserted``: the row is written by an INSERT (a new object, no row switch); ``unset``:
    the object was never given the attribute; ``unchanged``: an UPDATE does not set it.

    Example::

        null_kind(Doc.__table__.c.doc, inserted=True, unset=True, unchanged=True)  # "n"
    """
    if not column.type.should_evaluate_none:
        return None  # None is SQL NULL already (and an INSERT's default applied to it)
    if inserted:
        # a default (Python) gave the column its value: None only if the default returned
        # None, which SQLAlchemy writes as JSON null
        return SQL_NULL if unset and column.default is None else None
    # an onupdate sets the column; without one, an UPDATE that does not change it keeps it
    return KEEP if unchanged and column.onupdate is None else None


def after(
    nulls: Mapping[int, str], earlier_kind: str | None, earlier_nulls: Mapping[int, str]
) -> dict[int, str]:
    """The ``nulls`` of a write applied as one with an ``earlier`` write of its row that
    is not applied on its own (replaced in its transaction, or coalesced in a batch).

    A column the write keeps is as the earlier write left it: its SQL NULL, its JSON
    ``null`` (no mark), or kept in its turn; after a delete, SQL NULL (the row is new).
    """
    if earlier_kind is None or KEEP not in nulls.values():
        return dict(nulls)
    out: dict[int, str] = {}
    for position, kind in nulls.items():
        if kind != KEEP:
            out[position] = kind
        elif earlier_kind == "d":
            out[position] = SQL_NULL
        elif position in earlier_nulls:
            out[position] = earlier_nulls[position]
    return out


def inherit_nulls(nulls: dict[int, str], prior: Any) -> dict[int, str]:
    """``nulls`` of a captured write over ``prior``, its transaction's earlier operation of
    the row (an ``Op`` of session.py, or None), which it replaces in the queue.

    A row switch's prior is the delete of the same flush: the write is SQLAlchemy's UPDATE
    of the row as the deleted object's own earlier write of this transaction left it, if
    any (else as the database or the queue holds it: kept).
    """
    if prior is None or not nulls:
        return nulls
    if prior.kind == "d":
        prior = prior.written
        if prior is None:
            return nulls
    return after(nulls, prior.kind, prior.nulls)


def encode_nulls(nulls: Mapping[int, str]) -> bytes:
    """The fifth element of the stream entry, with its leading comma; b"" when none.

    Example::

        encode_nulls({2: "n", 4: "k"})  # b',{"n":[2],"k":[4]}'
    """
    if not nulls:
        return b""
    return b"," + orjson.dumps(as_document(nulls))


def as_document(nulls: Mapping[int, str]) -> dict[str, list[int]]:
    """``nulls`` as JSON data: ``{"n": [positions], "k": [positions]}``."""
    document: dict[str, list[int]] = {}
    for position, kind in sorted(nulls.items()):
        document.setdefault(kind, []).append(position)
    return document


def decode_nulls(document: Any, width: int, pk_positions: list[int]) -> dict[int, str]:
    """:func:`as_document`'s form read back (a stream entry's or a dead letter's); raises
    ValueError for anything else, or a position outside a row of ``width`` columns or of
    its primary key."""
    if not isinstance(document, dict) or not set(document) <= {SQL_NULL, KEEP}:
        raise ValueError(f"not a write-behind null list: {document!r}")
    out: dict[int, str] = {}
    for kind, positions in document.items():
        for position in positions if isinstance(positions, list) else [None]:
            if (
                type(position) is not int
                or not 0 <= position < width
                or position in pk_positions
                or position in out
            ):
                raise ValueError(f"not a write-behind null list: {document!r}")
            out[position] = kind
    return out
