# anyserve developer commands. Everything runs from .venv, which `make install`
# builds from nothing (a fresh machine needs only Python >= 3.11 and pip).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install proto lint test unit demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The only writer of anyserve/_proto/ (protos/generate.py says how).
proto: $(STAMP)
	$(PY) protos/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check anyserve tests benchmarks examples
	$(VENV)/bin/ruff format --check anyserve tests benchmarks examples
	$(VENV)/bin/mypy

test: $(STAMP)
	$(MAKE) lint
	$(PY) -m pytest -q

# The fast layer alone: no processes, no sockets to workers; seconds.
unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

demo: $(STAMP)
	$(PY) -m examples.demo

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
