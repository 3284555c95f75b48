# Everything a fresh machine with Python 3.11 needs: `make demo`, `make test`.
PYTHON ?= python3.11
TOOLS  := .venv-tools
VENV   := .venv
UV     := $(TOOLS)/bin/uv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedbeam-installed
UV_VERSION := 0.13.8

.PHONY: demo test lint bench env clean lock install-check

env: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml requirements/lock.txt requirements/overrides.txt
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(PY) -r requirements/lock.txt \
	    --override requirements/overrides.txt
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

# The main job end to end on real data (scikit-learn's handwritten digits).
demo: $(STAMP)
	$(PY) -m fedbeam.demo --workdir build/demo

# The test suite.
test: $(STAMP)
	mkdir -p build
	$(PY) -m pytest -q tests

# Formatter and linter (ruff, configured in pyproject.toml); CI fails on either.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# The README's install commands, each in a fresh venv outside the checkout, from a built
# wheel (.ci/install_check.sh; needs the package registry). CI runs it after the tests.
install-check: $(UV)
	UV=$(abspath $(UV)) PYTHON=$(PYTHON) bash .ci/install_check.sh

bench: $(STAMP)
	$(PY) -m bench.run_all

# Re-pin requirements/lock.txt after changing pyproject.toml (every extra; pins already in
# lock.txt are kept where the ranges allow them).
lock: $(UV)
	$(UV) pip compile pyproject.toml --all-extras \
	    --override requirements/overrides.txt --python-version 3.11 \
	    --no-annotate --no-header -o requirements/lock.txt

clean:
	rm -rf $(VENV) $(TOOLS) build
