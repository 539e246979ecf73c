"""``cache.attach()``: which session factories it takes, and the models it refuses.

``attach()`` checks every mapper of every declarative registry in the process, so the
models these tests define live in a declarative base of their own, made inside the test,
whose registry is disposed of before the test ends (:func:`private_base`): otherwise a
deliberately broken model would break every later ``attach()`` of the run.
"""

from __future__ import annotations

import asyncio
import gc
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
import redis as redis_lib
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy import Integer, String, select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.declarative import DeferredReflection
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from examples.shop import Product
from sa_redis_cache import Cache, CachePolicy, ConfigurationError, FromCache
from sa_redis_cache.models import all_mappers

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support import SQLCounter


@contextmanager
def private_base() -> Iterator[type[DeclarativeBase]]:
    """A declarative base for models local to one test, disposed of afterwards."""

    class Base(DeclarativeBase):
        pass

    def subclasses(cls: type) -> set[type]:
        found: set[type] = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    try:
        yield Base
    finally:
        registry = Base.registry
        defined = subclasses(Base)
        registry.dispose()
        assert not registry.mappers
        assert not [m for m in all_mappers() if m.class_ in defined]
        del Base, defined
        gc.collect()


def refusal(cache: Cache, target: Any = None) -> str:
    """The message of the ConfigurationError that ``attach`` raises; checks nothing attached."""
    factory = target if target is not None else sessionmaker()
    with pytest.raises(ConfigurationError) as info:
        cache.attach(factory)
    if isinstance(factory, sessionmaker):
        assert not sa.event.contains(factory, "do_orm_execute", cache._hooks.do_orm_execute)
    return str(info.value)


def define(base: type[DeclarativeBase], name: str, policy: Any, **extra: Any) -> type:
    """A mapped class ``name`` with ``__cache__ = policy`` on table ``name.lower()``.

    Keep a reference to it: a registry holds its classes weakly, so an unreferenced
    class can vanish (and escape the check) before ``attach()`` runs.
    """
    namespace: dict[str, Any] = {
        "__tablename__": f"attach_{name.lower()}",
        "__cache__": policy,
        "__annotations__": {"id": Mapped[int]},
        "id": mapped_column(Integer, primary_key=True),
        **extra,
    }
    return type(name, (base,), namespace)


