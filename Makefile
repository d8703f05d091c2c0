# The README's two commands: `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' capbalancer/__init__.py)

.PHONY: run test test-real lint bench demo clean image k8s-tools compile pure

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Optional, for speed: the scheduling core (capbalancer/sched/) compiled by mypyc, about 4x less CPU per decision
# and 1.3x the proxy's throughput (bench/results/compiled.md). `make run` and `make test` build it when mypyc (dev
# extras), a C compiler and Python's headers are there, again whenever a source changes; a missing tool or a
# failed build only says why. The .py files load whenever the build is missing, stale or unwanted:
# CAPBALANCER_PURE=1 neither builds nor loads it. `make compile` builds it and fails loudly; `make pure` removes it.
SCHED_SOURCES := $(wildcard capbalancer/sched/*.py)
COMPILED := $(VENV)/.compiled

$(COMPILED): $(STAMP) $(SCHED_SOURCES) tools/compile_sched.py
	@if [ -n "$$CAPBALANCER_PURE" ] && [ "$$CAPBALANCER_PURE" != 0 ]; then \
	  echo "compile: CAPBALANCER_PURE is set: the scheduling core runs as plain Python"; \
	else $(PY) tools/compile_sched.py --if-possible && touch $@; fi

compile: $(STAMP)
	$(PY) tools/compile_sched.py
	touch $(COMPILED)

pure:  # until a source changes or `make compile`
	rm -rf capbalancer/sched/*.so capbalancer/sched/compiled.json build/mypyc
	test ! -d $(VENV) || touch $(COMPILED)

run: $(STAMP) $(COMPILED)
	$(VENV)/bin/capbalancer serve --host $(HOST) --port $(PORT)

test: $(STAMP) $(COMPILED) k8s-tools
	$(PY) -m pytest -q -p no:randomly --durations=15

test-real: $(STAMP)
	$(PY) -m pytest -q -m real_engine --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check capbalancer tests bench

demo: $(STAMP)
	$(VENV)/bin/capbalancer demo

clean:
	rm -rf $(VENV) build *.egg-info capbalancer/sched/*.so capbalancer/sched/compiled.json

# The proxy's container image, under the name the Kubernetes output uses (capbalancer:<version>).
image:
	docker build -t capbalancer:$(VERSION) .

# kubectl renders the Kubernetes output in the tests (`kubectl kustomize`). If none is installed, Debian's
# package (kubernetes-client) is: as root directly, else through sudo; without either the tests that need
# it are skipped, and this says why.
k8s-tools:
	@command -v kubectl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq kubernetes-client; then :; \
	  else echo "k8s-tools: could not install kubectl (Debian package kubernetes-client); Kubernetes render tests will be skipped"; fi; }
