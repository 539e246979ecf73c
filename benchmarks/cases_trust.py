"""What not trusting Redis costs on the hit path: the decoder's checks, and entry signing.

Three hits, each measured in one alternating run (:func:`benchmarks.harness.alternate`)
against variants of our own cache, so that the ratios compare like with like:

* ``ours``: the library as shipped: every column's stored type is checked
  (:class:`~sa_redis_cache.codec.RowCodec`) and a query body is checked against its
  statement before any object is built (:mod:`sa_redis_cache.hydrate`).
* ``ours, no type checks``: the same cache and entries with the column type checks
  switched off for the call (each codec's column table reduced to the columns that have
  a converter, in the untimed setup, and restored in the teardown): the load as it was
  before the checks.
* ``ours, no checks``: also without the body checks (a trusting stand-in for
  ``hydrate.prepare`` that only resolves and decodes, as the code did before).
* ``ours, signed``: a cache with ``signing_key`` in a namespace of its own: every read
  verifies an HMAC-SHA256 over the value, bound to its key.

The cases are a one-row ``FromCache`` hit, a ``session.get`` hit and the 50-order graph
(250 objects), where per-object checks and hashing the larger value show most.

Every contender forgets the cache's kept decodings in its untimed setup
(``DecodedEntries.clear``): a hit on bytes decoded before skips the checks and the
signature alike, so without that every variant would time the same reuse. What is timed
is a hit of bytes the process has not decoded yet, where checking is paid.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from benchmarks.cases_reads import GET_PRODUCT, HIT_PRODUCT, graph_statement, one_row_statement
from benchmarks.common import (
    check_result,
    close,
    counter_probe,
    entities,
    expect_count,
    snapshot,
)
from benchmarks.harness import CaseResult, Comparison, Contender, measure
from examples.shop import Product
from sa_redis_cache import Cache, FromCache, hydrate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from benchmarks.common import Consume
    from benchmarks.env import BenchEnv
    from benchmarks.harness import Counts
    from benchmarks.plan import Plan
    from sa_redis_cache.codec import RowCodec

OURS = "ours"
NO_TYPE_CHECKS = "ours, no type checks"
NO_CHECKS = "ours, no checks"
SIGNED = "ours, signed"
SIGNING_KEY = b"benchmark signing key, 32 bytes!"


def _codecs(cache: Cache) -> list[RowCodec]:
    """Every row codec the cache's read path uses: models' and statements' scalar ones."""
    core = cache._core
    found = [info.codec for info in core.models.infos.values() if info.codec is not None]
    found += [plan.shape.scalar_codec for plan in cache._reads.queries._plans.values() if plan]
    return found


def _trusting_prepare(body: Any, shape: Any, info_of: Any) -> Any:
    """What rehydrate() did before the body checks: resolve the names, decode the rows."""
    _keys, single, names, objects, rows = body
    expected = hydrate._expected_names(shape.entity_mappers)
    infos = [info_of(expected[name]) for name in names]
    owners = [infos[o[0]] for o in objects]
    values = [info.codec.load_row(o[1]) for info, o in zip(owners, objects, strict=True)]
    scalars = [] if single else [shape.scalar_codec.load_row(row[1]) for row in rows]
    keys = [hydrate.identity_key_of(i, v) for i, v in zip(owners, values, strict=True)]
    return hydrate.Prepared(owners, values, objects, rows, scalars, keys)


@contextmanager
def _without_type_checks(cache: Cache) -> Iterator[None]:
    """The codecs as they were before the checks: a column is visited only for its load."""
    codecs = _codecs(cache)
    saved = [codec._loads for codec in codecs]
    for codec in codecs:
        codec._loads = tuple((i, None, load) for i, _, load in codec._loads if load is not None)
    try:
        yield
    finally:
        for codec, loads in zip(codecs, saved, strict=True):
            codec._loads = loads


def _variant(
    name: str, factory: sessionmaker[Session], consume: Consume, cache: Cache, *, body: bool
) -> Contender:
    """``consume`` in a fresh session with the checks off for the timed call only."""

    def setup() -> tuple[Session, Any]:
        _forget_decodings(cache)
        switched = _without_type_checks(cache)
        switched.__enter__()
        if body:
            hydrate.prepare = _trusting_prepare  # the A/B: restored in teardown
        return factory(), switched

    def teardown(state: tuple[Session, Any]) -> None:
        session, switched = state
        session.close()
        hydrate.prepare = _PREPARE
        switched.__exit__(None, None, None)

    return Contender(name, call=lambda state: consume(state[0]), setup=setup, teardown=teardown)


