"""The read/write shapes of ``test_review_apps.py`` under the library's deployment modes,
each cached read checked against the same read on a plain session (the oracle) after
each write: the local tier (two caches with their own engines as two processes), an
``AsyncSession`` (``awaitable_attrs``, ``stream()``, ``run_sync``) on a cache made from a
URL, and a Redis Cluster (the tables' keys on different nodes; spread query entries and
slot groups too). Writes: ORM collection changes, Core and ``text()`` through a session
or an attached engine, writing CTEs, ``CALL``; a worker with only its engine attached;
explicit invalidations from the other process. Statements: a writing CTE runs its write
every time, a ``SKIP LOCKED`` claim locks, the clock and ``random()`` are not frozen.

The review that wrote this module found no stale read in these combinations; the tests
keep them covered. It found two faults on every deployment, pinned down at the end:
``session.refresh(obj, ["tags"])`` served the named collections from the cache, and
``invalidate_query(stmt)`` found nothing ``cache_queries`` had cached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import Cache, FromCache
from tests.blog import MOVE_POST, Author, Post, Tag, blog_schema, post_tags

if TYPE_CHECKING:
    from collections.abc import Iterator

# the cluster deployments run in every run, as test_local_tier.py's
pytestmark = pytest.mark.cluster

WAIT = 10.0


@pytest.fixture
def blog(shop_engine: sa.Engine) -> Iterator[sa.Engine]:
    with blog_schema(shop_engine) as engine:
        yield engine


def snapshot(session: Session) -> dict[str, Any]:
    """What an application reads: rows by key, lazy collections of both kinds, queries."""
    out: dict[str, Any] = {}
    for aid in (1, 2):
        author = session.get(Author, aid)
        out[f"author{aid}.posts"] = author and [(p.id, p.title) for p in author.posts]
    for pid in (1, 2, 3, 4):
        post = session.get(Post, pid)
        out[f"post{pid}"] = post and (post.title, post.author_id)
        out[f"post{pid}.tags"] = post and [t.id for t in post.tags]
    out["posts"] = [(p.id, p.title, p.author_id) for p in session.scalars(select(Post))]
    out["titles"] = session.execute(select(Post.id, Post.title).order_by(Post.id)).all()
    out["by_author"] = session.scalars(
        select(Post.id).where(Post.author_id == 2).order_by(Post.id)
    ).all()
    out["tag_rows"] = session.execute(
        select(post_tags.c.post_id, post_tags.c.tag_id).order_by(
            post_tags.c.post_id, post_tags.c.tag_id
        )
    ).all()
    return out


# the writes, each given a session factory (attached) and an engine (attached)
Write = Callable[[Callable[[], Session], sa.Engine], None]


def orm_append(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        author = s.get(Author, 2)
        assert author is not None
        author.posts.append(Post(id=4, title="p4"))
        s.commit()


def orm_move(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        post = s.get(Post, 1)
        assert post is not None
        post.author_id = 2
        post.tags.remove(post.tags[0])
        s.commit()


def orm_delete(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        post = s.get(Post, 2)
        assert post is not None
        post.tags.clear()
        s.flush()
        s.delete(post)
        s.commit()


def core_session(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        s.execute(update(Post).where(Post.id == 1).values(author_id=2, title="core"))
        s.execute(insert(post_tags).values(post_id=3, tag_id=2))
        s.commit()


def core_engine(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(update(Post).where(Post.id == 1).values(author_id=2, title="core"))
        conn.execute(delete(post_tags).where(post_tags.c.tag_id == 1))


def text_session(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        s.execute(text("UPDATE blog_posts SET author_id = 2, title = 'txt' WHERE id = 2"))
        s.execute(text("INSERT INTO blog_post_tags (post_id, tag_id) VALUES (2, 1)"))
        s.commit()


def text_engine(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE blog_posts SET author_id = 2, title = 'txt' WHERE id = 2"))
        conn.execute(text("DELETE FROM blog_post_tags WHERE post_id = 1"))


def cte_session(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        moved = update(Post).where(Post.id == 1).values(author_id=2).returning(Post.id).cte()
        s.execute(select(moved)).all()
        dropped = delete(post_tags).where(post_tags.c.tag_id == 1)
        s.execute(select(dropped.returning(post_tags.c.post_id).cte())).all()
        s.commit()


def cte_engine(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with engine.begin() as conn:
        added = insert(post_tags).values(post_id=3, tag_id=3)
        conn.execute(select(added.returning(post_tags.c.post_id).cte())).all()


def call_session(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with factory() as s:
        s.execute(text(MOVE_POST))
        s.commit()


def call_engine(factory: Callable[[], Session], engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(MOVE_POST))


WRITES: dict[str, Write] = {
    "orm_append": orm_append,
    "orm_move": orm_move,
    "orm_delete": orm_delete,
    "core_session": core_session,
    "core_engine": core_engine,
    "text_session": text_session,
    "text_engine": text_engine,
    "cte_session": cte_session,
    "cte_engine": cte_engine,
    "call_session": call_session,
    "call_engine": call_engine,
}


# where the caches of a test run: a single Redis, with the local tier, a Redis Cluster,
# and the local tier on the cluster
DEPLOYMENTS = ["single", "local", "cluster", "cluster_local"]


def deployment(
    request: pytest.FixtureRequest, redis_url: str, where: str
) -> tuple[str, dict[str, Any]]:
    """The Redis URL and the ``Cache`` options of the deployment ``where`` names."""
    if "cluster" not in where and request.config.getoption("--redis-mode") == "cluster":
        pytest.skip("--redis-mode=cluster")
    url = redis_url
    if "cluster" in where:
        url = request.getfixturevalue("redis_cluster").url
    kw: dict[str, Any] = {"local": True, "local_lease": 5.0} if "local" in where else {}
    return url, kw


class Process:
    """A cache, its own engine and an attached factory (every select cached)."""

    def __init__(self, database_url: str, redis_url: str, namespace: str, **kw: Any) -> None:
        self.engine = sa.create_engine(database_url)
        self.cache = Cache(redis_url, namespace=namespace, **kw)
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.factory, cache_queries=FromCache(ttl=60))
        self.cache.attach(self.engine)
        tier = self.cache.inspector.local_tier
        if tier is not None:
            assert tier.wait_ready(WAIT)

    def snapshot(self) -> dict[str, Any]:
        with self.factory() as s:
            return snapshot(s)

    def close(self) -> None:
        self.cache.detach()
        self.engine.dispose()


@contextmanager
def pair(kind: type[Process], *args: Any, **kw: Any) -> Iterator[tuple[Process, Process]]:
    """Two processes alike (a reader and a writer), closed after."""
    reader = kind(*args, **kw)
    try:
        writer = kind(*args, **kw)
        try:
            yield reader, writer
        finally:
            writer.close()
    finally:
        reader.close()


def plain(engine: sa.Engine) -> dict[str, Any]:
    with Session(engine) as s:
        return snapshot(s)


def check(reader: Process, writer: Process, blog: sa.Engine, write: Write) -> None:
    for _ in range(3):  # a miss, a fill, then hits (local hits with a tier)
        reader.snapshot()
        writer.snapshot()
    assert reader.snapshot() == plain(blog)
    write(writer.factory, writer.engine)
    expected = plain(blog)
    assert writer.snapshot() == expected
    assert reader.snapshot() == expected


# --------------------------------------------------------------------------- local tier


@pytest.mark.parametrize("shape", list(WRITES))
def test_local_tier_a_write_in_one_process_is_seen_by_the_other(
    blog: sa.Engine, database_url: str, redis_url: str, namespace: str, shape: str
) -> None:
    with pair(Process, database_url, redis_url, namespace, local=True, local_lease=5.0) as (
        reader,
        writer,
    ):
        check(reader, writer, blog, WRITES[shape])


# --------------------------------------------------------------------------- cluster


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("shape", list(WRITES))
def test_cluster_a_write_is_seen_by_the_next_read(
    blog: sa.Engine, database_url: str, redis_cluster: Any, namespace: str, shape: str, local: bool
) -> None:
    kw: dict[str, Any] = {"local": True, "local_lease": 5.0} if local else {}
    with pair(Process, database_url, redis_cluster.url, namespace, **kw) as (reader, writer):
        check(reader, writer, blog, WRITES[shape])


# --------------------------------------------------------------------------- asyncio


async def async_snapshot(session: AsyncSession) -> dict[str, Any]:
    """``snapshot`` through the asyncio API: awaited gets, ``awaitable_attrs`` lazy loads,
    ``stream()``, and ``run_sync`` of the synchronous one (compared with it)."""
    out: dict[str, Any] = {}
    for aid in (1, 2):
        author = await session.get(Author, aid)
        out[f"author{aid}.posts"] = author and [
            (p.id, p.title) for p in await author.awaitable_attrs.posts
        ]
    for pid in (1, 2, 3, 4):
        post = await session.get(Post, pid)
        out[f"post{pid}"] = post and (post.title, post.author_id)
        out[f"post{pid}.tags"] = post and [t.id for t in await post.awaitable_attrs.tags]
    out["posts"] = [(p.id, p.title, p.author_id) for p in await session.scalars(select(Post))]
    out["titles"] = (await session.execute(select(Post.id, Post.title).order_by(Post.id))).all()
    out["by_author"] = (
        await session.scalars(select(Post.id).where(Post.author_id == 2).order_by(Post.id))
    ).all()
    out["tag_rows"] = (
        await session.execute(
            select(post_tags.c.post_id, post_tags.c.tag_id).order_by(
                post_tags.c.post_id, post_tags.c.tag_id
            )
        )
    ).all()
    streamed = await session.stream(select(Post.id, Post.title).order_by(Post.id))
    assert [tuple(r) async for r in streamed] == [tuple(r) for r in out["titles"]], "stream"
    streamed_orm = await session.stream_scalars(select(Post).order_by(Post.id))
    assert [(p.id, p.title, p.author_id) async for p in streamed_orm] == sorted(out["posts"])
    session.expunge_all()
    synced = await session.run_sync(snapshot)
    assert synced == out, "run_sync"
    return out


AsyncWrite = Callable[[async_sessionmaker[AsyncSession], Any], Any]


async def a_orm_append(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        author = await s.get(Author, 2)
        assert author is not None
        (await author.awaitable_attrs.posts).append(Post(id=4, title="p4"))
        await s.commit()


async def a_orm_move(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        post = await s.get(Post, 1)
        assert post is not None
        post.author_id = 2
        tags = await post.awaitable_attrs.tags
        tags.remove(tags[0])
        await s.commit()


async def a_core_session(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        await s.execute(update(Post).where(Post.id == 1).values(author_id=2, title="core"))
        await s.execute(insert(post_tags).values(post_id=3, tag_id=2))
        await s.commit()


async def a_core_engine(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(Post).where(Post.id == 1).values(author_id=2, title="core"))
        await conn.execute(delete(post_tags).where(post_tags.c.tag_id == 1))


async def a_text_session(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        await s.execute(text("UPDATE blog_posts SET author_id = 2, title = 'txt' WHERE id = 2"))
        await s.execute(text("INSERT INTO blog_post_tags (post_id, tag_id) VALUES (2, 1)"))
        await s.commit()


async def a_cte_session(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        moved = update(Post).where(Post.id == 1).values(author_id=2).returning(Post.id).cte()
        (await s.execute(select(moved))).all()
        dropped = delete(post_tags).where(post_tags.c.tag_id == 1)
        (await s.execute(select(dropped.returning(post_tags.c.post_id).cte()))).all()
        await s.commit()


async def a_cte_engine(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with engine.begin() as conn:
        added = insert(post_tags).values(post_id=3, tag_id=3)
        (await conn.execute(select(added.returning(post_tags.c.post_id).cte()))).all()


async def a_call_session(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        await s.execute(text(MOVE_POST))
        await s.commit()


async def a_run_sync(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    async with factory() as s:
        await s.run_sync(lambda sync: orm_move(lambda: sync, engine.sync_engine))
        await s.commit()


async def a_run_sync_core(factory: async_sessionmaker[AsyncSession], engine: Any) -> None:
    def write(sync: Session) -> None:
        sync.execute(text("DELETE FROM blog_post_tags WHERE post_id = 1"))
        sync.execute(update(Post).where(Post.id == 3).values(author_id=1))

    async with factory() as s:
        await s.run_sync(write)
        await s.commit()


ASYNC_WRITES: dict[str, AsyncWrite] = {
    "orm_append": a_orm_append,
    "orm_move": a_orm_move,
    "core_session": a_core_session,
    "core_engine": a_core_engine,
    "text_session": a_text_session,
    "cte_session": a_cte_session,
    "cte_engine": a_cte_engine,
    "call_session": a_call_session,
    "run_sync": a_run_sync,
    "run_sync_core": a_run_sync_core,
}


def async_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql+psycopg_async://")


@pytest.mark.parametrize("where", DEPLOYMENTS)
@pytest.mark.parametrize("shape", list(ASYNC_WRITES))
def test_async_a_write_is_seen_by_the_next_read(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    shape: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)

    async def run() -> None:
        processes = []
        for _ in range(2):
            engine = create_async_engine(async_url(database_url))
            cache = Cache(url, namespace=namespace, **kw)
            factory = async_sessionmaker(engine)
            cache.attach(factory, cache_queries=FromCache(ttl=60))
            cache.attach(engine)
            tier = cache.inspector.local_tier
            if tier is not None:
                assert tier.wait_ready(WAIT)
            processes.append((cache, engine, factory))
        try:

            async def read(factory: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
                async with factory() as s:
                    return await async_snapshot(s)

            for _ in range(3):
                for _cache, _engine, factory in processes:
                    await read(factory)
            assert await read(processes[0][2]) == plain(blog)
            _, writer_engine, writer_factory = processes[1]
            await ASYNC_WRITES[shape](writer_factory, writer_engine)
            expected = plain(blog)
            assert await read(writer_factory) == expected
            assert await read(processes[0][2]) == expected
        finally:
            for cache, engine, _factory in processes:
                cache.detach()
                await cache.aclose()
                await engine.dispose()

    asyncio.run(run())


class Worker:
    """A process that only writes: its cache has its engine attached, no session factory."""

    def __init__(self, database_url: str, redis_url: str, namespace: str, **kw: Any) -> None:
        self.engine = sa.create_engine(database_url)
        self.cache = Cache(redis_url, namespace=namespace, **kw)
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.engine)

    def snapshot(self) -> dict[str, Any]:
        return plain(self.engine)

    def close(self) -> None:
        self.cache.detach()
        self.engine.dispose()


ENGINE_WRITES = [name for name in WRITES if name.endswith("_engine")]


@pytest.mark.parametrize("where", DEPLOYMENTS)
@pytest.mark.parametrize("shape", ENGINE_WRITES)
def test_a_worker_with_only_its_engine_attached(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    shape: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)
    reader = Process(database_url, url, namespace, **kw)
    worker = Worker(database_url, url, namespace, **kw)
    try:
        check(reader, worker, blog, WRITES[shape])  # type: ignore[arg-type]
    finally:
        reader.close()
        worker.close()


# --------------------------------------------------------------------------- statements


def bump_cte(*, from_cache: bool) -> Any:
    bump = update(Post).where(Post.id == 1).values(title=Post.title + "!").returning(Post.title)
    stmt = select(bump.cte())
    return stmt.options(FromCache()) if from_cache else stmt


def claim() -> Any:
    first = (
        select(Post.id)
        .where(Post.author_id == 1)
        .order_by(Post.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return select(Post).where(Post.id.in_(first))


CLOCK = select(sa.func.clock_timestamp()).select_from(Post).limit(1)
RANDOM = select(Post.id, sa.func.random()).where(Post.id == 1)
LISTED = select(Post).where(Post.title == sa.bindparam("t"))
FROM_UNION = select(Post).from_statement(
    select(Post).where(Post.id == 1).union(select(Post).where(Post.id == 2))
)


def statements_sync(factory: Callable[[], Session], blog: sa.Engine) -> None:
    expected = "p1"
    for from_cache in (False, False, False, True, True):
        expected += "!"
        with factory() as s:
            assert s.execute(bump_cte(from_cache=from_cache)).scalar_one() == expected
            s.commit()
    with factory() as s:
        assert len({s.scalar(CLOCK) for _ in range(3)}) == 3
        assert len({s.execute(RANDOM).one()[1] for _ in range(3)}) == 3
    for _ in range(3):
        with factory() as s:
            assert [p.id for p in s.scalars(LISTED, [{"t": "p2"}])] == [2]
            assert sorted(p.id for p in s.scalars(FROM_UNION)) == [1, 2]
            assert [p.id for p in s.scalars(claim())] == [1]
    with Session(blog) as holder:
        assert [p.id for p in holder.scalars(claim())] == [1]
        with factory() as s:
            assert [p.id for p in s.scalars(claim())] == [2]
        holder.rollback()


async def statements_async(factory: async_sessionmaker[AsyncSession], blog: sa.Engine) -> None:
    expected = "p1"
    for from_cache in (False, False, False, True, True):
        expected += "!"
        async with factory() as s:
            assert (await s.execute(bump_cte(from_cache=from_cache))).scalar_one() == expected
            await s.commit()
    async with factory() as s:
        assert len({await s.scalar(CLOCK) for _ in range(3)}) == 3
        assert len({(await s.execute(RANDOM)).one()[1] for _ in range(3)}) == 3
    for _ in range(3):
        async with factory() as s:
            assert [p.id for p in await s.scalars(LISTED, [{"t": "p2"}])] == [2]
            assert sorted(p.id for p in await s.scalars(FROM_UNION)) == [1, 2]
            assert [p.id for p in await s.scalars(claim())] == [1]
            expected += "!"
            assert (await s.execute(bump_cte(from_cache=False))).scalar_one() == expected
            await s.commit()
        async with factory() as s:
            streamed = await s.stream_scalars(select(Post.title).where(Post.id == 1))
            assert [t async for t in streamed] == [expected]
    with Session(blog) as holder:
        assert [p.id for p in holder.scalars(claim())] == [1]
        async with factory() as s:
            assert [p.id for p in await s.scalars(claim())] == [2]
        holder.rollback()


@pytest.mark.parametrize("where", DEPLOYMENTS[1:])
def test_statements_sync(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)
    p = Process(database_url, url, namespace, **kw)
    try:
        statements_sync(p.factory, blog)
    finally:
        p.close()


@pytest.mark.parametrize("where", DEPLOYMENTS)
def test_statements_async(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)

    async def run() -> None:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(url, namespace=namespace, **kw)
        factory = async_sessionmaker(engine)
        cache.attach(factory, cache_queries=FromCache(ttl=60))
        cache.attach(engine)
        try:
            await statements_async(factory, blog)
        finally:
            cache.detach()
            await cache.aclose()
            await engine.dispose()

    asyncio.run(run())


# --------------------------------------------------------------------------- invalidation


def foreign_write(blog: sa.Engine) -> None:
    """Another program's write: the cache hears nothing of it."""
    with blog.begin() as conn:
        conn.execute(text("UPDATE blog_posts SET author_id = 2, title = 'x' WHERE id = 1"))
        conn.execute(text("DELETE FROM blog_post_tags WHERE post_id = 1"))
        conn.execute(text("INSERT INTO blog_post_tags (post_id, tag_id) VALUES (2, 1)"))


