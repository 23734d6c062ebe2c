# `make run`  — install the runtime pins only, migrate, serve on the defaults (SQLite, in-process bus, devnet).
# `make test` — install, run every test (PostgreSQL and Redis on 127.0.0.1 by default).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export SMARTSPACE_TEST_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export SMARTSPACE_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run test fuzz lint fmt bench lock clean contracts

# Pins: requirements.lock (what the server runs on) and requirements-dev.lock (what only tests and tools add).
$(BIN)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -c requirements-dev.lock -e '.[dev]'
	@touch $@ $(BIN)/.runtime

$(BIN)/.runtime: pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e .
	@touch $@

install: $(BIN)/.installed

run: $(BIN)/.runtime
	$(BIN)/smartspace migrate
	$(BIN)/smartspace serve

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

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

# Re-pin after changing pyproject.toml: a scratch venv installs the runtime dependencies, then the dev extra,
# keeping every version already pinned (delete a line to upgrade that package); runtime pins go to
# requirements.lock, the ones only the dev extra needs to requirements-dev.lock.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	touch requirements.lock requirements-dev.lock
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -c requirements.lock -c requirements-dev.lock -e .
	$(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^smartspace' > requirements.lock.new
	$(LOCK_VENV)/bin/pip install -q -c requirements.lock -c requirements-dev.lock -e '.[dev]'
	$(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^smartspace' | grep -vxFf requirements.lock.new \
		> requirements-dev.lock || true
	mv requirements.lock.new requirements.lock
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) $(LOCK_VENV) .smartspace .pytest_cache