# -- refused models ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "problem", "fix"),
    [
        # wrong on purpose: a mistyped strategy is refused with a clear message
        (CachePolicy(strategy="write_around"), "strategy='write_around'", "pick one of those"),  # type: ignore[arg-type]
        (CachePolicy(strategy="Write_Through"), "strategy='Write_Through'", "'write_through'"),  # type: ignore[arg-type]
        (CachePolicy(ttl=0), "ttl=0 is not a positive", "give ttl a value > 0"),
        (CachePolicy(ttl=-5), "ttl=-5 is not a positive", "give ttl a value > 0"),
        (CachePolicy(ttl=True), "ttl=True is not a positive", "give ttl a value > 0"),
        (CachePolicy(ttl=float("inf")), "ttl=inf is not a positive", "give ttl a value > 0"),
        (CachePolicy(ttl="60"), "ttl='60' is not a positive", "give ttl a value > 0"),  # type: ignore[arg-type]
        (CachePolicy(entity_cache="no"), "entity_cache='no' is not a bool", "entity_cache=True"),  # type: ignore[arg-type]
        ({"ttl": 60}, "__cache__ is {'ttl': 60}, not a CachePolicy", "__cache__ = CachePolicy("),
        ("write_through", "not a CachePolicy", "__cache__ = CachePolicy("),
        (CachePolicy, "not a CachePolicy", "__cache__ = CachePolicy("),  # forgot the ()
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_policy_is_refused(fresh_cache: Cache, policy: Any, problem: str, fix: str) -> None:
    with private_base() as base:
        gadget = define(base, "Gadget", policy)
        message = refusal(fresh_cache)
        del gadget
    assert "Gadget" in message
    assert problem in message
    assert fix in message


def test_every_refused_model_is_reported_at_once(fresh_cache: Cache) -> None:
    with private_base() as base:
        models = [
            define(base, "Widget", CachePolicy(ttl=-1)),
            define(base, "Sprocket", CachePolicy(strategy="nope")),  # type: ignore[arg-type]
            define(base, "Fine", CachePolicy(ttl=5)),
        ]
        message = refusal(fresh_cache)
        del models
    assert "Widget: ttl=-1" in message
    assert "Sprocket: strategy='nope'" in message
    assert "Fine" not in message


def test_policy_inherited_from_a_mixin_is_checked_on_the_mapped_class(fresh_cache: Cache) -> None:
    class CachedMixin:
        __cache__ = CachePolicy(ttl=-1)

    with private_base() as base:
        gizmo = type(
            "Gizmo",
            (CachedMixin, base),
            {
                "__tablename__": "attach_gizmo",
                "__annotations__": {"id": Mapped[int]},
                "id": mapped_column(Integer, primary_key=True),
            },
        )
        message = refusal(fresh_cache)
        del gizmo
    assert "Gizmo: ttl=-1" in message


def test_abstract_class_with_a_policy_is_accepted(fresh_cache: Cache) -> None:
    with private_base() as base:

        class Cached(base):  # type: ignore[valid-type,misc]
            __abstract__ = True
            __cache__ = CachePolicy(strategy="write_through", ttl=30)

        thing = define(Cached, "Thing", CachePolicy(ttl=-30))
        # the subclass's own policy is checked; the abstract one is not a problem
        message = refusal(fresh_cache)
        assert "Thing: ttl=-30" in message
        assert "Cached" not in message.replace("cache.attach", "")
        setattr(thing, "__cache__", Cached.__cache__)  # noqa: B010
        fresh_cache.attach(sessionmaker())


def test_deferred_reflection_class_before_prepare_is_refused(
    fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter
) -> None:
    """The realistic unmapped class with a policy: DeferredReflection waits for prepare()."""
    with private_base() as base:

        class Reflected(DeferredReflection):
            __abstract__ = True

        class ReflectedCategory(Reflected, base):  # type: ignore[valid-type,misc]
            __tablename__ = "categories"
            __cache__ = CachePolicy(ttl=60)

        message = refusal(fresh_cache)
        assert "ReflectedCategory" in message
        assert "not mapped" in message
        assert "prepare(" in message

        Reflected.prepare(shop_engine)
        factory = sessionmaker(shop_engine)
        fresh_cache.attach(factory)
        for expected_sql in (1, 0):
            sql.reset()
            with factory() as s:
                s.get(ReflectedCategory, 1)
            assert sql.count == expected_sql


def failed_class(base: type[DeclarativeBase], name: str, namespace: dict[str, Any]) -> type:
    """Define a class that SQLAlchemy refuses to map (no table); return what remains of it.

    The registry keeps the half-made class (weakly) until the garbage collector finds it:
    the collector is paused so that the returned reference keeps it there deterministically.
    """
    gc.disable()
    try:
        with pytest.raises(InvalidRequestError, match="does not have a __table__"):
            type(name, (base,), namespace)
        (residue,) = [c for c in base.__subclasses__() if c.__name__ == name]
    finally:
        gc.enable()
    assert sa.inspect(residue, raiseerr=False) is None
    with pytest.raises(sa.orm.exc.UnmappedClassError):
        base.registry.mappers  # noqa: B018  # SQLAlchemy's own listing fails on it
    return residue


def test_a_class_whose_mapping_failed_does_not_break_attach(fresh_cache: Cache) -> None:
    """SQLAlchemy keeps a half-made class in the registry when mapping raises; attach()
    must still work (without a policy) or refuse it clearly (with one)."""
    with private_base() as base:
        residue = failed_class(base, "NoTable", {"__annotations__": {"name": Mapped[str]}})
        fresh_cache.attach(sessionmaker())
        del residue

    with private_base() as base:
        residue = failed_class(base, "NoTableCached", {"__cache__": CachePolicy(ttl=60)})
        message = refusal(fresh_cache)
        assert "NoTableCached" in message
        assert "not mapped" in message
        del residue


def test_refused_attach_leaves_the_factory_uncached(
    fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter
) -> None:
    factory = sessionmaker(shop_engine)
    with private_base() as base:
        broken = define(base, "Broken", CachePolicy(ttl=0))
        refusal(fresh_cache, factory)
        del broken
    stmt = select(Product).where(Product.id == 1).options(FromCache())
    sql.reset()
    for _ in range(2):
        with factory() as s:
            s.scalars(stmt).one()
    assert sql.count == 2
    assert fresh_cache.stats()["regions"] == {}


# -- session factories ----------------------------------------------------------------


class NotAFactory:
    pass


@pytest.mark.parametrize(
    "target",
    [None, "sessionmaker", 42, NotAFactory, NotAFactory(), lambda: Session(), Session()],  # noqa: PLW0108
    ids=["None", "str", "int", "class", "instance", "function", "session_instance"],
)
def test_attach_refuses_what_is_not_a_session_factory(fresh_cache: Cache, target: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        fresh_cache.attach(target)
    message = str(info.value)
    assert repr(target) in message
    assert "pass a sessionmaker, a Session subclass" in message


def hit_after_miss(factory: Any, sql: SQLCounter) -> list[int]:
    """SQL statements of two runs of one FromCache query (expected: [1, 0])."""
    stmt = select(Product).where(Product.id == 2).options(FromCache())
    counts = []
    for _ in range(2):
        sql.reset()
        with factory() as s:
            assert s.scalars(stmt).one().id == 2
        counts.append(sql.count)
    return counts


def test_attach_a_sessionmaker(fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter) -> None:
    factory = sessionmaker(shop_engine)
    fresh_cache.attach(factory)
    assert hit_after_miss(factory, sql) == [1, 0]
    # another factory on the same engine is not cached
    assert hit_after_miss(sessionmaker(shop_engine), sql) == [1, 1]


def test_attach_twice_is_harmless(
    fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter
) -> None:
    factory = sessionmaker(shop_engine)
    fresh_cache.attach(factory)
    fresh_cache.attach(factory)
    assert hit_after_miss(factory, sql) == [1, 0]
    total = fresh_cache.stats()["regions"]["default"]
    assert (total["hits"], total["misses"], total["fills"]) == (1, 1, 1)


def test_attach_a_session_subclass(
    fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter
) -> None:
    class CachedSession(Session):
        pass

    fresh_cache.attach(CachedSession)
    assert hit_after_miss(lambda: CachedSession(shop_engine), sql) == [1, 0]
    assert hit_after_miss(lambda: Session(shop_engine), sql) == [1, 1]


def test_attach_a_scoped_session(
    fresh_cache: Cache, shop_engine: sa.Engine, sql: SQLCounter
) -> None:
    """A scoped_session is attached through its session factory."""
    registry = scoped_session(sessionmaker(shop_engine))
    fresh_cache.attach(registry)
    try:
        stmt = select(Product).where(Product.id == 2).options(FromCache())
        counts = []
        for _ in range(2):
            sql.reset()
            registry.scalars(stmt).one()
            registry.remove()
            counts.append(sql.count)
        assert counts == [1, 0]
    finally:
        registry.remove()


@pytest.fixture
def async_url(database_url: str) -> str:
    url = sa.make_url(database_url).set(drivername="postgresql+psycopg_async")
    return url.render_as_string(hide_password=False)


def test_attach_async_factories(
    redis_url: str, namespace: str, async_url: str, shop_engine: sa.Engine
) -> None:
    """async_sessionmaker, AsyncSession subclasses and async_scoped_session: hit without SQL."""

    class MyAsyncSession(AsyncSession):
        pass

    async def main() -> dict[str, list[int]]:
        engine = create_async_engine(async_url)
        statements: list[str] = []
        sa.event.listen(
            engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2])
        )
        client = redis_lib.Redis.from_url(redis_url)
        async_client = redis_lib.asyncio.Redis.from_url(redis_url)
        stmt = select(Product).where(Product.id == 3).options(FromCache())
        results: dict[str, list[int]] = {}
        caches: list[Cache] = []
        try:
            factories: dict[str, Any] = {
                "async_sessionmaker": async_sessionmaker(engine),
                "async_session_subclass": MyAsyncSession,
                "async_scoped_session": async_scoped_session(
                    async_sessionmaker(engine), scopefunc=asyncio.current_task
                ),
            }
            for index, (name, target) in enumerate(factories.items()):
                cache = Cache(client, async_client=async_client, namespace=f"{namespace}x{index}")
                caches.append(cache)
                cache.attach(target)
                counts = []
                for _ in range(2):
                    statements.clear()
                    if name == "async_session_subclass":
                        async with MyAsyncSession(engine) as s:
                            (await s.scalars(stmt)).one()
                    elif name == "async_scoped_session":
                        (await target.scalars(stmt)).one()
                        await target.remove()
                    else:
                        async with target() as s:
                            (await s.scalars(stmt)).one()
                    counts.append(len(statements))
                results[name] = counts
        finally:
            for cache in caches:  # its hooks would hold the factories' session classes
                cache.detach()
            client.close()
            await async_client.aclose()
            await engine.dispose()
        return results

    results = asyncio.run(main())
    assert results == {
        "async_sessionmaker": [1, 0],
        "async_session_subclass": [1, 0],
        "async_scoped_session": [1, 0],
    }


