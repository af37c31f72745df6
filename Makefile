# xtc-lightning: `make train` runs the quickstart pipeline offline, `make test` the test suite.
# Both create .venv on first use and install everything the project needs.

PYTHON        ?= python3
VENV          ?= .venv
# Pinned: the CPU wheel of this version lies on the development machines' disk; an
# unpinned torch pulls a multi-GB CUDA build. Override for GPU machines: make TORCH_VERSION=...
TORCH_VERSION ?= 2.13.0
EXTRAS        ?= dev,minilm,report,optuna,onnx
ARGS          ?=
# Processes for the tests that need no Slurm cluster (pytest-xdist). Most tests start train.py
# subprocesses that import torch and Lightning and train tiny models; on 2 cores two processes
# ran them in 752 s against ~960 s for one.
JOBS          ?= 2

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

# The offline GLUE copy beside the checkout, when there is one (the data loader reads GLUE_DIR).
GLUE_DIR ?= $(if $(wildcard ../shared/data/glue/SST-2),$(abspath ../shared/data/glue),)
export GLUE_DIR

.PHONY: help install train sweep test test-fast test-slurm lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)  ## create .venv and install torch, the project and its extras

train: $(STAMP)  ## run the quickstart XTC pipeline on the offline default (ARGS=... adds overrides)
	$(BIN)/python train.py experiment=quickstart $(ARGS)

# `make sweep`: a wandb sweep file's grid, run here as a Hydra multirun (no wandb server needed).
SWEEP ?= sweeps/grid.yaml

sweep: $(STAMP)  ## run a sweep file's grid as a local Hydra multirun (SWEEP=sweeps/grid.yaml ARGS=...)
	set -f; overrides="$$($(BIN)/python -m xtc_lightning.sweeps $(SWEEP))" && $(BIN)/python train.py -m $$overrides $(ARGS)

# The Slurm tests run by themselves first (their jobs on a real cluster must not compete with other
# tests for the cores), then the rest on $(JOBS) processes. When ARGS selects no Slurm test, the
# first run collects none (pytest exit 5): accepted unless XTC_REQUIRE_SLURM (CI) requires them.
test: $(STAMP)  ## run the whole test suite (offline)
	$(BIN)/python -m pytest -m slurm $(ARGS) || [ $$? -eq 5 -a -z "$$XTC_REQUIRE_SLURM" ]
	$(BIN)/python -m pytest -m "not slurm" -n $(JOBS) --dist worksteal $(ARGS)

test-fast: $(STAMP)  ## the tests without the slow end-to-end runs and the Slurm cluster
	$(BIN)/python -m pytest -m "not slow and not slurm" -n $(JOBS) --dist worksteal $(ARGS)

test-slurm: $(STAMP)  ## the tests against a local Slurm cluster (started if not up: needs root)
	$(BIN)/python -m pytest -m slurm $(ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf runs cache .pytest_cache
