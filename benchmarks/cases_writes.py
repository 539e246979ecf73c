"""Write cases: ``commit()`` latency with our write strategies vs a plain commit.

Each timed call is one ``session.commit()`` of one changed row; beginning the
transaction, loading the row and changing it happen in the untimed setup. The plain
session and ours write different rows of the same table, so that neither contender's
writes change what the other's cache entries say. Each call writes a value never written
before, so every commit really sends an UPDATE.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from benchmarks.common import close, floor_contender, round_trip_commits
from benchmarks.harness import CaseResult, Comparison, Contender, Target, measure
from examples.shop import Category, Product
from sa_redis_cache.codec import pack, unpack

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session, sessionmaker

    from benchmarks.env import BenchEnv
    from benchmarks.plan import Plan

PLAIN = "plain commit"
FLOOR = "floor: GET + orjson"
BOUND = "bound: plain + two round trips, no cache work"


def _floor(env: BenchEnv) -> Contender:
    """A one-round-trip yardstick, so the commit overhead can be read in round trips."""
    key = f"sarc:{env.namespace}:floor:commit"
    env.client.set(key, pack([1, ["a small entry"]]), ex=3600)
    return floor_contender(env.client, key, FLOOR)


def _round_trips(result: CaseResult, ours: str) -> None:
    s = result.summaries
    extra = s[ours].p50 - s[PLAIN].p50
    trips = s[BOUND].p50 - s[PLAIN].p50
    result.breakdown.append(
        f"ours adds {extra:.0f} µs to the commit, ≈ {extra / s[FLOOR].p50:.1f} round trips "
        f"of the floor's {s[FLOOR].p50:.0f} µs: {trips:.0f} µs of it is what the two round "
        f"trips cost when they carry nothing (the bound row), {extra - trips:.0f} µs the "
        "library's work in the flush and commit hooks (the flush plan, the scripts' "
        "arguments, the rows' states, the replies). Sums of medians: approximate."
    )


def committer(
    name: str,
    factory: sessionmaker[Session],
    model: type,
    ident: int,
    mutate: Callable[[Any, int], None],
) -> Contender:
    """A contender whose timed call commits one row that its setup loaded and changed."""
    counter = itertools.count(1)

    def setup() -> Session:
        session = factory()
        # Begin the database transaction here, for both contenders alike: ours may serve
        # the get() from the entity cache without a connection, which would otherwise move
        # the pool checkout and BEGIN into its timed commit and nothing else's. Checking a
        # connection out is not enough: psycopg sends BEGIN (a round trip of its own) with
        # the connection's first statement, so one is executed here.
        session.connection().exec_driver_sql("SELECT 1")
        obj = session.get(model, ident)
        mutate(obj, next(counter))
        return session

    def call(session: Session) -> None:
        session.commit()

    return Contender(name=name, call=call, setup=setup, teardown=close)


def new_price(product: Any, n: int) -> None:
    """Give a product the ``n``-th price, one it has never had before."""
    product.price = Decimal(100_000 + n) / 100


def new_name(category: Any, n: int) -> None:
    """Give a category the ``n``-th name (names are unique per category id)."""
    category.name = f"category-{category.id}-v{n}"


def _commit_case(
    env: BenchEnv,
    plan: Plan,
    *,
    slug: str,
    title: str,
    ours: str,
    model: type,
    mutate: Callable[[Any, int], None],
    target: float,
    miss_note: str,
) -> CaseResult:
    """One commit case: plain, ours, the floor and the bound, each on a row of its own
    (ids 1, 2, 3 of the category table, 21, 22, 23 of the products)."""
    first = 21 if model is Product else 1
    result = measure(
        slug,
        title,
        [
            committer(PLAIN, env.plain, model, first, mutate),
            committer(ours, env.cached, model, first + 1, mutate),
            _floor(env),
            committer(BOUND, round_trip_commits(env.engine, env.client), model, first + 2, mutate),
        ],
        plan.commits,
        [
            Comparison(row=BOUND, numerator=BOUND, denominator=PLAIN, label="bound ÷ plain"),
            Comparison(
                row=ours,
                numerator=ours,
                denominator=PLAIN,
                label="ours ÷ plain",
                target=Target("<=", target),
                miss_note=miss_note,
            ),
        ],
    )
    _round_trips(result, ours)
    return result


def commit_write_through(env: BenchEnv, plan: Plan) -> CaseResult:
    """Write-through commit (Product.price) vs the same commit through a plain session."""
    result = _commit_case(
        env,
        plan,
        slug="commit_write_through",
        title="commit: update Product.price (write_through)",
        ours="ours: write-through",
        model=Product,
        mutate=new_price,
        target=1.2,
        miss_note=(
            "the commit adds two Redis round trips to a plain UPDATE + COMMIT: "
            "flush_mark.lua (sent before the UPDATE, read after it: overlapped) and "
            "commit.lua (after COMMIT, read once SQLAlchemy has finished the commit: "
            "only SQLAlchemy's post-commit work overlaps it); commit.lua cannot be "
            "sent before the database commit, and not waiting for it would let a "
            "read that starts after commit() returned run before it"
        ),
    )
    result.notes += _check_written_through(env, 22, Decimal(100_000 + plan_total(plan)) / 100)
    return result


def plan_total(plan: Plan) -> int:
    """How many calls each commit contender makes."""
    return plan.commits.warmup + plan.commits.iterations


def _check_written_through(env: BenchEnv, ident: int, price: Decimal) -> list[str]:
    keys = list(env.client.scan_iter(match=f"sarc:{env.namespace}:*products*:e:*:{ident}"))
    raw = env.client.get(keys[0]) if len(keys) == 1 else None
    if raw is None:
        return ["write-through: the entity entry is absent after the last commit"]
    values = unpack(raw)[1][0]
    if not any(_same_decimal(v, price) for v in values):
        return [f"write-through: the entity entry does not hold the last price {price}"]
    return []


def _same_decimal(stored: object, price: Decimal) -> bool:
    # the codec keeps Decimal digits as text; compare numerically ("1004.40" == 1004.4)
    try:
        return isinstance(stored, str) and Decimal(stored) == price
    except ArithmeticError:
        return False


def commit_invalidate(env: BenchEnv, plan: Plan) -> CaseResult:
    """Invalidating commit (Category, cache_aside) vs the same commit through a plain session."""
    return _commit_case(
        env,
        plan,
        slug="commit_invalidate",
        title="commit: update Category.name (cache_aside, invalidates)",
        ours="ours: invalidate",
        model=Category,
        mutate=new_name,
        target=1.25,
        miss_note=(
            "as for write-through: flush_mark.lua overlaps the UPDATE, commit.lua "
            "follows the database COMMIT and is read before commit() returns"
        ),
    )


WRITE_CASES: list[tuple[str, Callable[[BenchEnv, Plan], CaseResult]]] = [
    ("commit_write_through", commit_write_through),
    ("commit_invalidate", commit_invalidate),
]
