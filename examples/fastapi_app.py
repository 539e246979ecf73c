"""A FastAPI + SQLModel application with the cache attached by its lifespan.

The shape of an application written without the cache in mind: SQLModel models (every
``str`` is an ``AutoString``), a login that returns the user's id as a token's ``sub``
(a ``str``), sync and async endpoints, each with its session dependency, and a profile
read on every authenticated request by ``session.get(User, token_sub)``. The cache is
added in three lines: a policy per model, ``Cache(...)``, and the lifespan, which
attaches both session factories (with ``cache_queries``: every select is cached) and
detaches at shutdown.

Run it::

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/app REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn --factory examples.fastapi_app:app_from_env

``tests/integration/test_fastapi_app.py`` runs it with FastAPI's test client and
``benchmarks/fastapi_flow.py`` measures it under a login-then-profile load.
"""

# no "from __future__ import annotations": SQLModel and FastAPI read these annotations at
# run time, and the endpoints' dependencies are local names
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from sqlalchemy import Column, DateTime, Engine, Table, create_engine, inspect
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlmodel import Field, Relationship, Session, SQLModel, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from sa_redis_cache import Cache, CachePolicy, FromCache


class AppUser(SQLModel, table=True):
    """A user; read on every authenticated request, so written through."""

    __tablename__ = "app_users"
    __cache__ = CachePolicy(strategy="write_through", ttl=600)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(unique=True, index=True)
    name: str
    password_hash: str
    bio: str = ""
    joined_at: datetime = Field(
        default_factory=lambda: datetime.now(timezone.utc),
        sa_column=Column(DateTime(timezone=True), nullable=False),
    )
    posts: list["AppPost"] = Relationship(back_populates="author")


class AppPost(SQLModel, table=True):
    """A user's post: the profile lists them (a lazy-loaded one-to-many)."""

    __tablename__ = "app_posts"
    __cache__ = CachePolicy(ttl=600)

    id: int | None = Field(default=None, primary_key=True)
    author_id: uuid.UUID = Field(foreign_key="app_users.id", index=True)
    title: str
    author: AppUser = Relationship(back_populates="posts")


def password_hash(password: str) -> str:
    """A stand-in for a real password hash (bcrypt, argon2): enough for an example."""
    return hashlib.sha256(password.encode()).hexdigest()