def invalidate_each(c: Cache) -> None:
    c.invalidate(Post, 1)
    c.invalidate(Post, 2)
    c.invalidate_region("Author.posts")
    c.invalidate_region("Post.tags")
    c.invalidate_table("blog_post_tags")
    c.invalidate_model(Post)


def invalidate_model_and_table(c: Cache) -> None:
    c.invalidate_model(Post)
    c.invalidate_table("blog_post_tags")


INVALIDATIONS: dict[str, Callable[[Cache], Any]] = {
    "table": lambda c: c.invalidate_table("blog_posts", "blog_post_tags"),
    "model_and_table": invalidate_model_and_table,
    "clear": lambda c: c.clear(),
    "regions": invalidate_each,
}

AINVALIDATIONS: dict[str, Callable[[Cache], Any]] = {
    "table": lambda c: c.ainvalidate_table("blog_posts", "blog_post_tags"),
    "clear": lambda c: c.aclear(),
}


@pytest.mark.parametrize("where", DEPLOYMENTS[1:])
@pytest.mark.parametrize("how", list(INVALIDATIONS))
def test_an_invalidation_in_one_process_is_seen_by_the_other(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    how: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)
    with pair(Process, database_url, url, namespace, **kw) as (reader, writer):

        def write(factory: Callable[[], Session], engine: sa.Engine) -> None:
            foreign_write(blog)
            INVALIDATIONS[how](writer.cache)

        check(reader, writer, blog, write)


