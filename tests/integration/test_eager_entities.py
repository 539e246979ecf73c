"""``session.get`` of a model whose relationships the mapper loads eagerly
(``relationship(lazy="selectin")``, ``"joined"``): served from the entity cache, with those
relationships loaded after the object is built, through their own cached reads, as the
database load would have them (docs/decisions.md, "The entity cache and eager
relationships").

The database (a plain session) is the oracle; each read is compared after the session
closed, where an unloaded relationship would raise ``DetachedInstanceError``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from sa_redis_cache import Cache, CachePolicy
from tests.modes import async_url
from tests.support import TierWorld, close_cache_and_engine

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@dataclass
class Models:
    """The private models of this module (``eag_*`` tables)."""

    shelf: Any
    book: Any
    author: Any
    note: Any
    gadget: Any


@pytest.fixture(scope="module")
def models(engine: sa.Engine) -> Iterator[Models]:
    """A shelf loading its books with ``selectin``, a note loading its author ``joined``
    (their targets load nothing eagerly), and a gadget whose part is an inner join."""

    class Base(DeclarativeBase):
        pass

    class EagShelf(Base):
        __tablename__ = "eag_shelf"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40))
        books: Mapped[list[EagBook]] = relationship(
            lazy="selectin", order_by="EagBook.id", back_populates="shelf"
        )

    class EagBook(Base):
        __tablename__ = "eag_book"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        shelf_id: Mapped[int] = mapped_column(ForeignKey("eag_shelf.id"))
        title: Mapped[str] = mapped_column(String(40))
        shelf: Mapped[EagShelf] = relationship(back_populates="books")

    class EagAuthor(Base):
        __tablename__ = "eag_author"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(40))

    class EagNote(Base):
        __tablename__ = "eag_note"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        author_id: Mapped[int | None] = mapped_column(ForeignKey("eag_author.id"))
        text: Mapped[str] = mapped_column(String(40))
        author: Mapped[EagAuthor | None] = relationship(lazy="joined")

    class EagGadget(Base):
        __tablename__ = "eag_gadget"
        __cache__ = CachePolicy(ttl=600)
        id: Mapped[int] = mapped_column(primary_key=True)
        part_id: Mapped[int | None] = mapped_column(ForeignKey("eag_author.id"))
        # a load joins the part with an INNER JOIN: a gadget without one is not found
        part: Mapped[EagAuthor | None] = relationship(lazy="joined", innerjoin=True)

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([EagShelf(id=1, name="s1"), EagShelf(id=2, name="empty")])
        s.add_all([EagAuthor(id=1, name="ann"), EagAuthor(id=2, name="bob")])
        s.flush()
        s.add_all(EagBook(id=i, shelf_id=1, title=f"b{i}") for i in (1, 2))
        s.add_all([EagNote(id=1, author_id=1, text="n1"), EagNote(id=2, text="orphan")])
        s.add_all([EagGadget(id=1, part_id=1), EagGadget(id=2)])
        s.commit()
    try:
        yield Models(EagShelf, EagBook, EagAuthor, EagNote, EagGadget)
    finally:
        Base.metadata.drop_all(engine)
        Base.registry.dispose()


@dataclass
class World(TierWorld):
    """A :class:`TierWorld` serving the module's models."""

    m: Models


@pytest.fixture
def w(models: Models, tiered: TierWorld) -> World:
    """Hits of the Redis tier, or of the local tier (``Cache(local=True)``)."""
    t = tiered
    return World(t.cache, t.cached, t.plain, t.sql, t.local, models)


def shelf_and_books(m: Models, pk: int) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        shelf = s.get_one(m.shelf, pk)
        s.expunge_all()  # what the get loaded is all there is
        return shelf.name, [(b.id, b.title) for b in shelf.books]

    return read


def note_and_author(m: Models, pk: int) -> Callable[[Session], Any]:
    def read(s: Session) -> Any:
        note = s.get_one(m.note, pk)
        s.expunge_all()
        return note.text, None if note.author is None else note.author.name

    return read


