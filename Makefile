# The two commands a newcomer needs are `make demo` and `make test`; both bootstrap everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a GPU machine: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint slurm-up slurm-down clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# make slurm-up NODES=2 also starts the two-node cluster (slurm/README.md); slurm-down stops both.
NODES ?= 1
slurm-up:
	bash slurm/local/start.sh --nodes $(NODES)

slurm-down:
	bash slurm/local/stop.sh

# A cluster that cannot start here (not root, no Debian packages) does not stop the run:
# the slurm tests then skip with the reason, or fail with start.sh's output when it should have worked.
test: setup
	-bash slurm/local/start.sh || echo "local SLURM could not start: tests marked slurm will say why"
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: no cluster, no slow end-to-end runs.
test-fast: setup
	$(PY) -m pytest -m "not slurm and not slow" $(PYTEST_ARGS)

# The whole chain on synthetic data (igfiqa demo --help); e.g. make demo DEMO_ARGS="--steps 40 --local".
# Without root or SLURM packages the cluster cannot start: the demo then trains here and says why.
demo: setup
	bash slurm/local/start.sh || echo "local SLURM could not start: the demo will train locally"
	$(VENV)/bin/igfiqa demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