@pytest.mark.parametrize("where", DEPLOYMENTS)
@pytest.mark.parametrize("how", list(AINVALIDATIONS))
def test_an_awaited_invalidation_is_seen_by_the_other_process(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    how: str,
    where: str,
) -> None:
    url, kw = deployment(request, redis_url, where)
    with pair(Process, database_url, url, namespace, **kw) as (reader, writer):

        def write(factory: Callable[[], Session], engine: sa.Engine) -> None:
            foreign_write(blog)

            async def run() -> None:
                await AINVALIDATIONS[how](writer.cache)
                await writer.cache.aclose()

            asyncio.run(run())

        check(reader, writer, blog, write)


CLUSTER_LAYOUTS: dict[str, dict[str, Any]] = {
    "spread": {"cache_queries": FromCache(ttl=60, spread=True)},
    "group_assoc": {"slot_groups": {"rcblog": ["blog_post_tags"]}},
    "group_all": {"slot_groups": {"rcblog": ["blog_post_tags", "blog_posts", "blog_tags"]}},
    "spread_local": {"cache_queries": FromCache(ttl=60, spread=True), "local": True},
    "group_local": {"slot_groups": {"rcblog": ["blog_post_tags", "blog_tags"]}, "local": True},
}


class LaidOut(Process):
    def __init__(self, database_url: str, redis_url: str, namespace: str, **kw: Any) -> None:
        queries = kw.pop("cache_queries", FromCache(ttl=60))
        self.engine = sa.create_engine(database_url)
        self.cache = Cache(redis_url, namespace=namespace, **kw)
        self.factory = sessionmaker(self.engine)
        self.cache.attach(self.factory, cache_queries=queries)
        self.cache.attach(self.engine)
        tier = self.cache.inspector.local_tier
        if tier is not None:
            assert tier.wait_ready(WAIT)


