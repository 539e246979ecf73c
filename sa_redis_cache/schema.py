"""The library's own Postgres tables, and the functions that migrate them.

The write-behind flush worker records, per Redis stream partition, the last stream id it
applied (``sarc_wb_offsets``), in the same transaction as the rows themselves, so a batch
delivered twice is applied once. Operations that fail on every attempt go to
``sarc_dead_letters`` instead of being dropped.

The tables are created by alembic revisions shipped inside the package (branch label
``sa_redis_cache``), never by ``metadata.create_all()``: an application's database then
records which version of them it has. Either call :func:`upgrade` (it keeps its own
version table, :data:`VERSION_TABLE`), or include the branch in the application's own
alembic environment through ``version_locations`` (see ``migrations/README``).

Example::

    from sa_redis_cache import schema

    schema.upgrade("postgresql+psycopg://app@db/shop")  # idempotent; safe at start-up
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    func,
    make_url,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from collections.abc import Iterator

    from alembic.runtime.environment import NameFilterParentNames, NameFilterType

__all__ = [
    "BRANCH",
    "MIGRATION_LOCK_KEY",
    "VERSION_LOCATION",
    "VERSION_TABLE",
    "dead_letters",
    "downgrade",
    "include_name",
    "lock_for_migrations",
    "metadata",
    "upgrade",
    "wb_offsets",
]

BRANCH = "sa_redis_cache"
"""Branch label of the first revision: ``alembic upgrade sa_redis_cache@head``."""

VERSION_TABLE = "sarc_alembic_version"
"""Version table of our own environment, apart from the application's ``alembic_version``."""

VERSION_LOCATION: str = str(Path(__file__).resolve().parent / "migrations" / "versions")
"""Filesystem path of the shipped revision files, for an application's ``version_locations``.

Example::

    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join([app_versions, VERSION_LOCATION]))
"""

MIGRATION_LOCK_KEY = 0x7361_7263_0000_0001
"""Postgres advisory lock key (``"sarc"`` then 1) held while our migrations run.

Several application processes commonly call :func:`upgrade` at start-up at the same time; the
lock makes the later ones wait, then find the schema current, instead of failing on
``CREATE TABLE``.
"""

# Postgres names primary keys "<table>_pkey" by itself; spelling the same convention out makes
# the names identical whether a table came from a migration or from create_all() in a test.
metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    }
)
"""The library's own tables; ``target_metadata`` of its alembic environment.

Example::

    target_metadata = [Base.metadata, sa_redis_cache.schema.metadata]  # an app's env.py
"""

wb_offsets = Table(
    "sarc_wb_offsets",
    metadata,
    # The Redis stream key of one write-behind partition (KeyScheme.stream_key).
    Column("stream", Text, primary_key=True),
    # A stream id ("1700000000000-3") is two 64-bit numbers, milliseconds and sequence: text
    # keeps it exact, and it must be compared as that pair, since as text "9-0" > "10-0".
    Column("last_id", Text, nullable=False),
    Column("applied_ops", BigInteger, nullable=False, server_default=text("0")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The fencing token: moved by every worker that takes the partition's lease, and checked
    # in each batch's transaction, so a worker that lost its lease cannot apply a batch.
    Column("lease_token", BigInteger, nullable=False, server_default=text("0")),
    comment="sa_redis_cache: last Redis stream id applied per write-behind partition",
)
"""One row per write-behind stream partition, written in each flush transaction.

``lease_token`` is the partition's fencing token: a worker that takes the partition's
lease increments it and keeps the new value; each of its batches locks the row and
proceeds only while the token is still its own (docs/write-behind.md, "Leases").

Example::

    from sqlalchemy.dialects.postgresql import insert

    stmt = insert(wb_offsets).values(stream=key, last_id="1700000000000-3", applied_ops=2)
    stmt = stmt.on_conflict_do_update(
        index_elements=[wb_offsets.c.stream],
        set_={"last_id": stmt.excluded.last_id, "updated_at": func.now(),
              "applied_ops": wb_offsets.c.applied_ops + stmt.excluded.applied_ops},
    )
"""

dead_letters = Table(
    "sarc_dead_letters",
    metadata,
    # BY DEFAULT rather than ALWAYS, so rows can be copied between databases with their ids.
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("namespace", Text, nullable=False),
    Column("table_name", Text, nullable=False),
    Column("stream", Text, nullable=False),
    Column("entry_id", Text, nullable=False),
    # op, pk and payload stay nullable: an entry that cannot be decoded is dead-lettered too,
    # with what is known of it, and a delete carries no row state.
    Column("op", Text),
    Column("pk", JSONB),
    Column("payload", JSONB),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("1")),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("replayed_at", DateTime(timezone=True)),
    comment="sa_redis_cache: write-behind operations that failed on every attempt",
)
"""Write-behind operations that failed on every attempt; ``dlq list`` and ``dlq replay``.

Example::

    select(dead_letters).where(dead_letters.c.namespace == "shop",
                               dead_letters.c.replayed_at.is_(None))
"""

