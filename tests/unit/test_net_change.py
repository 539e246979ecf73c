"""``compat.has_net_change`` says what ``Session.is_modified`` says, for every kind of
change a flush can see (it looks only at the attributes that recorded a change)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    deferred,
    mapped_column,
    relationship,
)

from sa_redis_cache import compat

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


class _Base(DeclarativeBase):
    pass


class Parent(_Base):
    __tablename__ = "net_parent"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(20))
    note: Mapped[str] = deferred(mapped_column(sa.String(20), default="n"))
    children: Mapped[list[Child]] = relationship(back_populates="parent")


class Child(_Base):
    __tablename__ = "net_child"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("net_parent.id"))
    parent: Mapped[Parent | None] = relationship(back_populates="children")


@pytest.fixture
def session() -> Iterator[Session]:
    engine = sa.create_engine("sqlite://")
    _Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Parent(id=1, name="a"), Parent(id=2, name="b")])
        s.add_all([Child(id=1, parent_id=1), Child(id=2, parent_id=1), Child(id=3, parent_id=2)])
        s.commit()
    with Session(engine) as s:
        yield s
    engine.dispose()


def _load(s: Session) -> tuple[Parent, Parent, Child, Child]:
    return s.get_one(Parent, 1), s.get_one(Parent, 2), s.get_one(Child, 1), s.get_one(Child, 3)


def _same_name(p: Parent) -> None:
    p.name = p.name


def _changed_back(p: Parent) -> None:
    p.name = "x"
    p.name = "a"


def _expired_then_set(p: Parent, s: Session) -> None:
    s.expire(p, ["name"])
    p.name = "y"


CHANGES: dict[str, Callable[[Session, Parent, Parent, Child, Child], None]] = {
    "nothing": lambda s, p1, p2, c1, c3: None,
    "scalar": lambda s, p1, p2, c1, c3: setattr(p1, "name", "z"),
    "scalar_to_itself": lambda s, p1, p2, c1, c3: _same_name(p1),
    "scalar_changed_back": lambda s, p1, p2, c1, c3: _changed_back(p1),
    "expired_then_set": lambda s, p1, p2, c1, c3: _expired_then_set(p1, s),
    "deferred_set": lambda s, p1, p2, c1, c3: setattr(p1, "note", "m"),
    "many_to_one_unloaded_collections": lambda s, p1, p2, c1, c3: setattr(c1, "parent", p2),
    "many_to_one_to_none": lambda s, p1, p2, c1, c3: setattr(c3, "parent", None),
    "loaded_collection_append": lambda s, p1, p2, c1, c3: (
        p2.children.append(c1) if p2.children is not None else None
    ),
    "loaded_collection_remove": lambda s, p1, p2, c1, c3: p1.children.remove(c1),
    "fk_column": lambda s, p1, p2, c1, c3: setattr(c3, "parent_id", 1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_has_net_change_agrees_with_is_modified(session: Session, change: str) -> None:
    p1, p2, c1, c3 = _load(session)
    CHANGES[change](session, p1, p2, c1, c3)
    objects = list(session.identity_map.values())
    ours = [compat.has_net_change(sa.inspect(obj)) for obj in objects]
    theirs = [session.is_modified(obj) for obj in objects]
    assert ours == theirs
    assert any(ours) == (change not in {"nothing", "scalar_to_itself", "scalar_changed_back"})
