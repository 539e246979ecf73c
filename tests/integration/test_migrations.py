"""The library's own tables: its alembic revisions, schema.metadata, and both ways to run them.

Each test migrates a database of its own, created on the server of the shared ``database_url``
and dropped afterwards, so no other test's tables are touched.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import String, column, create_engine, inspect, make_url, select, table, text
from sqlalchemy.pool import NullPool

from sa_redis_cache import schema

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection, Engine

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAD = "sarc_0002"
OUR_TABLES = {"sarc_wb_offsets", "sarc_dead_letters"}

# What the revisions up to the head must create, written out independently of schema.py:
# column -> (type as Postgres prints it, nullable, server default as reflected).
EXPECTED_COLUMNS: dict[str, dict[str, tuple[str, bool, str | None]]] = {
    "sarc_wb_offsets": {
        "stream": ("TEXT", False, None),
        "last_id": ("TEXT", False, None),
        "applied_ops": ("BIGINT", False, "0"),
        "updated_at": ("TIMESTAMP WITH TIME ZONE", False, "now()"),
        "lease_token": ("BIGINT", False, "0"),  # sarc_0002
    },
    "sarc_dead_letters": {
        "id": ("BIGINT", False, None),
        "namespace": ("TEXT", False, None),
        "table_name": ("TEXT", False, None),
        "stream": ("TEXT", False, None),
        "entry_id": ("TEXT", False, None),
        "op": ("TEXT", True, None),
        "pk": ("JSONB", True, None),
        "payload": ("JSONB", True, None),
        "error": ("TEXT", False, None),
        "attempts": ("INTEGER", False, "1"),
        "failed_at": ("TIMESTAMP WITH TIME ZONE", False, "now()"),
        "replayed_at": ("TIMESTAMP WITH TIME ZONE", True, None),
    },
}


@pytest.fixture
def fresh_url(database_url: str) -> Iterator[str]:
    """URL of a new, empty database on ``database_url``'s server; dropped afterwards."""
    server = make_url(database_url)
    name = f"sarc_mig_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    quoted = admin.dialect.identifier_preparer.quote(name)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {quoted}"))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE: a failed test may leave a subprocess's connection behind.
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture
def fresh_engine(fresh_url: str) -> Iterator[Engine]:
    eng = create_engine(fresh_url, poolclass=NullPool)
    yield eng
    eng.dispose()


def table_names(eng: Engine) -> set[str]:
    return set(inspect(eng).get_table_names())


def version_rows(eng: Engine, version_table: str) -> set[str]:
    query = select(column("version_num", String)).select_from(table(version_table))
    with eng.connect() as conn:
        return set(conn.scalars(query))


def our_migration_context(conn: Connection) -> MigrationContext:
    return MigrationContext.configure(
        conn,
        opts={
            "version_table": schema.VERSION_TABLE,
            "target_metadata": schema.metadata,
            "include_name": schema.include_name,
            "compare_server_default": True,
        },
    )


