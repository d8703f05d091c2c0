# The README's two commands: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test test-real lint bench demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/capbalancer serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q -p no:randomly --durations=15

test-real: $(STAMP)
	$(PY) -m pytest -q -m real_engine --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check capbalancer tests bench

demo: $(STAMP)
	$(VENV)/bin/capbalancer demo

clean:
	rm -rf $(VENV) build *.egg-info
