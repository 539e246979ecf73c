"""Alembic environment of sa_redis_cache's own tables (the command line, from a checkout).

The database URL comes from, in order: ``alembic -x url=...``, ``sqlalchemy.url`` in
alembic.ini, the ``DATABASE_URL`` environment variable. A program may instead pass an open
connection in ``config.attributes["connection"]``. The revisions live inside the package
(``sa_redis_cache/migrations/versions``, see ``version_locations`` in alembic.ini) so that
they ship in the wheel.
"""

from __future__ import annotations

import os
from logging.config import fileConfig
from typing import TYPE_CHECKING

from alembic import context
from sqlalchemy import create_engine, make_url, pool

from sa_redis_cache import schema

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Interpret the config file for Python logging.
# This line sets up loggers basically.
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = schema.metadata

# In both modes below: a version table of our own keeps our history apart from the
# application's alembic_version in the same database, and include_name keeps autogenerate away
# from the application's tables, which it would otherwise propose to drop.


def database_url() -> URL:
    """The URL to migrate: ``-x url=``, then ``sqlalchemy.url``, then ``$DATABASE_URL``."""
    raw = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("DATABASE_URL")
    )
    if not raw:
        raise SystemExit(
            "no database URL: pass -x url=postgresql+psycopg://..., set sqlalchemy.url in "
            "alembic.ini, or set DATABASE_URL"
        )
    url = make_url(raw)
    if url.drivername in {"postgresql", "postgres"}:
        # SQLAlchemy would pick psycopg2, which is not among the library's dependencies.
        url = url.set(drivername="postgresql+psycopg")
    return url


def run_migrations_offline() -> None:
    """Run migrations in 'offline' mode: write the SQL script instead of connecting.

    Only the URL's dialect is used, so no database needs to be reachable.
    """
    context.configure(
        url=database_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        target_metadata=target_metadata,
        version_table=schema.VERSION_TABLE,
        include_name=schema.include_name,
        compare_server_default=True,
    )

    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection: Connection) -> None:
    """Run the migrations on an open connection, one run at a time per database."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=schema.VERSION_TABLE,
        include_name=schema.include_name,
        compare_server_default=True,
    )

    with context.begin_transaction():
        schema.lock_for_migrations(connection)
        context.run_migrations()


def run_migrations_online() -> None:
    """Run migrations in 'online' mode, on a given connection or a new engine."""
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return

    connectable = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with connectable.connect() as connection:
            run_migrations(connection)
    finally:
        connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