def run_alembic(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run the alembic command line as a user would; warnings are errors, as in pytest."""
    base_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "alembic", *args],
        cwd=cwd,
        env={**base_env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def test_versions_ship_inside_the_package() -> None:
    versions = Path(schema.VERSION_LOCATION)
    package = Path(schema.__file__).resolve().parent
    assert versions.is_dir()
    assert versions.is_relative_to(package)

    script = ScriptDirectory(str(versions.parent))
    base = script.get_revision("sarc_0001")
    assert base is not None
    assert base.branch_labels == {"sa_redis_cache"}
    assert base.down_revision is None
    assert base.dependencies is None
    head = script.get_revision("sa_redis_cache@head")
    assert head is not None
    assert head.revision == HEAD


def test_upgrade_creates_the_tables_and_the_index(fresh_engine: Engine) -> None:
    schema.upgrade(fresh_engine)

    insp = inspect(fresh_engine)
    assert table_names(fresh_engine) == {*OUR_TABLES, schema.VERSION_TABLE}
    for table_name, expected in EXPECTED_COLUMNS.items():
        columns = {c["name"]: c for c in insp.get_columns(table_name)}
        actual = {
            name: (str(c["type"].compile(fresh_engine.dialect)), c["nullable"], c["default"])
            for name, c in columns.items()
        }
        assert actual == expected, table_name
        comment = insp.get_table_comment(table_name)["text"]
        assert (comment or "").startswith("sa_redis_cache: ")

    offsets_pk = insp.get_pk_constraint("sarc_wb_offsets")
    assert offsets_pk["name"] == "sarc_wb_offsets_pkey"
    assert offsets_pk["constrained_columns"] == ["stream"]
    assert insp.get_pk_constraint("sarc_dead_letters")["constrained_columns"] == ["id"]
    identity = {c["name"]: c.get("identity") for c in insp.get_columns("sarc_dead_letters")}
    assert identity["id"] is not None
    assert identity["id"]["always"] is False

    [index] = insp.get_indexes("sarc_dead_letters")
    assert index["name"] == "ix_sarc_dead_letters_pending"
    assert index["column_names"] == ["namespace", "table_name"]
    assert not index["unique"]
    assert index["dialect_options"]["postgresql_where"] == "(replayed_at IS NULL)"

    with fresh_engine.connect() as conn:
        assert our_migration_context(conn).get_current_heads() == (HEAD,)


def test_metadata_matches_what_the_migrations_create(fresh_engine: Engine) -> None:
    schema.upgrade(fresh_engine)
    with fresh_engine.begin() as conn:
        # An application's table in the same database must not show up as "to be dropped".
        conn.execute(text("CREATE TABLE products (id int PRIMARY KEY, name text)"))

    with fresh_engine.connect() as conn:
        assert compare_metadata(our_migration_context(conn), schema.metadata) == []

    # Autogenerate compares neither partial-index predicates nor identity options: check
    # those two by hand against what schema.py declares.
    [declared] = schema.dead_letters.indexes
    where = declared.dialect_options["postgresql"]["where"]
    assert (
        str(where.compile(dialect=fresh_engine.dialect)) == "sarc_dead_letters.replayed_at IS NULL"
    )
    insp = inspect(fresh_engine)
    [reflected] = insp.get_indexes("sarc_dead_letters")
    assert reflected["dialect_options"]["postgresql_where"] == "(replayed_at IS NULL)"

    declared_identity = schema.dead_letters.c.id.identity
    assert declared_identity is not None
    reflected_id = next(c for c in insp.get_columns("sarc_dead_letters") if c["name"] == "id")
    assert reflected_id["identity"]["always"] is bool(declared_identity.always)


def test_the_lease_token_is_added_to_existing_offsets_and_dropped_on_downgrade(
    fresh_engine: Engine,
) -> None:
    """sarc_0002 on a database that already has offsets: they keep their values, token 0."""
    schema.upgrade(fresh_engine, "sarc_0001")
    with fresh_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO sarc_wb_offsets (stream, last_id, applied_ops) "
                "VALUES ('sarc:shop:{shop:views}:wb:00ff:0', '1700000000000-3', 7)"
            )
        )
    schema.upgrade(fresh_engine)
    query = text("SELECT stream, last_id, applied_ops, lease_token FROM sarc_wb_offsets")
    with fresh_engine.connect() as conn:
        assert [tuple(r) for r in conn.execute(query)] == [
            ("sarc:shop:{shop:views}:wb:00ff:0", "1700000000000-3", 7, 0)
        ]
        assert our_migration_context(conn).get_current_heads() == (HEAD,)

    schema.downgrade(fresh_engine, "sarc_0001")
    columns = {c["name"] for c in inspect(fresh_engine).get_columns("sarc_wb_offsets")}
    assert "lease_token" not in columns
    with fresh_engine.connect() as conn:
        assert conn.execute(text("SELECT last_id FROM sarc_wb_offsets")).scalar_one() == (
            "1700000000000-3"
        )
        assert our_migration_context(conn).get_current_heads() == ("sarc_0001",)


def test_downgrade_base_drops_the_tables(fresh_engine: Engine) -> None:
    schema.upgrade(fresh_engine)
    schema.downgrade(fresh_engine)

    # alembic leaves its (now empty) version table behind, and nothing else of ours.
    assert table_names(fresh_engine) == {schema.VERSION_TABLE}
    assert version_rows(fresh_engine, schema.VERSION_TABLE) == set()

    schema.upgrade(fresh_engine)
    assert table_names(fresh_engine) >= OUR_TABLES


def test_upgrade_leaves_the_application_version_table_alone(fresh_engine: Engine) -> None:
    with fresh_engine.begin() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('app_0007')"))

    schema.upgrade(fresh_engine)

    assert version_rows(fresh_engine, "alembic_version") == {"app_0007"}
    assert version_rows(fresh_engine, schema.VERSION_TABLE) == {HEAD}


def test_upgrade_runs_inside_the_callers_transaction(fresh_engine: Engine) -> None:
    with fresh_engine.connect() as conn:
        conn.begin()
        schema.upgrade(conn)
        assert set(inspect(conn).get_table_names()) >= OUR_TABLES
        conn.rollback()

    assert not OUR_TABLES & table_names(fresh_engine)


# Imports first, says so, then waits on stdin, so that every process starts upgrading at once.
UPGRADE_WHEN_RELEASED = """\
import sys
from sa_redis_cache import schema
print("ready", flush=True)
sys.stdin.read()
schema.upgrade(sys.argv[1])
"""


def test_concurrent_upgrades_from_a_url_all_succeed(fresh_url: str, fresh_engine: Engine) -> None:
    # Application processes call upgrade() at start-up together; without the advisory lock
    # they race on CREATE TABLE and all but one fail. Processes, not threads: alembic's
    # migration context is global to a process.
    # Also checks that a URL without a driver gets psycopg 3.
    url = make_url(fresh_url).set(drivername="postgresql").render_as_string(hide_password=False)
    command = [sys.executable, "-W", "error", "-c", UPGRADE_WHEN_RELEASED, url]
    failures = []
    with ExitStack() as stack:
        procs = [
            stack.enter_context(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for _ in range(4)
        ]
        # Runs first on the way out: a failed assertion must not leave children waiting.
        for proc in procs:
            stack.callback(proc.kill)
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            assert proc.stderr is not None
            stderr = proc.stderr.read()  # small; ends when the child exits
            if proc.wait(timeout=60) != 0:
                failures.append(stderr)

    assert failures == []
    assert version_rows(fresh_engine, schema.VERSION_TABLE) == {HEAD}
    assert table_names(fresh_engine) >= OUR_TABLES


def test_alembic_command_line_from_the_repository_root(
    fresh_url: str, fresh_engine: Engine
) -> None:
    run_alembic("-x", f"url={fresh_url}", "upgrade", "head", cwd=REPO_ROOT)
    assert table_names(fresh_engine) >= OUR_TABLES

    current = run_alembic("current", cwd=REPO_ROOT, env={"DATABASE_URL": fresh_url})
    assert f"{HEAD} (head)" in current
    assert "No new upgrade operations detected" in run_alembic(
        "-x", f"url={fresh_url}", "check", cwd=REPO_ROOT
    )

    # Offline mode needs only the dialect, not a reachable database.
    script = run_alembic(
        "-x", "url=postgresql+psycopg://nobody@192.0.2.1/none", "upgrade", "head", "--sql",
        cwd=REPO_ROOT,
    )  # fmt: skip
    assert "CREATE TABLE sarc_alembic_version" in script
    assert "CREATE TABLE sarc_wb_offsets" in script
    assert "CREATE INDEX ix_sarc_dead_letters_pending" in script

    run_alembic("-x", f"url={fresh_url}", "downgrade", "base", cwd=REPO_ROOT)
    assert not OUR_TABLES & table_names(fresh_engine)


APP_INI = """\
[alembic]
script_location = %(here)s/alembic
path_separator = newline
version_locations =
    %(here)s/alembic/versions
    sa_redis_cache:migrations/versions
"""

APP_ENV = """\
import os

from alembic import context
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, pool

import sa_redis_cache.schema

app_metadata = MetaData()
Table("products", app_metadata, Column("id", Integer, primary_key=True))
target_metadata = [app_metadata, sa_redis_cache.schema.metadata]

engine = create_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

APP_REVISION = '''\
"""Products."""

import sqlalchemy as sa
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.create_table("products", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade():
    op.drop_table("products")
'''


def test_an_application_environment_includes_our_branch(
    fresh_url: str, fresh_engine: Engine, tmp_path: Path
) -> None:
    # The lines migrations/README tells an application to write, in an environment of its own.
    (tmp_path / "alembic" / "versions").mkdir(parents=True)
    (tmp_path / "alembic.ini").write_text(APP_INI)
    (tmp_path / "alembic" / "env.py").write_text(APP_ENV)
    (tmp_path / "alembic" / "versions" / "app_0001_products.py").write_text(APP_REVISION)
    env = {"DATABASE_URL": fresh_url}

    def alembic(*args: str) -> str:
        return run_alembic("-c", str(tmp_path / "alembic.ini"), *args, cwd=tmp_path, env=env)

    alembic("upgrade", "sa_redis_cache@head")
    assert table_names(fresh_engine) == {*OUR_TABLES, "alembic_version"}

    alembic("upgrade", "heads")
    assert table_names(fresh_engine) == {*OUR_TABLES, "alembic_version", "products"}
    # One history table, the application's; ours is one more row in it.
    assert version_rows(fresh_engine, "alembic_version") == {"app_0001", HEAD}
    assert "No new upgrade operations detected" in alembic("check")

    alembic("downgrade", "sa_redis_cache@base")
    assert table_names(fresh_engine) == {"alembic_version", "products"}
    assert version_rows(fresh_engine, "alembic_version") == {"app_0001"}
