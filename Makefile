# tokenbridge — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tokenbridge-installed
PYTEST_ARGS ?=

FUZZ_MINUTES ?= 10
MUTATION_ARGS ?=

.PHONY: help deps system-deps test lint demo bench fuzz mutation clean

help:
	@echo "make demo   - run the whole chain on a simulated token and sign a script"
	@echo "make test   - set up and run the full test suite (unit, integration, real PC/SC stack)"
	@echo "make lint   - ruff, and mypy --strict on protocol/ and both daemons"
	@echo "make bench  - measure latency/throughput against the budget (docs/performance.md)"
	@echo "make fuzz   - search with the fuzz targets for FUZZ_MINUTES (default 10), new seeds each run"
	@echo "make mutation - mutation testing of the safety-critical modules (docs/testing.md; ~1.5 h)"

system-deps:
	@bash .ci/system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# PYTHONWARNINGS: setuptools warns about every editable install in general terms.
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

deps: system-deps $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check protocol bridge_server bridge_client bridge_admin tests bench
	$(VENV)/bin/ruff format --check protocol bridge_server bridge_client bridge_admin tests bench
	$(VENV)/bin/mypy

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(VENV)/bin/tokenbridge demo

bench: deps
	$(PY) -m bench $(BENCH_ARGS)

fuzz: $(STAMP)
	$(PY) -m bench.fuzz --minutes $(FUZZ_MINUTES)

# Not part of `make test`: it runs every module's tests once per mutant (docs/testing.md says
# how long and how often). `make mutation MUTATION_ARGS="pin_guard --survivors-only"` after a test.
$(VENV)/.tokenbridge-mutation: $(STAMP) pyproject.toml
	@PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test,mutation]'
	@touch $@

mutation: $(VENV)/.tokenbridge-mutation
	nice -n 10 $(PY) -m bench.mutation $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .mutation .mutmut-cache
