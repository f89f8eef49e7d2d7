# Two entry points (see README): `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first, as a constraint, so that no dependency pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt "$(TORCH_PIN)"
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/rlhf demo --out runs/demo

test: install
	$(BIN)/python -m pytest

# the tests marked slow (kill-and-resume of full-weight runs and of 2 processes), left out of `make test` to keep
# CI inside its budget
test-slow: install
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

.PHONY: install demo test test-slow lint
