# `make test` creates/uses .venv, installs the package with its dev extra, and runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: setup test lint demo
setup: $(VENV)/.installed

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/dense-connector demo