def create_app(database_url: str, redis_url: str | None, namespace: str = "app") -> FastAPI:
    """The application; ``redis_url=None`` runs it without the cache.

    Example::

        app = create_app("postgresql+psycopg://postgres@127.0.0.1/app", "redis://...")
    """
    engine = create_engine(database_url, pool_size=10)
    async_engine = create_async_engine(database_url, pool_size=10)
    session_factory = sessionmaker(engine, class_=Session, expire_on_commit=False)
    async_factory = async_sessionmaker(async_engine, class_=AsyncSession, expire_on_commit=False)

    cache = None if redis_url is None else Cache(redis_url, namespace=namespace)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if cache is None:
            yield
        else:  # attach both factories, every select cached for a minute; detach at the end
            caching = cache.lifespan(
                session_factory, async_factory, cache_queries=FromCache(ttl=60)
            )
            async with caching(app):
                yield
        await async_engine.dispose()  # its connections belong to this event loop

    app = FastAPI(lifespan=lifespan)
    app.state.cache = cache
    app.state.engines = (engine, async_engine.sync_engine)
    app.state.session_factory = session_factory  # for scripts and test fixtures

    def db() -> Iterator[Session]:
        with session_factory() as session:
            yield session

    async def adb() -> AsyncIterator[AsyncSession]:
        async with async_factory() as session:
            yield session

    # type aliases of dependencies, named as FastAPI's documentation names them
    SyncDb = Annotated[Session, Depends(db)]  # noqa: N806
    AsyncDb = Annotated[AsyncSession, Depends(adb)]  # noqa: N806

    def token_sub(authorization: Annotated[str, Header()]) -> str:
        scheme, _, sub = authorization.partition(" ")
        if scheme.lower() != "bearer" or not sub:
            raise HTTPException(401, "a bearer token is needed")
        return sub

    TokenSub = Annotated[str, Depends(token_sub)]  # noqa: N806

    @app.post("/login")
    def login(payload: dict[str, str], session: SyncDb) -> dict[str, str]:
        """Sync endpoint: the user by e-mail (a select, cached by ``cache_queries``)."""
        user = session.exec(select(AppUser).where(AppUser.email == payload["email"])).first()
        if user is None or user.password_hash != password_hash(payload["password"]):
            raise HTTPException(401, "wrong e-mail or password")
        return {"access_token": str(user.id), "token_type": "bearer"}

    @app.get("/me")
    async def me(sub: TokenSub, session: AsyncDb) -> dict[str, Any]:
        """Async endpoint: ``session.get`` with the token's ``str`` sub, and the posts."""
        user = await session.get(AppUser, sub)
        if user is None:
            raise HTTPException(404, "no such user")
        posts = await session.exec(
            select(AppPost).where(AppPost.author_id == user.id).order_by(AppPost.id)
        )
        return {
            "id": str(user.id),
            "name": user.name,
            "bio": user.bio,
            "posts": [p.title for p in posts],
        }

    @app.patch("/me")
    async def update_me(payload: dict[str, str], sub: TokenSub, session: AsyncDb) -> dict[str, str]:
        user = await session.get(AppUser, sub)
        if user is None:
            raise HTTPException(404, "no such user")
        user.bio = payload["bio"]
        await session.commit()  # written through: the next /me reads it from Redis
        return {"bio": user.bio}

    @app.get("/users/{user_id}")
    def profile(user_id: uuid.UUID, session: SyncDb) -> dict[str, Any]:
        """Sync endpoint: the entity cache, and a lazy-loaded one-to-many."""
        user = session.get(AppUser, user_id)
        if user is None:
            raise HTTPException(404, "no such user")
        return {"name": user.name, "posts": len(user.posts)}

    @app.get("/stats/users")
    async def user_count(session: AsyncDb) -> dict[str, int]:
        return {"users": await count_users(session)}

    async def count_users_uncached(session: AsyncSession) -> int:
        return (await session.exec(select(func.count()).select_from(AppUser))).one()

    count_users = (
        count_users_uncached
        if cache is None
        else cache.cached("user_count", ttl=30, ignore=("session",))(count_users_uncached)
    )
    return app


def seed(engine: Engine, users: int, posts_per_user: int = 3) -> list[tuple[str, str]]:
    """Create the tables and ``users`` users; their (e-mail, password) pairs.

    Example::

        credentials = seed(engine, users=50)
    """
    SQLModel.metadata.create_all(engine, tables=_tables())
    credentials = []
    with Session(engine) as session:
        for i in range(1, users + 1):
            email, password = f"user{i}@example.com", f"secret-{i}"
            user = AppUser(email=email, name=f"User {i}", password_hash=password_hash(password))
            session.add(user)
            session.add_all(
                AppPost(author=user, title=f"post {j} of user {i}")
                for j in range(1, posts_per_user + 1)
            )
            credentials.append((email, password))
        session.commit()
    return credentials


def drop(engine: Engine) -> None:
    """Drop the example's tables."""
    SQLModel.metadata.drop_all(engine, tables=_tables())


def _tables() -> list[Table]:
    return [
        t
        for t in (inspect(AppUser).local_table, inspect(AppPost).local_table)
        if isinstance(t, Table)
    ]


def app_from_env() -> FastAPI:
    """``uvicorn --factory examples.fastapi_app:app_from_env``: URLs from the environment."""
    return create_app(os.environ["DATABASE_URL"], os.environ.get("REDIS_URL"))
