"""Which models a cache takes: every mapped class is checked at ``attach()``, and a class
mapped after it as soon as SQLAlchemy configures it.

``attach()`` checks every mapper of the process (:meth:`ModelAdmission.admit_all`) and
refuses all of them at once when any is misconfigured. A class mapped later (a module
imported after ``attach()``, a model made at run time) passes the same checks, against
the models already taken, when SQLAlchemy configures its mapper (``after_configured``,
before its first use: :meth:`ModelAdmission.admit_new`). Taken there, it is known to
every path at once: its first flush is written behind, its first ``session.get`` reads
the entity cache. A refused class is logged there and raises :class:`ConfigurationError`
wherever the cache needs its policy (a flush that writes it, a ``FromCache`` read of it:
:meth:`ModelRegistry.info_of <sa_redis_cache.models.ModelRegistry.info_of>`), before any
of its rows reaches Redis or the database; paths that only look a model up (a
``session.get``) treat it as uncached.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper

from . import compat
from .errors import ConfigurationError
from .models import ModelInfo, all_mappers, build_model_info, shared_table_problems
from .policy import CachePolicy, Strategy
from .redis_io import is_cluster
from .slot_groups import policy_groups
from .strategies.write_behind import checks as write_behind_checks

if TYPE_CHECKING:
    from .context import CacheContext

log = logging.getLogger(__name__)


class ModelAdmission:
    """The model checks of one cache: all at ``attach()``, one by one after it.

    Example::

        admission = ModelAdmission(core, given_groups={})
        admission.admit_all()   # attach(): ConfigurationError naming every problem
        admission.listen()      # then each class SQLAlchemy configures: admit_new()
        # a refused class raises ConfigurationError where the cache needs its policy:
        core.models.info_of(Gadget.__mapper__)
    """

    def __init__(self, core: CacheContext, given_groups: dict[str, str]) -> None:
        self.core = core
        # what Cache(slot_groups=...) said, apart from the models' policies
        self.given_groups = dict(given_groups)
        self.groups_fixed = False  # set by the first attach(): no group may appear later
        self.refused: weakref.WeakKeyDictionary[Mapper[Any], str] = weakref.WeakKeyDictionary()
        self._admitting_all = False

    def listen(self) -> None:
        """From now on, check each class SQLAlchemy maps when it configures it (once per
        cache; :meth:`Cache.detach <sa_redis_cache.Cache.detach>` stops it)."""
        self.core.models.admit = self.admit_late
        if not event.contains(Mapper, "after_configured", self.admit_new):
            self.core.listen(Mapper, "after_configured", self.admit_new)

    def admit_new(self) -> None:
        """Check and take each mapper the cache has not met (SQLAlchemy's
        ``after_configured``); one refused is logged, and remembered for its first use."""
        if self._admitting_all:
            return
        known = self.core.models.infos
        for mapper in all_mappers():
            if mapper in known or mapper in self.refused:
                continue
            try:
                self.core.models.add(
                    self.admit_late(mapper, getattr(mapper.class_, "__cache__", None))
                )
            except ConfigurationError as exc:
                log.error("%s", exc)  # noqa: TRY400  # the refusal is the message: no traceback

    def admit_all(self) -> None:
        """Check every mapped class of the process; take them all, or raise naming each
        problem and its fix and take none."""
        self._admitting_all = True
        try:
            self._admit_all()
        finally:
            self._admitting_all = False

    def _admit_all(self) -> None:
        problems: list[str] = []
        found: dict[Mapper[Any], CachePolicy | None] = {}
        infos: list[ModelInfo] = []
        mappers, unmapped = compat.registered_classes()
        problems.extend(
            f"{cls.__name__} declares __cache__ but is not mapped (a DeferredReflection "
            "class before prepare(), or a class whose mapping raised); call "
            "prepare(engine) or fix the mapping before cache.attach()"
            for cls in unmapped
            if getattr(cls, "__cache__", None) is not None
        )
        for mapper in mappers:
            policy = getattr(mapper.class_, "__cache__", None)
            info, own = self._model_problems(mapper, policy)
            problems.extend(own)
            if info is not None:
                found[mapper] = info.policy
                infos.append(info)
        problems.extend(_unmapped_policies(found, skip=set(unmapped)))
        problems.extend(shared_table_problems(infos))
        groups, group_problems = self._group_problems(found)
        problems.extend(group_problems)
        if problems:
            raise ConfigurationError(
                "cache.attach() refused these models:\n  - " + "\n  - ".join(problems)
            )
        # in place: every part of the cache builds its keys through this one KeyScheme
        self.core.keys.groups.update(groups)
        self.groups_fixed = True
        for info in infos:
            self.core.models.add(info)

    def admit_late(self, mapper: Mapper[Any], policy: object) -> ModelInfo:
        """The info of ``mapper``, mapped after the first ``attach()``, once it passes the
        checks ``attach()`` runs, against the models the cache has taken; otherwise
        :class:`ConfigurationError`, naming each problem and its fix.

        A class without ``__cache__`` passes as it would at ``attach()``. A refusal is
        remembered: the class stays refused until it is mapped again.
        """
        refused = self.refused.get(mapper)
        if refused is not None:
            raise ConfigurationError(refused)
        info, problems = self._model_problems(mapper, policy)
        if info is not None and info.policy is not None:
            taken = self.core.models.infos
            same_table = [i for i in taken.values() if i.table == info.table and i is not info]
            problems.extend(shared_table_problems([*same_table, info]))
            found = {m: i.policy for m, i in taken.items()}
            found[mapper] = info.policy
            problems.extend(self._group_problems(found)[1])
        if problems or info is None:
            message = self.refused[mapper] = (
                f"the cache refused {mapper.class_.__name__}, a model mapped after "
                "cache.attach():\n  - "
                + "\n  - ".join(problems)
                + "\n(import the model before cache.attach() to have it checked there)"
            )
            raise ConfigurationError(message)
        return info

    def _model_problems(
        self, mapper: Mapper[Any], policy: object
    ) -> tuple[ModelInfo | None, list[str]]:
        """What is wrong with ``mapper``'s own ``policy`` (its ``__cache__``), and its info
        (None when the policy is not a :class:`CachePolicy`)."""
        name = mapper.class_.__name__
        if policy is not None and not isinstance(policy, CachePolicy):
            wrong = f"{name}.__cache__ is {policy!r}, not a CachePolicy"
            return None, [f"{wrong}; write __cache__ = CachePolicy(...)"]
        info = build_model_info(mapper, policy)
        problems: list[str] = []
        if policy is not None:
            problems.extend(f"{name}: {problem}" for problem in policy.problems())
            if policy.strategy == Strategy.WRITE_BEHIND:
                problems.extend(write_behind_checks.model_problems(mapper, info))
                problems.extend(
                    f"{name}: {problem}"
                    for problem in write_behind_checks.redis_problems(self.core.client, policy)
                )
        return info, problems

    def _group_problems(
        self, found: dict[Mapper[Any], CachePolicy | None]
    ) -> tuple[dict[str, str], list[str]]:
        """The slot groups of the cache with those ``found``'s policies declare, and what
        is wrong with them."""
        groups = dict(self.core.keys.groups)
        problems = policy_groups(found, groups)
        if self.groups_fixed:
            # a table read under its own tag since the first attach() would keep entries
            # (plans, the local tier) under counters no write bumps any more
            problems.extend(
                f"table {table!r} is put in slot group {group!r} after the cache's first "
                "attach(), when its keys may be in use under its own tag; import the model "
                "before the first attach() (or give the group in Cache(slot_groups=...))"
                for table, group in groups.items()
                if table not in self.core.keys.groups
            )
        problems.extend(
            write_behind_checks.group_problems(
                found, groups, self.given_groups, cluster=is_cluster(self.core.client)
            )
        )
        problems.extend(write_behind_checks.foreign_key_problems(found))
        return groups, problems


def _unmapped_policies(found: dict[Mapper[Any], CachePolicy | None], skip: set[type]) -> list[str]:
    """Policies declared on classes of a declarative hierarchy that are not mapped."""
    mapped = {m.class_ for m in found}
    roots: set[type] = set()
    for cls in mapped:
        for base in cls.__mro__:
            if "registry" in base.__dict__ and "metadata" in base.__dict__:
                roots.add(base)
    problems = []
    seen: set[type] = set()
    stack = list(roots)
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub in seen:
                continue
            seen.add(sub)
            stack.append(sub)
            if (
                "__cache__" in sub.__dict__
                and sub not in mapped
                and sub not in skip
                and not sub.__dict__.get("__abstract__", False)
            ):
                problems.append(
                    f"{sub.__name__} declares __cache__ but is not mapped; map it (give it a "
                    "__tablename__) or move the policy to the mapped class"
                )
    return problems
