"""A small blog schema of the review tests: authors, their posts (one-to-many) and the
posts' tags (many-to-many, through ``blog_post_tags``), each model cached, and a
procedure that writes two of its tables where no statement names them.

``blog_schema(engine)`` makes and seeds it, and drops it after::

    with blog_schema(engine):
        ...
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from sqlalchemy import Column, ForeignKey, String, Table, text
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from sa_redis_cache import CachePolicy

if TYPE_CHECKING:
    from collections.abc import Iterator

    import sqlalchemy as sa

# moves post 1 to author 2 and drops its tags: a CALL holds no table's name
MOVE_POST = "CALL blog_move_post()"


class Base(AsyncAttrs, DeclarativeBase):
    pass


post_tags = Table(
    "blog_post_tags",
    Base.metadata,
    Column("post_id", ForeignKey("blog_posts.id"), primary_key=True),
    Column("tag_id", ForeignKey("blog_tags.id"), primary_key=True),
)


class Author(Base):
    __tablename__ = "blog_authors"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(Base):
    __tablename__ = "blog_posts"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(40))
    author_id: Mapped[int] = mapped_column(ForeignKey("blog_authors.id"))
    author: Mapped[Author] = relationship(back_populates="posts")
    tags: Mapped[list[Tag]] = relationship(secondary=post_tags, order_by="Tag.id")


class Tag(Base):
    __tablename__ = "blog_tags"
    __cache__ = CachePolicy()

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@contextmanager
def blog_schema(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The schema on ``engine``'s database, seeded: author 1 with posts 1 (tags 1, 2) and
    2 (tag 3), author 2 with post 3 (tag 1); and the procedure :data:`MOVE_POST` calls."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        tags = [Tag(id=i, name=f"t{i}") for i in (1, 2, 3)]
        s.add_all(
            [
                Author(
                    id=1,
                    name="a",
                    posts=[
                        Post(id=1, title="p1", tags=[tags[0], tags[1]]),
                        Post(id=2, title="p2", tags=[tags[2]]),
                    ],
                ),
                Author(id=2, name="b", posts=[Post(id=3, title="p3", tags=[tags[0]])]),
            ]
        )
        s.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE PROCEDURE blog_move_post() LANGUAGE sql AS $$ "
                "UPDATE blog_posts SET author_id = 2 WHERE id = 1; "
                "DELETE FROM blog_post_tags WHERE post_id = 1 $$"
            )
        )
    try:
        yield engine
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP PROCEDURE IF EXISTS blog_move_post()"))
        Base.metadata.drop_all(engine)
