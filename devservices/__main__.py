"""Run :func:`devservices.cli.main`: see that module for the usage."""

import sys

from devservices.cli import main

sys.exit(main())
