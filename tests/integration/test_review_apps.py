"""The cache as applications use it, each cached read checked against the same read on a
plain session (the oracle) after each write.

Faults found by the review of the integrations (docs/integrations.md), one section each:

- a data-modifying CTE (``select(update(...).returning(...).cte())``) was taken for a
  read: ``cache_queries`` served its second execution without running the write, and
  the tables it wrote were never retired;
- ``cache.attach(async_engine)`` (and ``cache.lifespan()`` given one) was refused;
- ``select(Model).from_statement(select(...))`` raised ``AttributeError`` in every
  attached session;
- a ``FOR UPDATE`` in a subquery (the ``SKIP LOCKED`` job claim) was cached: a hit took
  no lock;
- ``session.execute(stmt, [{...}])`` raised ``AttributeError`` for a cached select;
- ``text("CALL proc()")`` retired nothing;
- ``cache_queries`` froze selects that read the clock (``now()``) or ``random()``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from sa_redis_cache import Cache, FromCache
from tests.blog import MOVE_POST, Author, Post, blog_schema, post_tags

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@pytest.fixture
def blog(shop_engine: sa.Engine) -> Iterator[sa.Engine]:
    with blog_schema(shop_engine) as engine:
        yield engine


@pytest.fixture
def app(blog: sa.Engine, cache: Cache) -> Iterator[sessionmaker[Session]]:
    """The application's factory, every select cached, and its engine attached."""
    factory = sessionmaker(blog)
    cache.attach(factory, cache_queries=FromCache(ttl=60))
    cache.attach(blog)
    yield factory
    cache.detach()


def snapshot(session: Session) -> dict[str, Any]:
    """What an application reads: rows by key, lazy collections of both kinds, queries."""
    out: dict[str, Any] = {}
    for aid in (1, 2):
        author = session.get(Author, aid)
        out[f"author{aid}"] = author and author.name
        out[f"author{aid}.posts"] = author and [(p.id, p.title) for p in author.posts]
    for pid in (1, 2, 3):
        post = session.get(Post, pid)
        out[f"post{pid}"] = post and (post.title, post.author_id)
        out[f"post{pid}.tags"] = post and [t.id for t in post.tags]
    out["posts"] = [(p.id, p.title, p.author_id) for p in session.scalars(select(Post))]
    out["titles"] = session.execute(select(Post.id, Post.title).order_by(Post.id)).all()
    return out


def agrees_after(
    factory: sessionmaker[Session], engine: sa.Engine, write: Callable[[], None]
) -> None:
    """Warm the cache, write, and compare the cached reads with a plain session's."""
    for _ in range(3):  # a miss, a fill, then hits
        with factory() as s:
            snapshot(s)
    write()
    with factory() as s:
        cached = snapshot(s)
    with Session(engine) as plain:
        assert cached == snapshot(plain)


# --------------------------------------------------------------------------- writing CTEs


def test_a_select_of_a_writing_cte_runs_its_write_every_time(
    app: sessionmaker[Session], blog: sa.Engine
) -> None:
    """``cache_queries`` took ``select(update(...).returning(...).cte())`` for a read: its
    second execution was a hit, and the UPDATE never ran again."""
    for expected in ("p1!", "p1!!", "p1!!!"):
        with app() as s:
            bump = (
                update(Post)
                .where(Post.id == 1)
                .values(title=Post.title + "!")
                .returning(Post.title)
                .cte()
            )
            assert s.execute(select(bump)).scalar_one() == expected
            s.commit()
    for expected in ("p1!!!!", "p1!!!!!"):  # its own FromCache does not make it a read
        with app() as s:
            bump = (
                update(Post)
                .where(Post.id == 1)
                .values(title=Post.title + "!")
                .returning(Post.title)
                .cte()
            )
            assert s.execute(select(bump).options(FromCache())).scalar_one() == expected
            s.commit()
    with Session(blog) as plain:
        assert plain.get(Post, 1).title == "p1!!!!!"  # type: ignore[union-attr]