@pytest.mark.parametrize("layout", list(CLUSTER_LAYOUTS))
@pytest.mark.parametrize("shape", list(WRITES))
def test_cluster_layouts_a_write_is_seen_by_the_next_read(
    blog: sa.Engine, database_url: str, redis_cluster: Any, namespace: str, shape: str, layout: str
) -> None:
    with pair(LaidOut, database_url, redis_cluster.url, namespace, **CLUSTER_LAYOUTS[layout]) as (
        reader,
        writer,
    ):
        check(reader, writer, blog, WRITES[shape])


# --------------------------------------------------------------------------- refresh


def unannounced_write(database_url: str) -> None:
    """A write on an engine no cache is attached to (another program's)."""
    other = sa.create_engine(database_url)
    try:
        with other.begin() as conn:
            conn.execute(text("DELETE FROM blog_post_tags WHERE post_id = 1 AND tag_id = 1"))
            conn.execute(text("UPDATE blog_posts SET author_id = 2 WHERE id = 2"))
    finally:
        other.dispose()


def fresh_collections(blog: sa.Engine) -> tuple[list[int], list[int]]:
    with Session(blog) as s:
        post, author = s.get(Post, 1), s.get(Author, 1)
        assert post is not None
        assert author is not None
        return [t.id for t in post.tags], [p.id for p in author.posts]


