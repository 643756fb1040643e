# timfusion: `make run` (installs if needed, then runs the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.timfusion-installed
# learn2learn 0.2.0 has no wheel for Python 3.11 and its sdist's generated C fails to
# compile there: build it once from the sdist with Cython 3 into a wheel cache shared by
# every clone on this machine (../shared/STACK.md).
WHEEL_CACHE ?= $(HOME)/.cache/timfusion/wheels
L2L_VERSION := 0.2.0
L2L_STAMP := $(WHEEL_CACHE)/.learn2learn-$(L2L_VERSION)-built
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled

.PHONY: install run test test-all bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(L2L_STAMP)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check 'torch==2.14.1' 'torchvision==0.29.1'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,meta]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-index --find-links $(WHEEL_CACHE) 'learn2learn==$(L2L_VERSION)'
	@touch $(STAMP)

$(L2L_STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check 'cython>=3' wheel setuptools numpy
	@set -euo pipefail; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	  $(BIN)/pip download -q --disable-pip-version-check --no-deps --no-binary :all: 'learn2learn==$(L2L_VERSION)' -d "$$work"; \
	  tar -xzf "$$work"/learn2learn-$(L2L_VERSION).tar.gz -C "$$work"; \
	  src="$$work/learn2learn-$(L2L_VERSION)"; rm -f "$$src"/learn2learn/data/*.c; \
	  $(BIN)/cython -3 "$$src"/learn2learn/data/*.pyx; \
	  mkdir -p $(WHEEL_CACHE); \
	  $(BIN)/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps "$$src" -w $(WHEEL_CACHE)
	@touch $(L2L_STAMP)

run: install
	$(BIN)/timfusion run

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	@mkdir -p benchmarks/results
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python "$$script" || exit 1; done

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs runs .pytest_cache .ruff_cache
