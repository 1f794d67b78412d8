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

.PHONY: run test test-latest lint format install docs constraints

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
