"""The sweep in MLflow: one parent run, each trial's training run nested under it.

Everything goes through ``MlflowClient`` with explicit run ids: the fluent API keeps one active
run per thread, and the trials run in other processes anyway. The train stage creates each
trial's run (``neu_model.registry.tracking.train_run``); the trial then tags it ``mlflow.parentRunId``
(what the MLflow UI nests by) once ``reports/run.json`` names it. The stages also get the
parent's id as ``NEU_MLFLOW_PARENT_RUN_ID``, for a train stage that sets the tag itself at
creation.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from typing import Any, Mapping

import pandas as pd

PARENT_ENV = "NEU_MLFLOW_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG, TRIAL_TAG = "neu.sweep", "neu.sweep.trial"
# The best trial's figures logged as the parent's metrics (best_<name>).
BEST_FIGURES = ("val_acc_%", "test_acc_%", "macro_f1_%", "robust_%", "in_ps_err", "errors", "review_%",
                "accepted_err", "train_s", "train_img/s", "infer_img/s")


def client(store: str):
    from mlflow import MlflowClient

    return MlflowClient(store)


def start_parent(store: str, experiment: str, sweep_name: str, params: Mapping[str, Any],
                 tags: Mapping[str, Any]) -> str:
    """Create the sweep's parent run in ``experiment`` (created if missing); returns its id."""
    from mlflow.entities import Param, RunTag

    from neu_model.registry.tracking import experiment_id

    mlflow_client = client(store)
    exp_id = experiment_id(mlflow_client, experiment)
    run = mlflow_client.create_run(exp_id, run_name=f"sweep-{sweep_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={SWEEP_TAG: sweep_name, **{k: str(v) for k, v in tags.items()}})
    mlflow_client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                            tags=[RunTag("mlflow.note.content", f"Sweep {sweep_name}: one child run per trial")])
    return run.info.run_id


def adopt(store: str, run_id: str, parent_id: str, sweep_name: str, trial: str, overrides: list[str]) -> None:
    """Nest a trial's training run under the parent, named after the trial."""
    from mlflow.entities import RunTag

    mlflow_client = client(store)
    tags = {PARENT_TAG: parent_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial, "neu.sweep.overrides": " ".join(overrides)}
    mlflow_client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    mlflow_client.update_run(run_id, name=f"{sweep_name}-{trial}")


def metric_key(column: str) -> str:
    """A table column as an MLflow metric name (``%`` and ``/`` are not allowed there)."""
    return re.sub(r"[^\w.\- ]", "_", column.replace("%", "pct").replace("/", "_per_"))


def finish_parent(store: str, parent_id: str, frame: pd.DataFrame, markdown: str, best: Mapping | None,
                  failed: int) -> None:
    """Log the trials' table (CSV, JSON, Markdown) and the best trial's figures; end the parent run.

    The run ends FAILED when no trial finished, else FINISHED (``failed_trials`` says how many failed).
    """
    from mlflow.entities import Metric, RunTag

    mlflow_client = client(store)
    csv = io.StringIO()
    frame.to_csv(csv, index=False)
    mlflow_client.log_text(parent_id, csv.getvalue(), "sweep/trials.csv")
    records = json.loads(frame.to_json(orient="split", index=False))
    mlflow_client.log_dict(parent_id, {"columns": records["columns"], "data": records["data"]}, "sweep/trials.json")
    mlflow_client.log_text(parent_id, markdown, "sweep/summary.md")
    tags = [RunTag("failed_trials", str(failed))]
    metrics = []
    if best:
        now = int(time.time() * 1000)
        tags += [RunTag("best_trial", str(best["trial"])), RunTag("best_run_id", str(best.get("mlflow_run")))]
        values = {k: best.get(k) for k in BEST_FIGURES}
        metrics = [Metric(f"best_{metric_key(k)}", float(v), now, 0) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
    mlflow_client.log_batch(parent_id, metrics=metrics, tags=tags)
    trials = frame[frame["trial"] != "mean"]
    mlflow_client.set_terminated(parent_id, "FAILED" if failed == len(trials) else "FINISHED")


def fail_parent(store: str, parent_id: str) -> None:
    """End the parent run FAILED (the sweep stopped before its table)."""
    client(store).set_terminated(parent_id, "FAILED")
