# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - the main job: a demo load that works with or without a GPU
#   make test   - lint, the CPU tier, the kernel simulator tier, then the
#                 real-package tier (the cu13 extra's packages, no GPU)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is optional for users; the tests use it for framework="torch". The
# development machines ship a CPU wheel of 2.13.0; TORCH= skips it.
TORCH ?= torch==2.13.0
# The GPU extra test-gpu installs: cu12 (CUDA 12 drivers) or cu13.
CUDA ?= cu12
# The real-package tier's own environment: the cu13 extra (cupy, numba-cuda,
# kvikio) next to the test tools, so that .venv stays free of cupy and the
# CPU tier keeps testing the no-cupy path.
VENV_CU13 ?= .venv-cu13
STAMP_CU13 := $(VENV_CU13)/.installed

.PHONY: install install-cu13 test test-realpkg test-gpu lint demo bench-cpu clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(TORCH))
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

$(STAMP_CU13): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_CU13)
	$(VENV_CU13)/bin/python -m pip install -q --upgrade pip
	$(VENV_CU13)/bin/python -m pip install -q -e '.[cu13,test]'
	touch $(STAMP_CU13)

install-cu13: $(STAMP_CU13)

lint: $(STAMP)
	$(BIN)/ruff check gpuload kernels tests bench examples
	$(BIN)/ruff format --check gpuload kernels tests bench examples
	$(BIN)/hadolint docker/Dockerfile

test: lint
	$(BIN)/python -m pytest -q --ignore=tests/cudasim --ignore=tests/realpkg
	# Numba reads NUMBA_ENABLE_CUDASIM at import: the simulator tier runs alone.
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q tests/cudasim
	$(MAKE) test-realpkg

# The real CUDA packages (no GPU needed): what gpuload calls on them exists
# with the arguments it passes, and the fakes match them. TEST_REALPKG=1:
# missing packages fail the tier instead of skipping it.
test-realpkg: $(STAMP_CU13)
	TEST_REALPKG=1 $(VENV_CU13)/bin/python -m pytest -q tests/realpkg
	# The gpu tests with the real packages and no device: collected, then
	# skipped for want of a device (never an error). Where a GPU is present,
	# make test-gpu runs them for real instead.
	if ls /dev/nvidia[0-9]* >/dev/null 2>&1; then echo "a GPU is here: see make test-gpu"; \
	else $(VENV_CU13)/bin/python -m pytest -q -m gpu --ignore=tests/cudasim \
	  --ignore=tests/realpkg tests; fi

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
	rm -rf $(VENV) $(VENV_CU13) .pytest_cache .ruff_cache .hypothesis
