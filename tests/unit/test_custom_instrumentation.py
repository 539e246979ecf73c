"""A class with a custom instrumentation manager is described as uncacheable.

The cache reads and builds objects through their ``__dict__`` (``hydrate``), as
SQLAlchemy's default instrumentation keeps them; ``sqlalchemy.ext.instrumentation`` lets a
class keep its attributes elsewhere. Such a class's rows are never stored: its model info
has no codec, with a reason, and a warning says so. The check runs in a child process:
importing ``sqlalchemy.ext.instrumentation`` changes SQLAlchemy's lookups process-wide.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import warnings

    from sqlalchemy import Column, Integer, Table
    from sqlalchemy.ext.instrumentation import InstrumentationManager
    from sqlalchemy.orm import registry

    from sa_redis_cache.models import UncacheableModelWarning, build_model_info

    reg = registry()
    table = Table("custom", reg.metadata, Column("id", Integer, primary_key=True))

    class Custom:
        __sa_instrumentation_manager__ = InstrumentationManager

    class Plain:
        pass

    reg.map_imperatively(Custom, table)
    plain_table = Table("plain", reg.metadata, Column("id", Integer, primary_key=True))
    reg.map_imperatively(Plain, plain_table)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        custom = build_model_info(Custom.__mapper__, None)
        plain = build_model_info(Plain.__mapper__, None)
    assert custom.codec is None, custom
    assert "custom instrumentation manager" in custom.uncacheable_reason
    assert plain.codec is not None and plain.uncacheable_reason is None
    messages = [str(w.message) for w in caught if w.category is UncacheableModelWarning]
    assert len(messages) == 1 and "Custom" in messages[0], messages
    print("ok")
    """
)


def test_a_custom_instrumentation_manager_makes_the_model_uncacheable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
