"""MLflow plumbing for the stages: the store, the run of one pipeline pass, the logged model.

Store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo root>/mlflow.db``. The artifacts of a SQLite
store live in ``mlruns/`` beside the database, so ``mlflow ui`` started in the repository root
shows everything. One pipeline pass is one run: ``train`` creates it and writes its id to
``reports/run.json``; ``evaluate`` and ``register`` log into the run named there.

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
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from neu_model import provenance
from neu_model.cli import StageError
from neu_model.config import CLASSES, ROOT, Config
from neu_model.data import read_split
from neu_model.files import sha256_file, write_json

log = logging.getLogger("neu_model.tracking")

RUN_FILE = Path("reports/run.json")
DEFAULT_DB = ROOT / "mlflow.db"
MODEL_ARTIFACT = "model"
RUN_KEY_TAG = "neu.run_key"
DVC_DATA_SUFFIXES = (".py", ".sha256")  # code deps: the git SHA tag already pins them
# What a plain MLflow client gets: the contract of the logged model (README: docs/mlflow.md).
CONTRACT = (f"input: float32 array (N, 1, H, W), grayscale pixels scaled to [0, 1]; output: float32 class "
            f"probabilities (N, {len(CLASSES)}) in the order {', '.join(CLASSES)}; normalisation is inside the model")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite file at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """``mlruns/`` beside a SQLite database (absolute, as the database stores it); a server decides its own."""
    db = _sqlite_file(uri)
    return str(db.resolve().parent / "mlruns") if db is not None else None


def connect(uri: str | None = None):
    """Check that the tracking store answers, point MLflow at it and return a client.

    Raises:
        StageError: the store does not answer; raised before any work, with the URI and the fix.
    """
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    fix = "start the server (make ui) or point MLFLOW_TRACKING_URI at a reachable store"
    db = _sqlite_file(uri)
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


def read_dvc(stages: tuple[str, ...] = (), inputs_of: str | None = None, root: Path = Path(".")) -> dict[str, str]:
    """Hashes ``dvc.lock`` records: the deps and outs of ``stages``, or the data inputs of ``inputs_of``.

    ``inputs_of`` looks up each data dep of that stage among the outs of the other stages, since
    its own entry is the previous run's until DVC finishes it. Missing files give ``{}``.
    """
    import yaml

    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for stage in stages:
        for kind in ("deps", "outs"):
            for item in lock.get(stage, {}).get(kind, []):
                if not item["path"].endswith(DVC_DATA_SUFFIXES):
                    out[f"dvc.{stage}.{kind}.{item['path']}"] = item.get("md5", "")
    if inputs_of:
        produced = {o["path"]: o.get("md5", "") for name, s in lock.items() if name != inputs_of for o in s.get("outs", [])}
        for dep in spec.get(inputs_of, {}).get("deps", []):
            for path, md5 in produced.items():
                if dep == path or dep.startswith(path + "/"):
                    out[f"dvc.input.{dep}"] = md5 if dep == path else f"{md5} ({path})"
    return out


class ProbabilityModel(nn.Module):
    """The trained network followed by softmax: what the registry serves (probabilities, not logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def model_signature(image_size: int):
    """Tensor signature of the logged model. The input tensor is unnamed so that a bare ndarray is accepted."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(CLASSES)), f"probabilities[{','.join(CLASSES)}]")]),
    )


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
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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

    def log_dataset(self, split_file: Path, manifest: Path, dataset_version: str) -> None:
        """The split, with each file's sha256, as one MLflow dataset input per part (context train/val/test)."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        table = pd.read_csv(split_file, dtype=str)
        if Path(manifest).exists():
            table = table.merge(pd.read_csv(manifest, dtype=str)[["file", "sha256"]], on="file", how="left")
        inputs = []
        for part in ("train", "val", "test"):
            rows = table[table["split"] == part].reset_index(drop=True).astype(object)
            # Own digest over every row: MLflow's samples rows and fails on pandas' arrow strings.
            digest = hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:12]
            with warnings.catch_warnings():  # MLflow registers the local-file source twice and says so
                warnings.simplefilter("ignore", UserWarning)
                ds = mlflow.data.from_pandas(rows, source=str(Path(split_file).resolve()), targets="label",
                                             name=f"NEU-CLS-{part}", digest=digest)
            tags = [InputTag("mlflow.data.context", part), InputTag("dataset_version", dataset_version)]
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, model_file: Path, image_size: int):
        """Log ``model_file`` (best weights) as a pt2 pyfunc model returning probabilities."""
        import mlflow
        import mlflow.pytorch

        from neu_model.predict import load_model  # here: predict imports train, which imports this module

        net, meta = load_model(model_file, "cpu")
        example = np.random.default_rng(0).random((2, 1, image_size, image_size), dtype=np.float32)  # batch 2: keeps N dynamic
        logged = self.client.create_logged_model(self.experiment_id, MODEL_ARTIFACT, self.run_id,
                                                 tags={"model": meta["model_name"]}, model_type="image-classifier")
        return mlflow.pytorch.log_model(
            ProbabilityModel(net).eval(), name=MODEL_ARTIFACT, model_id=logged.model_id, run_id=self.run_id,
            signature=model_signature(image_size), input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                              f"numpy=={np.__version__}"],
            metadata={"classes": list(CLASSES), "contract": CONTRACT, "architecture": meta["model_name"]})

    def finish(self, cfg: Config, summary: Mapping[str, Any], model_file: Path, files: list[Path],
               run_file: Path, dataset_version: str) -> dict:
        """Log the summary, report files and model; then write ``run_file`` for the later stages."""
        self.log_metrics({f"best_{k}" if k == "val_accuracy" else k: v for k, v in summary.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for path in files:
            self.log_artifact(path, "figures" if Path(path).suffix == ".png" else "reports")
        info = self.log_model(model_file, cfg.data.image_size)
        record = {"run_id": self.run_id, "experiment_id": self.experiment_id, "experiment": cfg.mlflow.experiment,
                  "tracking_uri": self.client.tracking_uri, "model_uri": info.model_uri, "model_id": info.model_id,
                  "model_sha256": sha256_file(model_file), "model": cfg.train.model, "dataset_version": dataset_version}
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
    version = provenance.dataset_version(manifest) if Path(manifest).exists() else "unknown"
    if run_id:
        client.update_run(run_id, status="RUNNING")
        run = TrainRun(client, run_id, exp_id)
        log.info("continuing MLflow run %s", run_id)
    else:
        created = client.create_run(exp_id, run_name=f"{cfg.train.model}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = TrainRun(client, created.info.run_id, exp_id)
        config = cfg.to_dict()
        params = flatten(config) | flatten({"recipe": config["train"]["recipes"][cfg.train.model]})
        from mlflow.entities import Param

        client.log_batch(run.run_id, params=[Param(k, v) for k, v in params.items()])
        sha = provenance.git_sha()
        run.set_tags({"git_sha": sha, "mlflow.source.git.commit": sha, "git_dirty": provenance.git_dirty(),
                      "dataset_version": version, "device": str(device), "torch_version": torch.__version__,
                      "model": cfg.train.model, RUN_KEY_TAG: key} | read_dvc(inputs_of="train"))
        run.log_dataset(split_file, manifest, version)
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
        raise StageError(f"{run_file}: run {record['run_id']} is not in the MLflow store {client.tracking_uri} "
                         f"(it was logged to {record.get('tracking_uri')}); rerun the train stage") from None
    return Run(client, run.info.run_id, run.info.experiment_id, record)


def test_split_id(split_file: Path, dataset_version: str) -> str:
    """Names "the same test split of the same dataset version": accuracies compare only within one id."""
    rows = read_split(split_file)
    rows = rows[rows["split"] == "test"].sort_values("file")
    text = dataset_version + "\n" + "\n".join(rows["file"] + "," + rows["label"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def log_evaluation(run: Run | None, metrics: Mapping[str, Any], reports: Path, split_file: Path) -> None:
    """Log test metrics, per-class table and evaluation figures into the training run."""
    if run is None:
        return
    values = {f"test_{k}": metrics[k] for k in ("accuracy", "macro_f1", "errors", "in_ps_errors")}
    values["inference_images_per_second"] = metrics["inference_images_per_second"]
    for code, row in metrics["per_class"].items():
        values |= {f"test_{k}_{code}": row[k] for k in ("precision", "recall", "f1")}
    values |= {f"robustness_{k}": v for k, v in metrics.get("robustness", {}).items()}
    values |= {f"review_{k}": v for k, v in metrics.get("review", {}).items()}
    run.log_metrics(values)
    table = pd.DataFrame([{"class": c} | row for c, row in metrics["per_class"].items()])
    # log_dict, not log_table: log_table appends to an existing file, so re-evaluating the same
    # run (evaluate's code changed, training did not) would duplicate every row.
    run.client.log_dict(run.run_id, {"columns": list(table.columns), "data": table.values.tolist()},
                        "evaluation/per_class.json")
    split_id = test_split_id(split_file, run.record.get("dataset_version", "unknown"))
    run.set_tags({"test_split_id": split_id, "n_test": metrics["n_test"]})
    for name in ("confusion.png", "misclassified.png"):
        run.log_artifact(reports / name, "figures")
    for name in ("metrics.json", "robustness.csv", "predictions.csv", "review_curve.csv"):
        run.log_artifact(reports / name, "evaluation")
