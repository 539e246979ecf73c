"""What the docs (README.md, docs/*.md) promise a user who copies them, where the code
had drifted from the page. Each test names the page and the sentence it holds the code to.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy import Column, ForeignKey, Integer, String, Table, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from sa_redis_cache.cli import cli
from sa_redis_cache.protocol import KeyScheme


class DocsBase(DeclarativeBase):
    pass


class DocsItem(DocsBase):
    __tablename__ = "docs_items"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


# Declared beside the models, mapped by no class and named by no relationship: the
# application reads it in Core joins, and another program writes it.
docs_labels = Table(
    "docs_labels",
    DocsBase.metadata,
    Column("item_id", Integer, ForeignKey("docs_items.id"), primary_key=True),
    Column("label", String(20), nullable=False),
)


@pytest.fixture
def docs_world(engine: sa.Engine, cache: Cache) -> Iterator[sessionmaker[Session]]:
    DocsBase.metadata.drop_all(engine)
    DocsBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(DocsItem), [{"id": 1, "name": "one"}])
        conn.execute(sa.insert(docs_labels), [{"item_id": 1, "label": "old"}])
    factory = sessionmaker(engine)
    cache.attach(factory)
    try:
        yield factory
    finally:
        cache.detach()
        DocsBase.metadata.drop_all(engine)


def test_invalidate_table_takes_any_table_of_the_models_metadata(
    docs_world: sessionmaker[Session], cache: Cache, database_url: str
) -> None:
    """configuration.md: ``invalidate_table`` takes "tables given as ``Table`` objects or
    ``fullname``s"; "a name that no mapped class's ``MetaData`` has raises". A table of
    the models' MetaData that no class maps was refused by name (only mapped and
    association tables were known), so an application could not retire it by name, nor
    with ``sa-redis-cache invalidate --table`` (cli.md: "a table of the models'
    ``MetaData``")."""
    stmt = (
        select(DocsItem.name, docs_labels.c.label)
        .join(docs_labels, docs_labels.c.item_id == DocsItem.id)
        .options(FromCache(ttl=60))
    )
    with docs_world() as s:
        assert s.execute(stmt).all() == [("one", "old")]
    with docs_world() as s:
        assert s.execute(stmt).all() == [("one", "old")]  # a hit

    # another program writes the table, out of the cache's sight
    other = sa.create_engine(database_url)
    try:
        with other.begin() as conn:
            conn.execute(sa.update(docs_labels).values(label="new"))
    finally:
        other.dispose()

    assert cache.invalidate_table("docs_labels") == ["docs_labels"]
    with docs_world() as s:
        assert s.execute(stmt).all() == [("one", "new")]

    with pytest.raises(ConfigurationError, match="no_such_table"):
        cache.invalidate_table("no_such_table")


def test_cli_invalidate_table_takes_a_table_of_the_models_metadata(
    redis_url: str, namespace: str, redis_client: redis.Redis
) -> None:
    """cli.md: ``invalidate --table NAME`` is ``cache.invalidate_table(NAME)`` "for a table
    of the models' ``MetaData``"; this module's unmapped ``docs_labels`` was refused."""
    args = ["--redis-url", redis_url, "--namespace", namespace, "--models", __name__]
    done = CliRunner().invoke(
        cli, [*args, "invalidate", "--table", "docs_labels", "--yes"], catch_exceptions=False
    )
    assert done.exit_code == 0, done.output
    assert redis_client.exists(KeyScheme(namespace).version_key("docs_labels"))
    unknown = CliRunner().invoke(
        cli, [*args, "invalidate", "--table", "no_such_table", "--yes"], catch_exceptions=False
    )
    assert unknown.exit_code == 1
