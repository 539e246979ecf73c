# Developer and CI entry points. `make test` sets itself up on a fresh machine: it creates
# .venv and installs the package with its dev and bench extras before running anything.
# Services (Postgres, Redis) are found or started by devservices/, the repository's own
# development package (not in the wheel; importable because make runs from the root).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEVSERVICES := $(BIN)/python -m devservices --

.DEFAULT_GOAL := test
.PHONY: test test-sa20 lint typecheck pytest demo bench bench-smoke clean distclean

# Re-installs when pyproject.toml changes (new dependencies); the marker records success.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[dev,bench]'
	touch $@

test: lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

# Tests run in parallel (pytest-xdist), a file's tests in one worker: its module fixtures
# are set up once. Each worker makes its own database and namespaces (tests/conftest.py).
PYTEST_PARALLEL := -n auto --maxprocesses=4 --dist loadfile

pytest: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_PARALLEL)

# The ORM internals the cache relies on (sa_redis_cache/hydrate.py) differ between
# SQLAlchemy 2.0 and 2.1: the whole suite runs against both.
SA20_VENV := .venv-sa20
$(SA20_VENV)/.installed: pyproject.toml
	test -x $(SA20_VENV)/bin/python || $(PY) -m venv $(SA20_VENV)
	$(SA20_VENV)/bin/python -m pip install --disable-pip-version-check --quiet -e '.[dev]' 'SQLAlchemy[asyncio]>=2.0.30,<2.1'
	touch $@

test-sa20: $(SA20_VENV)/.installed
	$(SA20_VENV)/bin/python -c 'import sqlalchemy; print("SQLAlchemy", sqlalchemy.__version__)'
	$(SA20_VENV)/bin/pytest -q $(PYTEST_PARALLEL)

demo: $(VENV)/.installed
	$(DEVSERVICES) $(BIN)/python -m examples.demo

bench: $(VENV)/.installed
	$(DEVSERVICES) $(BIN)/python -m benchmarks.run
	$(DEVSERVICES) $(BIN)/python -m benchmarks.cases_write_behind --out benchmarks/results/write_behind.md
	$(DEVSERVICES) $(BIN)/python -m benchmarks.async_ratio --out benchmarks/results/async.md

bench-smoke: $(VENV)/.installed
	$(DEVSERVICES) $(BIN)/python -m benchmarks.run --smoke
	$(DEVSERVICES) $(BIN)/python -m benchmarks.cases_write_behind --smoke

# Build and tool caches only; `distclean` also removes the virtualenv.
clean:
	rm -rf build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(SA20_VENV)
