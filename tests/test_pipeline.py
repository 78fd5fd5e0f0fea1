"""A smoke run of the whole ``dvc repro`` chain on the tiny fixture: real DVC, 1 epoch, CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neu_model.config import DATA_SOURCE_ENV, ROOT

from conftest import FIXTURE_IMAGES, TINY

pytestmark = pytest.mark.slow

PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "neu_model", ".dvc/config", ".dvcignore"]


def _set(raw: dict, dotted: str) -> None:
    key, _, value = dotted.partition("=")
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node[p]
    node[leaf] = yaml.safe_load(value)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC copy of the project whose params.yaml is fixture-sized."""
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for override in TINY:
        _set(raw, override)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run(args, cwd, **env):
    full_env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                             "PYTHONPATH": str(cwd), DATA_SOURCE_ENV: str(FIXTURE_IMAGES)} | env
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


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
