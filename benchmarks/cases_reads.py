"""Read cases: FromCache hits (1 row, a 50-parent graph, an expensive aggregate),
``session.get`` through the entity cache, and the miss path.

Before timing, each case fills both caches once, finds the key our cache wrote (for the
floor), and checks that every contender returns what the uncached query returns and that
the hits run no SQL; after timing, it checks from ``cache.stats()`` that every timed call
of ours was the hit (or miss) it is meant to be. A failed check becomes a note beside
the figures instead of silently measuring something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, selectinload

from benchmarks.common import (
    Consume,
    breakdown,
    canned_sessions,
    check_result,
    close,
    counter_probe,
    entities,
    expect_count,
    floor_contender,
    model_counter,
    orm_contender,
    region_counter,
    round_trip_reads,
    rows,
    snapshot,
)
from benchmarks.dogpile_recipe import RecipeFromCache
from benchmarks.harness import TIMES, CaseResult, Comparison, Contender, Target, measure
from examples.shop import Category, Order, OrderLine, OrderStatus, Product
from sa_redis_cache import FromCache

if TYPE_CHECKING:
    from collections.abc import Callable

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

UNCACHED = "uncached ORM"
FLOOR = "floor: GET + orjson"
RECIPE = "dogpile recipe"
OURS = "ours"
PIPELINE = "SQLAlchemy pipeline only (canned result)"
MISS_BOUND = "bound: uncached + two round trips, no cache work"
FILL_REPLY = "the fill's reply alone, read at the thread's next cache call"

# The product ids each case reads; distinct, so that one case's invalidations or fills
# never touch another case's entries.
HIT_PRODUCT, GET_PRODUCT, MISS_PRODUCT = 7, 11, 13


def one_row_statement() -> Any:
    """A one-row entity query."""
    return select(Product).where(Product.id == HIT_PRODUCT)


def graph_statement() -> Any:
    """50 orders with their 200 order lines eager-loaded (docs/design.md, "Reads"'s measurement)."""
    return select(Order).options(selectinload(Order.lines)).order_by(Order.id).limit(50)


def expensive_statement(revenue_label: str = "revenue") -> Any:
    """Revenue and paid orders per category: a four-table join and an aggregate.

    ``revenue_label`` names the sum: another label gives the same query under another
    cache key and SQL text (the stampede case runs one per variant and counts each).
    """
    return (
        select(
            Category.name,
            func.count(distinct(Order.id)).label("orders"),
            func.sum(OrderLine.quantity * OrderLine.unit_price).label(revenue_label),
        )
        .join(Product, Product.category_id == Category.id)
        .join(OrderLine, OrderLine.product_id == Product.id)
        .join(Order, Order.id == OrderLine.order_id)
        .where(Order.status == OrderStatus.PAID)
        .group_by(Category.name)
        .order_by(Category.name)
    )


def _fill_and_find(env: BenchEnv, consume: Consume) -> str:
    """Run ``consume`` once through our cache; return the one query key it wrote."""
    before = env.query_keys()
    with env.cached() as session:
        consume(session)
    new = env.query_keys() - before
    if len(new) != 1:
        raise RuntimeError(f"expected the fill to write one query entry, found {len(new)}")
    return new.pop().decode()


def _hit_case(
    env: BenchEnv,
    plan: Plan,
    *,
    slug: str,
    title: str,
    statement: Any,
    as_rows: bool,
    heavy: bool,
    comparisons: list[Comparison],
    objects: int = 0,
) -> CaseResult:
    wrap = rows if as_rows else entities
    plain, ours, recipe = (
        wrap(statement),
        wrap(statement.options(FromCache())),
        wrap(statement.options(RecipeFromCache())),
    )
    with env.plain() as session:
        loaded = plain(session)
        expected = snapshot(loaded)
    entry_key = _fill_and_find(env, ours)
    with env.recipe_sessions() as session:
        recipe(session)
    recipe_key = env.recipe.key_of(statement.options(RecipeFromCache()))
    if not env.client.exists(recipe_key):
        raise RuntimeError("the recipe did not store its entry")
    env.entries[slug] = (entry_key, recipe_key)
    notes = check_result(env, OURS, env.cached, ours, expected, expect_no_sql=True)
    notes += check_result(env, RECIPE, env.recipe_sessions, recipe, expected, expect_no_sql=True)
    counts = plan.heavy if heavy else plan.cheap
    contenders = [
        orm_contender(UNCACHED, env.plain, plain),
        floor_contender(env.client, entry_key, FLOOR),
        orm_contender(RECIPE, env.recipe_sessions, recipe),
        orm_contender(OURS, env.cached, ours),
    ]
    assert isinstance(loaded, list)
    keys = [d["name"] for d in statement.column_descriptions]
    data = [tuple(row) for row in loaded] if as_rows else loaded
    canned = canned_sessions(env.engine, data, keys, scalars=not as_rows)
    contenders.append(orm_contender(PIPELINE, canned, plain))
    hits = counter_probe(lambda: region_counter(env, "hits"))
    result = measure(slug, title, contenders, counts, comparisons)
    result.notes += notes + expect_count("hits", hits(), counts.warmup + counts.iterations)
    result.breakdown.append(_breakdown(result, objects))
    return result


def _breakdown(result: CaseResult, objects: int = 0) -> str:
    s = result.summaries
    line = breakdown(s[OURS].p50, s[FLOOR].p50, s[PIPELINE].p50, objects)
    bound = s[RECIPE].p50 / s[FLOOR].p50
    return (
        f"{line} Even with no work of its own, ours could be at most {bound:.2f}{TIMES} "
        "faster than the recipe here, as both pay the round trip."
    )


def _get_breakdown(result: CaseResult) -> str:
    """A ``session.get`` hit's split: ours skips the execute pipeline the recipe pays."""
    s = result.summaries
    return breakdown(
        s[OURS].p50,
        s[FLOOR].p50,
        s[PIPELINE].p50,
        work="the fast path's checks, the entity key, the MGET's extra keys, decode, "
        "building the object, stats",
    )


def _speedup_over(
    row: str, name: str, target: Target | None = None, miss_note: str = ""
) -> Comparison:
    """``row ÷ ours``: how many times faster ours is than ``row``."""
    return Comparison(
        row=row,
        numerator=row,
        denominator=OURS,
        label=f"{name} ÷ ours",
        target=target,
        miss_note=miss_note,
    )


def _over_floor(target: Target | None = None, miss_note: str = "") -> Comparison:
    """``ours ÷ floor``: what ours costs on top of a bare GET + decode."""
    return Comparison(
        row=FLOOR,
        numerator=OURS,
        denominator=FLOOR,
        label="ours ÷ floor",
        target=target,
        miss_note=miss_note,
    )


def hit_one_row(env: BenchEnv, plan: Plan) -> CaseResult:
    """FromCache hit for a one-row query."""
    return _hit_case(
        env,
        plan,
        slug="hit_1row",
        title="FromCache hit, 1 row",
        statement=one_row_statement(),
        as_rows=False,
        heavy=False,
        comparisons=[
            _speedup_over(UNCACHED, "uncached"),
            _over_floor(
                Target("<=", 1.6),
                miss_note=(
                    "on top of the floor a hit pays the library's own work (the fast "
                    "path's checks, entry-key digest of the bound values, the MGET's extra "
                    "version keys, codec, building the object, the stats lock), served "
                    "before SQLAlchemy's execute pipeline; 'Where the time goes' splits the "
                    "median. A shorter round trip (bare metal) raises this ratio, as the "
                    "floor shrinks"
                ),
            ),
            _speedup_over(
                RECIPE,
                "recipe",
                Target(">=", 1.5),
                miss_note=(
                    "with one object the recipe's pickle.loads + merge cost little more than "
                    "our decode + build, and both pay the same round trip, which caps the "
                    "ratio (the bound is under 'Where the time goes'); ours skips the "
                    "SQLAlchemy pipeline the recipe pays, and what is left is the library's "
                    "own work over the floor"
                ),
            ),
        ],
    )


def hit_graph(env: BenchEnv, plan: Plan) -> CaseResult:
    """FromCache hit for 50 parents with 200 eager-loaded children."""
    return _hit_case(
        env,
        plan,
        slug="hit_50rows",
        title="FromCache hit, 50 orders + 200 selectinload lines",
        statement=graph_statement(),
        as_rows=False,
        heavy=True,
        objects=250,
        comparisons=[
            _speedup_over(UNCACHED, "uncached"),
            _over_floor(),
            _speedup_over(
                RECIPE,
                "recipe",
                Target(">=", 3.0),
                miss_note=(
                    "building 250 objects is nearly all of ours (per-object cost under "
                    "'Where the time goes'); in cProfile it splits into "
                    "_Materializer.object() itself, new_instance(), codec load_row() and "
                    "set_committed_value() per collection. Trimming ~10% of the "
                    "per-object cost meets 3x"
                ),
            ),
        ],
    )


def hit_expensive(env: BenchEnv, plan: Plan) -> CaseResult:
    """FromCache hit for a join + aggregate that takes milliseconds uncached."""
    return _hit_case(
        env,
        plan,
        slug="hit_expensive",
        title="FromCache hit, join + aggregate (8 rows of scalars)",
        statement=expensive_statement(),
        as_rows=True,
        heavy=True,
        comparisons=[
            _speedup_over(UNCACHED, "uncached"),
            _over_floor(),
            _speedup_over(RECIPE, "recipe"),
        ],
    )


def session_get(env: BenchEnv, plan: Plan) -> CaseResult:
    """``session.get`` through the entity cache vs the database, the floor and the recipe."""

    def get(session: Session) -> object:
        return session.get(Product, GET_PRODUCT)

    def recipe_get(session: Session) -> object:
        return session.get(Product, GET_PRODUCT, options=[RecipeFromCache()])

    with env.plain() as session:
        product = get(session)
        expected = snapshot(product)
    canned = canned_sessions(env.engine, [product], ["Product"], scalars=True)
    before = env.entity_keys()
    with env.cached() as session:
        get(session)
    new = env.entity_keys() - before
    if len(new) != 1:
        raise RuntimeError(f"expected session.get to write one entity entry, found {len(new)}")
    entity_key = new.pop().decode()
    with env.recipe_sessions() as session:
        recipe_get(session)
    notes = check_result(env, OURS, env.cached, get, expected, expect_no_sql=True)
    notes += check_result(
        env, RECIPE, env.recipe_sessions, recipe_get, expected, expect_no_sql=True
    )
    counts = plan.cheap
    hits = counter_probe(lambda: model_counter(env, "hits", "Product"))
    result = measure(
        "get",
        "session.get hit (entity cache), fresh session per call",
        [
            orm_contender(UNCACHED, env.plain, get),
            floor_contender(env.client, entity_key, FLOOR),
            orm_contender(RECIPE, env.recipe_sessions, recipe_get),
            orm_contender(OURS, env.cached, get),
            orm_contender(PIPELINE, canned, get),
        ],
        counts,
        [
            _speedup_over(UNCACHED, "uncached"),
            _over_floor(
                Target("<=", 1.5),
                miss_note=(
                    "the get is served by the session class's own get() before SQLAlchemy "
                    "builds a statement (no execute pipeline); what is left over the floor "
                    "is the library's work: the fast path's checks (identity map, "
                    "autoflush, transaction, get_bind), the entity key, the MGET's four "
                    "keys (entry, generation, row write counter, and the version a miss "
                    "captures), decode, building the object, the stats"
                ),
            ),
            _speedup_over(RECIPE, "recipe"),
        ],
    )
    result.notes += notes + expect_count("hits", hits(), counts.warmup + counts.iterations)
    result.breakdown.append(_get_breakdown(result))
    return result


def _miss_case(
    env: BenchEnv, plan: Plan, *, slug: str, title: str, statement: Any, note: str
) -> CaseResult:
    ours_stmt = statement.options(FromCache())
    recipe_stmt = statement.options(RecipeFromCache())
    plain, ours, recipe = entities(statement), entities(ours_stmt), entities(recipe_stmt)
    env.cache.invalidate_query(ours_stmt)  # an earlier case may have filled it
    entry_key = _fill_and_find(env, ours)
    # The floor reads a copy: the entry itself is removed before every miss of ours.
    floor_key = f"sarc:{env.namespace}:floor:{slug}"
    env.client.set(floor_key, env.client.get(entry_key) or b"", ex=3600)
    recipe_key = env.recipe.key_of(recipe_stmt)
    cached, recipe_sessions, cache, client = (
        env.cached,
        env.recipe_sessions,
        env.cache,
        env.client,
    )

    def cold_ours() -> Session:
        # removing the entry (untimed) makes the timed call a miss that fills again
        cache.invalidate_query(ours_stmt)
        return cached()

    def cold_recipe() -> Session:
        client.unlink(recipe_key)
        return recipe_sessions()

    owed = cache._core.owed

    def after_a_miss() -> None:
        # untimed: a miss whose fill's reply is read by the timed call, as the thread's
        # next cache call reads it
        session = cold_ours()
        try:
            ours(session)
        finally:
            session.close()

    counts = plan.heavy
    misses = counter_probe(lambda: region_counter(env, "misses"))
    fills = counter_probe(lambda: region_counter(env, "fills"))
    ours_miss, recipe_miss = OURS + " (miss)", RECIPE + " (miss)"
    result = measure(
        slug,
        title,
        [
            orm_contender(UNCACHED, env.plain, plain),
            floor_contender(env.client, floor_key, FLOOR),
            Contender(recipe_miss, call=recipe, setup=cold_recipe, teardown=close),
            Contender(ours_miss, call=ours, setup=cold_ours, teardown=close),
            orm_contender(MISS_BOUND, round_trip_reads(env.engine, env.client), plain),
            Contender(FILL_REPLY, call=lambda _: owed.settle_own(), setup=after_a_miss),
        ],
        counts,
        [
            Comparison(
                row=MISS_BOUND,
                numerator=MISS_BOUND,
                denominator=UNCACHED,
                label="bound ÷ uncached",
            ),
            Comparison(
                row=recipe_miss,
                numerator=recipe_miss,
                denominator=UNCACHED,
                label="recipe ÷ uncached",
            ),
            Comparison(
                row=ours_miss,
                numerator=ours_miss,
                denominator=UNCACHED,
                label="ours ÷ uncached",
                target=Target("<=", 1.25),
                miss_note=note,
            ),
        ],
    )
    total = 2 * (counts.warmup + counts.iterations)  # ours, and the fill reply's setup
    result.notes += expect_count("misses", misses(), total) + expect_count("fills", fills(), total)
    s = result.summaries
    extra = s[ours_miss].p50 - s[UNCACHED].p50
    trips = s[MISS_BOUND].p50 - s[UNCACHED].p50
    result.breakdown.append(
        f"a miss costs {extra:.0f} µs more than the uncached query, ≈ "
        f"{extra / s[FLOOR].p50:.1f}{TIMES} the floor's {s[FLOOR].p50:.0f} µs round trip; a miss "
        "needs two round trips (the look that finds no entry and takes the lease, "
        "look.lua, waited for; the fill's EVALSHA, sent, its reply read by the thread's "
        f"next cache call): {trips:.0f} µs of it when they carry nothing and the result is "
        f"frozen as ours is (the bound row), {extra - trips:.0f} µs the rest (key, "
        "extract() + codec + pack, the fill's payload, stats). Reading the fill's reply "
        f"later costs that next call {s[FILL_REPLY].p50:.0f} µs. Sums of medians: "
        "approximate."
    )
    return result


def miss_one_row(env: BenchEnv, plan: Plan) -> CaseResult:
    """The miss path on a one-row query: overhead over the uncached query."""
    return _miss_case(
        env,
        plan,
        slug="miss_1row",
        title="FromCache miss + fill, 1 row",
        statement=select(Product).where(Product.id == MISS_PRODUCT),
        note=(
            "a miss adds two Redis round trips to the query: the look that finds no "
            "entry and takes the fill lease in the same script (look.lua), and the fill, "
            "an EVALSHA of fill.lua (GET of each version, TIME, ZRANGEBYSCORE of each "
            "writers set, SET PX), whose reply is not waited for; on a sub-millisecond "
            "query the look and the fill's sending alone exceed 1.25x "
            "(benchmarks/results/speed.md)"
        ),
    )


def miss_graph(env: BenchEnv, plan: Plan) -> CaseResult:
    """The miss path on the 50-parent graph."""
    return _miss_case(
        env,
        plan,
        slug="miss_50rows",
        title="FromCache miss + fill, 50 orders + 200 lines",
        statement=graph_statement(),
        note=(
            "beyond the two round trips, extract() walks the 250-object graph "
            "(instance_state, the column values, the relationships' references per object) "
            "and the codec dumps every row with exact-type checks: a few µs per object, a "
            "cost the fill could pay after the result is returned (background thread) "
            "instead of before"
        ),
    )


READ_CASES: list[tuple[str, Callable[[BenchEnv, Plan], CaseResult]]] = [
    ("hit_1row", hit_one_row),
    ("hit_50rows", hit_graph),
    ("hit_expensive", hit_expensive),
    ("get", session_get),
    ("miss_1row", miss_one_row),
    ("miss_50rows", miss_graph),
]
