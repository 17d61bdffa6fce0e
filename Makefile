# Two entry points for a fresh machine:
#   make demo   installs into .venv and trains + evaluates the tiny CoCa on the embedded shapes data
#   make test   installs into .venv and runs the test suite
# The Python the pins are for (jax 0.12 needs >= 3.12): python3.12 if it runs, else the newest
# 3.12 that pyenv installed (found in its versions folder, so pyenv need not be on the PATH; its
# python3.12 shim fails while another version is selected).
PYTHON_VERSION := 3.12
PYTHON ?= $(shell python$(PYTHON_VERSION) -c '' 2>/dev/null && echo python$(PYTHON_VERSION) || \
  ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/$(PYTHON_VERSION).*/bin/python$(PYTHON_VERSION) \
  2>/dev/null | sort -V | tail -n 1 | grep . || echo python$(PYTHON_VERSION))
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/shapes_coca
# Tests use 8 simulated CPU devices for the sharding tests; xdist runs two workers (2 cores).
# Modules marked xdist_group keep their tests on one worker, so their module fixtures (trained
# runs, converted models) are built once.
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install install-test demo test clean

# --clear: a changed requirements file or Python rebuilds the venv from scratch, so nothing of
# an older stack is left behind.
$(VENV)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(PYTHON_VERSION)")' \
	  2>/dev/null || { \
	  echo "make: the pinned requirements need Python $(PYTHON_VERSION), and '$(PYTHON)' is not it;" \
	       "pass PYTHON=/path/to/python$(PYTHON_VERSION)" >&2; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
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
