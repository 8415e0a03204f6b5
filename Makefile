# The two commands from the README: `make train` and `make test`.
# Each one creates the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python

.PHONY: setup train test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip
	$(VENV_PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

train: setup
	$(VENV_PYTHON) train.py $(ARGS)

test: setup
	$(VENV_PYTHON) -m pytest $(ARGS)

lint: setup
	$(VENV_PYTHON) -m ruff check .
