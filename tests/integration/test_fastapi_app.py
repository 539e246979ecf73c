"""The FastAPI + SQLModel example (examples/fastapi_app.py) through FastAPI's test client.

Sync and async endpoints, the lifespan that attaches both session factories with
``cache_queries`` and detaches at shutdown, ``session.get`` with a token's ``str`` sub, a
lazy-loaded collection, a cached function that ignores its session argument, and a
write seen at once: the issue 16 user flow, with no WARNING logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import select

from examples import fastapi_app
from tests.support import SQLCounter

if TYPE_CHECKING:
    from collections.abc import Iterator

    from fastapi import FastAPI


@pytest.fixture
def credentials(engine: sa.Engine) -> Iterator[list[tuple[str, str]]]:
    fastapi_app.drop(engine)
    yield fastapi_app.seed(engine, users=5)
    fastapi_app.drop(engine)


@pytest.fixture
def app(database_url: str, redis_url: str, namespace: str) -> Iterator[FastAPI]:
    made = fastapi_app.create_app(database_url, redis_url, namespace)
    yield made
    for engine in made.state.engines:
        engine.dispose()


@pytest.fixture
def sql(app: FastAPI) -> Iterator[SQLCounter]:
    counter = SQLCounter()
    for engine in app.state.engines:
        sa.event.listen(engine, "before_cursor_execute", counter)
    yield counter
    for engine in app.state.engines:
        sa.event.remove(engine, "before_cursor_execute", counter)


def flow(client: TestClient, email: str, password: str) -> dict[str, object]:
    """Log in, then read the profile (async) and the public page (sync)."""
    token = client.post("/login", json={"email": email, "password": password}).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    me = client.get("/me", headers=headers).json()
    page = client.get(f"/users/{me['id']}").json()
    return {"me": me, "page": page}


def test_login_then_profile_is_served_from_the_cache(
    app: FastAPI,
    credentials: list[tuple[str, str]],
    sql: SQLCounter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sa_redis_cache")
    email, password = credentials[0]
    with TestClient(app) as client:
        first = flow(client, email, password)
        cold = sql.count
        sql.reset()
        second = flow(client, email, password)
        assert second == first
        assert first["page"] == {"name": "User 1", "posts": 3}
        # login, me, its posts, and the page's posts (its user was filled by /me)
        assert cold == 4
        assert sql.count == 0
        stats = app.state.cache.stats()
        assert stats["regions"]["AppUser.posts"]["hits"] == 1
        assert stats["total"]["decode_errors"] == 0
    assert not caplog.records


def test_a_write_through_an_async_endpoint_is_read_at_once(
    app: FastAPI, credentials: list[tuple[str, str]], sql: SQLCounter
) -> None:
    email, password = credentials[1]
    with TestClient(app) as client:
        token = client.post("/login", json={"email": email, "password": password}).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        assert client.get("/me", headers=headers).json()["bio"] == ""
        assert client.patch("/me", json={"bio": "hello"}, headers=headers).json() == {
            "bio": "hello"
        }
        sql.reset()
        me = client.get("/me", headers=headers).json()
        assert me["bio"] == "hello"
        assert sql.count == 0  # written through, and the posts query was not invalidated


def test_a_cached_function_ignoring_its_session(
    app: FastAPI, credentials: list[tuple[str, str]], sql: SQLCounter
) -> None:
    with TestClient(app) as client:
        assert client.get("/stats/users").json() == {"users": 5}
        sql.reset()
        assert client.get("/stats/users").json() == {"users": 5}
        assert sql.count == 0
        assert app.state.cache.stats()["functions"]["user_count"]["hits"] == 1


def test_the_lifespan_detaches_at_shutdown(
    app: FastAPI, credentials: list[tuple[str, str]], sql: SQLCounter
) -> None:
    engine = app.state.engines[0]
    before = len(engine.dispatch.after_cursor_execute)
    for _ in range(2):  # started twice, as a test suite does with one app
        with TestClient(app) as client:
            assert len(engine.dispatch.after_cursor_execute) == before + 1
            flow(client, *credentials[2])
        assert len(engine.dispatch.after_cursor_execute) == before
    with TestClient(app) as client:
        # attached again: what the first block cached was retired at startup (writes made
        # while detached went unseen), and is served from the cache once read again
        flow(client, *credentials[2])
        sql.reset()
        flow(client, *credentials[2])
        assert sql.count == 0


def test_writes_between_two_test_clients_are_seen_by_the_second(
    app: FastAPI, credentials: list[tuple[str, str]], sql: SQLCounter
) -> None:
    """A fixture writes through the app's own session factory between two TestClient
    blocks, while the lifespan has detached the cache: the second block must read those
    writes, from the entity cache (the profile), a cached query (the login's select by
    e-mail, the posts of /me) and a lazy-loaded collection, not what the first cached."""
    email, password = credentials[3]
    with TestClient(app) as client:
        before = flow(client, email, password)
        flow(client, email, password)  # every read is a hit now
    user_id = before["me"]["id"]  # type: ignore[index]
    with app.state.session_factory() as session:
        user = session.get(fastapi_app.AppUser, user_id)
        user.name = "Renamed between clients"
        user.password_hash = fastapi_app.password_hash("new secret")
        first_post = session.exec(
            select(fastapi_app.AppPost)
            .where(fastapi_app.AppPost.author_id == user.id)
            .order_by(fastapi_app.AppPost.id)
        ).first()
        first_post.title = "retitled between clients"
        session.add(fastapi_app.AppPost(author_id=user.id, title="added between clients"))
        session.commit()
    with TestClient(app) as client:
        refused = client.post("/login", json={"email": email, "password": password})
        assert refused.status_code == 401  # the cached select held the old password hash
        after = flow(client, email, "new secret")
        assert after["me"]["name"] == "Renamed between clients"  # type: ignore[index]
        assert after["me"]["posts"] == [  # type: ignore[index]
            "retitled between clients",
            "post 2 of user 4",
            "post 3 of user 4",
            "added between clients",
        ]
        assert after["page"] == {"name": "Renamed between clients", "posts": 4}
        sql.reset()
        assert flow(client, email, "new secret") == after
        assert sql.count == 0  # cached again
