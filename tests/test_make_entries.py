"""The Makefile's entries that change the workspace, run as a user runs them, in a committed copy
of the project: ``make retrain`` killed with SIGKILL and run again, a second ``make retrain`` and
a ``make pipeline`` refused while one runs, a bad ``--set`` refused before Prefect starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.core.paths import ROOT
from neu_model.ops import orchestrate

from conftest import make_project
from kill_support import Watched, project_env

pytestmark = pytest.mark.slow

PROJECT_OVERRIDES = ("register.accuracy_floor=0.0",)  # the 1-epoch model becomes champion


@pytest.fixture(scope="module")
def prefect_api():
    """A throwaway Prefect API; the runs under make report to it (PREFECT_API_URL) instead of
    each starting a temporary one."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def dvc_status(project: Path) -> dict:
    """``dvc status`` as JSON; ``{"source": ["always changed"]}`` when there is nothing to do."""
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=project,
                         env=orchestrate.stage_env(project), capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


def make_checkout(root: Path) -> Path:
    """A project copy with the Makefile, the venv and params.yaml committed, as a clone has them."""
    project = make_project(root, *PROJECT_OVERRIDES)
    shutil.copy(ROOT / "Makefile", project / "Makefile")
    (project / ".venv").symlink_to(Path(sys.executable).parents[1])
    (project / ".gitignore").write_text(".venv\n/data/\n/models/\n/mlflow.db\n/mlruns/\n/.prefect/\n*.tmp\n")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], cwd=project, check=True)
    return project


def test_make_retrain_killed_then_rerun_leaves_params_and_dvc_clean_and_refuses_a_second_run(prefect_api, tmp_path):
    project = make_checkout(tmp_path / "checkout")
    env = project_env(project) | {"PREFECT_API_URL": prefect_api}
    make = ["make", "-o", ".venv/.installed"]  # the venv is there: no (re)install
    # The train stage stops at its first checkpoint write (NEU_PAUSE_AT reaches the stages) until killed.
    first = Watched([*make, "retrain", "ARGS=--set train.recipes.defectnet.epochs=2"], project, env,
                    pause_at="rename:checkpoint.pt")
    try:
        first.wait_for("NEU_PAUSE_AT reached: rename:checkpoint.pt")
        holder = json.loads((project / ".dvc" / "tmp" / "neu-workspace.lock").read_text())
        for target in ("retrain", "pipeline"):
            second = subprocess.run([*make, target], cwd=project, env=env, capture_output=True, text=True,
                                    timeout=600)
            assert second.returncode != 0 and "Running stage" not in second.stdout + second.stderr
            refusal = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
            assert len(refusal) == 1 and f"in use by pid {holder['pid']} (started {holder['started']}: " in refusal[0]
            assert "python -m flows.training run --set train.recipes.defectnet.epochs=2)" in refusal[0]
    finally:
        first.kill()  # SIGKILL to make, the lock wrapper, the flow, dvc and the stage
    assert "epochs: 2" in (project / "params.yaml").read_text()  # what the kill left
    again = subprocess.run([*make, "retrain"], cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "undid the overrides (train.recipes.defectnet.epochs=2) of the run started" in again.stdout + again.stderr
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=project).returncode == 0
    assert dvc_status(project) == {"source": ["always changed"]}


@pytest.mark.parametrize("override,named", [
    ("train.recipes.defectnet.epochz=1", "no key 'train.recipes.defectnet.epochz'"),
    ("train.recipes.defectnet.epochs=abc", "train.recipes.defectnet.epochs='abc' must be an integer")])
def test_make_retrain_refuses_a_bad_override_before_prefect_starts(tmp_path, override, named):
    project = make_checkout(tmp_path / "checkout")
    result = subprocess.run(["make", "-o", ".venv/.installed", "retrain", f"ARGS=--set {override}"], cwd=project,
                            env=project_env(project), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Prefect" not in result.stdout + result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and named in errors[0]
    assert not (project / "data").exists()
    assert subprocess.run(["git", "diff", "--quiet", "params.yaml"], cwd=project).returncode == 0
