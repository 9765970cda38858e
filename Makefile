# blip2-service: `make run` starts the service, `make test` runs the tests. Both install first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build here (a local file); GPU hosts: make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install run test test-docker lint format bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Embedded defaults: SQLite under ./data, watching ./inbox, port 7777. MODEL=tiny-random for a self-test.
run: install
	mkdir -p inbox data
	WATCH_DIRS="$${WATCH_DIRS-./inbox}" $(VENV)/bin/blip2-service serve

# Two parts: the tests that leave the broker alone on two pytest-xdist workers (most of a test's
# time is a process importing torch or waiting on one), then the broker's tests one at a time,
# since some restart it. Exit status 5 (nothing selected, say by a -k in PYTEST_ARGS) is no failure.
test: install
	$(PY) -m pytest -n 2 -m "not broker" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(PY) -m pytest -m broker $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The image and the compose stack on a real Docker engine (installs docker.io, starts dockerd,
# debootstraps a base image when missing): tools/docker/test_docker.sh says what it checks.
test-docker: install
	PYTHON=$(PY) bash tools/docker/test_docker.sh

lint: install
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format src tests bench tools
	$(VENV)/bin/ruff check --fix src tests bench tools

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