def test_a_get_hit_loads_a_selectin_collection_without_reading_the_parents_row(w: World) -> None:
    read = shelf_and_books(w.m, 1)
    w.agree(read)
    w.agree(read)  # the collection's own cached read is filled
    w.sql.reset()
    assert w.agree(read) == ("s1", [(1, "b1"), (2, "b2")])
    # the plain session's read is the only one: one SELECT of the shelf, one of its books
    assert (w.selects_of("eag_shelf"), w.selects_of("eag_book")) == (1, 1)
    assert w.agree(shelf_and_books(w.m, 2)) == ("empty", [])


def test_a_get_hit_loads_a_joined_many_to_one_and_none(w: World) -> None:
    for _ in range(3):
        w.sql.reset()
        assert w.agree(note_and_author(w.m, 1)) == ("n1", "ann")
        assert w.agree(note_and_author(w.m, 2)) == ("orphan", None)
    # the last round's cached reads (the note and its author) sent nothing
    assert w.selects_of("eag_note") == 2


def test_the_eager_relationships_of_a_hit_follow_their_targets_writes(w: World) -> None:
    m = w.m
    books, author = shelf_and_books(m, 1), note_and_author(m, 1)
    for _ in range(2):
        w.agree(books)
        w.agree(author)
    with w.cached() as s:  # through the ORM
        s.get_one(m.author, 1).name = "ann2"
        s.add(m.book(id=3, shelf_id=1, title="b3"))
        s.commit()
    assert w.agree(books) == ("s1", [(1, "b1"), (2, "b2"), (3, "b3")])
    assert w.agree(author) == ("n1", "ann2")
    with w.plain() as s, s.begin():  # past the ORM: Core
        s.execute(sa.update(m.book.__table__).where(m.book.__table__.c.id == 1).values(title="x"))
        s.execute(sa.update(m.note.__table__).values(author_id=2).where(m.note.id == 1))
    assert w.agree(books) == ("s1", [(1, "x"), (2, "b2"), (3, "b3")])
    assert w.agree(author) == ("n1", "bob")
    with w.plain() as s, s.begin():  # back as the module's other tests expect them
        s.execute(sa.delete(m.book.__table__).where(m.book.__table__.c.id == 3))
        s.execute(sa.update(m.book.__table__).where(m.book.__table__.c.id == 1).values(title="b1"))
        s.execute(sa.update(m.author.__table__).where(m.author.id == 1).values(name="ann"))
        s.execute(sa.update(m.note.__table__).values(author_id=1).where(m.note.id == 1))


def test_an_inner_joined_relationship_keeps_the_model_out_of_the_entity_cache(w: World) -> None:
    m = w.m
    assert not w.cache.inspector.model(m.gadget).entity_cached
    assert w.cache.inspector.model(m.shelf).entity_cached
    assert w.cache.inspector.model(m.note).entity_cached
    for _ in range(3):  # a gadget without its part is no object to a primary-key load
        assert w.agree(lambda s: s.get(m.gadget, 2)) is None
        assert w.agree(lambda s: s.get_one(m.gadget, 1).part.name) == "ann"


def test_an_asyncio_get_hit_needs_no_lazy_load_afterwards(
    w: World, database_url: str, redis_url: str
) -> None:
    m = w.m

    async def run() -> list[Any]:
        engine = create_async_engine(async_url(database_url))
        factory = async_sessionmaker(engine)
        cache = Cache(redis_url, namespace=w.cache.namespace)
        cache.attach(factory)
        seen = []
        try:
            for _ in range(3):  # a miss, then hits
                async with factory() as s:
                    shelf = await s.get_one(m.shelf, 1)
                    note = await s.get_one(m.note, 1)
                # outside the session, no await: loaded or it raises
                seen.append(([b.title for b in shelf.books], note.author.name))
        finally:
            await close_cache_and_engine(cache, engine)
        return seen

    assert asyncio.run(run()) == [(["b1", "b2"], "ann")] * 3
