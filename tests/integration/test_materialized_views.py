"""A materialized view's entries are retired by ``REFRESH MATERIALIZED VIEW``: its rows
change then, and only then (docs/guarantees.md, "Only tables the cache can see are
versioned")."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import select, text
from sqlalchemy.orm import Session, registry, sessionmaker

from sa_redis_cache import Cache, FromCache

REFRESHES = [
    "REFRESH MATERIALIZED VIEW {view}",
    "refresh materialized view concurrently {view} with data",
    "-- nightly totals\nREFRESH MATERIALIZED VIEW public.{view}",
    '/* totals */ REFRESH MATERIALIZED VIEW "{view}";',
]


class Totals:
    """A row of the materialized view: a category and its number of items."""

    category: int
    items: int


@pytest.fixture
def totals(engine: sa.Engine) -> Iterator[tuple[str, str, type[Totals]]]:
    """``(base table, materialized view, mapped class)``, dropped afterwards."""
    suffix = secrets.token_hex(4)
    base, view = f"mv_items_{suffix}", f"mv_totals_{suffix}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {base} (id serial PRIMARY KEY, category int)"))
        conn.execute(text(f"INSERT INTO {base} (category) VALUES (1), (1), (2)"))  # noqa: S608 - our names
        summary = f"SELECT category, count(*)::int AS items FROM {base} GROUP BY category"  # noqa: S608 - our names
        conn.execute(text(f"CREATE MATERIALIZED VIEW {view} AS {summary}"))
        # CONCURRENTLY needs a unique index
        conn.execute(text(f"CREATE UNIQUE INDEX ON {view} (category)"))
    table = sa.Table(
        view,
        sa.MetaData(),
        sa.Column("category", sa.Integer, primary_key=True),
        sa.Column("items", sa.Integer),
    )
    mapped = type(f"Totals{suffix}", (Totals,), {})
    registry().map_imperatively(mapped, table)
    yield base, view, mapped
    with engine.begin() as conn:
        conn.execute(text(f"DROP MATERIALIZED VIEW {view}"))
        conn.execute(text(f"DROP TABLE {base}"))


def _items(factory: sessionmaker[Session], mapped: type[Totals]) -> int:
    with factory() as s:
        row = s.scalars(
            select(mapped).where(mapped.category == 1).options(FromCache())  # type: ignore[arg-type]
        ).one()
        return row.items


@pytest.mark.parametrize("refresh", REFRESHES)
@pytest.mark.parametrize("through", ["session", "engine"])
def test_a_refresh_retires_the_views_entries(
    engine: sa.Engine,
    cache: Cache,
    totals: tuple[str, str, type[Totals]],
    refresh: str,
    through: str,
) -> None:
    base, view, mapped = totals
    factory = sessionmaker(engine)
    cache.attach(factory)
    assert _items(factory, mapped) == 2
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {base} (category) VALUES (1)"))  # noqa: S608 - our names
    # the view's rows have not changed yet: what the cache serves is what Postgres reads
    assert _items(factory, mapped) == 2
    statement = text(refresh.format(view=view))
    if through == "session":
        with factory() as s:
            s.execute(statement)
            s.commit()
    else:
        with engine.begin() as conn:
            conn.execute(statement)
    assert _items(factory, mapped) == 3
