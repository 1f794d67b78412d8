# make run: the embedded default job. make test: the test suite. Both set up .venv first.
# CPU machines use the torch 2.13.0 CPU wheel; on a GPU machine install the CUDA build of
# torch you need into .venv first (see README), and `make TORCH=torch ...` keeps it.
# .venv installs the versions CI tested (constraints.txt); `make test-latest` builds .venv-latest
# with the newest versions pyproject.toml allows and runs the suite there.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN = $(VENV)/bin
PIP_CONSTRAINTS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: run test test-latest test-export lint format install docs constraints

$(BIN)/.installed: pyproject.toml examples/neftune_plugin/pyproject.toml examples/contacts/pyproject.toml tests/ia3_plugin/pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIP_CONSTRAINTS) -e ".[test]" -e examples/contacts -e examples/neftune_plugin -e tests/ia3_plugin
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/ftengine run

# Files are spread over TEST_WORKERS processes, one torch thread each (threads of two workers
# sharing two cores only wait for each other); `pytest -q` alone runs them in one process.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# GGUF exports judged by llama.cpp itself (tests/test_export_llamacpp.py; CI skips them: building
# llama-cpp-python from its sdist takes minutes, see docs/export-runtimes.md). The CPU wheel is
# built once, without -march=native so the cached wheel runs on any x86-64 with AVX2, into
# $(WHEELS), and installed from there.
WHEELS ?= $(HOME)/.cache/ftengine/wheels
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
test-export: $(BIN)/.installed
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		$(BIN)/python -m pip wheel --no-deps -w $(WHEELS) llama_cpp_python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install -q $(PIP_CONSTRAINTS) --find-links $(WHEELS) -e ".[llamacpp]"
	$(BIN)/python -m pytest -q tests/test_export_llamacpp.py tests/test_export_ollama.py

# The formatter and linter CI runs (configured in pyproject.toml); `make format` applies them.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The suite against the newest versions pyproject.toml allows (a fresh venv, no constraints):
# upstream drift shows up here as a named failure, not as a red CI on an unrelated change.
test-latest:
	rm -rf .venv-latest
	$(MAKE) VENV=.venv-latest CONSTRAINTS= test

# Record the versions of .venv as the tested set (after the suite passed in it).
constraints: $(BIN)/.installed
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|ftengine|ftengine-contacts|ftengine-neftune|ftengine-ia3-test)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

docs: $(BIN)/.installed
	$(BIN)/python docs/generate_hooks.py
