"""MLflow tracking against a real SQLite store in a temporary folder (conftest's ``mlflow_store``)."""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import neu_model.training.train as train_mod
from neu_model.core import provenance
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_split, to_float
from neu_model.evaluation.evaluate import evaluate
from neu_model.inference.torch_model import load_torch_model, predict_logits
from neu_model.registry import register as register_stage  # module access: pytest would collect a bare test_split_id
from neu_model.registry import tracking
from neu_model.registry.lineage import read_dvc
from neu_model.training.train import train

from conftest import die_in_epoch, tiny_config


def _record(model_file):
    return json.loads(model_file.with_name("run.json").read_text())


def _train(ws, out, cfg):
    return train(cfg, ws.split, ws.images, out / "model.pt", out / "ckpt.pt", out / "train_log.csv",
                 out / "train_metrics.json", ws.raw / "manifest.csv")


def test_train_run_records_config_provenance_data_curves_and_model(tiny_data, tiny_model, mlflow_store):
    record = _record(tiny_model)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == tiny_config().mlflow.experiment
    # Artifacts sit in mlruns/ beside the database, at an absolute path.
    assert run.info.artifact_uri.startswith(str(mlflow_store / "mlruns"))
    # run.json is committed: the session's store, outside the repository, is no path to write there.
    assert record["tracking_uri"] is None
    assert str(mlflow_store) not in tiny_model.with_name("run.json").read_text()

    params = run.data.params
    assert tracking.flatten(tiny_config().to_dict()).items() <= params.items()
    assert params["train.model"] == "defectnet" and params["recipe.epochs"] == "1"

    tags = run.data.tags
    assert tags["dataset_version"] == provenance.dataset_version(tiny_data.raw / "manifest.csv")
    assert tags["dataset_version"] == record["dataset_version"]
    assert tags["git_sha"] == provenance.git_sha() and tags["git_dirty"] in ("True", "False")
    assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__

    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val", "test", "training"}
    assert all(d.digest and d.name == f"NEU-CLS-{part}" for part, d in inputs.items() if part != "training")
    # the data as a whole: its digest is the plant's labels version ("public": none), with the counts
    data = next(i for i in run.inputs.dataset_inputs if i.dataset.name == "training-data")
    assert data.dataset.digest == "public" == tags["labels_version"].replace("none", "public")
    assert {t.key: t.value for t in data.tags}["public_images"] == "30"
    assert {t.key: t.value for t in data.tags}["plant_images"] == "0"

    for key in ("train_loss", "train_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1]
    for key in ("val_loss", "val_accuracy"):  # the fixture's split has one val image (Sc_3)
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/train_curves.png" in artifacts

    info = mlflow.models.get_model_info(record["model_uri"])
    assert [m.model_id for m in run.outputs.model_outputs] == [record["model_id"]]
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 200, 200)
    assert info.signature.inputs.inputs[0].type == np.dtype(np.float32)
    assert info.signature.outputs.inputs[0].shape == (-1, 8)  # six probabilities, the unknown score and flag
    assert info.metadata["classes"] == ["Cr", "In", "Pa", "PS", "RS", "Sc"]


def test_logged_model_returns_the_networks_probabilities(tiny_data, tiny_model):
    test = load_split("test", tiny_data.split, tiny_data.images)
    x = to_float(test.images).numpy()
    served = mlflow.pyfunc.load_model(_record(tiny_model)["model_uri"]).predict(x)
    net, meta = load_torch_model(tiny_model)
    expected = predict_logits(net, test.images, torch.device("cpu")).softmax(1).numpy()
    assert served.shape == (len(test), 8) and served.dtype == np.float32
    probs, scores, flags = served[:, :6], served[:, 6], served[:, 7]
    np.testing.assert_array_equal(flags, (scores > meta["unknown"]["threshold"]).astype(np.float32))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


@pytest.mark.slow
def test_evaluate_logs_into_the_training_run(tiny_data, tiny_model, tmp_path):
    shutil.copy(tiny_model.with_name("run.json"), tmp_path / "run.json")
    metrics = evaluate(tiny_config("evaluate.robustness=false"), tiny_model, tiny_data.split, tiny_data.images,
                       tmp_path)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(_record(tiny_model)["run_id"])
    assert run.data.metrics["test_accuracy"] == metrics["accuracy"]
    assert run.data.metrics["test_macro_f1"] == metrics["macro_f1"]
    assert run.data.metrics["test_f1_Cr"] == metrics["per_class"]["Cr"]["f1"]
    split_id = register_stage.test_split_id(tiny_data.split, run.data.tags["dataset_version"])
    assert run.data.tags["test_split_id"] == split_id
    paths = {a.path for folder in ("figures", "evaluation") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"figures/confusion.png", "figures/misclassified.png", "evaluation/per_class.json"} <= paths
    table_file = client.download_artifacts(run.info.run_id, "evaluation/per_class.json", str(tmp_path / "dl"))
    table = json.loads(Path(table_file).read_text())
    assert [row[0] for row in table["data"]] == ["Cr", "In", "Pa", "PS", "RS", "Sc"]


