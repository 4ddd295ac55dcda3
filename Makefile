# The two commands of README.md: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test test-fast install lint typecheck docs clean

# The browser tests drive Debian's Chromium (Playwright never downloads one); CI runs as root.
CHROMIUM ?= /usr/bin/chromium

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,loadtest]'  # loadtest: the Locust run is tested too
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chatd serve --config config/dev.toml

$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# Three test processes (pytest-xdist; a module stays in one process, so its servers are shared), then the tests
# whose latency bounds need a quiet machine, alone.  Add -x, -k or --lf through PYTEST_ARGS.
XDIST = -n 3 --dist loadfile

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check chatd tests loadtest
	$(BIN)/mypy
	$(BIN)/python -m pytest $(XDIST) -m "not long and not serial" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m "serial and not long" $(PYTEST_ARGS)

# Every unit test and the integration tests marked smoke: under 2 minutes.
test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest $(XDIST) -m "smoke and not long" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check chatd tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/chatd config-doc > docs/CONFIG.md
	$(BIN)/chatd frames-schema > docs/client-frames.schema.json

clean:
	rm -rf $(VENV) var