_PREPARE = hydrate.prepare


def _forget_decodings(cache: Cache) -> None:
    """The next hit decodes and checks its bytes again (see the module docstring)."""
    cache._reads.queries.decoded.clear()


def _decoding(
    name: str, factory: sessionmaker[Session], consume: Consume, cache: Cache
) -> Contender:
    """``consume`` in a fresh session, the cache's kept decodings forgotten first."""

    def setup() -> Session:
        _forget_decodings(cache)
        return factory()

    return Contender(name, call=consume, setup=setup, teardown=close)


def _ratios() -> list[Comparison]:
    return [
        Comparison(
            row=NO_TYPE_CHECKS,
            numerator=OURS,
            denominator=NO_TYPE_CHECKS,
            label="ours ÷ no type checks",
        ),
        Comparison(row=NO_CHECKS, numerator=OURS, denominator=NO_CHECKS, label="ours ÷ no checks"),
        Comparison(row=SIGNED, numerator=SIGNED, denominator=OURS, label="signed ÷ ours"),
    ]


def _case(
    env: BenchEnv,
    signed: tuple[Cache, sessionmaker[Session]],
    *,
    slug: str,
    title: str,
    consume: Consume,
    counts: Counts,
    scope: Callable[[Cache], int],
) -> CaseResult:
    signed_cache, signed_factory = signed
    with env.plain() as session:
        expected = snapshot(consume(session))
    notes: list[str] = []
    for name, factory in ((OURS, env.cached), (SIGNED, signed_factory)):
        with factory() as session:
            consume(session)  # the fill
        notes += check_result(env, name, factory, consume, expected, expect_no_sql=True)
    ours_hits = counter_probe(lambda: scope(env.cache))
    signed_hits = counter_probe(lambda: scope(signed_cache))
    result = measure(
        slug,
        title,
        [
            _decoding(OURS, env.cached, consume, env.cache),
            _variant(NO_TYPE_CHECKS, env.cached, consume, env.cache, body=False),
            _variant(NO_CHECKS, env.cached, consume, env.cache, body=True),
            _decoding(SIGNED, signed_factory, consume, signed_cache),
        ],
        counts,
        _ratios(),
    )
    total = counts.warmup + counts.iterations
    result.notes += notes + expect_count("hits of ours", ours_hits(), 3 * total)
    result.notes += expect_count("hits of ours, signed", signed_hits(), total)
    errors = (
        signed_cache.stats()["total"]["decode_errors"] + env.cache.stats()["total"]["decode_errors"]
    )
    if errors:
        result.notes.append(f"{errors} decode error(s): a variant read something as corrupt")
    return result


def _region_hits(cache: Cache) -> int:
    return int(cache.stats()["regions"].get("default", {}).get("hits", 0))


def _product_hits(cache: Cache) -> int:
    return int(cache.stats()["models"].get("Product", {}).get("hits", 0))


def trust_costs(env: BenchEnv, plan: Plan) -> list[CaseResult]:
    """The three hits, each with the four variants."""
    # the same client as ours: the signature is the only difference on the Redis side
    signed_cache = Cache(
        env.client, namespace=env.new_namespace("signed"), default_ttl=600, signing_key=SIGNING_KEY
    )
    signed_factory: sessionmaker[Session] = sessionmaker(env.new_engine())
    signed_cache.attach(signed_factory)
    signed = (signed_cache, signed_factory)

    def get(session: Session) -> object:
        return session.get(Product, GET_PRODUCT)

    try:
        return [
            _case(
                env,
                signed,
                slug="trust_hit_1row",
                title=f"decoder checks and signing: FromCache hit, 1 row (product {HIT_PRODUCT})",
                consume=entities(one_row_statement().options(FromCache())),
                counts=plan.cheap,
                scope=_region_hits,
            ),
            _case(
                env,
                signed,
                slug="trust_get",
                title="decoder checks and signing: session.get hit (entity cache)",
                consume=get,
                counts=plan.cheap,
                scope=_product_hits,
            ),
            _case(
                env,
                signed,
                slug="trust_hit_50rows",
                title="decoder checks and signing: FromCache hit, 50 orders + 200 lines",
                consume=entities(graph_statement().options(FromCache())),
                counts=plan.heavy,
                scope=_region_hits,
            ),
        ]
    finally:
        signed_cache.detach()
