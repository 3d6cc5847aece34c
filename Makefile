# One-command entry points. Each target creates .venv (Python 3.11) and installs what is missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_INDEX ?=
# Tests that start torchrun use both cores; a single pytest worker keeps them from oversubscribing.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider --durations=10

.PHONY: help venv test test-all test-gpu demo bench clean golden

help:
	@echo "make demo      - set up, generate demo data, run the tiny Stage 0-4 recipes on CPU"
	@echo "make test      - set up and run the test suite (under 15 minutes on 2 cores)"
	@echo "make test-all  - also the slow tests"
	@echo "make test-gpu  - GPU smoke tests (in the Docker image; skipped without CUDA)"
	@echo "make bench     - benchmarks, written to bench/results.md"
	@echo "make golden    - regenerate the golden losses (tests/golden/*.json) after a numerics change"

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that nothing later resolves "torch" to a CUDA wheel. Where
	# pip has no local CPU wheel (find-links), point TORCH_INDEX at PyTorch's CPU index, e.g.
	# make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: venv
	$(PYTEST) -m "not slow and not gpu" tests

test-all: venv
	$(PYTEST) -m "not gpu" tests

# On a GPU machine, e.g. in the Docker image: python is the image's (CUDA torch + TE + kernels).
# -rs prints why a test was skipped (no CUDA, a missing kernel package, one GPU only).
GPU_PY ?= python
test-gpu:
	$(GPU_PY) -m pytest -q -p no:cacheprovider -rs --durations=10 -m gpu tests/cluster

demo: venv
	$(PY) -m megatron_vlm.cli.demo

bench: venv
	$(PY) -m bench.run_all --out bench/results.md

clean:
	rm -rf $(VENV) build *.egg-info

# Regenerate tests/golden/*.json (golden losses) after an intended change of numerics.
golden: venv
	$(PY) -m tests.golden.update
