"""A DVC remote set up by ``make remote``: push from one clone, pull into a fresh one, nothing retrained.

A temporary git repository of the project on the fixture (1 epoch) pushes its data and model
to a folder remote; a ``git clone`` of it, given the same remote, pulls exactly those files and
``dvc repro`` there trains nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neu_model.core.paths import ROOT

from conftest import make_project, run_in_project

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VENV = Path(sys.prefix)
DVC = str(Path(sys.executable).parent / "dvc")
# What `dvc pull` must bring back: the data, the split and the model (DVC-cached outputs).
PULLED = ["data/raw", "data/split.csv", "models/model.pt"]


def run(args, cwd: Path) -> subprocess.CompletedProcess:
    done = run_in_project(args, cwd)
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def make_remote(project: Path, remote: Path) -> subprocess.CompletedProcess:
    """``make remote`` of this repository's Makefile, in ``project``, with this interpreter's venv."""
    return run(["make", "--no-print-directory", "-o", f"{VENV}/.installed", "remote", f"REMOTE={remote}",
                f"VENV={VENV}"], project)


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost", *args], cwd=project,
                          capture_output=True, text=True, check=True)
    return done.stdout


def digests(project: Path) -> dict[str, str]:
    """sha256 of every file under the pulled paths, by path relative to ``project``."""
    files = [f for p in PULLED for f in ([project / p] if (project / p).is_file() else (project / p).rglob("*"))]
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """The origin repository after a pipeline run, ``make remote`` and ``dvc push``; yields (origin, remote)."""
    base = tmp_path_factory.mktemp("dvc-remote")
    origin, remote = make_project(base / "origin"), base / "remote"
    for name in ("Makefile", ".gitignore", ".dvc/.gitignore"):  # the real repository's: config.local stays out
        shutil.copy(ROOT / name, origin / name)
    run([DVC, "repro"], origin)
    make_remote(origin, remote)
    run([DVC, "push"], origin)
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "pipeline on the fixture")
    return origin, remote


def test_the_remote_is_local_config_not_committed(pushed):
    origin, remote = pushed
    assert str(remote) in (origin / ".dvc" / "config.local").read_text()
    assert "remote" not in (origin / ".dvc" / "config").read_text()
    tracked = git(origin, "ls-files").splitlines()
    assert ".dvc/config" in tracked and "dvc.lock" in tracked
    assert ".dvc/config.local" not in tracked and not any(f.startswith(".dvc/cache") for f in tracked)
    assert any(remote.rglob("*")), "dvc push wrote nothing"


def test_a_fresh_clone_pulls_the_same_files_and_retrains_nothing(pushed, tmp_path):
    origin, remote = pushed
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert not (clone / "models" / "model.pt").exists()
    # A clone has no remote until its user sets one: the location is not in git.
    no_remote = run_in_project([DVC, "pull"], clone)
    assert no_remote.returncode != 0 and "no default remote set" in no_remote.stderr, no_remote.stderr
    make_remote(clone, remote)
    run([DVC, "pull"], clone)
    assert digests(clone) == digests(origin)
    assert any(path.startswith("data/raw/NEU-CLS/") for path in digests(clone))

    lock = (clone / "dvc.lock").read_text()
    again = run([DVC, "repro"], clone)  # same NEU_DATA_SOURCE as the origin's run (run_in_project)
    ran = [ln for ln in again.stdout.splitlines() if ln.startswith("Running stage")]
    # source runs on every repro (always_changed) and found nothing new; boxes rebuilds data/boxes.csv,
    # which DVC does not cache (cache: false), as the same table (evaluate stays skipped)
    assert ran in (["Running stage 'source':"], ["Running stage 'source':", "Running stage 'boxes':"]) or (
        not ran and "Data and pipelines are up to date" in again.stdout), again.stdout
    assert (clone / "dvc.lock").read_text() == lock
    assert digests(clone) == digests(origin)
