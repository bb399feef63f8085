# The README's two commands:
#   make run    set up, tune a small default sweep into the embedded SQLite database on
#               whatever device is present, then show what the dispatcher chooses and why
#   make test   set up (including the vLLM test environment) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed pinned: on CPU-only machines an unpinned torch pulls several GB of
# CUDA wheels; 2.13.0 resolves to the CPU build these machines carry. A machine that
# already has torch (e.g. a CUDA build in the system site-packages) keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-dev run test test-fast lint clean

$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q "triton>=3.1"
	$(PIP) install -q -e ".[tuning,postgres]"
	touch $@

setup: $(VENV)/.setup-done

$(VENV)/.dev-done: $(VENV)/.setup-done
	$(PIP) install -q -e ".[dev]"
	touch $@

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
