"""The installed package stands alone: it imports nothing that stays in the repository.

``devservices/`` (the bring-up of the demo, the tests and the benchmarks), ``tests/``,
``examples/`` and ``benchmarks/`` are not in the wheel; a library module that imported
one of them would fail on every installation but a source checkout.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "sa_redis_cache"
REPOSITORY_ONLY = ("devservices", "tests", "examples", "benchmarks")


def imported_roots(path: Path) -> set[str]:
    """The top-level names of the modules ``path`` imports (absolute imports only)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_library_module_imports_repository_code(path: Path) -> None:
    found = imported_roots(path) & set(REPOSITORY_ONLY)
    assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}, which the wheel lacks"


def test_the_development_bring_up_is_outside_the_package() -> None:
    assert (ROOT / "devservices" / "__init__.py").is_file()
    assert not (LIBRARY / "devservices").exists(), "it would ship in the wheel"
