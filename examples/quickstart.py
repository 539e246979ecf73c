"""The README quickstart, runnable: ``python -m examples.quickstart``.

Needs DATABASE_URL (a SQLAlchemy URL, e.g. postgresql+psycopg://postgres@127.0.0.1/postgres)
and REDIS_URL (e.g. redis://127.0.0.1:6379/0); ``python -m devservices --
python -m examples.quickstart`` provides both. It creates (and finally drops) one table,
``qs_products``, in that database. Keep this file and the README's quickstart identical.
"""

from __future__ import annotations

import os
from decimal import Decimal

from sqlalchemy import Numeric, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sa_redis_cache import Cache, CachePolicy, FromCache


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "qs_products"
    # write_through: a commit writes the new row state to Redis (the default, cache_aside,
    # deletes it instead); every entry of this model lives at most 600 s
    __cache__ = CachePolicy(strategy="write_through", ttl=600)

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(80))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))


def main(database_url: str, redis_url: str, namespace: str = "quickstart") -> None:
    engine = create_engine(database_url)
    statements: list[str] = []  # what reaches Postgres, to see the cache at work
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    cache = Cache(redis_url, namespace=namespace, default_ttl=300)
    make_session = sessionmaker(engine)
    cache.attach(make_session)  # sessionmaker, Session subclass or async_sessionmaker

    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache.invalidate_model(Product)  # the table changed behind the cache's back (DDL)
    with make_session() as s:
        s.add_all(
            Product(
                id=i,
                category="books" if i % 2 else "games",
                name=f"item {i}",
                price=Decimal("0.50") + i,
            )
            for i in range(1, 11)
        )
        s.commit()

    books = select(Product).where(Product.category == "books").options(FromCache(ttl=60))
    for attempt in ("first", "second"):
        with make_session() as s:
            statements.clear()
            names = [p.name for p in s.scalars(books)]
            print(f"{attempt} read: {names}, {len(statements)} SQL statement(s)")

    with make_session() as s:
        p = s.get(Product, 7)  # entity cache by primary key (the insert wrote it through)
        assert p is not None
        p.price = Decimal("9.99")
        s.commit()  # write-through: the new state is in Redis before commit() returns

    with make_session() as s:
        statements.clear()
        p = s.get(Product, 7)
        assert p is not None
        print(f"product 7 costs {p.price}, {len(statements)} SQL statement(s)")
        assert p.price == Decimal("9.99")
        assert not statements

    cache.invalidate(Product, 7)  # drop one entity entry
    cache.invalidate_query(books)  # drop one cached statement
    stats = cache.stats()["models"]["Product"]
    print(f"Product: {stats['hits']} hits, {stats['misses']} misses")

    cache.detach()  # the hooks off make_session (a process that ends need not)
    Base.metadata.drop_all(engine)
    engine.dispose()
    cache.client.close()


if __name__ == "__main__":
    main(os.environ["DATABASE_URL"], os.environ["REDIS_URL"])
