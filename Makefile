# `make demo` and `make test` are the README's quick start; CI runs `make test` (.ci/run).
# Both build the virtual environment on first use: `make demo` with what igd needs to run,
# `make test` adds the test tools (captum, hypothesis, ray, pandas, timm, transformers).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install install-test test test-fast test-cuda demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# pytest-xdist workers, each given whole test files (a file's daemons and fixtures are started
# once). Most tests wait on igd processes of their own, so 3 keep 2 cores busy.
TEST_WORKERS ?= 3
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: install-test
	$(BIN)/python -m pytest $(XDIST) --durations=10

# The fast lane: every test but those marked slow or cuda, that is the in-process tests and
# those against the daemons shared by the whole run (tests/conftest.py).
test-fast: install-test
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not cuda" --durations=10

# Where a GPU is: the engine, checkpoints and daemon on CUDA (tests/test_cuda.py).
test-cuda: install-test
	$(BIN)/python -m pytest -m cuda tests/test_cuda.py

demo: install
	VENV=$(VENV) scripts/demo.sh

# All CPU benchmarks (about two hours on 2 cores; bench/accuracy.py is half of it), then docs/benchmarks.md. GPU: bench/gpu.py.
bench: install-test
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/chunks.py --json docs/benchmarks/chunks.json
	$(BIN)/python bench/engine.py --json docs/benchmarks/engine.json
	$(BIN)/python bench/compiled.py --json docs/benchmarks/compiled.json
	$(BIN)/python bench/e2e.py --json docs/benchmarks/e2e.json
	$(BIN)/python bench/client.py --json docs/benchmarks/client.json
	$(BIN)/python bench/concurrency.py --json docs/benchmarks/concurrency.json
	$(BIN)/python bench/memory.py --json docs/benchmarks/memory.json
	$(BIN)/python bench/max_request.py --json docs/benchmarks/max_request.json
	$(BIN)/python bench/budget.py --json docs/benchmarks/budget.json
	$(BIN)/python bench/accuracy.py --json docs/benchmarks/accuracy.json
	$(BIN)/python bench/batch.py --json docs/benchmarks/batch.json
	$(BIN)/python bench/targets.py --json docs/benchmarks/targets.json
	$(BIN)/python bench/xrai.py --json docs/benchmarks/xrai.json
	$(BIN)/python bench/soak.py --json docs/benchmarks/soak.json
	$(BIN)/python bench/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
