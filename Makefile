# The README's two commands: `make demo` and `make test`. Each sets up what it needs: a virtualenv
# in .venv, system tools through apt-get where a step needs one (scripts/ensure-tools).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TOOLS := .tools
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(TOOLS)/criu/bin:$(PATH)

.PHONY: venv lint test test-fast bench demo criu tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# CRIU 4.2 with its own glibc (older CRIU fails on 6.18 kernels); see scripts/install-criu. Beside
# it, the fast-restore build thaw exec restores with (scripts/build-criu-fast, ~1 min once).
criu:
	scripts/install-criu $(TOOLS)/criu
	scripts/build-criu-fast $(TOOLS)/criu-fast

# System tools the tests and benchmarks use (wrk, kubectl), installed with apt-get when missing.
tools:
	scripts/ensure-tools

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint criu tools
	$(VENV)/bin/pytest

# Skips the lint step and the slow marks while iterating.
test-fast: venv
	$(VENV)/bin/pytest -x -m "not slow"

bench: venv criu tools
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench

demo: venv criu
	$(VENV)/bin/thaw demo

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache .hypothesis
