# Two commands do everything on a fresh machine:
#   make run    set up, then generate the sample videos with the tiny model (outputs/sample-tiny)
#   make test   set up, then run the test suite (everything: what CI runs)
#   make test-fast  the logic of every module in under two minutes: no model runs, no processes, no browser
# ARGS passes Hydra overrides to `make run`, e.g. make run ARGS="model=svd_xt manifest.path=m.parquet"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU the CPU build of torch is installed first (fast, small);
# where nvidia-smi works, pip's default (CUDA) build is used. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: setup run test test-fast browser clean gpu-kit

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(BIN)/svd-batch $(ARGS)

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not distributed and not browser and not process" $(PYTEST_ARGS)

# The gallery test loads the page in headless Chromium (Debian package `chromium`).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium for the gallery test"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Wheels for the GPU machine (scripts/gpu-kit.txt and svd-batch's own) in gpu-kit/, carried there with the tree;
# scripts/gpu_check.sh installs them offline (README, "On the GPU machine").
gpu-kit:
	bash scripts/gpu_kit.sh $(or $(GPU_KIT),gpu-kit)

clean:
	rm -rf $(VENV) outputs/* build *.egg-info
