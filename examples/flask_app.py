"""A Flask + Flask-SQLAlchemy application with the cache attached.

``db.session`` is a scoped session whose factory names no engine, and Flask-SQLAlchemy
makes its engines per app: :func:`sa_redis_cache.integrations.attach_flask_sqlalchemy`
attaches both, so that ``db.session`` reads through the cache and Core or ``text()``
writes on ``db.engine`` invalidate. ``tests/integration/test_flask_app.py`` runs it with
Flask's test client.

Run it::

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/app REDIS_URL=redis://127.0.0.1:6379/0 \\
        flask --app 'examples.flask_app:create_app()' run
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, abort, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_redis_cache import Cache, CachePolicy, FromCache
from sa_redis_cache.integrations import attach_flask_sqlalchemy


class Base(DeclarativeBase):
    """The models' base, given to Flask-SQLAlchemy as its ``model_class``."""


db = SQLAlchemy(model_class=Base)


class Book(db.Model):  # type: ignore[name-defined,misc]  # Flask-SQLAlchemy's dynamic base
    """A book; a cache-aside model."""

    __tablename__ = "flask_books"
    __cache__ = CachePolicy(ttl=600)

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    shelf: Mapped[str] = mapped_column(String(40))


# The process's one Cache, by (Redis URL, namespace): ``db`` is module-level, so every app
# this module makes shares ``db.session``, which one Cache at a time may be attached to.
_caches: dict[tuple[str, str], Cache] = {}


def _cache_for(redis_url: str, namespace: str) -> Cache:
    """The Cache of every app made with ``redis_url`` and ``namespace``; another pair
    (a test's own namespace) detaches the previous one first."""
    found = _caches.get((redis_url, namespace))
    if found is None:
        for previous in _caches.values():
            previous.detach()
        _caches.clear()
        found = _caches[redis_url, namespace] = Cache(redis_url, namespace=namespace)
    return found


def create_app(
    database_url: str | None = None, redis_url: str | None = None, namespace: str = "flask_app"
) -> Flask:
    """The application, with the cache attached when ``redis_url`` (or ``REDIS_URL``) is set.

    Called once per test, as Flask's testing guide does, it gives every app of one Redis
    URL and namespace the same Cache (the module's ``db.session`` takes one), attached
    to each app's engines as well.

    Example::

        app = create_app("postgresql+psycopg://postgres@127.0.0.1/app", "redis://...")
    """
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url or os.environ["DATABASE_URL"]
    db.init_app(app)
    redis_url = redis_url or os.environ.get("REDIS_URL")
    cache = None if redis_url is None else _cache_for(redis_url, namespace)
    if cache is not None:
        attach_flask_sqlalchemy(cache, db, app, cache_queries=FromCache(ttl=60))
    app.extensions["sa_redis_cache"] = cache

    @app.get("/books/<int:book_id>")
    def book(book_id: int) -> dict[str, Any]:
        found = db.session.get(Book, book_id)  # the entity cache
        if found is None:
            abort(404)
        return {"title": found.title, "shelf": found.shelf}

    @app.get("/shelves/<shelf>")
    def shelf(shelf: str) -> dict[str, Any]:
        books = db.session.scalars(select(Book).where(Book.shelf == shelf).order_by(Book.id))
        return {"titles": [b.title for b in books]}  # cached by cache_queries

    @app.post("/shelves/<shelf>/rename")
    def rename_shelf(shelf: str) -> dict[str, Any]:
        """A textual write on ``db.engine``: seen because the engine is attached."""
        with db.engine.begin() as conn:
            moved = conn.execute(
                text("UPDATE flask_books SET shelf = :new WHERE shelf = :old"),
                {"new": request.get_json()["to"], "old": shelf},
            ).rowcount
        return {"moved": moved}

    @app.post("/books/<int:book_id>/title")
    def retitle(book_id: int) -> dict[str, Any]:
        found = db.session.get(Book, book_id)
        if found is None:
            abort(404)
        found.title = request.get_json()["title"]
        db.session.commit()
        return {"title": found.title}

    return app
