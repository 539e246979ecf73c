"""The Flask-SQLAlchemy example (examples/flask_app.py) through Flask's test client.

``attach_flask_sqlalchemy`` attaches ``db.session`` and the app's engine: reads are
cached, a session write and a ``text()`` write on ``db.engine`` are both seen at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from examples import flask_app
from sa_redis_cache import Cache, ConfigurationError
from sa_redis_cache.integrations import attach_flask_sqlalchemy
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from flask import Flask


@pytest.fixture
def app(database_url: str, redis_url: str, namespace: str) -> Iterator[Flask]:
    made = flask_app.create_app(database_url, redis_url, namespace)
    with made.app_context():
        flask_app.db.drop_all()
        flask_app.db.create_all()
        flask_app.db.session.add_all(
            flask_app.Book(id=i, title=f"book {i}", shelf="new" if i % 2 else "old")
            for i in range(1, 7)
        )
        flask_app.db.session.commit()
    yield made
    with made.app_context():
        flask_app.db.drop_all()
        engines = list(flask_app.db.engines.values())
    made.extensions["sa_redis_cache"].detach()
    for engine in engines:
        engine.dispose()


@pytest.fixture
def sql(app: Flask) -> Iterator[SQLCounter]:
    with app.app_context():
        engine = flask_app.db.engine
    counter = SQLCounter()
    sa.event.listen(engine, "before_cursor_execute", counter)
    yield counter
    sa.event.remove(engine, "before_cursor_execute", counter)


def test_reads_are_cached_and_writes_seen(app: Flask, sql: SQLCounter) -> None:
    client = app.test_client()
    for expected in (1, 0):
        sql.reset()
        assert client.get("/books/3").json == {"title": "book 3", "shelf": "new"}
        assert client.get("/shelves/new").json == {"titles": ["book 1", "book 3", "book 5"]}
        assert sql.count == 2 * expected
    assert client.post("/books/3/title", json={"title": "renamed"}).json == {"title": "renamed"}
    assert client.get("/books/3").json == {"title": "renamed", "shelf": "new"}
    assert client.get("/shelves/new").json == {"titles": ["book 1", "renamed", "book 5"]}
    # a text() write on db.engine: seen because attach_flask_sqlalchemy attached the engine
    assert client.post("/shelves/new/rename", json={"to": "top"}).json == {"moved": 3}
    assert client.get("/shelves/new").json == {"titles": []}
    assert client.get("/books/1").json == {"title": "book 1", "shelf": "top"}
    sql.reset()
    assert client.get("/shelves/top").json == {"titles": ["book 1", "renamed", "book 5"]}
    assert client.get("/shelves/top").json == {"titles": ["book 1", "renamed", "book 5"]}
    assert sql.count == 1


def test_two_apps_made_in_one_process_share_one_cache(
    app: Flask, database_url: str, redis_url: str, namespace: str
) -> None:
    """``create_app()`` called again in the process (an app per test, as Flask's testing
    guide has it): the module-level ``db.session`` takes one Cache, so the second app
    gets the first's, attached to its engine too; both apps serve what either wrote."""
    second = flask_app.create_app(database_url, redis_url, namespace)
    cache = app.extensions["sa_redis_cache"]
    try:
        assert second.extensions["sa_redis_cache"] is cache
        clients = (app.test_client(), second.test_client())
        for client in clients * 2:
            assert client.get("/books/3").json == {"title": "book 3", "shelf": "new"}
            assert client.get("/shelves/new").json == {"titles": ["book 1", "book 3", "book 5"]}
        assert clients[1].post("/books/3/title", json={"title": "second's"}).status_code == 200
        for client in clients:
            assert client.get("/books/3").json == {"title": "second's", "shelf": "new"}
            assert client.get("/shelves/new").json == {"titles": ["book 1", "second's", "book 5"]}
        # a text() write on the first app's engine, and one on the second's
        assert clients[0].post("/shelves/new/rename", json={"to": "top"}).json == {"moved": 3}
        assert clients[1].post("/shelves/old/rename", json={"to": "low"}).json == {"moved": 3}
        for client in clients:
            assert client.get("/shelves/new").json == {"titles": []}
            assert client.get("/shelves/low").json == {"titles": ["book 2", "book 4", "book 6"]}
        total = cache.stats()["total"]
        assert total["lease_waits"] == 0  # no second cache waiting for this one's fills
        assert total["hits"] > 0
    finally:
        with second.app_context():
            engines = list(flask_app.db.engines.values())
        for engine in engines:
            engine.dispose()


def test_a_second_cache_on_db_session_is_refused_until_the_first_detaches(
    app: Flask, redis_url: str, namespace: str
) -> None:
    """A Cache per app over the module-level ``db`` (the pattern the example avoids):
    ``attach_flask_sqlalchemy`` of a second cache is refused, naming the fix; after the
    first detaches (a test's teardown), it attaches, and reads what was written between."""
    first = app.extensions["sa_redis_cache"]
    second = Cache(redis_url, namespace=namespace)
    client = app.test_client()
    assert client.get("/books/2").json == {"title": "book 2", "shelf": "old"}
    try:
        with pytest.raises(ConfigurationError, match=r"another Cache \(namespace '") as info:
            attach_flask_sqlalchemy(second, flask_app.db, app)
        assert "cache.detach()" in str(info.value)
        first.detach()
        with app.app_context():  # unseen: no cache is attached
            flask_app.db.session.get_one(flask_app.Book, 2).title = "retitled while detached"
            flask_app.db.session.commit()
        attach_flask_sqlalchemy(second, flask_app.db, app)
        assert client.get("/books/2").json == {"title": "retitled while detached", "shelf": "old"}
    finally:
        second.detach()
