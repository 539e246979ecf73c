"""``sa-redis-cache``: the command line for operators (``python -m sa_redis_cache`` too).

Commands: ``stats`` (hits, misses and entries per model and region, summed over every
process, and what Redis holds per table, live with ``--watch``), ``inspect`` (one
row's or one statement's entry, decoded), ``invalidate`` (a row, a model or the namespace),
``dlq list`` (dead letters), ``demo``; ``worker`` and ``dlq replay`` come with write-behind.
See docs/cli.md.

Example::

    $ sa-redis-cache --models examples.shop --namespace shop stats
"""

from __future__ import annotations

from .app import cli, main

__all__ = ["cli", "main"]
