# The README's two commands: `make demo` (SGD vs SAM through the trainer) and
# `make test`. Each sets up .venv on a fresh machine (python3 -m venv + pip
# install -e '.[dev]') and runs.
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

# Style (ruff) and types (pyright, configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check sam_optax tests benchmarks examples
	$(BIN)/pyright

# Time x base and x hand-written for every method on the MLP and both CNN
# sizes (both paths for the schedule family), with the memory table:
# benchmarks/results/speed_<device>.{md,json,png}. ~20 min on 2 CPU cores.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_speed.py $(BENCH_ARGS)

# The paper's claims on Fashion-MNIST through the trainer (label noise, variants,
# m-sharpness): ~1.5 h on 2 shared CPU cores, resumable (finished runs are kept in
# benchmarks/results/fashion_mnist_cells/); tables and plots in benchmarks/results/.
RESULTS_ARGS ?=
results: $(STAMP)
	nice -n 10 $(BIN)/python benchmarks/fashion_mnist.py $(RESULTS_ARGS)

# The documentation (docs/, Sphinx): docs/_build/html/index.html. Warnings
# are errors; the >>> examples of the pages (docs/**/*.md) run as doctests.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m pip install -q -r docs/requirements.txt
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html
	$(BIN)/python -m pytest -q --doctest-glob='*.md' --ignore=docs/conf.py \
		--ignore=docs/_build docs

clean:
	rm -rf $(VENV) build *.egg-info
