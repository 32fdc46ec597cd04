# tfloop: `make demo` runs the whole loop on embedded defaults, `make test` runs the test suite.
# Both create .venv with the pinned dependency set (requirements/lock.txt) when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfloop-installed
TFSA := tensorflow-serving-api==2.21.0

.PHONY: demo test test-fast lint lock bench system-deps clean

$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -c requirements/lock.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(TFSA)
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tfloop demo

# System tools the end-to-end tests use (buildah, debootstrap, a registry, Chromium). Installed when
# missing and possible; tests that still lack a tool skip with a loud reason.
system-deps:
	@bash scripts/system-deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: $(STAMP) system-deps
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/serving.py

lock: $(STAMP)
	@{ head -2 requirements/lock.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(tensorflow==|tensorflow-serving-api)'; } > requirements/lock.new && mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) .tfloop .pytest_cache
