# Everything runs inside .venv/ in this checkout; the first target creates it.
# Installs are redone only when pyproject.toml or constraints.txt changes (the stamp files in .venv/);
# constraints.txt pins every package to the version the image (Dockerfile) ships.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check

.PHONY: demo test test-fast lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -c constraints.txt -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/mura-ray demo --out demo-out

test: install-test
	$(BIN)/python -m pytest -q --durations=15

# The tests that need no Ray (planning, protocol, metrics, decoding, the CLI's checks): a few minutes.
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not ray" --durations=10

lint: install-test
	$(BIN)/ruff check mura_ray tests jobs && $(BIN)/ruff format --check mura_ray tests jobs

clean:
	rm -rf $(VENV) demo-out .pytest_cache
