# Two entry points for a fresh machine:
#   make demo   installs into .venv and trains + evaluates the tiny CoCa on the embedded shapes data
#   make test   installs into .venv and runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/shapes_coca
# Tests use 8 simulated CPU devices for the sharding tests; xdist runs two workers (2 cores).
# Modules marked xdist_group keep their tests on one worker, so their module fixtures (trained
# runs, converted models) are built once.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install install-test demo test clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-test-nodeps.txt
	$(PY) -m pip install -r requirements-test.txt
	$(PY) -m pip install --no-deps -r requirements-test-nodeps.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m vlm_jax.demo --workdir $(WORKDIR)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs
