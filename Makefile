# `make run`  — install, migrate, serve on the embedded defaults (SQLite, in-process bus, devnet).
# `make test` — install, lint, type-check, run every test (PostgreSQL and Redis on 127.0.0.1 by default).
# `make typecheck` — mypy as configured in pyproject.toml [tool.mypy] (strict on domain/ and agentic/).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export SMARTSPACE_TEST_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export SMARTSPACE_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run test typecheck fuzz lint fmt bench lock clean contracts

$(BIN)/.installed: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/smartspace migrate
	$(BIN)/smartspace serve

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

typecheck: install
	$(BIN)/mypy

# Schemathesis over the whole OpenAPI (every phase, user token and sk- key, SQLite and PostgreSQL) with
# more examples than the bounded run inside `make test`.
fuzz: install
	SMARTSPACE_FUZZ_EXAMPLES=$${SMARTSPACE_FUZZ_EXAMPLES:-100} $(BIN)/pytest -m fuzz -s tests/e2e/test_fuzz_openapi.py

lint: install
	$(BIN)/ruff check .

fmt: install
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/reserve.py
	$(BIN)/python bench/gateway.py

# Recompile the devnet USDC token (contracts/USDC.vy → contracts/USDC.json, committed; offline).
contracts: install
	$(BIN)/python contracts/build.py

# Re-pin every dependency (after changing pyproject.toml).
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^smartspace' > requirements.lock

clean:
	rm -rf $(VENV) .smartspace .pytest_cache
