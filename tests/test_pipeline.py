"""A smoke run of the whole ``dvc repro`` chain on the tiny fixture: real DVC, 1 epoch, CPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.config import DATA_SOURCE_ENV, ROOT

from conftest import FIXTURE_IMAGES, make_project, run_in_project

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("project"))


def run(args, cwd, **env):
    return run_in_project(args, cwd, **env)


def test_dvc_repro_runs_every_stage_then_does_nothing(project):
    dvc = str(Path(sys.executable).parent / "dvc")
    src = run([sys.executable, "-m", "neu_model.source"], project)
    assert src.returncode == 0, src.stderr
    first = run([dvc, "repro"], project)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("download", "split", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and "per_class" in metrics
    assert (project / "models" / "model.pt").exists()
    assert (project / "dvc.lock").exists()

    again = run([dvc, "repro"], project)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout
    assert run([dvc, "status"], project).stdout.strip().endswith("up to date.")


def test_new_image_at_the_source_reruns_the_chain(project, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(FIXTURE_IMAGES, source)
    env = {DATA_SOURCE_ENV: str(source)}
    assert run([sys.executable, "-m", "neu_model.source"], project, **env).returncode == 0
    assert run([str(Path(sys.executable).parent / "dvc"), "repro"], project, **env).returncode == 0
    shutil.copy(source / "Cr_1.bmp", source / "Cr_6.bmp")
    changed = run([sys.executable, "-m", "neu_model.source"], project, **env)
    assert "changed" in changed.stderr
    status = run([str(Path(sys.executable).parent / "dvc"), "status"], project, **env)
    assert "download" in status.stdout