# Partial: "dlq list" and "dlq replay" look only at what is still waiting, per model.
Index(
    "ix_sarc_dead_letters_pending",
    dead_letters.c.namespace,
    dead_letters.c.table_name,
    postgresql_where=dead_letters.c.replayed_at.is_(None),
)


def include_name(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Tell alembic's autogenerate to look only at our tables, in the default schema.

    Our tables live in the application's database: without this filter, ``alembic check`` or
    ``revision --autogenerate`` in our environment would propose dropping every table of the
    application.

    Example::

        context.configure(connection=conn, target_metadata=metadata, include_name=include_name)
    """
    if type_ == "schema":
        return name is None
    if type_ == "table":
        return name in metadata.tables
    return True


def lock_for_migrations(connection: Connection) -> None:
    """Serialise concurrent runs of our migrations, until the current transaction ends.

    Call it inside ``context.begin_transaction()``, before ``context.run_migrations()``.

    Example::

        with context.begin_transaction():
            lock_for_migrations(connection)
            context.run_migrations()
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})


def upgrade(
    url_or_engine: str | URL | Engine | Connection, revision: str = f"{BRANCH}@head"
) -> None:
    """Migrate the library's tables up to ``revision``; a no-op when they are already there.

    Runs in one transaction. Given a :class:`~sqlalchemy.engine.Connection` that is already in
    a transaction, it runs inside it and the caller commits. A URL without a driver
    (``postgresql://``) uses psycopg 3, which the library depends on. Several processes may
    call it at once (see :data:`MIGRATION_LOCK_KEY`), but not several threads of one process:
    alembic's migration context is global to the process.

    Example::

        schema.upgrade("postgresql+psycopg://app@db/shop")
        schema.upgrade(engine, "sarc_0001")
    """
    with _connection(url_or_engine) as connection:
        command.upgrade(_config(connection), revision)


def downgrade(url_or_engine: str | URL | Engine | Connection, revision: str = "base") -> None:
    """Migrate the library's tables down to ``revision``; ``"base"`` drops them all.

    Only our version table is consulted, so the application's own migrations are untouched.
    The (then empty) version table itself stays, as alembic leaves it.

    Example::

        schema.downgrade(engine)  # drops sarc_wb_offsets and sarc_dead_letters
    """
    with _connection(url_or_engine) as connection:
        command.downgrade(_config(connection), revision)


def _config(connection: Connection) -> Config:
    # The environment shipped inside the package (not the top-level migrations/ of a source
    # checkout, which a wheel does not contain), so a checkout and an installed wheel run the
    # same code. "package:path" is resolved by alembic through importlib.resources, and the
    # revisions sit in its default "versions" directory, so no path needs interpolating.
    config = Config()
    config.set_main_option("script_location", "sa_redis_cache:migrations")
    config.attributes["connection"] = connection
    return config


@contextmanager
def _connection(bind: str | URL | Engine | Connection) -> Iterator[Connection]:
    if isinstance(bind, Connection):
        yield bind
        return
    if isinstance(bind, Engine):
        with bind.begin() as connection:
            yield connection
        return
    url = make_url(bind)
    if url.drivername in {"postgresql", "postgres"}:
        # SQLAlchemy would pick psycopg2 here, which is not among our dependencies.
        url = url.set(drivername="postgresql+psycopg")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def is_library_table(name: str) -> bool:
    """True for the library's own tables (``sarc_*``, with or without a schema).

    No cache entry reads them: writes to them invalidate nothing, and ``sa-redis-cache
    stats`` does not list them among the application's tables.

    Example::

        >>> is_library_table("sarc_wb_offsets"), is_library_table("products")
        (True, False)
    """
    return name.rpartition(".")[2] in _LIBRARY_TABLES or name == VERSION_TABLE


_LIBRARY_TABLES = frozenset(metadata.tables)
