# Everything sets itself up: the first target you run creates .venv from requirements.lock.
#   make pipeline   the whole chain on the real data (dvc repro)
#   make test       the test suite
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

.PHONY: pipeline test test-fast install clean-outputs

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	$(PY) -m neu_model.source
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"
