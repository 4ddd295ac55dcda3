# The two commands of README.md: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test install lint typecheck docs clean

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

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check chatd tests
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check chatd tests loadtest

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/chatd config-doc > docs/CONFIG.md
	$(BIN)/chatd frames-schema > docs/client-frames.schema.json

clean:
	rm -rf $(VENV) var
