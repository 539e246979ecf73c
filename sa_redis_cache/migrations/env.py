"""Alembic environment behind ``sa_redis_cache.schema.upgrade()`` and ``downgrade()``.

It ships inside the package so that those functions work from an installed wheel, where the
top-level ``migrations/`` environment of the source checkout does not exist. It takes the
connection from ``Config.attributes`` and reads no ini file; for the command line, use the
top-level environment, or include our branch in the application's own environment.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sa_redis_cache import schema

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise TypeError(
        "this environment is driven by sa_redis_cache.schema.upgrade()/downgrade(), which pass "
        "a Connection in Config.attributes['connection']; for the command line use "
        "the repository's alembic.ini, or your application's own environment"
    )

context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    version_table=schema.VERSION_TABLE,
    include_name=schema.include_name,
    compare_server_default=True,
)
with context.begin_transaction():
    schema.lock_for_migrations(connection)
    context.run_migrations()