@pytest.mark.parametrize("through", ["session", "engine"])
@pytest.mark.parametrize("kind", ["update", "insert_secondary", "delete_secondary"])
def test_a_writing_cte_retires_what_it_wrote(
    app: sessionmaker[Session], blog: sa.Engine, through: str, kind: str
) -> None:
    """The engine listener saw a SELECT and retired nothing: the rows, queries and
    collections the CTE wrote were served as they were before it."""
    statements: dict[str, Any] = {
        "update": lambda: (
            update(Post).where(Post.id == 1).values(author_id=2, title="moved").returning(Post.id)
        ),
        "insert_secondary": lambda: (
            insert(post_tags).values(post_id=3, tag_id=3).returning(post_tags.c.post_id)
        ),
        "delete_secondary": lambda: (
            delete(post_tags).where(post_tags.c.tag_id == 1).returning(post_tags.c.post_id)
        ),
    }

    def write() -> None:
        stmt = select(statements[kind]().cte())
        if through == "session":
            with app() as s:
                s.execute(stmt).all()
                s.commit()
        else:
            with blog.begin() as conn:
                conn.execute(stmt).all()

    agrees_after(app, blog, write)


# --------------------------------------------------------------------------- async engines


def test_an_async_engine_attached_alone_invalidates_its_core_writes(
    blog: sa.Engine, cache: Cache
) -> None:
    """``cache.attach(async_engine)`` (docs: "attach the engines Core or text() writes
    go through") was refused as "not a session factory"; so was ``cache.lifespan()``
    given one. An async worker writing through Core then went unseen."""
    factory = sessionmaker(blog)  # the application's reads
    cache.attach(factory, cache_queries=FromCache(ttl=60))
    async_engine = create_async_engine(blog.url)
    cache.attach(async_engine)  # the worker's writes

    def titles() -> list[str]:
        with factory() as s:
            post = s.get(Post, 1)
            assert post is not None
            author = s.get(Author, 1)
            assert author is not None
            return [post.title, *(p.title for p in author.posts)]

    async def write(title: str) -> None:
        async with async_engine.begin() as conn:
            await conn.execute(update(Post).where(Post.id == 1).values(title=title))

    try:
        assert titles() == titles() == ["p1", "p1", "p2"]
        asyncio.run(write("from the worker"))
        assert titles() == ["from the worker", "from the worker", "p2"]
    finally:
        cache.detach()
        asyncio.run(async_engine.dispose())


def test_the_lifespan_attaches_an_async_engine(blog: sa.Engine, cache: Cache) -> None:
    factory = sessionmaker(blog)
    async_engine = create_async_engine(blog.url)

    async def run() -> str:
        async with cache.lifespan(factory, async_engine, cache_queries=True)(None):
            with factory() as s:
                assert s.scalars(select(Post.title).where(Post.id == 2)).one() == "p2"
            async with async_engine.begin() as conn:
                await conn.execute(text("UPDATE blog_posts SET title = 'async' WHERE id = 2"))
            with factory() as s:
                return s.scalars(select(Post.title).where(Post.id == 2)).one()

    try:
        assert asyncio.run(run()) == "async"
    finally:
        asyncio.run(async_engine.dispose())


# --------------------------------------------------------------------------- from_statement


@pytest.mark.parametrize("cache_queries", [None, True])
def test_from_statement_of_a_select_or_a_union_reads_as_uncached(
    blog: sa.Engine, cache: Cache, cache_queries: bool | None
) -> None:
    """``select(Model).from_statement(select(...))`` (or of a ``UNION``) names its model
    like a primary-key load: the entity cache looked for a WHERE criterion it does not
    have and raised ``AttributeError`` in every attached session."""
    factory = sessionmaker(blog)
    cache.attach(factory, cache_queries=cache_queries)
    one = select(Post).where(Post.id == 1)
    statements = [
        select(Post).from_statement(one),
        select(Post).from_statement(one.union(select(Post).where(Post.id == 2))),
        select(Post).from_statement(
            sa.union_all(
                select(Post.__table__).where(Post.id == 2),
                select(Post.__table__).where(Post.id == 3),
            )
        ),
    ]
    for stmt in statements:
        with factory() as s, Session(blog) as plain:
            assert [p.id for p in s.scalars(stmt)] == [p.id for p in plain.scalars(stmt)]


# --------------------------------------------------------------------------- locking


