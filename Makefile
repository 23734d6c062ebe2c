# `make run`  — install the runtime pins only, migrate, serve on the embedded defaults (SQLite, in-process bus, devnet).
# `make test` — install, lint, type-check, run every test (PostgreSQL and Redis on 127.0.0.1; the browser
#               tests need Debian's chromium, installed here when missing and we are root).
# `make demo`  — a running dashboard with simulated agent traffic (`smartspace demo`).
# `make ui`    — rebuild the dashboard bundle (ui/ → server/static, committed) from the lockfile (Node).
# `make typecheck` — mypy as configured in pyproject.toml [tool.mypy] (strict on domain/ and agentic/).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export SMARTSPACE_TEST_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test
export SMARTSPACE_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install run test typecheck fuzz lint fmt bench lock clean contracts ui chromium demo

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

test: install chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

typecheck: install
	$(BIN)/mypy

# Schemathesis over the whole OpenAPI (every phase, user token and sk- key, SQLite and PostgreSQL) with
# more examples than the bounded run inside `make test`.
fuzz: install
	SMARTSPACE_FUZZ_EXAMPLES=$${SMARTSPACE_FUZZ_EXAMPLES:-100} $(BIN)/pytest -m fuzz -s tests/e2e/test_fuzz_openapi.py

# Browser tests drive /usr/bin/chromium (never a downloaded browser). Missing it, root with apt-get
# installs it; anyone else gets a loud warning and the browser tests skip.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing Debian's chromium for the browser tests"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/tmp/smartspace-chromium.log 2>&1 \
	      || { tail -5 /tmp/smartspace-chromium.log; echo "!!! make: chromium could not be installed: the browser tests will be SKIPPED"; }; \
	  else \
	    echo "!!! make: /usr/bin/chromium is missing (apt-get install chromium as root): the browser tests will be SKIPPED"; \
	  fi; \
	fi

# The dashboard: `npm ci` from ui/package-lock.json, then vite builds into server/static (commit it).
ui:
	cd ui && npm ci --no-audit --no-fund && npm run build

demo: install
	$(BIN)/smartspace demo

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
