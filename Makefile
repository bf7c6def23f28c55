# `make demo` runs the main job, `make test` the test suite; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo verify test test-slow test-lowest lint typecheck format bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,peers]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/jax-resnet train

verify: $(BIN)/.installed
	$(BIN)/jax-resnet verify

# KaTeX parses the derivations' math (tests/test_render.py); that test skips without npm.
KATEX := tests/katex/node_modules/.installed

$(KATEX): tests/katex/package.json tests/katex/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix tests/katex --no-audit --no-fund --loglevel=error && touch $@ \
			|| echo "npm ci failed (offline?): tests/test_render.py will skip the KaTeX check"; \
	else \
		echo "npm not found: tests/test_render.py will skip the KaTeX check"; \
	fi

test: $(BIN)/.installed $(KATEX)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 -m "not slow"

test-slow: $(BIN)/.installed $(KATEX)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 -m slow

# The fast suite at the bottom of pyproject.toml's ranges, in a second environment made afresh each
# run: uv's lowest-direct resolution puts each direct dependency at its lower bound (the rest at the
# newest that fits), and .ci/lowest_bounds.py fails where a bound is lower than what got installed.
# The peers extra is a second resolution (jax-privacy 2.0 needs newer optax and dp-accounting than
# the core's bounds), with the only tests that import them.
LOWEST := .venv-lowest
UV := $(LOWEST)/uv/bin/uv
LOWEST_PY := $(LOWEST)/env/bin/python

$(UV):
	$(PYTHON) -m venv $(LOWEST)/uv
	$(LOWEST)/uv/bin/python -m pip install --quiet uv

test-lowest: $(UV)
	$(UV) venv --quiet --clear --python $(PYTHON) $(LOWEST)/env
	$(UV) pip install --quiet --python $(LOWEST_PY) --resolution lowest-direct -e ".[dev]"
	$(LOWEST_PY) .ci/lowest_bounds.py core dev
	$(LOWEST_PY) -m pytest -q -n 2 --dist loadgroup --durations=10 -m "not slow"
	$(UV) venv --quiet --clear --python $(PYTHON) $(LOWEST)/env
	$(UV) pip install --quiet --python $(LOWEST_PY) --resolution lowest-direct -e ".[dev,peers]"
	$(LOWEST_PY) .ci/lowest_bounds.py peers
	$(LOWEST_PY) -m pytest -q tests/test_bench.py tests/test_dp.py -k "jax_privacy or kfac_jax"

# The documentation site (docs/README.md): sources where they live, warnings are errors, a fresh
# environment each time so that no warning hides in an unchanged page. tests/test_docs_site.py
# (make test-slow) opens every page in Chromium.
$(BIN)/.installed-docs: $(BIN)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(BIN)/.installed-docs $(KATEX)
	rm -rf docs/api/generated
	$(BIN)/sphinx-build -b html -c docs -W --keep-going -E -q . docs/_build/html
	@echo "built docs/_build/html/index.html"

lint: $(BIN)/.installed typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy rather than pyright: a pure-Python wheel from PyPI, no Node.js runtime to fetch on first run, so it
# installs with the dev extra like the other tools (and under `make test-lowest`'s resolution); settings in
# pyproject.toml's [tool.mypy].
typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/jax-resnet bench --json benchmarks/results.json --markdown benchmarks/results.md

clean:
	rm -rf $(VENV) $(LOWEST) runs .pytest_cache .hypothesis docs/_build docs/api/generated
