"""neu-predict --runtime, and the exported files of registered versions (``model_source.version_artifact``).

The registry is the session's real SQLite store (conftest ``mlflow_store``) with this module's own
model name; the versions' runs hold the files the register stage logs under ``exported/``.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neu_model.core.config import CLASSES
from neu_model.core.stage import StageError
from neu_model.data.dataset import load_images, to_float
from neu_model.inference import export
from neu_model.inference.loading import load_model
from neu_model.inference.predict import cli
from neu_model.inference.registry_files import MISSING_EXPORT_FIX, MissingArtifactError, version_artifact
from neu_model.inference.torch_model import TorchPredictor, load_torch_model, probability_model

from conftest import FIXTURE_IMAGES

# The saved tiny model is compared with its plain network and ONNX file: mirror averaging off.
pytestmark = pytest.mark.usefixtures("without_mirror")

MODEL_NAME = "predict-runtime-test"
PROBS = [f"p_{c}" for c in CLASSES]
IMAGES = [FIXTURE_IMAGES / f"{n}.bmp" for n in ("Cr_1", "In_2", "Pa_3", "PS_4", "RS_5", "Sc_1")]
DROPPED = "parity failed: 3 changed predictions"


@dataclass(frozen=True)
class Registered:
    champion: str  # exported/model.pt, model.onnx, export.json (onnx kept, openvino-bf16 dropped)
    bare: str  # a version whose run holds no exported files
    mirrored: str  # export.json says mirror: the torch runtime averages over the mirror image
    run_id: str  # the champion's run


@pytest.fixture(scope="module")
def models_dir(tiny_model, tmp_path_factory) -> Path:
    """models/model.pt and its ONNX export side by side, as the train and export stages leave them."""
    folder = tmp_path_factory.mktemp("project") / "models"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "model.pt")
    net, _ = load_torch_model(tiny_model, "cpu")
    graph = probability_model(export.native_pooling(copy.deepcopy(net)), False)
    export.export_onnx(graph, folder / "model.onnx", metadata={"mirror": "false"})
    return folder


def export_report(folder: Path, mirror: bool) -> Path:
    report = {"mirror": mirror, "variants": {"onnx": {"kept": True, "reason": "parity: same predictions"},
                                             "openvino-bf16": {"kept": False, "reason": DROPPED}}}
    path = folder / "export.json"
    path.write_text(json.dumps(report))
    return path


@pytest.fixture(scope="module")
def registered(mlflow_store, models_dir, tmp_path_factory) -> Registered:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment(MODEL_NAME, artifact_location=str(tmp_path_factory.mktemp("artifacts")))
    client.create_registered_model(MODEL_NAME)
    files = tmp_path_factory.mktemp("exported")
    aliases = {}
    for alias, logged in [("champion", ("model.pt", "model.onnx", "export.json")), ("bare", ()),
                          ("mirrored", ("model.pt", "export.json"))]:
        run_id = client.create_run(experiment).info.run_id
        for name in logged:
            source = export_report(files, alias == "mirrored") if name == "export.json" else models_dir / name
            client.log_artifact(run_id, str(source), "exported")
        version = client.create_model_version(MODEL_NAME, f"runs:/{run_id}/exported", run_id=run_id)
        client.set_registered_model_alias(MODEL_NAME, alias, version.version)
        aliases[alias] = run_id
    uri = f"models:/{MODEL_NAME}@"
    return Registered(uri + "champion", uri + "bare", uri + "mirrored", aliases["champion"])


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NEU_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def predict(capsys, model, *args) -> tuple[int, pd.DataFrame, str]:
    status = cli(["--model", str(model), "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(out), keep_default_na=False) if out else pd.DataFrame()
    return status, frame, err


def test_version_artifact_fetches_the_runs_exported_file_once(registered, models_dir, tmp_path):
    fetched = version_artifact(registered.champion, "model.pt", cache=tmp_path / "c")
    assert fetched == tmp_path / "c" / registered.run_id / "model.pt"
    assert fetched.read_bytes() == (models_dir / "model.pt").read_bytes()
    fetched.write_bytes(b"kept")  # a fetched file is not fetched again
    assert version_artifact(registered.champion, "model.pt", cache=tmp_path / "c").read_bytes() == b"kept"
    by_number = version_artifact(f"models:/{MODEL_NAME}/1", "export.json", cache=tmp_path / "n")
    assert json.loads(by_number.read_text())["mirror"] is False
    assert [p.name for p in (tmp_path / "n" / registered.run_id).iterdir()] == ["export.json"]  # no temporaries


def test_a_version_without_exported_files_names_the_fix(registered, tmp_path):
    with pytest.raises(MissingArtifactError) as missing:
        version_artifact(registered.bare, "model.onnx", cache=tmp_path)
    message = str(missing.value)
    assert message.startswith(f"{registered.bare}: its run ") and "has no exported/model.onnx" in message
    assert MISSING_EXPORT_FIX in message and "\n" not in message
    with pytest.raises(StageError, match=f"models:/{MODEL_NAME}@nope: no such model version"):
        version_artifact(f"models:/{MODEL_NAME}@nope", "model.pt", cache=tmp_path)
    with pytest.raises(StageError, match="write models:/<name>@<alias> or models:/<name>/<version>"):
        version_artifact(f"models:/{MODEL_NAME}", "model.pt", cache=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing left half-written


def test_registered_torch_gives_the_rows_of_the_saved_model(registered, models_dir, capsys):
    status, local, err = predict(capsys, models_dir / "model.pt", *IMAGES, "--locate")
    assert status == 0, err
    status, remote, err = predict(capsys, registered.champion, *IMAGES, "--locate", "--runtime", "torch")
    assert status == 0, err
    pd.testing.assert_frame_equal(remote, local)


@pytest.mark.slow
def test_auto_runs_a_runtime_the_export_kept_and_remembers_the_choice(registered, models_dir, own_cache, capsys):
    _, torch_rows, _ = predict(capsys, models_dir / "model.pt", *IMAGES)
    status, frame, err = predict(capsys, registered.champion, *IMAGES)
    assert status == 0, err
    chosen = json.loads((own_cache / registered.run_id / "fastest.json").read_text())["runtime"]
    assert chosen in ("torch", "onnx")
    assert f"{registered.champion}: runtime {chosen} (auto: the fastest here of torch, onnx)" in err
    assert list(frame["predicted"]) == list(torch_rows["predicted"])
    np.testing.assert_allclose(frame[PROBS].astype(float), torch_rows[PROBS].astype(float), atol=1e-4)
    other = "torch" if chosen == "onnx" else "onnx"
    remembered = json.loads((own_cache / registered.run_id / "fastest.json").read_text()) | {"runtime": other}
    (own_cache / registered.run_id / "fastest.json").write_text(json.dumps(remembered))
    assert f"runtime {other} (auto:" in predict(capsys, registered.champion, IMAGES[0])[2]


def test_the_exports_mirror_averaging_is_applied_by_torch(registered, models_dir, capsys):
    status, frame, err = predict(capsys, registered.mirrored, *IMAGES, "--runtime", "torch")
    assert status == 0, err
    net, _ = load_torch_model(models_dir / "model.pt", "cpu")
    images = to_float(load_images(IMAGES)).numpy()
    for mirror, close in ((True, True), (False, False)):
        expected = TorchPredictor(net, mirror=mirror).predict(images)
        assert np.allclose(frame[PROBS].astype(float), expected, atol=1e-5) is close


def test_registry_runtimes_that_cannot_run_exit_2_naming_why(registered, capsys):
    status, _, err = predict(capsys, registered.champion, IMAGES[0], "--runtime", "openvino-bf16")
    assert status == 2 and f"runtime 'openvino-bf16' did not pass the export's checks ({DROPPED})" in err
    status, _, err = predict(capsys, registered.bare, IMAGES[0], "--runtime", "onnx")
    assert status == 2 and err.count("\n") == 1 and MISSING_EXPORT_FIX in err


def test_onnx_runtimes_give_the_classes_of_torch(models_dir, capsys):
    _, torch_rows, _ = predict(capsys, models_dir / "model.pt", *IMAGES)
    for model, runtime in [(models_dir / "model.pt", "onnx"), (models_dir / "model.onnx", "auto"),
                           (models_dir / "model.onnx", "openvino")]:
        status, frame, err = predict(capsys, model, *IMAGES, "--runtime", runtime)
        assert status == 0, err
        assert list(frame["predicted"]) == list(torch_rows["predicted"]), (model.name, runtime)
        np.testing.assert_allclose(frame[PROBS].astype(float), torch_rows[PROBS].astype(float), atol=1e-4)


def test_an_onnx_model_locates_with_the_classical_method_and_says_so(models_dir, capsys):
    status, frame, err = predict(capsys, models_dir / "model.onnx", *IMAGES, "--locate")
    assert status == 0 and all(json.loads(cell) for cell in frame["boxes"])
    assert "note: an exported file has no network to explain, so --locate uses the classical method" in err


def test_runtime_usage_errors_exit_2_with_one_line(models_dir, tmp_path, capsys, monkeypatch):
    cases = [
        (models_dir / "model.pt", "tensorrt", "unknown runtime 'tensorrt'; choose one of auto, pyfunc, torch"),
        (models_dir / "model.onnx", "torch", "an exported file runs in onnx, openvino or openvino-bf16"),
        (models_dir / "model.pt", "pyfunc", "runtime 'pyfunc' runs registered models"),
        (tmp_path / "none.onnx", "onnx", "none.onnx: no such file"),
    ]
    for model, runtime, message in cases:
        status, frame, err = predict(capsys, model, IMAGES[0], "--runtime", runtime)
        assert (status, frame.empty, err.count("\n")) == (2, True, 1) and message in err, err
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    status, _, err = predict(capsys, models_dir / "model.onnx", IMAGES[0], "--runtime", "openvino")
    assert status == 2 and "runtime 'openvino' needs the openvino package, which is not installed here" in err


def test_a_variant_the_local_export_report_dropped_is_refused(models_dir, tmp_path, capsys):
    project = tmp_path / "project"
    shutil.copytree(models_dir, project / "models")
    (project / "reports").mkdir()
    export_report(project / "reports", False)
    status, _, err = predict(capsys, project / "models" / "model.pt", IMAGES[0], "--runtime", "openvino-bf16")
    assert status == 2 and DROPPED in err
    status, frame, err = predict(capsys, project / "models" / "model.pt", IMAGES[0], "--runtime", "onnx")
    assert status == 0 and len(frame) == 1 and "mirror" not in err, err
    # asked to mirror, the graph exported without: said, not silently ignored
    note = load_model(project / "models" / "model.pt", "onnx", "cpu", mirror=True).note
    assert "runs the export's mirror averaging (off), not inference.mirror (on)" in note


def test_a_damaged_export_report_is_one_line(models_dir, tmp_path, capsys):
    project = tmp_path / "project"
    shutil.copytree(models_dir, project / "models")
    (project / "reports").mkdir()
    (project / "reports" / "export.json").write_text("[1, 2]")
    status, _, err = predict(capsys, project / "models" / "model.pt", IMAGES[0], "--runtime", "onnx")
    assert status == 2 and err.count("\n") == 1
    assert "export.json: not an export report (a JSON list, not an object); re-run the export stage" in err
