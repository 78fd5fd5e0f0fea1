"""MLflow runs of the stages: the store, the run of one pipeline pass, its params, tags and data.

Store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo root>/mlflow.db``. The artifacts of a SQLite
store live in ``mlruns/`` beside the database, so ``mlflow ui`` started in the repository root
shows everything. One pipeline pass is one run: ``train`` creates it and writes its id to
``reports/run.json``; ``evaluate`` and ``register`` log into the run named there. The logged
model is ``neu_model.registry.mlflow_model``'s, the ``dvc.lock`` tags ``neu_model.registry.lineage``'s.

Everything goes through ``MlflowClient`` with explicit run ids rather than the fluent API, which
keeps a global active run and is not thread-safe (a Prefect flow may run stages in threads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from neu_model.core import provenance
from neu_model.core.config import Config
from neu_model.core.files import sha256_file, write_json
from neu_model.core.paths import ROOT
from neu_model.core.redact import redact_url
from neu_model.core.stage import StageError
from neu_model.core.store import sqlite_file, tracking_uri
from neu_model.registry import mlflow_model
from neu_model.registry.lineage import labels_version, read_dvc, split_inputs

log = logging.getLogger("neu_model.registry.tracking")

PARENT_RUN_ENV = "NEU_MLFLOW_PARENT_RUN_ID"
RUN_KEY_TAG = "neu.run_key"


def _local_store(uri: str) -> Path | None:
    """The path of a local store (a SQLite file, a ``file:`` URI, a plain path); None for a server."""
    db = sqlite_file(uri)
    if db is not None:
        return db
    parts = urllib.parse.urlsplit(uri)
    return Path(parts.path) if parts.scheme in ("", "file") else None


def portable_uri(uri: str, root: Path = ROOT) -> str | None:
    """``uri`` in a form that means the same store on another machine, for ``reports/run.json``.

    A local store inside ``root`` becomes relative to it (``sqlite:///mlflow.db``: the stages run
    from the repository root); a server URL is kept, without the password if it has one.

    Returns:
        The portable URI, or None for a local store outside ``root``: its path names nothing
        on another machine.
    """
    local = _local_store(uri)
    if local is None:
        parts = urllib.parse.urlsplit(uri)
        if parts.password is None:
            return uri
        netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()
    if not local.is_absolute():
        return uri
    try:
        relative = local.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None
    return f"sqlite:///{relative}" if sqlite_file(uri) is not None else relative


def artifact_location(uri: str) -> str | None:
    """``mlruns/`` beside a SQLite database (absolute, as the database stores it); a server decides its own."""
    db = sqlite_file(uri)
    return str(db.resolve().parent / "mlruns") if db is not None else None


def connect(uri: str | None = None):
    """Check that the tracking store answers, point MLflow at it and return a client.

    Raises:
        StageError: the store does not answer; raised before any work, with the URI and the fix.
    """
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    fix = "start the server (make ui) or point MLFLOW_TRACKING_URI at a reachable store"
    db = sqlite_file(uri)
    if db is not None and not db.resolve().parent.is_dir():
        raise StageError(f"MLflow store {uri}: folder {db.resolve().parent} does not exist; create it or {fix}")
    if uri.startswith(("http://", "https://")):
        # Probe once with a short timeout: MLflow's own client retries for minutes before failing.
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answers; the client call below says whether it is MLflow
        except (OSError, ValueError) as exc:
            raise StageError(f"MLflow store {uri} does not answer ({exc}); {fix}") from None
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StageError(f"MLflow store {uri} does not answer ({first}); {fix}") from None
    import mlflow

    mlflow.set_tracking_uri(uri)  # log_model and pyfunc resolve the store from the global URI
    return client


def experiment_id(client, name: str) -> str:
    """The id of experiment ``name``, created with the project's artifact location when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # another process created it meanwhile
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise StageError(f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                         "or set another mlflow.experiment")
    return exp.experiment_id


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values, as MLflow stores them."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@dataclass
class Run:
    """One MLflow run, addressed by id through a client."""

    client: Any
    run_id: str
    experiment_id: str
    record: dict = field(default_factory=dict)  # reports/run.json, when opened from it

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags; the credentials of any URL in a value are masked (``neu_model.core.redact``)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact_url(str(v))) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), folder)


