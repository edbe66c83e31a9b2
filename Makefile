# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test unit lint bench bench-failover bench-switch bench-upgrade clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pgroute demo

test: $(BIN)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(BIN)/.installed
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# Lint, format and types; .ci/run runs it before the tests. Checks only, fixes nothing:
# `$(BIN)/ruff check --fix .` and `$(BIN)/ruff format .` make the changes.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pgroute tests bench

bench: $(BIN)/.installed
	$(BIN)/python bench/proxy.py

bench-failover: $(BIN)/.installed
	$(BIN)/python bench/failover.py

bench-switch: $(BIN)/.installed
	$(BIN)/python bench/switch.py

bench-upgrade: $(BIN)/.installed
	$(BIN)/python bench/upgrade.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