@pytest.mark.slow
def test_evaluating_a_model_without_its_run_logs_nothing(tiny_data, tiny_model, tmp_path):
    record = _record(tiny_model) | {"model_sha256": "0" * 64}  # run.json of some other model
    (tmp_path / "run.json").write_text(json.dumps(record))
    before = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(record["run_id"]).data.metrics
    evaluate(tiny_config("evaluate.robustness=false"), tiny_model, tiny_data.split, tiny_data.images, tmp_path)
    assert MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(record["run_id"]).data.metrics == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri", [f"http://127.0.0.1:{_free_port()}", "sqlite:////nonexistent-folder/mlflow.db"])
def test_unreachable_store_fails_before_training(tiny_data, tmp_path, monkeypatch, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(train_mod, "train_one_epoch", lambda *a, **k: pytest.fail("trained without a store"))
    start = time.monotonic()
    with pytest.raises(StageError, match="MLflow store .* (does not answer|does not exist)") as err:
        _train(tiny_data, tmp_path, tiny_config())
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "run.json").exists()


@pytest.mark.slow
def test_killed_training_ends_its_run_and_the_resume_continues_it(tiny_data, tmp_path, monkeypatch):
    cfg = tiny_config("train.model=seed_cnn", "train.recipes.seed_cnn.epochs=2", "mlflow.experiment=resume-test")
    undo = die_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_data, tmp_path, cfg)
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("resume-test").experiment_id
    (killed,) = client.search_runs([exp])
    assert killed.info.status == "KILLED"
    undo()
    _train(tiny_data, tmp_path, cfg)
    (resumed,) = client.search_runs([exp])  # the same run, continued: no second run
    assert resumed.info.run_id == killed.info.run_id == _record(tmp_path / "model.pt")["run_id"]
    assert resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train_loss")] == [1, 2]


def test_read_dvc_finds_the_locked_hashes_of_a_stages_inputs(tmp_path):
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    deps: [data/raw/NEU-CLS, data/split.csv, neu_model/training/train.py]\n")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  download:\n    outs:\n    - {path: data/raw, md5: aaa.dir}\n"
        "  split:\n    outs:\n    - {path: data/split.csv, md5: bbb}\n"
        "  train:\n    deps:\n    - {path: data/split.csv, md5: old}\n"
        "    - {path: neu_model/training/train.py, md5: ccc}\n"
        "    outs:\n    - {path: models/model.pt, md5: ddd}\n")
    assert read_dvc(inputs_of="train", root=tmp_path) == {
        "dvc.input.data/raw/NEU-CLS": "aaa.dir (data/raw)", "dvc.input.data/split.csv": "bbb"}
    assert read_dvc(stages=("train",), root=tmp_path) == {
        "dvc.train.deps.data/split.csv": "old", "dvc.train.outs.models/model.pt": "ddd"}
    assert read_dvc(inputs_of="train", root=tmp_path / "missing") == {}


@pytest.mark.parametrize(("uri", "portable"), [
    (f"sqlite:///{ROOT}/mlflow.db", "sqlite:///mlflow.db"),
    (f"sqlite:///{ROOT}/stores/mlflow.db", "sqlite:///stores/mlflow.db"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("sqlite:////elsewhere/mlflow.db", None),
    (f"file://{ROOT}/mlruns", "mlruns"),
    ("http://mlflow.plant.local:5000", "http://mlflow.plant.local:5000"),
    ("https://reader:secret@mlflow.plant.local/", "https://reader@mlflow.plant.local/"),
])
def test_run_json_names_the_store_as_another_machine_would(uri, portable):
    assert tracking.portable_uri(uri) == portable


@pytest.mark.parametrize(("logged_to", "shown"), [("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
                                                  (None, "a local store outside the repository")])
def test_a_run_missing_from_the_store_names_where_it_was_logged(tiny_model, tmp_path, logged_to, shown):
    record = _record(tiny_model) | {"run_id": "0" * 32, "tracking_uri": logged_to}
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(StageError, match=f"run 0+ is not in the MLflow store .*it was logged to {shown}"):
        tracking.open_run(tmp_path / "run.json", tiny_model)
