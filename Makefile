# `make demo` runs the main job, `make test` the test suite; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo verify test test-slow lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/jax-resnet bench --json benchmarks/results.json --markdown benchmarks/results.md

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
