"""Small helpers for web frameworks whose sessions the cache cannot reach by itself.

FastAPI and other ASGI applications use :meth:`sa_redis_cache.Cache.lifespan`; plain
``Session(engine)`` applications attach ``Session`` and the engine
(docs/integrations.md). This module holds what needs a framework object:

* :func:`attach_flask_sqlalchemy`: Flask-SQLAlchemy's ``db.session`` is a scoped session
  whose factory names no engine (it picks one per bind key when a session needs it), so
  ``attach(db.session)`` alone leaves Core and ``text()`` DML on ``db.engine``
  uninstrumented; its engines exist only per Flask app, inside an app context.

No framework is imported here: the helpers take the application's objects.

Example::

    db = SQLAlchemy(app)
    cache = Cache(REDIS_URL, namespace="app")
    attach_flask_sqlalchemy(cache, db, app)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import Cache
    from .options import FromCache

__all__ = ["attach_flask_sqlalchemy"]


def attach_flask_sqlalchemy(
    cache: Cache, db: Any, app: Any, *, cache_queries: FromCache | bool | None = None
) -> None:
    """Attach Flask-SQLAlchemy's ``db.session`` and every engine ``db`` has for ``app``.

    Call it after ``db.init_app(app)`` (or ``SQLAlchemy(app)``), once per app: the
    session factory gets the read path and the session hooks, and each engine of the app
    (the default one and every ``SQLALCHEMY_BINDS`` key) gets the Core and ``text()`` DML
    listeners. ``cache_queries`` is :meth:`~sa_redis_cache.Cache.attach`'s. Every app of
    one ``db`` shares ``db.session``: give them one ``cache`` (another one is refused with
    :class:`~sa_redis_cache.ConfigurationError` until the first is detached).

    Example::

        app = Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg://..."
        db = SQLAlchemy(model_class=Base)
        db.init_app(app)
        attach_flask_sqlalchemy(cache, db, app, cache_queries=FromCache(ttl=60))
    """
    cache.attach(db.session, cache_queries=cache_queries)
    with app.app_context():
        engines = list(db.engines.values())
    for engine in engines:
        cache.attach(engine)
