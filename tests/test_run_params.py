"""A run's params.yaml overrides are undone when it ends, and after a real SIGKILL at any point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from neu_model.core import paths
from neu_model.core.config import ConfigError
from neu_model.core.paths import ROOT
from neu_model.ops import run_params

from kill_support import project_env, run

EPOCHS = "train.recipes.defectnet.epochs=7"
APPLY = "import sys\nfrom neu_model.ops.run_params import apply\napply(sys.argv[1], sys.argv[2:])\n"


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


def leftovers(project: Path) -> list[str]:
    """Temporaries beside params.yaml or the record (a writer killed before its rename)."""
    return sorted(p.name for p in [*project.glob(".*.tmp"), *(project / ".dvc" / "tmp").glob(".*.tmp")])


def test_overrides_last_until_the_run_ends(project):
    original = (project / "params.yaml").read_text()
    notes = []
    assert run_params.apply(project, [EPOCHS, "seed=0"], notes.append) == [EPOCHS]  # seed was 0 already
    text = (project / "params.yaml").read_text()
    assert "epochs: 7" in text and "# The one source of configuration" in text  # comments kept
    assert run_params.restore(project, notes.append, ending=True)
    assert (project / "params.yaml").read_text() == original
    assert not (project / paths.RUN_PARAMS_RECORD).exists() and leftovers(project) == []
    assert notes == [f"{project / 'params.yaml'}: this run's overrides ({EPOCHS}, seed=0) undone"]
    assert run_params.apply(project, []) == [] and not (project / paths.RUN_PARAMS_RECORD).exists()


def test_an_edit_made_during_the_run_is_kept(project):
    run_params.apply(project, ["seed=5"])
    edited = (project / "params.yaml").read_text().replace("batch_size: 64", "batch_size: 32")
    (project / "params.yaml").write_text(edited)  # a person edits it while the run goes on
    notes = []
    assert not run_params.restore(project, notes.append, ending=True)
    assert (project / "params.yaml").read_text() == edited and "the edit is kept" in notes[0]


@pytest.mark.parametrize("override,named", [("train.nope=1", "no key 'train.nope'"),
                                            ("train.recipes.defectnet.epochs=abc", "epochs='abc' must be an integer")])
def test_a_bad_override_writes_nothing(project, override, named):
    original = (project / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=named):
        run_params.apply(project, [override])
    assert (project / "params.yaml").read_text() == original and not (project / paths.RUN_PARAMS_RECORD).exists()


# Every point of apply and restore at which a SIGKILL can land: the record being renamed into
# place, written, params.yaml being renamed into place, written.
KILL_POINTS = ["rename:flow-params.json", "renamed:flow-params.json", "rename:params.yaml", "renamed:params.yaml"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_while_applying_is_undone_by_the_next_start(project, point):
    original = (project / "params.yaml").read_text()
    env = project_env(project) | {"PYTHONPATH": str(ROOT)}
    run([sys.executable, "-c", APPLY, str(project), EPOCHS], project, env, pause_at=point)
    assert ("epochs: 7" in (project / "params.yaml").read_text()) == (point == "renamed:params.yaml")
    restore = run([sys.executable, "-m", "neu_model.ops.run_params", "restore"], project, env)
    assert restore.proc.returncode == 0, restore.output
    assert (project / "params.yaml").read_text() == original
    assert not (project / paths.RUN_PARAMS_RECORD).exists()
    if point == "renamed:params.yaml":
        assert f"undid the overrides ({EPOCHS}) of the run started" in restore.output
    # The next write of the same file removes the temporary the killed writer left.
    run_params.apply(project, ["seed=1"])
    run_params.restore(project, ending=True)
    assert leftovers(project) == [] and (project / "params.yaml").read_text() == original


def test_sigkill_while_restoring_is_finished_by_the_next_start(project):
    original = (project / "params.yaml").read_text()
    env = project_env(project) | {"PYTHONPATH": str(ROOT)}
    run_params.apply(project, [EPOCHS])
    run([sys.executable, "-m", "neu_model.ops.run_params", "restore"], project, env, pause_at="rename:params.yaml")
    assert "epochs: 7" in (project / "params.yaml").read_text()  # the kill came before the rename
    run_params.restore(project)
    assert (project / "params.yaml").read_text() == original and not (project / paths.RUN_PARAMS_RECORD).exists()
