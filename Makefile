# The README's two commands: `make demo` and `make test`. Each sets up .venv
# on a fresh machine (python3 -m venv + pip install -e '.[dev]') and runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/digits_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

lint: $(STAMP)
	$(BIN)/ruff check sam_optax tests benchmarks examples

# Speed, memory and compile cost of every SAM row, interleaved in one run:
# benchmarks/results/speed_<device>.{md,json,png}. < 15 min on 2 CPU cores.
# On a GPU: make bench BENCH_ARGS="--steps 100 --variant-workloads all".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py $(BENCH_ARGS)

# Research-fidelity table and plot (label noise, SGD vs SAM): < 20 min on 2 cores.
results: $(STAMP)
	$(BIN)/python benchmarks/label_noise.py

clean:
	rm -rf $(VENV) build *.egg-info
