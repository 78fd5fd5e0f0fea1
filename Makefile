# Everything sets itself up: the first target you run creates .venv from requirements.lock.
#   make pipeline   dvc repro (its first stage, source, looks for new images), then a short summary
#   make test       ruff, then the whole test suite; prints the 15 slowest tests
#   make test-fast  the fast tier: no test marked slow (no ruff)
#   make bench      train and score every model, print a table (ARGS="--seeds 0 1 2 --epochs 5")
#   make bench-inference  every runtime on the test images, one table of speeds and ratios (ARGS="--mirror")
#   make retrain    the Prefect training flow once (ARGS="--set key=value --device cuda")
#                   pipeline, retrain, serve: one run at a time per workspace; WAIT=1 waits for a busy one
#   make serve      the training flow as a deployment on a cron schedule (CRON="0 3 * * 1")
#   make sweep      the trials of a sweep file side by side on a local Dask cluster (SWEEP=... WORKERS=2)
#   make ui         the MLflow UI on http://127.0.0.1:$(UI_PORT) over this project's store (docs/mlflow.md)
#   make registry   versions, aliases and promotion history of the registered model
#   make mlflow-server  a shared MLflow server on PostgreSQL, artifacts proxied (HOST=, MLFLOW_PORT=; docs/scale-out.md)
#   make remote     the DVC remote for data and models, in .dvc/config.local (REMOTE=/path, s3://..., ssh://...)
#   make deploy     the training flow as a deployment in a Prefect work pool (POOL=neu-process)
#   make worker     a Prefect worker running that pool's flows in this checkout (POOL=neu-process)
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

.PHONY: install pipeline retrain serve sweep test test-fast bench bench-inference ui registry mlflow-server remote deploy worker

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# One run at a time per workspace: pipeline and retrain hold the workspace lock (a second one is
# refused, naming the first; WAIT=1 waits for it), and serve's runs take it themselves.
# pipeline first undoes params.yaml overrides that a killed flow run left (neu_model/ops/run_params.py).
LOCKED := $(PY) -m neu_model.ops.workspace_lock run$(if $(WAIT), --wait) --
pipeline: $(STAMP)
	$(LOCKED) $(SHELL) -c '$(PY) -m neu_model.ops.run_params restore && $(BIN)/dvc repro'
	$(PY) -m neu_model.ops.summary

# Prefect: no server needed (a temporary one starts), or PREFECT_API_URL's; state in .prefect/ (prefect.toml).
retrain: $(STAMP)
	$(LOCKED) $(PY) -m flows.training run $(ARGS)

CRON ?= 0 3 * * 1
serve: $(STAMP)
	$(PY) -m flows.training serve --cron "$(CRON)" $(if $(WAIT),--wait) $(ARGS)

# Sweeps: each trial in a clone of its own, on WORKERS local Dask processes (docs/orchestration.md, "Sweeps").
SWEEP ?= sweeps/seeds.yaml
WORKERS ?= 2
sweep: $(STAMP)
	$(PY) -m flows.sweep $(SWEEP) --workers $(WORKERS) $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_models.py $(ARGS)

# models/model.pt on the test part of data/split.csv: torch eager and compiled, ONNX Runtime and
# OpenVINO (fp32, bf16, int8 where the CPU has the instructions), each in its own process.
bench-inference: $(STAMP)
	$(PY) benchmarks/bench_inference.py $(ARGS)

# MLflow: run metadata in mlflow.db (MLFLOW_TRACKING_URI), artifacts in mlruns/ beside it.
UI_PORT ?= 5000
ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --default-artifact-root "$(CURDIR)/mlruns" \
		--host 127.0.0.1 --port $(UI_PORT)

registry: $(STAMP)
	$(PY) -m neu_model.registry.register --history

# Shared MLflow server (docs/scale-out.md): PostgreSQL backend store, artifacts proxied by the
# server (clients need no access to the artifact store). The database is MLFLOW_BACKEND_STORE_URI
# when set (postgresql://user@host:5432/mlflow; the password in PGPASSFILE), else a project-local
# PostgreSQL in $(PG_DIR), started on 127.0.0.1 (python -m neu_model.ops.pgserver start|stop|status).
# MLflow's job runner (GenAI scorers, unused here: six processes) stays off unless asked for.
# Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) make pipeline
HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5001
MLFLOW_WORKERS ?= 2
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
PG_DIR ?= $(CURDIR)/.pg
mlflow-server: $(STAMP)
	@if [ -n "$${MLFLOW_BACKEND_STORE_URI:-}" ]; then backend="$$MLFLOW_BACKEND_STORE_URI"; \
	else backend="$$($(PY) -m neu_model.ops.pgserver start --dir "$(PG_DIR)")" || exit 1; \
		export PGPASSFILE="$(PG_DIR)/pgpass"; fi; \
	export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"; \
	echo "MLflow server on http://$(HOST):$(MLFLOW_PORT), artifacts in $(MLFLOW_ARTIFACTS)"; \
	exec $(BIN)/mlflow server --backend-store-uri "$$backend" --serve-artifacts \
		--artifacts-destination "$(MLFLOW_ARTIFACTS)" --host "$(HOST)" --port $(MLFLOW_PORT) \
		--workers $(MLFLOW_WORKERS) $(ARGS)

# DVC remote for data/raw, models and figures (`dvc push` / `dvc pull`). --local writes it into
# .dvc/config.local, which git ignores: the location and its credentials belong to one clone.
REMOTE_NAME ?= storage
remote: $(STAMP)
	@test -n "$(REMOTE)" || { echo "error: no remote given: make remote REMOTE=/mnt/dvc-store (or s3://bucket/prefix, ssh://host/path)" >&2; exit 2; }
	$(BIN)/dvc remote add --local --default --force $(REMOTE_NAME) "$(REMOTE)"
	$(BIN)/dvc remote list --local

# Prefect work pool (docs/orchestration.md): `make deploy` puts the training flow into POOL (once,
# against PREFECT_API_URL's server); `make worker`, on the machine that trains, runs its flows.
POOL ?= neu-process
deploy: $(STAMP)
	$(PY) -m flows.training deploy --pool "$(POOL)" $(ARGS)

worker: $(STAMP)
	$(BIN)/prefect worker start --pool "$(POOL)" --type process --limit 1 $(ARGS)
