# gesr_jax: `make demo` and `make test` each build .venv on first use (Python >= 3.12, pinned set) and run.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# DEVICE=cpu (default), gpu (NVIDIA: the `cuda12` or `cuda13` extra) or tpu (the `tpu` extra), e.g.
# `make demo DEVICE=gpu`. The demo then runs with JAX_PLATFORMS set, so a missing accelerator is an error,
# not a silent CPU run. With DEVICE=gpu, CUDA=12|13 picks the CUDA line; by default it is read from the
# driver (`nvidia-smi` reports the newest CUDA it supports): 13 and later get cuda13, older ones cuda12.
DEVICE ?= cpu
ifeq ($(DEVICE),gpu)
CUDA ?= $(shell v=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n1); \
  if [ -n "$$v" ] && [ "$$v" -ge 13 ]; then echo 13; else echo 12; fi)
ifeq ($(filter $(CUDA),12 13),)
$(error CUDA must be 12 or 13, got '$(CUDA)')
endif
endif
EXTRAS_cpu := test
EXTRAS_gpu := test,cuda$(CUDA)
EXTRAS_tpu := test,tpu
PLATFORM_cpu :=
PLATFORM_gpu := cuda
PLATFORM_tpu := tpu
EXTRAS := $(EXTRAS_$(DEVICE))
ifeq ($(EXTRAS),)
$(error DEVICE must be cpu, gpu or tpu, got '$(DEVICE)')
endif
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)-$(DEVICE)$(if $(filter gpu,$(DEVICE)),$(CUDA))
PYTEST_ARGS ?=

# The first interpreter that really runs and is >= 3.12: PATH first (a pyenv shim can exist and still fail),
# then pyenv, preferring 3.12 (the version the pins are tested with).
define find_python
for c in python3.12 python3.13 python3.14 python3 python; do \
  p=$$(command -v $$c 2>/dev/null) || continue; \
  $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1 && { echo $$p; exit 0; }; \
done; \
if command -v pyenv >/dev/null 2>&1; then \
  for p in $$(ls -d "$$(pyenv root)"/versions/3.12*/bin/python3 2>/dev/null | sort -rV) \
           $$(ls -d "$$(pyenv root)"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V); do \
    $$p -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1 && { echo $$p; exit 0; }; \
  done; \
fi; exit 1
endef

.PHONY: demo test test-all test-slow bench-hstu ablations clean-venv python

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  py=$$( $(find_python) ) || { echo "error: gesr_jax needs Python >= 3.12 and none was found on PATH or under pyenv. Install one (e.g. 'pyenv install 3.12') and re-run." >&2; exit 1; }; \
	  echo "creating $(VENV) with $$py ($$($$py --version))"; \
	  $$py -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

python:
	@py=$$( $(find_python) ) && echo $$py || { echo "no Python >= 3.12 found on PATH or under pyenv" >&2; exit 1; }

## Train the two-tower baseline and GESR on the embedded synthetic data; print NE per task next to the oracle NE.
## DEVICE=gpu / DEVICE=tpu install the accelerator extra first and run there.
demo: $(STAMP)
	$(if $(PLATFORM_$(DEVICE)),JAX_PLATFORMS=$(PLATFORM_$(DEVICE)) )$(PY) experiments/demo.py

## The default suite (CPU, < 10 min on 2 cores; slow tests excluded).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

## Only the long runs.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

## Everything.
test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench-hstu: $(STAMP)
	$(PY) experiments/bench_hstu_attention.py

ablations: $(STAMP)
	$(PY) experiments/ablations.py --dataset synthetic
	$(PY) experiments/ablations.py --dataset ml1m

clean-venv:
	rm -rf $(VENV)