def refreshed_sync(factory: Callable[[], Session]) -> tuple[list[int], list[int]]:
    with factory() as s:
        post, author = s.get(Post, 1), s.get(Author, 1)
        assert post is not None
        assert author is not None
        s.refresh(post, ["tags"])
        s.refresh(author, ["posts"])
        return [t.id for t in post.tags], [p.id for p in author.posts]


@pytest.mark.parametrize("where", DEPLOYMENTS)
def test_a_refreshed_collection_is_read_from_the_database(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    where: str,
) -> None:
    """``session.refresh(post, ["tags"])`` loads the named collection at once, by a lazy
    load inside the refresh; the cache served it from the collection's entry, so a refresh
    asked for after another program's write gave back what the cache held."""
    url, kw = deployment(request, redis_url, where)
    p = Process(database_url, url, namespace, **kw)
    try:
        for _ in range(3):
            p.snapshot()
        unannounced_write(database_url)
        assert refreshed_sync(p.factory) == fresh_collections(blog) == ([2], [1])
    finally:
        p.close()


@pytest.mark.parametrize("where", DEPLOYMENTS)
def test_an_awaited_refresh_of_a_collection_is_read_from_the_database(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    where: str,
) -> None:
    """``await session.refresh(post, ["tags"])``, the asyncio way to load a collection
    again, was served from the cache as in a ``Session``."""
    url, kw = deployment(request, redis_url, where)

    async def run() -> tuple[list[int], list[int]]:
        engine = create_async_engine(async_url(database_url))
        cache = Cache(url, namespace=namespace, **kw)
        factory = async_sessionmaker(engine)
        cache.attach(factory, cache_queries=FromCache(ttl=60))
        tier = cache.inspector.local_tier
        if tier is not None:
            assert tier.wait_ready(WAIT)
        try:
            for _ in range(3):
                async with factory() as s:
                    await async_snapshot(s)
            unannounced_write(database_url)
            async with factory() as s:
                post, author = await s.get(Post, 1), await s.get(Author, 1)
                assert post is not None
                assert author is not None
                await s.refresh(post, ["tags"])
                await s.refresh(author, ["posts"])
                return [t.id for t in post.tags], [p.id for p in author.posts]
        finally:
            cache.detach()
            await cache.aclose()
            await engine.dispose()

    assert asyncio.run(run()) == fresh_collections(blog) == ([2], [1])


