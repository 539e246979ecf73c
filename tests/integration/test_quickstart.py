"""The README quickstart runs as written (examples/quickstart.py is the README's code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from examples import quickstart

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs(
    database_url: str, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    quickstart.main(database_url, redis_url, namespace=namespace)
    out = capsys.readouterr().out
    assert "first read: ['item 1', 'item 3', 'item 5', 'item 7', 'item 9'], 1 SQL" in out
    assert "second read: ['item 1', 'item 3', 'item 5', 'item 7', 'item 9'], 0 SQL" in out
    assert "product 7 costs 9.99, 0 SQL statement(s)" in out
    engine = sa.create_engine(database_url)
    try:
        assert not sa.inspect(engine).has_table("qs_products")  # it cleans up after itself
    finally:
        engine.dispose()


def test_quickstart_runs_twice_without_stale_entries(
    database_url: str, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run recreates the table; the previous run's entries must not be served."""
    quickstart.main(database_url, redis_url, namespace=namespace)
    quickstart.main(database_url, redis_url, namespace=namespace)
    out = capsys.readouterr().out
    assert out.count("product 7 costs 9.99, 0 SQL statement(s)") == 2


def test_readme_quickstart_is_the_example() -> None:
    """The README's quickstart block is examples/quickstart.py, line for line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    source = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    code = source[source.index("from __future__") :]
    assert any(block.strip() == code.strip() for block in blocks), (
        "README.md must contain examples/quickstart.py (from `from __future__` on) verbatim"
    )
