# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - the main job: a demo load that works with or without a GPU
#   make test   - lint, the CPU tier, then the kernel simulator tier
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is optional for users; the tests use it for framework="torch". The
# development machines ship a CPU wheel of 2.13.0; TORCH= skips it.
TORCH ?= torch==2.13.0
# The GPU extra test-gpu installs: cu12 (CUDA 12 drivers) or cu13.
CUDA ?= cu12

.PHONY: install test test-gpu lint demo bench-cpu clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check gpuload kernels tests bench
	$(BIN)/ruff format --check gpuload kernels tests bench
	$(BIN)/hadolint docker/Dockerfile

test: lint
	$(BIN)/python -m pytest -q --ignore=tests/cudasim
	# Numba reads NUMBA_ENABLE_CUDASIM at import: the simulator tier runs alone.
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q tests/cudasim

# A CPU build of torch cannot take device memory: pass a CUDA one, e.g.
# make test-gpu CUDA=cu13 TORCH=torch (else the torch GPU tests skip).
test-gpu: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[$(CUDA),test,bench]' $(TORCH)
	$(BIN)/python -m pytest -q -m gpu --ignore=tests/cudasim tests

demo: $(STAMP)
	$(BIN)/gpuload demo

bench-cpu: $(STAMP)
	$(BIN)/python bench/cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
