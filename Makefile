# `make test` creates/uses .venv (transformers 5.23), installs the package with its dev extra, and runs the suite;
# `make test-min` does the same in .venv-min with the lowest supported transformers.
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_MIN ?= .venv-min
TRANSFORMERS_MIN := 5.19.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(VENV_MIN)/.installed: pyproject.toml
	python3 -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV_MIN)/bin/python -m pip install --quiet -e ".[dev]" transformers==$(TRANSFORMERS_MIN)
	touch $@

.PHONY: setup setup-min test test-min lint demo
setup: $(VENV)/.installed

setup-min: $(VENV_MIN)/.installed

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/integrations

test-min: setup-min
	OMP_NUM_THREADS=1 $(VENV_MIN)/bin/python -m pytest -n 2 --dist loadfile -q tests --ignore=tests/integrations

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/dense-connector demo
