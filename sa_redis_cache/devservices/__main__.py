"""Run :func:`sa_redis_cache.devservices.cli.main`: see that module for the usage."""

import sys

from sa_redis_cache.devservices.cli import main

sys.exit(main())
