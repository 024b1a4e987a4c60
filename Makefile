# anyserve developer commands. Everything runs from .venv, which `make install`
# builds from nothing (a fresh machine needs only Python >= 3.11 and pip).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install proto lint test unit demo bench soak clean

install: $(STAMP)

# redis-server for the Redis registry tests (they start their own, on a free
# port): installed when missing, if we are root and have apt-get.
$(STAMP): pyproject.toml
	command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server); } \
		|| echo "redis-server not installed: the Redis registry tests will be skipped"
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

# Five minutes of mixed load at 64 clients; checks answers and that memory and
# descriptors stay flat (not part of `make bench` or the tests).
soak: $(STAMP)
	$(PY) -m benchmarks.soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
