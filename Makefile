# Everything sets itself up: the first target you run creates .venv from requirements.lock.
#   make pipeline   dvc repro (its first stage, source, looks for new images), then dvc metrics show
#   make test       ruff, then the whole test suite
#   make test-fast  the test suite without the slow tests (no ruff)
#   make bench      train and score every model, print a table (ARGS="--seeds 0 1 2 --epochs 5")
#   make retrain    the Prefect training flow once (ARGS="--set key=value --device cuda")
#                   pipeline, retrain, serve: one run at a time per workspace; WAIT=1 waits for a busy one
#   make serve      the training flow as a deployment on a cron schedule (CRON="0 3 * * 1")
#   make ui         the MLflow UI on http://127.0.0.1:$(UI_PORT) over this project's store (docs/mlflow.md)
#   make registry   versions, aliases and promotion history of the registered model
# Data source: params.yaml's data.source, or NEU_DATA_SOURCE when set.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `python` from PATH: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Plants are often air-gapped: no tool phones home.
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: install pipeline retrain serve test test-fast bench ui registry

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# One run at a time per workspace: pipeline and retrain hold the workspace lock (a second one is
# refused, naming the first; WAIT=1 waits for it), and serve's runs take it themselves.
# pipeline first undoes params.yaml overrides that a killed flow run left (neu_model/run_params.py).
LOCKED := $(PY) -m neu_model.workspace_lock run$(if $(WAIT), --wait) --
pipeline: $(STAMP)
	$(LOCKED) $(SHELL) -c '$(PY) -m neu_model.run_params restore && $(BIN)/dvc repro'
	$(BIN)/dvc metrics show

# Prefect: no server needed (a temporary one starts), or PREFECT_API_URL's; state in .prefect/ (prefect.toml).
retrain: $(STAMP)
	$(LOCKED) $(PY) -m flows.training run $(ARGS)

CRON ?= 0 3 * * 1
serve: $(STAMP)
	$(PY) -m flows.training serve --cron "$(CRON)" $(if $(WAIT),--wait) $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_models.py $(ARGS)

# MLflow: run metadata in mlflow.db (MLFLOW_TRACKING_URI), artifacts in mlruns/ beside it.
UI_PORT ?= 5000
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --default-artifact-root "$(CURDIR)/mlruns" \
		--host 127.0.0.1 --port $(UI_PORT)

registry: $(STAMP)
	$(PY) -m neu_model.register --history
