# Every target installs into a local virtualenv first, so nothing depends on what the machine already has.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/gateway serve --config config/gateway.toml --bind 127.0.0.1:8000

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/embedded.py
	$(BIN)/python bench/live.py
	$(BIN)/python bench/pacing.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/idle.py
	$(BIN)/python bench/longaudio.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/storm.py
	$(BIN)/python bench/crash.py
	$(BIN)/python bench/fuzz.py
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/pg_driver.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
