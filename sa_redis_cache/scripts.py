"""The Lua scripts in ``lua/``, loaded once per process and run with EVALSHA.

Each script opens with a comment naming its KEYS and ARGV; keep that header true.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis import Redis
    from redis.commands.core import Script


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return resources.files(__package__).joinpath("lua").joinpath(f"{name}.lua").read_text("utf-8")


class Scripts:
    """Registered scripts for one Redis client; EVALSHA with a reload on NOSCRIPT.

    Example::

        scripts = Scripts(redis.Redis())
        scripts.fill(keys=[...], args=[...])
    """

    def __init__(self, client: Redis) -> None:
        self._client = client
        self.capture_versions: Script = client.register_script(source("capture_versions"))
        self.fill: Script = client.register_script(source("fill"))
        self.flush_mark: Script = client.register_script(source("flush_mark"))
        self.commit: Script = client.register_script(source("commit"))
        self.wb_enqueue: Script = client.register_script(source("wb_enqueue"))
        self.wb_flushed: Script = client.register_script(source("wb_flushed"))
        self.wb_lease: Script = client.register_script(source("wb_lease"))
        self.release_lease: Script = client.register_script(source("release_lease"))
        self.bump_all: Script = client.register_script(source("bump_all"))

    def run(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; redis-py reloads it when the server answers NOSCRIPT."""
        return script(keys=keys, args=args, client=self._client)

    def run_batch(self, calls: Sequence[tuple[Script, list[str], list[Any]]]) -> list[Any]:
        """Run several script calls in one round trip; their replies in order.

        A Script object queued in a pipeline makes redis-py send SCRIPT EXISTS before
        every execute, a second round trip on each commit. Raw EVALSHA is queued instead,
        and on NOSCRIPT (a restarted or flushed server) the scripts are loaded and the
        batch is sent once more; every script here is safe to run twice.
        """
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [self.run(script, keys, args)]
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for script, keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return list(pipe.execute())
            except NoScriptError:
                if attempt:
                    raise
                for script, _, _ in calls:
                    self._client.script_load(script.script)
        raise AssertionError("unreachable")  # pragma: no cover
