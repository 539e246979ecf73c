"""Scratch databases for the demo, the tests and the benchmarks.

Each of them works in a database of its own on a shared server: these create and drop
such databases (``AUTOCOMMIT``, as ``CREATE DATABASE`` needs; ``DROP ... WITH (FORCE)``,
so that a leaked connection cannot keep one alive). Their Redis keys go with
:func:`sa_redis_cache.redis_io.unlink_matching`.

Example::

    with scratch_database("postgresql+psycopg://postgres@127.0.0.1/postgres", "t1") as url:
        engine = sqlalchemy.create_engine(url)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["drop_database", "recreate_database", "scratch_database"]


def _run_on_server(server_url: str | sa.URL, name: str, *statements: str) -> None:
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    quoted = admin.dialect.identifier_preparer.quote(name)
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement.format(name=quoted)))
    finally:
        admin.dispose()


def recreate_database(server_url: str | sa.URL, name: str) -> sa.URL:
    """Drop database ``name`` if it exists and create it empty; its URL on that server."""
    _run_on_server(
        server_url, name, "DROP DATABASE IF EXISTS {name} WITH (FORCE)", "CREATE DATABASE {name}"
    )
    return sa.make_url(server_url).set(database=name)


def drop_database(server_url: str | sa.URL, name: str) -> None:
    """Drop database ``name`` if it exists, whoever is still connected to it."""
    _run_on_server(server_url, name, "DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def scratch_database(server_url: str | sa.URL, name: str) -> Iterator[sa.URL]:
    """Database ``name``, created for the block and dropped after it; yields its URL."""
    _run_on_server(server_url, name, "CREATE DATABASE {name}")
    try:
        yield sa.make_url(server_url).set(database=name)
    finally:
        drop_database(server_url, name)
