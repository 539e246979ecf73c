"""The peer to beat: the cache-aside recipe of SQLAlchemy's dogpile_caching example.

Written afresh from the recipe's description rather than copied, over plain redis-py
instead of a dogpile.cache region, so that it pays for exactly what the recipe does and
nothing else:

* a ``UserDefinedOption`` marks a statement as cached;
* a ``do_orm_execute`` listener builds the key from the statement's SQL string plus its
  bound values (``CacheKey.to_offline_string``, the string cached per statement shape)
  and hashes it, as the example's key mangler does;
* on a miss it runs the statement, stores ``pickle.dumps(result.freeze())`` with a TTL,
  and returns the frozen result;
* on a hit it unpickles the ``FrozenResult`` and returns
  ``loading.merge_frozen_result(session, statement, frozen, load=False)``, which merges
  every object (and, through the merge cascade, every eager-loaded child) into the
  session.

It shares the recipe's known faults (docs/design.md, "Known failures": the key ignores loader
options, no
version check, so a write leaves stale entries until their TTL); they do not change the
cost of a hit, which is what it is here for.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import event
from sqlalchemy.orm import loading
from sqlalchemy.orm.interfaces import UserDefinedOption

if TYPE_CHECKING:
    import redis
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker


class RecipeFromCache(UserDefinedOption):
    """Cache this statement with the recipe; ``ttl`` in seconds."""

    # The eager loaders' own statements must not be cached separately: their objects are
    # pickled with their parents, as in the example.
    propagate_to_loaders = False

    def __init__(self, ttl: int = 600) -> None:
        super().__init__(payload=None)
        self.ttl = ttl


class DogpileRecipe:
    """The recipe's ``do_orm_execute`` handler, storing under ``prefix`` in Redis."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        # SQL text per statement shape, so a hit does not recompile the statement.
        self._sql_strings: dict[Any, str] = {}

    def attach(self, factory: sessionmaker[Session]) -> None:
        """Serve :class:`RecipeFromCache` statements of sessions made by ``factory``."""
        event.listen(factory, "do_orm_execute", self._on_execute)

    def key_of(self, statement: Any, parameters: Any = None) -> str:
        """The Redis key of ``statement`` executed with ``parameters``."""
        cache_key = statement._generate_cache_key()
        text = cache_key.to_offline_string(self._sql_strings, statement, parameters or {})
        return self.prefix + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def _on_execute(self, orm_context: ORMExecuteState) -> Result[Any] | None:
        if not orm_context.is_select:
            return None
        option = None
        for opt in orm_context.user_defined_options:
            if isinstance(opt, RecipeFromCache):
                option = opt
        if option is None:
            return None
        key = self.key_of(orm_context.statement, orm_context.parameters)
        raw = cast("bytes | None", self.client.get(key))
        if raw is not None:
            # The recipe's whole point is to pickle ORM results; this is what is measured.
            frozen = pickle.loads(raw)  # noqa: S301
            merged = loading.merge_frozen_result(  # type: ignore[no-untyped-call]
                orm_context.session, orm_context.statement, frozen, load=False
            )
            return cast("Result[Any]", merged())
        frozen = orm_context.invoke_statement().freeze()
        self.client.set(key, pickle.dumps(frozen), ex=option.ttl)
        return frozen()
