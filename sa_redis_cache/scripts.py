"""The Lua scripts in ``lua/``, loaded once per process and run with EVALSHA.

Each script opens with a comment naming its KEYS and ARGV; keep that header true. Redis
runs ``lua/_prelude.lua`` (the helpers that treat a key of the wrong type or an
unparsable counter as absent, and heal it) followed by the script.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .io import SyncRedisIO

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis import Redis
    from redis.commands.core import Script


def _file(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


@cache
def source(name: str) -> str:
    """The text Redis runs for ``lua/<name>.lua``: the shared prelude, then the script."""
    return _file("_prelude") + _file(name)


class Scripts:
    """Registered scripts for one Redis client; EVALSHA with a reload on NOSCRIPT.

    The ``Script`` objects carry their SHA1 and source, so the asyncio client of a cache
    runs the same objects through :class:`~sa_redis_cache.io.AsyncRedisIO`;
    :meth:`run` and :meth:`run_batch` use the synchronous client given here.

    Example::

        scripts = Scripts(redis.Redis())
        scripts.run(scripts.fill, keys=[...], args=[...])
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self.io = SyncRedisIO(client)
        self.capture_versions: Script = client.register_script(source("capture_versions"))
        self.fill: Script = client.register_script(source("fill"))
        self.flush_mark: Script = client.register_script(source("flush_mark"))
        self.commit: Script = client.register_script(source("commit"))
        self.wb_enqueue: Script = client.register_script(source("wb_enqueue"))
        self.wb_flushed: Script = client.register_script(source("wb_flushed"))
        self.wb_lease: Script = client.register_script(source("wb_lease"))
        self.release_lease: Script = client.register_script(source("release_lease"))
        self.invalidate_entries: Script = client.register_script(source("invalidate_entries"))
        self.bump_all: Script = client.register_script(source("bump_all"))

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` with EVALSHA; on NOSCRIPT it is loaded and run again."""
        return self.io.run_script(script, keys, args)

    def run_batch(self, calls: Sequence[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """Run several script calls in one round trip; their replies in order.

        See :meth:`sa_redis_cache.io.RedisIO.run_batch`: every script given here must be
        safe to run twice (the batch is sent again after a NOSCRIPT).
        """
        return self.io.run_batch(calls)
