"""``python -m sa_redis_cache.worker``: the flush worker's command (see
:mod:`sa_redis_cache.strategies.write_behind.worker.runner`)."""

from __future__ import annotations

import sys

from sa_redis_cache.strategies.write_behind.worker.runner import main

sys.exit(main())
