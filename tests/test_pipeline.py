"""A smoke run of the whole ``dvc repro`` chain on the tiny fixture: real DVC, 1 epoch, CPU."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from neu_model.core.config import BOXES_SOURCE_ENV, DATA_SOURCE_ENV
from neu_model.core.paths import ROOT

from conftest import FIXTURE_IMAGES, make_project, run_in_project

BOXES = {BOXES_SOURCE_ENV: str(ROOT / "tests" / "fixtures" / "boxes.csv")}  # the fixture images' NEU-DET boxes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


def run(args, cwd, **env):
    return run_in_project(args, cwd, **env)


def test_dvc_repro_runs_every_stage_then_does_nothing(project):
    dvc = str(Path(sys.executable).parent / "dvc")
    first = run([dvc, "repro"], project, **BOXES)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("source", "download", "boxes", "split", "train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["localisation"]["chosen"] == "combined" and metrics["localisation"]["images"] > 0
    assert json.loads((project / "reports" / "localisation.json").read_text())["test"]["images"] > 0
    assert (project / "reports" / "locate_gallery.png").exists()
    registration = json.loads((project / "reports" / "registration.json").read_text())
    run_id = json.loads((project / "reports" / "run.json").read_text())["run_id"]
    assert registration["run_id"] == run_id and registration["test_accuracy"] == metrics["accuracy"]
    assert 0 <= metrics["accuracy"] <= 1 and "per_class" in metrics
    assert (project / "models" / "model.pt").exists()
    assert (project / "dvc.lock").exists()
    export = json.loads((project / "reports" / "export.json").read_text())
    assert export["variants"]["onnx"]["kept"] and export["offered"]
    shown = json.loads(run([str(Path(sys.executable).parent / "dvc"), "metrics", "show", "--json"], project).stdout)
    assert {"reports/metrics.json", "reports/export.json"} <= set(shown[""]["data"])

    # The session's throwaway store (conftest), inherited by dvc's stages; named explicitly because
    # MLflow's global URI may still point where an earlier test's in-process code left it.
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_run(run_id).info.experiment_id
    published = {Path(f.path).name for f in client.list_artifacts(run_id, "exported")}
    assert {"model.pt", "model.onnx", "export.json"} <= published  # the registered version's run has its files
    n_runs = len(client.search_runs([experiment]))
    again = run([dvc, "repro"], project, **BOXES)
    assert len(client.search_runs([experiment])) == n_runs  # skipped stages create no (empty) run
    assert again.returncode == 0
    # only the source stage, which runs every time (always_changed) and found nothing new
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("Running stage")] == ["Running stage 'source':"]
    assert json.loads(run([dvc, "status", "--json"], project, **BOXES).stdout) == {"source": ["always changed"]}


def test_new_image_at_the_source_reruns_the_chain(project, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(FIXTURE_IMAGES, source)
    env = {DATA_SOURCE_ENV: str(source)}
    assert run([sys.executable, "-m", "neu_model.data.source"], project, **env).returncode == 0
    assert run([str(Path(sys.executable).parent / "dvc"), "repro"], project, **env).returncode == 0
    shutil.copy(source / "Cr_1.bmp", source / "Cr_6.bmp")
    changed = run([sys.executable, "-m", "neu_model.data.source"], project, **env)
    assert "changed" in changed.stderr
    status = run([str(Path(sys.executable).parent / "dvc"), "status"], project, **env)
    assert "download" in status.stdout


def test_boxes_gone_reruns_evaluate_alone_and_skips_the_localisation_figures(project):
    dvc = str(Path(sys.executable).parent / "dvc")
    assert run([dvc, "repro"], project, **BOXES).returncode == 0
    gone = run([dvc, "repro"], project)  # no NEU_BOXES_SOURCE and data.boxes null: no boxes
    assert gone.returncode == 0, gone.stdout + gone.stderr
    ran = [ln for ln in gone.stdout.splitlines() if ln.startswith("Running stage")]
    assert "Running stage 'evaluate':" in ran and "Running stage 'train':" not in ran
    assert "localisation metrics will be skipped" in gone.stderr
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["localisation"] == {"skipped": "no boxes: set data.boxes or NEU_BOXES_SOURCE"}