def test_unmapped_class_elsewhere_never_fails_a_read(
    shop_engine: sa.Engine, redis_url: str, namespace: str, sql: SQLCounter
) -> None:
    client = redis_lib.Redis.from_url(redis_url)
    caches = [Cache(client, namespace=namespace), Cache(client, namespace=namespace)]
    try:
        early_factory = sessionmaker(shop_engine)
        caches[0].attach(early_factory)  # before the model exists
        with private_base() as base:

            class Section(base):  # type: ignore[valid-type,misc]
                __tablename__ = "categories"
                id: Mapped[int] = mapped_column(primary_key=True)
                name: Mapped[str] = mapped_column(String(80))

            late_factory = sessionmaker(shop_engine)
            caches[1].attach(late_factory)
            stmt = select(Section).where(Section.id == 1).options(FromCache())
            with late_factory() as s:
                s.scalars(stmt).one()  # the entry names Section
            residue = failed_class(base, "Residue", {})
            with early_factory() as s:  # this cache never registered Section
                assert s.scalars(stmt).one().name == "category-1"
            del residue
    finally:
        for cache in caches:
            cache.detach()  # their engine listeners and publishers must not outlive the test
        client.close()


# -- one cache per session class ------------------------------------------------------


class OwnSession(Session):
    pass


