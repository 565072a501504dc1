# The README's two commands: `make run` (set up + the whole default job) and `make test`.
# Set-up is part of every target: a venv, the pinned installs, the Fashion-MNIST package.
# requirements.txt is the runtime set (every target); requirements-test.txt only `make test` adds.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV))/bin
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

# Telemetry and analytics off everywhere (no network calls from a run); headless plots.
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg
export PATH := $(BIN):$(PATH)

.PHONY: run run-full test setup fashion-mnist ui viz tune tune-ui apply-best bench gpu-check clean-outputs help

help:
	@echo "make run    set up, then 'dvc repro': shard -> pretrain -> probe for scenes and fashion_mnist"
	@echo "make run-full  the longer, higher-quality job (conf/full) -> data/full/, outside DVC"
	@echo "make test   set up, then run the test suite"
	@echo "make ui     MLflow UI on http://127.0.0.1:5000"
	@echo "make viz    kedro-viz (the pipelines) on http://127.0.0.1:4141"
	@echo "make tune   Optuna mask-ratio search (opt-in);  make apply-best  hands the winner to dvc repro"
	@echo "make tune-ui  optuna-dashboard of the study on http://127.0.0.1:8080"
	@echo "make bench  speed and quality benchmarks -> benchmarks/RESULTS.md"
	@echo "make gpu-check  GPU train-step figures (MFU, memory, compile) -> the gpu section of RESULTS.md; < 5 min"

# A fresh venv takes about 7 GB (torch 2.14.1 brings its CUDA libraries even on CPU machines):
# refuse early with the numbers rather than let pip fail half-way with "No space left on device".
MIN_FREE_GB ?= 8
VENV_PARENT = $(dir $(abspath $(VENV)))

# Installs go through uv (pinned below): on a 2-core machine it set up the runtime pins in 90 s
# against pip's 193 s, byte-compiling included (imports as fast as after pip). uv does not read
# pip's configuration, so tools/uv_args.py hands it pip's index, find-links and constraints.
# Where uv cannot be installed or fails, pip does the same install.
UV_VERSION := 0.13.9
define install
$(PY) -m pip install -q uv==$(UV_VERSION) \
  && $(BIN)/uv pip install --quiet --python $(PY) --compile-bytecode $$($(PY) tools/uv_args.py $(PY)) -r $(1) \
  || { echo "setup: uv failed, installing $(1) with pip (slower)"; \
       $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -r $(1); }
endef

$(VENV)/.installed: requirements.txt pyproject.toml tools/uv_args.py
	@if [ ! -x $(PY) ]; then \
	  mkdir -p $(VENV_PARENT); \
	  free_gb=$$(df -Pk $(VENV_PARENT) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ "$$free_gb" -lt $(MIN_FREE_GB) ]; then \
	    echo "setup: $$free_gb GB free under $(VENV_PARENT), a fresh $(VENV) needs about $(MIN_FREE_GB) GB" >&2; \
	    echo "setup: free some space, or run with MIN_FREE_GB=0 to try anyway" >&2; \
	    exit 1; \
	  fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(call install,requirements.txt)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Test-only extras (pytest, selenium), a stamp of their own: `make run` never installs them, and a
# change of requirements-test.txt re-runs only this step. Order-only on the runtime stamp: the
# venv must exist first, but a runtime re-install does not force this one again.
$(VENV)/.installed-test: requirements-test.txt requirements-ui.txt | $(VENV)/.installed
	$(call install,requirements-test.txt)
	touch $@

# The browser UIs beside MLflow's (kedro-viz, optuna-dashboard), installed on demand by `make viz` /
# `make tune-ui` (and `make test`, through requirements-test.txt), never by `make run`.
$(VENV)/.installed-ui: requirements-ui.txt | $(VENV)/.installed
	$(call install,requirements-ui.txt)
	touch $@

# Real images for the default job: Debian's dataset-fashion-mnist (no download at run time).
fashion-mnist:
	@if ls $(FASHION_DIR)/*ubyte.gz >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST idx files not found in $(FASHION_DIR): install the Debian package"; \
	  echo "dataset-fashion-mnist (as root) or set shard.fashion_mnist.fashion_mnist.root in conf/local"; \
	fi

setup: $(VENV)/.installed fashion-mnist

run: setup
	dvc repro

# The longer job: the Kedro environment conf/full (its parameters deep-merged over conf/base),
# the same three pipelines per dataset, written under data/full/ so the DVC-tracked default job
# stays as dvc.lock says; MLflow runs carry the tag kedro_env=full.
FULL_DATASETS ?= scenes fashion_mnist
run-full: setup
	set -e; for d in $(FULL_DATASETS); do for p in shard pretrain probe; do \
	  kedro run --env full --pipeline $$p --params dataset=$$d; done; done

# Two pytest workers (pytest-xdist), a test file per worker at a time (its module fixtures stay in
# one process): many tests spend their time starting Kedro, DVC or torchrun subprocesses on one
# core, so two workers overlap them (343 tests: 8.7-10.2 min against 12.8-14.5 min in one process
# on 2 cores). PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2
test: setup $(VENV)/.installed-test
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# kedro-viz: the shard / pretrain / probe / tune pipelines, their nodes, datasets and parameters.
VIZ_PORT ?= 4141
viz: setup $(VENV)/.installed-ui
	kedro viz run --host 127.0.0.1 --port $(VIZ_PORT) --no-browser

tune: setup
	kedro run --pipeline tune --params dataset=$${DATASET:-fashion_mnist}

# optuna-dashboard on the study's storage (tune.storage: data/07_tune/optuna.db by default).
TUNE_STORAGE ?= sqlite:///data/07_tune/optuna.db
TUNE_UI_PORT ?= 8080
tune-ui: setup $(VENV)/.installed-ui
	optuna-dashboard $(TUNE_STORAGE) --host 127.0.0.1 --port $(TUNE_UI_PORT)

apply-best: setup
	$(PY) -m ijepa.tune apply-best --dataset $${DATASET:-fashion_mnist}

bench: setup
	$(PY) benchmarks/run_all.py

# One command on a machine with a GPU (< 5 min): ViT-B/16 and ViT-H/14, eager and compiled, into the
# gpu section of benchmarks/results.json and RESULTS.md. Without a GPU it says so and exits 0.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean-outputs:
	rm -rf data/02_shards data/06_models data/07_model_output data/08_reporting data/full mlflow.db
