# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test unit bench bench-failover bench-switch clean

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

bench: $(BIN)/.installed
	$(BIN)/python bench/proxy.py

bench-failover: $(BIN)/.installed
	$(BIN)/python bench/failover.py

bench-switch: $(BIN)/.installed
	$(BIN)/python bench/switch.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
