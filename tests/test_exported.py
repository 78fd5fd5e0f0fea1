"""The exported files of a registered version: checked, logged under ``exported/`` of its run, and
fetched by the plain client of docs/mlflow.md, which must reproduce the version's pyfunc predictions."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
from mlflow import MlflowClient

from neu_model.core.config import CLASSES
from neu_model.core.files import sha256_file
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_split, to_float
from neu_model.registry import export_artifacts as exported
from neu_model.registry import register as register_stage
from neu_model.registry.register import register

from conftest import documented_onnx_client, export_model, tiny_config

TOLERANCE = 1e-4  # export.tolerance: what the export stage holds an fp32 runtime to


def client() -> MlflowClient:
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def pipeline_pass(tiny_model: Path, split_file: Path, tmp_path: Path, accuracy: float = 0.96) -> Path:
    """reports/ of a pass of the tiny model: a new run (its model is the tiny model's) with an evaluation."""
    record = json.loads(tiny_model.with_name("run.json").read_text())
    run_id = client().create_run(record["experiment_id"]).info.run_id
    client().log_metric(run_id, "test_accuracy", accuracy)
    client().set_tag(run_id, "test_split_id", register_stage.test_split_id(split_file, record["dataset_version"]))
    reports = tmp_path / run_id
    reports.mkdir()
    (reports / "run.json").write_text(json.dumps(record | {"run_id": run_id}))
    (reports / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "macro_f1": accuracy}))
    return reports


def register_pass(name: str, reports: Path, data, model: Path, export_dir: Path, *overrides: str) -> dict:
    # the export folders of these tests say their own mirror setting; tiny_export's is off
    cfg = tiny_config(f"register.model_name={name}", "register.accuracy_floor=0.0", "inference.mirror=false",
                      *overrides)
    return register(cfg, reports / "run.json", reports / "metrics.json", data.split, data.images, model,
                    reports / "registration.json", export_dir / "export.json", export_dir)


@pytest.fixture(scope="module")
def mirror_export(tiny_data, tiny_model, tmp_path_factory) -> Path:
    return export_model(tiny_model, tiny_data, tmp_path_factory.mktemp("export-mirror"),
                        "--set", "inference.mirror=true")


@pytest.fixture
def name() -> str:
    return f"neu-exported-{uuid.uuid4().hex[:8]}"


@pytest.mark.slow
def test_doc_client_reproduces_the_champions_pyfunc_predictions(tiny_data, tiny_model, tiny_export, tmp_path, name):
    result = register_pass(name, pipeline_pass(tiny_model, tiny_data.split, tmp_path), tiny_data, tiny_model,
                           tiny_export)
    assert result["champion"] == result["version"]
    code = documented_onnx_client()
    onnx_file = code["champion_onnx"](name)
    assert sha256_file(onnx_file) == sha256_file(tiny_export / "model.onnx")
    test = load_split("test", tiny_data.split, tiny_data.images)
    answers = code["classify"](onnx_file, [tiny_data.images / f for f in test.files])
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(to_float(test.images).numpy())[:, :6]
    assert [c for c, _ in answers] == [CLASSES[i] for i in served.argmax(1)]
    np.testing.assert_allclose([p for _, p in answers], served.max(1), atol=TOLERANCE)


def test_version_run_holds_the_exported_files_and_figures(tiny_data, tiny_model, tiny_export, tmp_path, name):
    result = register_pass(name, pipeline_pass(tiny_model, tiny_data.split, tmp_path), tiny_data, tiny_model,
                           tiny_export)
    report = json.loads((tiny_export / "export.json").read_text())
    listed = {Path(f.path).name for f in client().list_artifacts(result["run_id"], exported.FOLDER)}
    int8 = {"model.int8.onnx"} if exported.keeps_int8(report) else set()
    assert listed == {"model.pt", "model.onnx", "export.json"} | int8
    logged = client().get_run(result["run_id"]).data.metrics
    for variant, entry in report["variants"].items():
        key = f"export_{variant.replace('-', '_')}"
        assert logged[f"{key}_kept"] == float(entry["kept"])
        if "max_prob_diff" in entry:  # a variant this CPU cannot judge has no figures
            assert logged[f"{key}_max_diff"] == pytest.approx(entry["max_prob_diff"])
            assert logged[f"{key}_changed"] == entry["changed_predictions"]
    tags = client().get_model_version(name, result["version"]).tags
    assert tags["inference.mirror"] == "false" and tags["export.onnx_sha256"] == report["onnx_sha256"]
    assert tags["export.offered"] == ",".join(report["offered"])


