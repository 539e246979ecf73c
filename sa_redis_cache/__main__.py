"""``python -m sa_redis_cache``: the same program as the ``sa-redis-cache`` command.

Example::

    $ python -m sa_redis_cache --namespace shop stats --json
"""

from __future__ import annotations

from sa_redis_cache.cli import main

if __name__ == "__main__":
    main(prog_name="python -m sa_redis_cache")