def test_a_skip_locked_claim_in_a_subquery_is_never_served_from_the_cache(
    app: sessionmaker[Session], blog: sa.Engine
) -> None:
    """The job-queue claim ``WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` was cached
    by ``cache_queries`` (only a top-level ``with_for_update()`` was recognised): a hit
    took no lock and handed a second worker the row the first one holds."""

    def claim() -> Any:
        first = (
            select(Post.id)
            .where(Post.author_id == 1)
            .order_by(Post.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        return select(Post).where(Post.id.in_(first))

    for _ in range(2):
        with app() as s:
            assert [p.id for p in s.scalars(claim())] == [1]
    with Session(blog) as worker:
        assert [p.id for p in worker.scalars(claim())] == [1]  # holds post 1
        with Session(blog) as plain:
            expected = [p.id for p in plain.scalars(claim())]
        assert expected == [2]
        with app() as s:
            assert [p.id for p in s.scalars(claim())] == expected
        worker.rollback()


def test_from_statement_of_a_locking_select_takes_its_lock_with_from_cache(
    app: sessionmaker[Session], blog: sa.Engine
) -> None:
    """A statement's own ``FromCache`` on ``from_statement(select(...).with_for_update())``
    served a hit that locked nothing."""
    locking = select(Post).from_statement(select(Post).where(Post.id == 1).with_for_update())
    for _ in range(3):  # a miss, a fill, then what would be a hit
        with app() as s:
            assert [p.id for p in s.scalars(locking.options(FromCache()))] == [1]
            # the row is locked by s: another transaction cannot take it at once
            with (
                blog.connect() as other,
                pytest.raises(sa.exc.OperationalError, match="could not obtain lock"),
            ):
                other.execute(select(Post.id).where(Post.id == 1).with_for_update(nowait=True))
            s.rollback()


# --------------------------------------------------------------------------- parameters


def test_a_select_given_a_list_of_parameter_sets_runs_as_uncached(
    app: sessionmaker[Session], blog: sa.Engine
) -> None:
    """``session.execute(stmt, [{"i": 1}])`` (parameters as a list, as for DML) raised
    ``AttributeError`` in the key builder for every cached select."""
    stmt = select(Post).where(Post.title == sa.bindparam("t"))
    for _ in range(2):
        with app() as s, Session(blog) as plain:
            got = [p.id for p in s.scalars(stmt, [{"t": "p2"}])]
            assert got == [p.id for p in plain.scalars(stmt, [{"t": "p2"}])] == [2]


# --------------------------------------------------------------------------- procedures


@pytest.fixture
def procedure(blog: sa.Engine) -> str:
    """A procedure that moves post 1 to author 2 and drops its tags (tests/blog.py)."""
    return MOVE_POST


@pytest.mark.parametrize("through", ["session", "engine"])
def test_a_procedure_call_retires_what_it_may_have_written(
    app: sessionmaker[Session], blog: sa.Engine, procedure: str, through: str
) -> None:
    """``text("CALL ...")`` holds no DML word, so it was taken for a statement that
    writes nothing: the rows, queries and collections the procedure wrote were served as
    before."""

    def write() -> None:
        if through == "session":
            with app() as s:
                s.execute(text(procedure))
                s.commit()
        else:
            with blog.begin() as conn:
                conn.execute(text(procedure))

    agrees_after(app, blog, write)


# --------------------------------------------------------------------------- the clock


def test_cache_queries_leaves_selects_that_read_the_clock_to_the_database(
    app: sessionmaker[Session], blog: sa.Engine
) -> None:
    """``cache_queries`` cached ``WHERE expires_at > now()`` as any select: the clock moves
    with no write, so the answer froze for the TTL (an expired token kept being found).
    A statement's own ``FromCache`` still caches it: that is the application's choice."""
    clock = select(sa.func.clock_timestamp()).select_from(Post).limit(1)
    with app() as s:
        seen = {s.scalar(clock) for _ in range(3)}
    assert len(seen) == 3  # each read asked the database
    random = select(Post.id, sa.func.random()).where(Post.id == 1)
    with app() as s:
        assert len({s.execute(random).one()[1] for _ in range(3)}) == 3
    chosen = clock.options(FromCache())
    with app() as s:
        assert len({s.scalar(chosen) for _ in range(6)}) < 6  # served from its entry
