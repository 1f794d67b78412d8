# make run: the embedded default job. make test: the test suite. Both set up .venv first.
# CPU machines use the torch 2.13.0 CPU wheel; on a GPU machine install the CUDA build of
# torch you need into .venv first (see README), and `make TORCH=torch ...` keeps it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: run test install docs

$(BIN)/.installed: pyproject.toml examples/neftune_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" -e examples/neftune_plugin
	touch $@

install: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/ftengine run

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

docs: $(BIN)/.installed
	$(BIN)/python docs/generate_hooks.py
