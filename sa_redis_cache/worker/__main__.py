"""``python -m sa_redis_cache.worker``: the flush worker's command, ``sa-redis-cache worker``
run on its own (see :func:`sa_redis_cache.cli.admin.worker_main`)."""

from __future__ import annotations

import sys

from sa_redis_cache.cli.admin import worker_main

sys.exit(worker_main())
