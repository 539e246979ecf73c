"""Contender builders and result checks shared by the case modules.

Every ORM contender opens a fresh Session in its untimed ``setup`` and closes it in its
untimed ``teardown``: a fresh identity map is what a request sees, and it keeps the
session from answering a load by itself. The Session's construction and close are
excluded alike for every contender, so the floor (which has no session) is compared with
the work a cached read adds to a session the application already holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import redis
import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.harness import Contender
from sa_redis_cache.codec import pack
from sa_redis_cache.protocol.scripts import Script
from sa_redis_cache.redis_io import SyncRedisIO

if TYPE_CHECKING:
    from benchmarks.env import BenchEnv
    from sa_redis_cache.protocol.scripts import ScriptCall
    from sa_redis_cache.redis_io import Pending

# What codec.unpack skips before handing the rest to orjson (magic and version byte),
# measured from codec.pack itself rather than copied from its private constant.
HEADER_LEN = len(pack(0)) - len(b"0")

Consume = Callable[[Session], object]


def close(session: Session) -> None:
    """Teardown of an ORM contender."""
    session.close()


def orm_contender(name: str, factory: Callable[[], Session], consume: Consume) -> Contender:
    """A contender that runs ``consume(session)`` in a fresh session per call."""
    return Contender(name=name, call=consume, setup=factory, teardown=close)


def floor_contender(client: redis.Redis, key: str, name: str = "floor: GET + orjson") -> Contender:
    """The floor: one GET of ``key`` and an orjson decode of the stored document."""
    get = client.get
    loads = orjson.loads
    skip = HEADER_LEN

    def call(_: object) -> object:
        return loads(memoryview(get(key))[skip:])  # type: ignore[arg-type]

    return Contender(name=name, call=call)


def canned_sessions(
    engine: sa.Engine, data: list[Any], keys: list[str], *, scalars: bool
) -> sessionmaker[Session]:
    """Sessions whose every ORM statement returns ``data`` at once, without Redis or SQL.

    What SQLAlchemy's own execute pipeline costs (statement setup, ``do_orm_execute``
    dispatch, the result object) for any cache built on ``do_orm_execute``: the part of a
    hit that no such cache can remove. ``data`` holds detached instances loaded earlier
    (``scalars``) or plain tuples.
    """
    factory: sessionmaker[Session] = sessionmaker(engine)

    def on_execute(_orm_context: Any) -> IteratorResult[Any]:
        result: IteratorResult[Any] = IteratorResult(SimpleResultMetaData(keys), iter(data))
        result._source_supports_scalars = scalars
        return result

    sa.event.listen(factory, "do_orm_execute", on_execute)
    return factory


def _noop_script(client: redis.Redis) -> ScriptCall:
    """A call of a script that does nothing: a round trip that runs Lua, as ours do."""
    source = "return 1"
    client.script_load(source)
    sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    return Script("noop", source, sha), [], []


def round_trip_reads(engine: sa.Engine, client: redis.Redis) -> Callable[[], Session]:
    """Sessions whose every ORM statement pays a miss's two Redis round trips and nothing
    else: a no-op script before the database read (where the look is), waited for, and
    one after it (where the fill is), sent and its reply read when the next session is
    made (ours reads it at the thread's next cache call); then the rows as SQLAlchemy
    loaded them, frozen and thawed (a cache on ``do_orm_execute`` keeps the rows it
    returns: ours does, the recipe too).

    The bound of a miss: what no cache that looks before reading and fills after it can
    get under. The round trips go the way ours do: through a ``SyncRedisIO`` of the same
    client, on the thread's own connection.
    """
    factory: sessionmaker[Session] = sessionmaker(engine)
    io = SyncRedisIO(_sibling(client))
    noop = _noop_script(client)
    owed: list[Pending] = []

    def on_execute(orm_context: Any) -> Any:
        if orm_context.is_relationship_load:
            return None  # an eager load's own statement: ours are part of the top one
        io.run_script(*noop)
        frozen = orm_context.invoke_statement().freeze()
        owed.append(_sent(io, noop))
        return frozen()

    def sessions() -> Session:
        while owed:
            owed.pop().replies()
        return factory()

    sa.event.listen(factory, "do_orm_execute", on_execute)
    return sessions


def round_trip_commits(engine: sa.Engine, client: redis.Redis) -> sessionmaker[Session]:
    """Sessions whose commit pays the cache's two Redis round trips, overlapped where the
    cache overlaps them, and nothing else: a no-op script sent in ``before_flush`` and read
    in ``after_flush`` (the flush marks), another sent in ``after_commit`` and read in
    ``after_transaction_end`` (the post-commit script).

    The bound of a commit: what no cache that marks before the database commit and
    releases after it can get under. Sent and read the way ours are (a ``SyncRedisIO``'s
    ``send_batch``).
    """
    factory: sessionmaker[Session] = sessionmaker(engine)
    io = SyncRedisIO(_sibling(client))
    noop = _noop_script(client)
    sent: list[Pending] = []

    def send(*_: Any) -> None:
        sent.append(_sent(io, noop))

    def read(*_: Any) -> None:
        if sent:
            sent.pop().replies()

    for sending, reading in (
        ("before_flush", "after_flush"),
        ("after_commit", "after_transaction_end"),
    ):
        sa.event.listen(factory, sending, send)
        sa.event.listen(factory, reading, read)
    return factory


def _sibling(client: redis.Redis) -> redis.Redis:
    """A client like ``client`` on a pool of its own: the bound's round trips get thread
    connections of their own (``redis_io.ThreadConnections``, one set per pool), as a
    cache on its own client does, and leave the measured cache's alone (a reply the
    bound leaves unread would otherwise send the cache's calls to the pool)."""
    pool = client.connection_pool
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **pool.connection_kwargs
        )
    )