class TrainRun(Run):
    """The run of one ``train`` stage."""

    def log_history(self, history: list[dict]) -> None:
        """Log epochs finished before this process started (a resumed checkpoint) that the run lacks."""
        done = {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}
        for row in history:
            if row["epoch"] not in done:
                self.log_epoch(row)

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """Per-epoch curves, with ``step`` = epoch number."""
        self.log_metrics({k: v for k, v in row.items() if k != "epoch" and not math.isnan(v)}, step=int(row["epoch"]))

    def finish(self, cfg: Config, summary: Mapping[str, Any], model_file: Path, files: list[Path],
               run_file: Path, dataset_version: str) -> dict:
        """Log the summary, report files and model; then write ``run_file`` for the later stages."""
        self.log_metrics({f"best_{k}" if k == "val_accuracy" else k: v for k, v in summary.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for path in files:
            self.log_artifact(path, "figures" if Path(path).suffix == ".png" else "reports")
        info = mlflow_model.log_model(self.client, self.experiment_id, self.run_id, model_file, cfg.data.image_size)
        # The store as another machine would name it: run.json is committed with the reports.
        record = {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": cfg.mlflow.experiment,
                  "tracking_uri": portable_uri(self.client.tracking_uri), "model_uri": info.model_uri,
                  "model_id": info.model_id, "model_sha256": sha256_file(model_file), "model": cfg.train.model,
                  "dataset_version": dataset_version,
                  "labels_version": self.client.get_run(self.run_id).data.tags.get("labels_version", "none")}
        self.set_tags({"model_uri": info.model_uri})
        write_json(run_file, record)
        return record


def _unfinished_run(client, exp_id: str, key: str) -> str | None:
    runs = client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def train_run(cfg: Config, *, key: str, device: torch.device, split_file: Path, manifest: Path,
              resume: bool = False) -> Iterator[TrainRun]:
    """Start the training run (or continue the unfinished one of a resumed checkpoint).

    Logs the resolved config as params, provenance tags, the dataset inputs, the ``dvc.lock`` hashes
    of the data inputs, and system metrics while the block runs. The run ends FINISHED, or FAILED /
    KILLED when the block raises.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    client = connect()
    exp_id = experiment_id(client, cfg.mlflow.experiment)
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    run_id = _unfinished_run(client, exp_id, key) if resume else None
    version = provenance.dataset_version(manifest)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        run = TrainRun(client, run_id, exp_id)
        log.info("continuing MLflow run %s", run_id)
    else:
        parent = os.environ.get(PARENT_RUN_ENV)  # a sweep trial: nested under the sweep's run
        created = client.create_run(exp_id, run_name=f"{cfg.train.model}-{time.strftime('%Y%m%d-%H%M%S')}",
                                    tags={"mlflow.parentRunId": parent} if parent else None)
        run = TrainRun(client, created.info.run_id, exp_id)
        config = cfg.to_dict()
        params = flatten(config) | flatten({"recipe": config["train"]["recipes"][cfg.train.model]})
        from mlflow.entities import Param

        # data.source may be a URL with credentials: MLflow shows params to everyone with access.
        client.log_batch(run.run_id, params=[Param(k, redact_url(v)) for k, v in params.items()])
        sha = provenance.git_sha()
        run.set_tags({"git_sha": sha, "mlflow.source.git.commit": sha, "git_dirty": provenance.git_dirty(),
                      "dataset_version": version, "labels_version": labels_version(manifest) or "none",
                      "device": str(device), "torch_version": torch.__version__,
                      "model": cfg.train.model, RUN_KEY_TAG: key} | read_dvc(inputs_of="train"))
        client.log_inputs(run.run_id, datasets=split_inputs(split_file, manifest, version))
        log.info("MLflow run %s in experiment %r (%s)", run.run_id, cfg.mlflow.experiment, client.tracking_uri)
    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=5, resume_logging=bool(run_id),
                                   tracking_uri=client.tracking_uri)
    monitor.start()
    # SIGTERM (dvc, Prefect or a scheduler stopping the stage) as an exception, so the run is closed.
    previous = _on_sigterm(_raise_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        yield run
    except BaseException as exc:
        monitor.finish()
        client.set_terminated(run.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if previous is not None:
            _on_sigterm(previous)
    monitor.finish()
    client.set_terminated(run.run_id, "FINISHED")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _on_sigterm(handler):
    return signal.signal(signal.SIGTERM, handler)


def open_run(run_file: Path, model_file: Path | None = None) -> Run | None:
    """The run named in ``run_file``, if it is the run that trained ``model_file``.

    Returns:
        None (with a warning) when there is no run file or it belongs to another model, so a
        model evaluated outside the pipeline logs nothing rather than into a stranger's run.

    Raises:
        StageError: the store does not answer or does not know the run.
    """
    from mlflow.exceptions import MlflowException

    run_file = Path(run_file)
    if not run_file.is_file():
        log.warning("%s not found: nothing is logged to MLflow (run the train stage first)", run_file)
        return None
    record = json.loads(run_file.read_text())
    if model_file is not None and record.get("model_sha256") != sha256_file(model_file):
        log.warning("%s is not the model of MLflow run %s: nothing is logged to MLflow", model_file, record["run_id"])
        return None
    client = connect()
    try:
        run = client.get_run(record["run_id"])
    except MlflowException:
        logged_to = record.get("tracking_uri") or "a local store outside the repository"
        raise StageError(f"{run_file}: run {record['run_id']} is not in the MLflow store {client.tracking_uri} "
                         f"(it was logged to {logged_to}); rerun the train stage") from None
    return Run(client, run.info.run_id, run.info.experiment_id, record)
