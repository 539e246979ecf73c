"""``python -m sa_redis_cache.worker``: see :mod:`sa_redis_cache.worker.runner`."""

from __future__ import annotations

import sys

from .runner import main

sys.exit(main())
