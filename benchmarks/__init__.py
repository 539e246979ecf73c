"""Benchmarks of sa_redis_cache: every headline figure as a ratio measured in one run.

Each case runs its contenders in one process, alternating call by call after a warm-up,
so that machine noise (frequency scaling, other tenants, the services' own background
work) lands on every contender alike and cancels in the ratio of their medians. The
contenders, over the example shop schema (:mod:`examples.shop`):

* the plain uncached ORM query, through a sessionmaker the cache is not attached to;
* the floor: a raw redis-py GET of the entry our cache stores, plus its orjson decode;
* the cache-aside recipe of SQLAlchemy's dogpile_caching example, written afresh in
  :mod:`benchmarks.dogpile_recipe` (pickled ``FrozenResult``, ``merge_frozen_result``);
* ours: ``FromCache()`` and ``session.get`` through an attached sessionmaker.

The local tier's cases (:mod:`benchmarks.cases_local`) serve the same hits from
``Cache(local=True)``, measure the memory of a local entry, and time a commit on rows that
four other processes hold locally, with the bound of ``local_consistency="bounded"``.

The failure cases (:mod:`benchmarks.cases_failure`) add reads while Redis is down (the
circuit breaker, against the uncached query) and a hot key's expiries under concurrent
readers (database queries with and without stampede control).

Run it with ``make bench`` (or ``make bench-smoke`` for the seconds-long smoke mode);
see :mod:`benchmarks.run` for the options and ``benchmarks/results/latest.md`` for the
latest table.
"""
