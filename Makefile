# The README's two set-up commands are `make run` and `make test`; `.ci/run` calls `make test`.
VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip -q --disable-pip-version-check
CONFIG ?= config.yaml

.PHONY: install install-test system-packages run test bench clean-storage

install: $(VENV)/.installed

# torch first, pinned, so that nothing that depends on it pulls a CUDA build from the registry.
$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

system-packages:
	scripts/install-system-packages.sh

run: install
	$(VENV)/bin/dicom-node serve --config $(CONFIG)

test: install-test system-packages
	$(VENV)/bin/ruff check dicom_node inference web tests benchmarks
	$(VENV)/bin/ruff format --check dicom_node inference web tests benchmarks
	$(PYTHON) -m pytest

bench: install-test system-packages
	$(PYTHON) benchmarks/ingest.py
