# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# The install compiles the pure core (setup.py): an edited module of it is built again.
CORE := $(filter-out %/__init__.py %/_compiled.py,$(wildcard engine/machine/*.py))

# A PostgreSQL that answers on 127.0.0.1:5432 is used by the tests; under CI=true a missing one fails them.
PG_URL := postgresql+asyncpg://postgres@127.0.0.1:5432/test
PG_UP := $(shell $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 5432), 1)" 2>/dev/null && echo yes)

# The dashboard's browser test drives Debian's Chromium through Playwright, which never
# downloads a browser of its own.
CHROMIUM := /usr/bin/chromium

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml setup.py $(CORE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/cjm serve

lint: $(STAMP)
	$(BIN)/ruff check engine channels tests bench setup.py
	$(BIN)/ruff format --check engine channels tests bench setup.py
	$(BIN)/mypy engine channels bench

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; \
	else \
		echo "the dashboard tests need Chromium at $(CHROMIUM): run as root, or" \
			"sudo apt-get install -y chromium chromium-driver" >&2; \
		exit 1; \
	fi

test: $(STAMP) lint $(CHROMIUM)
	$(if $(PG_UP),CJM_TEST_POSTGRES_URL=$${CJM_TEST_POSTGRES_URL:-$(PG_URL)}) $(BIN)/pytest -q

# Benchmarks print their figures beside a baseline measured in the same run and keep
# them in bench/results.json (bench/README.md: what each measures, figures measured).
# About an hour in all; the PostgreSQL ones run when a server answers.
BENCH_PG := $(if $(PG_UP),CJM_TEST_POSTGRES_URL=$${CJM_TEST_POSTGRES_URL:-$(PG_URL)})
bench: $(STAMP)
	$(BIN)/python bench/step.py
	$(BENCH_PG) $(BIN)/python bench/tracking.py $(if $(PG_UP),--postgres)
	$(BENCH_PG) $(BIN)/python bench/e2e.py $(if $(PG_UP),--postgres)
	$(BENCH_PG) $(BIN)/python bench/e2e.py --worker-process $(if $(PG_UP),--postgres)
	$(BIN)/python bench/timers.py
	$(BIN)/python bench/batches.py
	$(BIN)/python bench/emails.py
	$(BIN)/python bench/audience_export.py
	$(BIN)/python bench/kpis.py
	$(if $(PG_UP),$(BENCH_PG) $(BIN)/python bench/scaleout.py)
	$(BIN)/python bench/e2e.py --headline
	$(BIN)/python bench/e2e.py --headline --worker-process

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache cjm.db cjm.db-wal cjm.db-shm cjm.db.writers cjm.db.writers-waiting var test-artifacts
	rm -rf build engine/machine/*.so engine/machine/_compiled.py
