# Two commands do all the set-up on a fresh clone with Python 3.11 and git:
#   make run    install from uv.lock, then run the pipeline (dvc repro)
#   make test   install from uv.lock, then run the whole test suite
.DEFAULT_GOAL := help
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
# Use uv from PATH, else the one pip installs for $(PYTHON).
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
MLFLOW_PORT ?= 5000
# The sweep spec `make sweep` and `make sweep-promote` run.
SPEC ?= sweeps/example.yaml
SERVE_PORT ?= 5001
SERVE_HOST ?= 127.0.0.1
# The registered model `make serve` serves; empty: export.model_name, which tools.serve
# reads from params.yaml as YAML (quotes, comments and all).
MODEL_NAME ?=

# The pipeline's stage commands call `python`: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export DVC_NO_ANALYTICS := true

.PHONY: help install run test test-fast ui serve monitor exp compare plots-diff lint format bench clean team-up sweep sweep-promote

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# --compile-bytecode: every stage, dvc and test process then starts from .pyc files
# (a no-op `dvc repro` in 0.8 s instead of 3.4 s where PYTHONDONTWRITEBYTECODE is set).
install: ## create .venv from uv.lock (installs uv first if missing)
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet 'uv>=0.9'
	$(UV) sync --frozen --python 3.11 --compile-bytecode

# The summary comes last, after DVC's hints, and also when every stage was up to date.
run: install ## run the pipeline on the offline default data (dvc repro), then summarise it
	CLASSIFIER_SUMMARY_AFTER_REPRO=1 dvc repro
	@python -m tools.summary

test: install ## run the whole test suite (in parallel: one worker per core)
	python -m pytest -n auto

test-fast: install ## the fast tier: no pipeline runs, no servers, no long trainings
	python -m pytest -n auto -m "not slow"

ui: install ## MLflow UI on http://127.0.0.1:5000 (MLFLOW_PORT to change)
	python -m tools.ui --host 127.0.0.1 --port $(MLFLOW_PORT)

serve: install ## serve export.model_name@champion (or MODEL_NAME) on http://127.0.0.1:5001/invocations, /metrics; logs to logs/predictions
	python -m tools.serve $(if $(MODEL_NAME),--model-name "$(MODEL_NAME)") --host $(SERVE_HOST) --port $(SERVE_PORT)

monitor: install ## compare the newest served predictions with the training data: reports/monitor.html
	python -m tools.monitor

exp: install ## dvc exp show: every param and metric, without the dependency-hash columns
	dvc exp show --drop '^(stages|data|models|lineage|plots|reports)/|^Created$$'

compare: install ## HTML comparison of the champion's run and the latest other: reports/compare.html
	python -m tools.compare

plots-diff: install ## dvc plots diff of the workspace against the champion's experiment or commit
	rev=$$(python -m tools.champion_rev) && dvc plots diff "$$rev"

sweep: install ## run (or resume) the sweep SPEC on DVC's queue workers; report in sweeps/<name>/
	python -m tools.sweep $(SPEC)

sweep-promote: install ## send the best trial of SPEC through export's promotion gate
	python -m tools.sweep $(SPEC) --promote

lint: install ## ruff check and format check
	ruff check . && ruff format --check .

format: install ## apply ruff's fixes and formatting
	ruff check --fix . && ruff format .

bench: install ## run the benchmarks (after make run; MNIST from ../shared/data/mnist); JSON in benchmarks/results
	python -m benchmarks.ingest --images 3000
	python -m benchmarks.mnist --epochs 10 --batch-size 64
	python -m benchmarks.mnist --architecture small_bn_cnn --epochs 30 --batch-size 128 -S train.schedule=warmup_cosine -S train.augment=affine -S train.learning_rate=0.003
	python -m benchmarks.train --epochs 3 --batch-size 64 --rounds 3
	python -m benchmarks.photos --sizes 64,96
	python -m benchmarks.augment --sizes 64,96
	python -m benchmarks.inference
	python -m benchmarks.pyfunc
	python -m benchmarks.server
	python -m benchmarks.server_load
	python -m benchmarks.overhead
	python -m benchmarks.summary

team-up: install ## try team mode here: S3 store + MLflow server with auth on 127.0.0.1 (Ctrl-C stops)
	python -m tools.team_up

clean: ## remove pipeline outputs and the local MLflow store (keeps .venv)
	rm -rf data models mlflow.db mlartifacts .dvc/tmp .dvc/cache