class OwnAsyncSession(AsyncSession):
    pass


@pytest.fixture
def url_caches(redis_url: str, namespace: str) -> Iterator[list[Cache]]:
    """Two caches of this test's namespace made from the URL (so async factories attach)."""
    caches = [Cache(redis_url, namespace=namespace), Cache(redis_url, namespace=namespace)]
    yield caches
    for cache in caches:
        cache.detach()


@pytest.mark.parametrize(
    "kind",
    [
        "sessionmaker",
        "scoped_session",
        "session_subclass",
        "sessionmaker_of_the_subclass",
        "async_sessionmaker",
        "async_session_subclass",
    ],
)
def test_a_second_cache_on_one_session_class_is_refused_until_the_first_detaches(
    url_caches: list[Cache], shop_engine: sa.Engine, async_url: str, sql: SQLCounter, kind: str
) -> None:
    """Two caches' hooks on one session class would run every hook twice: each
    write-through UPDATE would get RETURNING twice (a syntax error) and each miss would
    wait for the other cache's fill lease. The second attach() is refused, naming the
    first cache's namespace and the fix; once the first detaches, it is accepted."""
    first, second = url_caches
    async_engine = create_async_engine(async_url)
    factory = sessionmaker(shop_engine)
    targets: dict[str, tuple[Any, Any]] = {  # (what the first attaches, what the second does)
        "sessionmaker": (factory, factory),
        "scoped_session": (factory, scoped_session(factory)),
        "session_subclass": (OwnSession, OwnSession),
        "sessionmaker_of_the_subclass": (OwnSession, sessionmaker(shop_engine, class_=OwnSession)),
        "async_sessionmaker": (async_sessionmaker(async_engine),) * 2,
        "async_session_subclass": (OwnAsyncSession, OwnAsyncSession),
    }
    held, target = targets[kind]
    first.attach(held)
    given = dict(getattr(target, "kw", {}))
    with pytest.raises(ConfigurationError) as info:
        second.attach(target)
    message = str(info.value)
    assert f"another Cache (namespace {first.namespace!r}) is attached" in message
    assert "Detach it first (cache.detach())" in message
    assert dict(getattr(target, "kw", {})) == given  # the refused attach changed nothing
    assert not second._attached
    if kind in ("sessionmaker", "scoped_session", "session_subclass"):
        # the first cache alone serves a write-through write and its reads
        made = factory if kind != "session_subclass" else lambda: OwnSession(shop_engine)
        with made() as s:
            product = s.get_one(Product, 5)
            name = product.name
            product.name = "renamed by the one cache"
            s.commit()
        try:
            assert hit_after_miss(made, sql) == [1, 0]
        finally:
            with made() as s:
                s.get_one(Product, 5).name = name
                s.commit()
    first.detach()
    second.attach(target)  # the detached cache freed it
    assert second._attached
    asyncio.run(async_engine.dispose())


@pytest.mark.parametrize("again", ["the same cache", "a new cache"])
def test_writes_made_while_detached_are_seen_once_attached_again(
    url_caches: list[Cache], shop_engine: sa.Engine, sql: SQLCounter, again: str
) -> None:
    """Between detach() and the next attach() of a factory, its writes reach no cache
    (a fixture between two test clients, an app made again per test): the attach
    retires every table the process maps, so neither the entity cache nor a cached
    query serves what was cached before."""
    first = url_caches[0]
    later = first if again == "the same cache" else url_caches[1]
    factory = sessionmaker(shop_engine)
    stmt = select(Product).where(Product.id == 7).options(FromCache())
    first.attach(factory)
    with factory() as s:
        name = s.get_one(Product, 7).name
        assert s.scalars(stmt).one().name == name
    first.detach()
    try:
        with factory() as s:  # unseen: nothing is attached
            s.get_one(Product, 7).name = "renamed while detached"
            s.commit()
        later.attach(factory)
        for expected in (2, 0):  # read again once, then cached again
            sql.reset()
            with factory() as s:
                assert s.get_one(Product, 7).name == "renamed while detached"
                assert s.scalars(stmt).one().name == "renamed while detached"
            assert sql.count == expected
        later.attach(factory)  # attached already: nothing retired
        sql.reset()
        with factory() as s:
            assert s.scalars(stmt).one().name == "renamed while detached"
        assert sql.count == 0
    finally:
        with Session(shop_engine) as s:
            s.get_one(Product, 7).name = name
            s.commit()
