"""Review probes of bad input and misconfiguration, with the database as the oracle.

The standard (docs/configuration.md, docs/write-behind.md): a misconfigured model is
refused at ``attach()`` naming the model, the problem and the fix, or else works; a
corrupt entry is a miss or a reported skip, never an exception and never a lost
write-behind operation; bad arguments get an error that names them.

Models live in private declarative bases disposed of before each test ends
(:func:`tests.integration.test_attach.private_base`), so a refused one never reaches a
later test's ``attach()``.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_lib
import sqlalchemy as sa
from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FlushWorker, schema
from tests.integration.test_attach import private_base
from tests.wb_support import drain

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def base(engine: sa.Engine) -> Iterator[type[DeclarativeBase]]:
    """A private declarative base whose tables exist for the test and are dropped after."""
    schema.upgrade(engine)
    with private_base() as made:
        try:
            yield made
        finally:
            made.metadata.drop_all(engine)


@pytest.fixture
def volatile_cache(redis_url: str, namespace: str) -> Iterator[Cache]:
    """A cache nothing is attached to yet (write-behind models need accept_volatile=True)."""
    client = redis_lib.Redis.from_url(redis_url)
    cache = Cache(client, namespace=namespace)
    yield cache
    cache.detach()
    client.close()


WB = CachePolicy(strategy="write_behind", accept_volatile=True)


def _worker(engine: sa.Engine, cache: Cache, namespace: str, *models: Any) -> FlushWorker:
    return FlushWorker(engine, cache.client, namespace=namespace, models=list(models))


# -- write-behind and SQLAlchemy features the flush skips --------------------------------


def test_version_id_col_on_a_write_behind_model_is_refused_or_kept(
    base: type[DeclarativeBase], engine: sa.Engine, volatile_cache: Cache, namespace: str
) -> None:
    """``version_id_col``: SQLAlchemy sets the version on INSERT and checks it on UPDATE;
    write-behind's flush runs neither."""

    class Doc(base):  # type: ignore[misc, valid-type]
        __tablename__ = "review_input_docs"
        __cache__ = WB
        id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
        body: Mapped[str] = mapped_column(String(40))
        version: Mapped[int] = mapped_column(Integer, nullable=False)
        __mapper_args__ = {"version_id_col": version}  # noqa: RUF012

    base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    try:
        volatile_cache.attach(factory)
    except ConfigurationError as exc:
        message = str(exc)
        assert "Doc" in message and "version_id_col" in message and "write_through" in message
        return
    with factory() as s:
        doc = Doc(body="a")
        s.add(doc)
        s.commit()
        pk = doc.id
        assert doc.version == 1
    worker = _worker(engine, volatile_cache, namespace, Doc)
    try:
        drain(worker)
    finally:
        worker.release()
    with engine.connect() as conn:
        assert conn.execute(select(Doc.__table__)).all() == [(pk, "a", 1)]