# --------------------------------------------------------------------------- invalidate_query

QUERIES: list[Any] = [
    select(Post.title).where(Post.id == 1),
    select(Post).where(Post.title.like("p%")).order_by(Post.id),
    select(Post.id, Tag.name).join(Post.tags).order_by(Post.id, Tag.id),
]


def read_queries(factory: Callable[[], Session]) -> list[Any]:
    with factory() as s:
        return [
            s.execute(QUERIES[0]).all(),
            [(p.id, p.title) for p in s.scalars(QUERIES[1])],
            s.execute(QUERIES[2]).all(),
        ]


def rename_everything(database_url: str) -> None:
    """Another program's write: every title and tag name changes."""
    other = sa.create_engine(database_url)
    try:
        with other.begin() as conn:
            conn.execute(text("UPDATE blog_posts SET title = title || '!'"))
            conn.execute(text("UPDATE blog_tags SET name = name || '!'"))
    finally:
        other.dispose()


@pytest.mark.parametrize("awaited", [False, True])
@pytest.mark.parametrize("where", [*DEPLOYMENTS, "cluster_spread"])
def test_invalidate_query_retires_what_cache_queries_cached(
    request: pytest.FixtureRequest,
    blog: sa.Engine,
    database_url: str,
    redis_url: str,
    namespace: str,
    where: str,
    awaited: bool,
) -> None:
    """``cache.invalidate_query(stmt)`` ("the ``FromCache`` option does not matter: the
    statement is matched with or without it") found nothing ``cache_queries`` had cached:
    a statement without options had another digest than the same statement with
    ``FromCache()`` (whose key holds an empty options list), so the call returned 0 and
    the next read served what another program's write had replaced."""
    url, kw = deployment(request, redis_url, where)
    if where == "cluster_spread":
        kw["cache_queries"] = FromCache(ttl=60, spread=True)
    with pair(LaidOut, database_url, url, namespace, **kw) as (reader, writer):
        for _ in range(3):
            read_queries(reader.factory)
        rename_everything(database_url)
        if awaited:

            async def retire() -> list[int]:
                try:
                    return [await writer.cache.ainvalidate_query(q) for q in QUERIES]
                finally:
                    await writer.cache.aclose()

            retired = asyncio.run(retire())
        else:
            retired = [writer.cache.invalidate_query(q) for q in QUERIES]
        assert retired == [1, 1, 1]
        assert read_queries(reader.factory) == read_queries(sessionmaker(blog))
