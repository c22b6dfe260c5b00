# Andromeda compute scheduler. `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# WITH_TORCH=1 also installs the CPU build of PyTorch, so the gloo DDP path is exercised.
WITH_TORCH ?= 0
TORCH_VERSION ?= 2.13.0

.PHONY: help install demo demo-repeat test test-fast bench lint typecheck gpu-check clean

help:
	@echo "make demo       run the whole loop locally (3 sites of simulated GPU nodes + SQLite)"
	@echo "make demo-repeat N=20  run the demo N times in a row and report the pass count"
	@echo "make test       install and run the test suite (needs PostgreSQL at 127.0.0.1:5432)"
	@echo "make bench      run the benchmarks in bench/ and print their tables"
	@echo "make lint       ruff + mypy"
	@echo "make clean      remove the virtualenv and scratch data"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77' wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)
ifeq ($(WITH_TORCH),1)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
endif

demo: install
	$(BIN)/andromeda demo

demo-repeat: install
	scripts/demo_repeat.sh $(or $(N),20)

test: install
	$(BIN)/python -m pytest
	# The GCS probe's tests leave process-wide Ray client state behind that breaks later
	# clusters in the same process, so they run in a pytest process of their own.
	ANDROMEDA_TEST_ISOLATED=ray-probe $(BIN)/python -m pytest -q tests/agents/test_ray_probe.py

test-fast: install
	$(BIN)/python -m pytest -m "not ray"

bench: install
	$(BIN)/python bench/bench_policy.py
	$(BIN)/python bench/bench_sites.py
	$(BIN)/python bench/bench_heartbeat.py
	$(BIN)/python bench/bench_statements.py
	$(BIN)/python bench/bench_agent.py
	$(BIN)/python bench/bench_spool.py
	$(BIN)/python bench/bench_cycle.py
	$(BIN)/python bench/bench_fleet.py

lint: install
	$(BIN)/ruff check scheduler agents tests bench examples
	$(BIN)/mypy scheduler agents

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache *.egg-info
