"""An oracle review of the flush worker and its command line, as an operator uses them.

Each test compares what the docs promise (docs/write-behind.md, docs/cli.md,
docs/operations.md, ``FlushWorker``'s docstring, ``worker --help``) with what real
services do: the table after draining write-behind commits equals the table plain
SQLAlchemy commits leave (the oracle), and bad input is one ``Error:`` line and a
non-zero exit.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import FlushWorker
from sa_redis_cache.cli import cli
from sa_redis_cache.cli.admin import worker_main
from sa_redis_cache.errors import ConfigurationError
from tests.wb_support import drain, letters

pytest_plugins = ["tests.wb_fixtures"]

MODELS = "tests.wb_support:active_models"


def table_rows(engine: sa.Engine, model: Any) -> dict[Any, tuple[Any, ...]]:
    """Every row of ``model``'s table, by id, as the database holds it."""
    with engine.connect() as conn:
        return {r.id: tuple(r) for r in conn.execute(sa.select(model.__table__))}


# --------------------------------------------------------------------------- data shapes


def test_a_none_given_for_a_column_with_a_default_takes_the_default_as_plain_sqlalchemy(
    engine: sa.Engine,
    models: Any,
    factory: sessionmaker[Session],
    make_worker: Any,
    namespace: str,
) -> None:
    """SQLAlchemy's INSERT leaves out a None it does not evaluate (any type but JSON's), so
    the column's Python default applies: ``PageView(views=None)`` is stored with views 0.
    Write-behind queued the None, and the worker dead-lettered the row (NOT NULL)."""
    page_view = models[0]
    queued, plain = uuid.uuid4(), uuid.uuid4()
    with factory() as s:
        obj = page_view(id=queued, path="/q", views=None)
        s.add(obj)
        s.commit()
        assert obj.views == 0
    with Session(engine) as s:  # the oracle: the same object committed without the cache
        s.add(page_view(id=plain, path="/q", views=None))
        s.commit()
    drain(make_worker())
    assert letters(engine, namespace) == []
    found = table_rows(engine, page_view)
    assert found[queued][1:4] == found[plain][1:4] == ("/q", 0, None)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("option", ["--max-backoff", "--progress-interval"])
def test_a_number_of_seconds_that_is_not_finite_is_a_usage_error(
    models: Any, option: str, value: str
) -> None:
    """click's FloatRange lets ``nan`` through: ``--max-backoff nan`` made a worker that
    retried a failure in a busy loop, thousands of connection attempts a second."""
    del models
    result = CliRunner().invoke(
        cli,
        [
            "worker",
            "--model",
            MODELS,
            "--database-url",
            "postgresql://x@127.0.0.1:1/x",
            option,
            value,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: Invalid value for '{option}': {float(value)} is not a number of seconds"
    ], result.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_flush_worker_refuses_a_backoff_that_is_not_a_number_of_seconds(
    worker_engine: sa.Engine, client: redis.Redis, namespace: str, models: Any, value: float
) -> None:
    with pytest.raises(ConfigurationError, match="max_backoff"):
        FlushWorker(
            worker_engine, client, namespace=namespace, models=[models[0]], max_backoff=value
        )


def test_python_m_worker_says_redis_refused_in_one_line_not_a_traceback(
    database_url: str, wb_redis_url: str, models: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m sa_redis_cache.worker`` runs the command outside the ``sa-redis-cache``
    group, whose error translation it missed: a Redis that answers with an error (here a
    database index out of range) was a traceback there, one line under the group."""
    del models
    url = wb_redis_url.rsplit("/", 1)[0] + "/99"
    status = worker_main(["--database-url", database_url, "--redis-url", url, "--model", MODELS])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"Error: Redis at {url} failed: DB index is out of range"
    ], err