def _sent(io: SyncRedisIO, call: ScriptCall) -> Pending:
    pending = io.send_batch([call])
    if pending is None:
        raise RuntimeError("the benchmark's client must send past execute_command")
    return pending


def breakdown(ours: float, floor: float, pipeline: float, objects: int = 0, work: str = "") -> str:
    """Split a hit's median into the Redis floor and the library's own work.

    The hit is served before SQLAlchemy's execute pipeline (``session.get``, and
    ``session.execute`` of a ``FromCache`` statement whose entry the cache knows is
    there), which the recipe pays: ``pipeline`` (a canned result) is quoted for that.
    """
    rest = ours - floor
    per_object = f", {rest / objects:.1f} µs per object built" if objects else ""
    work = work or (
        "the fast path's checks, the entry key, the MGET's version counters, codec, "
        "building objects into the session, stats"
    )
    return (
        f"ours {ours:.0f} µs ≈ floor {floor:.0f} µs (Redis round trip + decode) + "
        f"{rest:.0f} µs the library's own work ({work}{per_object}); no execute pipeline: "
        "the hit is served before SQLAlchemy runs it (the recipe pays it: "
        f"{pipeline:.0f} µs with a canned result). Sums of medians: approximate."
    )


def entities(statement: Any) -> Consume:
    """Consume an entity statement the way applications do: ``scalars().all()``."""

    def consume(session: Session) -> object:
        return session.scalars(statement).all()

    return consume


def rows(statement: Any) -> Consume:
    """Consume a column statement: ``execute().all()``."""

    def consume(session: Session) -> object:
        return session.execute(statement).all()

    return consume


_MISSING = "<not loaded>"


def snapshot(value: Any, depth: int = 0) -> Any:
    """A comparable picture of a result: column values with their types, loaded graphs.

    Reads only what is loaded (``state.dict``), so taking it never emits SQL; relationship
    targets are followed one level down, which covers the eager loads of these cases.
    """
    if isinstance(value, list | tuple | Row):
        return [snapshot(v, depth) for v in value]
    state = sa.inspect(value, raiseerr=False)
    if state is None or not hasattr(state, "mapper"):
        return (type(value).__name__, value)
    dict_ = state.dict
    out: dict[str, Any] = {"class": type(value).__name__}
    for attr in state.mapper.column_attrs:
        got = dict_.get(attr.key, _MISSING)
        out[attr.key] = (type(got).__name__, got)
    if depth == 0:
        for rel in state.mapper.relationships:
            if rel.key in dict_:
                out[rel.key] = snapshot(dict_[rel.key], depth + 1)
    return out


def check_result(
    env: BenchEnv,
    name: str,
    factory: sessionmaker[Session],
    consume: Consume,
    expected: Any,
    *,
    expect_no_sql: bool,
) -> list[str]:
    """Run ``consume`` once in a fresh session; notes for a wrong result or unexpected SQL."""
    notes: list[str] = []
    with factory() as session, env.counting_sql():
        before = env.sql_count
        got = snapshot(consume(session))
        ran = env.sql_count - before
    if got != expected:
        notes.append(f"{name}: result differs from the uncached query (a correctness bug)")
    if expect_no_sql and ran:
        notes.append(f"{name}: a hit ran {ran} SQL statement(s); it should run none")
    return notes


def region_counter(env: BenchEnv, counter: str, region: str = "default") -> int:
    """One of our cache's counters for a FromCache region."""
    return int(env.cache.stats()["regions"].get(region, {}).get(counter, 0))


def model_counter(env: BenchEnv, counter: str, model: str) -> int:
    """One of our cache's counters for a model (entity cache)."""
    return int(env.cache.stats()["models"].get(model, {}).get(counter, 0))


def expect_count(what: str, got: int, expected: int) -> list[str]:
    """A note when a counter moved by other than what every timed call should add."""
    if got == expected:
        return []
    return [f"{what}: {got} of {expected} calls (the figures above are not pure {what})"]


def counter_probe(read: Callable[[], int]) -> Callable[[], int]:
    """Start counting: returns a function giving how much ``read()`` moved since."""
    start = read()
    return lambda: read() - start
