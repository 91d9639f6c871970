# The two commands of the README: `make run` (the service on SQLite) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/clinicomm serve

test: install
	PYTHON=$(BIN)/python scripts/test

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# `make bench`: SQLite, and PostgreSQL + Redis twice: API and worker in one process, then 2 API
# processes and a worker (on 2 cores the one process costs less CPU per message); ~8 minutes.
# `BENCH_QUICK=1 make bench`: a smoke run under a minute (SQLite, small counts).
ifeq ($(BENCH_QUICK),1)
BENCH_ARGS ?= --quick
else
BENCH_ARGS ?= --database-url sqlite \
	--database-url postgresql+asyncpg://postgres@127.0.0.1/benchpg \
	--redis-url redis://127.0.0.1:6379/15 --processes 1 --processes 2
endif

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
