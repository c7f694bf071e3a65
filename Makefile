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
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests --ignore=tests/integrations

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/dense-connector demo

# `make test-eval`: lmms-eval's own environment. lmms-eval pulls torchvision, which replaces torch 2.13, so it lives
# apart from .venv; torch and torchvision are pinned first so pip does not pick them itself.
VENV_EVAL ?= .venv-eval
PY_EVAL := $(VENV_EVAL)/bin/python

$(VENV_EVAL)/.installed: pyproject.toml
	python3 -m venv $(VENV_EVAL)
	$(PY_EVAL) -m pip install --quiet --upgrade pip
	$(PY_EVAL) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY_EVAL) -m pip install --quiet -e ".[dev,eval]"
	touch $@

.PHONY: setup-eval test-eval
setup-eval: $(VENV_EVAL)/.installed

test-eval: setup-eval
	OMP_NUM_THREADS=1 $(PY_EVAL) -m pytest -q tests/integrations/test_lmms_eval.py \
		$(wildcard tests/integrations/test_torchvision.py)