@pytest.mark.slow
def test_mirror_setting_registers_the_mirror_averaged_twin(tiny_data, tiny_model, tiny_export, mirror_export,
                                                           tmp_path, name):
    reports = pipeline_pass(tiny_model, tiny_data.split, tmp_path)
    plain = register_pass(name, reports, tiny_data, tiny_model, tiny_export)
    mirror = register_pass(name, reports, tiny_data, tiny_model, mirror_export, "inference.mirror=true")
    assert mirror["version"] != plain["version"]  # same run, another model: not the plain version reused
    assert register_pass(name, reports, tiny_data, tiny_model, mirror_export,
                         "inference.mirror=true")["version"] == mirror["version"]
    version = client().get_model_version(name, mirror["version"])
    assert version.tags["inference.mirror"] == "true"
    test = load_split("test", tiny_data.split, tiny_data.images)
    x = to_float(test.images).numpy()
    mirror_model = mlflow.pyfunc.load_model(f"models:/{name}/{mirror['version']}")
    served = mirror_model.predict(x)[:, :6]
    # averaged over both views, the model cannot tell an image from its mirror image
    np.testing.assert_allclose(served, mirror_model.predict(np.ascontiguousarray(x[..., ::-1]))[:, :6], atol=1e-6)
    plain_served = mlflow.pyfunc.load_model(f"models:/{name}/{plain['version']}").predict(x)[:, :6]
    assert np.abs(served - plain_served).max() > 1e-4
    code = documented_onnx_client()  # challenger: the mirror version, registered last
    answers = code["classify"](code["champion_onnx"](name, "challenger"), [tiny_data.images / f for f in test.files])
    np.testing.assert_allclose([p for _, p in answers], served.max(1), atol=TOLERANCE)


def test_export_of_another_model_or_setting_is_refused_before_registering(tiny_data, tiny_model, tiny_export,
                                                                          mirror_export, tmp_path, name):
    reports = pipeline_pass(tiny_model, tiny_data.split, tmp_path)
    with pytest.raises(StageError, match=r"exported with mirror averaging True, but inference.mirror is false"):
        register_pass(name, reports, tiny_data, tiny_model, mirror_export)
    stale = shutil.copytree(tiny_export, tmp_path / "stale")
    report = json.loads((stale / "export.json").read_text())
    (stale / "export.json").write_text(json.dumps(report | {"model_sha256": "0" * 64}))
    with pytest.raises(StageError, match="describes another model than the evaluated one; rerun the export stage"):
        register_pass(name, reports, tiny_data, tiny_model, stale)
    (stale / "export.json").write_text(json.dumps(report))
    shutil.copy(mirror_export / "model.onnx", stale / "model.onnx")  # a newer graph than the report judged
    with pytest.raises(StageError, match="model.onnx is not the file that .*export.json judged"):
        register_pass(name, reports, tiny_data, tiny_model, stale)
    (stale / "export.json").unlink()
    with pytest.raises(StageError, match=r"export.json: not found; rerun the export stage \(dvc repro export\)"):
        register_pass(name, reports, tiny_data, tiny_model, stale)
    assert client().search_model_versions(f"name = '{name}'") == []


def test_metric_names_follow_the_variants(tiny_export):
    report = json.loads((tiny_export / "export.json").read_text())
    figures = exported.metrics(report)
    assert figures and all(re.fullmatch(r"export_[a-z0-9_]+", key) for key in figures)
    assert {key.split("_kept")[0] for key in figures if key.endswith("_kept")} == {
        f"export_{v.replace('-', '_')}" for v in report["variants"]}
