# The README's two commands:
#   make run    set up, tune a small default sweep into the embedded SQLite database on
#               whatever device is present, then show what the dispatcher chooses and why
#   make test   set up (including the vLLM test environment) and run the test suite
#
# torch: a machine that already has it (e.g. a CUDA or ROCm build in the system
# site-packages, which the venv sees) keeps it. Otherwise, with an NVIDIA GPU, PyPI's
# torch (the CUDA build, Triton included); without a GPU, the CPU build from PyTorch's CPU
# index (PyPI's Linux wheel would pull several GB of CUDA libraries; a +cpu wheel that pip
# is already configured to find, e.g. in a local wheel directory, is used first); with a ROCm GPU,
# install PyTorch's ROCm build first (pytorch.org). Triton is installed only for the test
# suite on machines whose torch did not bring it (its interpreter runs the Triton kernels'
# tests on CPU); `make run` does not need it. On machines without a GPU the cpu extra
# (numba) is installed too: it brings moe_topk_softmax's fast CPU kernel.
SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TRITON_SPEC ?= triton>=3.1
# setuptools prints a banner on every editable install (an import-precedence notice about
# the install mode, not about this project); recent pip shows it even with -q.
EDITABLE_QUIET := PYTHONWARNINGS="ignore:Editable installation"
# cuda | rocm | cpu: which torch build this machine needs.
GPU_KIND := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; \
                    elif [ -e /dev/kfd ]; then echo rocm; else echo cpu; fi)

.PHONY: setup setup-dev run test test-fast lint clean

$(VENV)/.setup-done: pyproject.toml
	@test -x $(PY) || { echo "[setup] creating $(VENV) (sees the system site-packages)"; $(PYTHON) -m venv --system-site-packages $(VENV); }
	@echo "[setup] upgrading pip"; $(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "[setup] torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: kept"; \
	elif [ "$(GPU_KIND)" = cuda ]; then \
	  echo "[setup] installing torch $(TORCH_VERSION) (CUDA build, with Triton) ..."; \
	  $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	elif [ "$(GPU_KIND)" = rocm ]; then \
	  echo "[setup] ROCm GPU found and no torch: install PyTorch's ROCm build first (https://pytorch.org/get-started/locally/), then run make again" >&2; \
	  exit 1; \
	else \
	  echo "[setup] installing torch $(TORCH_VERSION) (CPU build) ..."; \
	  $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(PIP) install -q "torch==$(TORCH_VERSION)+cpu" --index-url "$(TORCH_CPU_INDEX)"; \
	fi
	@echo "[setup] installing kernmux (editable) with the tuning database extra$(if $(filter cpu,$(GPU_KIND)), and the cpu extra (numba: the fast CPU top-k),) ..."
	@$(EDITABLE_QUIET) $(PIP) install -q -e ".[tuning$(if $(filter cpu,$(GPU_KIND)),$(comma)cpu)]"
	@touch $@
	@echo "[setup] done: $(VENV)"

setup: $(VENV)/.setup-done

$(VENV)/.dev-done: $(VENV)/.setup-done
	@if ! $(PY) -c "import triton" 2>/dev/null; then \
	  echo "[setup] installing $(TRITON_SPEC) (for the Triton interpreter tests) ..."; \
	  $(PIP) install -q "$(TRITON_SPEC)"; \
	fi
	@echo "[setup] installing the test extra (pytest, PostgreSQL driver, import-linter) ..."
	@$(EDITABLE_QUIET) $(PIP) install -q -e ".[dev]"
	@touch $@

setup-dev: $(VENV)/.dev-done

run: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/main_job.sh

test: setup-dev
	bash scripts/vllm_env.sh
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -ra

# Without the vLLM end-to-end and other slow tests.
test-fast: setup-dev
	$(PY) -m pytest -q -ra -m "not slow"

lint: setup
	$(VENV)/bin/kernmux rules lint

clean:
	rm -rf $(VENV) .cache build *.egg-info
