"""Shared fixtures: a tiny real-image data set, its split, and a model trained on it for one epoch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from neu_model.core.config import BOXES_SOURCE_ENV, DATA_SOURCE_ENV, Config, apply_overrides, load_config
from neu_model.core.paths import ROOT
from neu_model.core.stage import disable_telemetry

disable_telemetry()
os.environ["NEU_PROGRESS"] = "0"
# CI exports NEU_DATA_SOURCE and NEU_BOXES_SOURCE for `make pipeline`; tests choose their data
# themselves. Removed at import, not in a function fixture, because session fixtures are built before those run.
os.environ.pop(DATA_SOURCE_ENV, None)
os.environ.pop(BOXES_SOURCE_ENV, None)

FIXTURE_IMAGES = ROOT / "tests" / "fixtures" / "NEU-tiny"  # 30 real BMPs: 5 a class, Pa_101 == Pa_105
# One epoch, small batches, no robustness suite: what every fixture-sized run overrides.
TINY = [
    "data.expected_per_class=any",
    "train.recipes.defectnet.epochs=1",
    "train.recipes.defectnet.batch_size=8",
    "train.recipes.seed_cnn.epochs=1",
    "train.device=cpu",
    "evaluate.robustness=false",  # test_evaluate runs the suite; elsewhere it only costs time
]


# The fast tier (`make test-fast`, `-m "not slow"`): unit tests on tiny fixtures and one smoke run of
# the chain (the session's one-epoch `tiny_model`, scored by neu-predict). Whatever exports, registers,
# evaluates, trains again, starts a server or runs `dvc repro` is `slow`: a test marks itself, and
# every test that uses one of these fixtures (each does such work once per run) is marked here.
SLOW_FIXTURES = {"tiny_export", "exported", "mirror_export", "models_dir", "registered", "evaluated"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def tiny_config(*overrides: str) -> Config:
    """The repository's params with the fixture-sized overrides and ``overrides`` on top."""
    return load_config(overrides=[f"data.source={FIXTURE_IMAGES}", *TINY, *overrides])


@dataclass(frozen=True)
class Workspace:
    root: Path
    raw: Path
    split: Path

    @property
    def images(self) -> Path:
        return self.raw / "NEU-CLS"


@pytest.fixture(autouse=True)
def _no_env_source(monkeypatch):
    monkeypatch.delenv(DATA_SOURCE_ENV, raising=False)
    monkeypatch.delenv(BOXES_SOURCE_ENV, raising=False)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> Path:
    """One throwaway MLflow store (SQLite + mlruns/) for the session: no test writes the project's mlflow.db.

    Created once because creating a SQLite store runs MLflow's migrations (seconds); tests keep
    apart by using their own experiment or registered-model names. Subprocesses inherit the URI.
    """
    root = tmp_path_factory.mktemp("mlflow")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    yield root
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Workspace:
    """The fixture images downloaded and split, as the first two stages leave them."""
    from neu_model.data.download import download
    from neu_model.data.split import split

    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config()
    download(cfg, root / "data" / "raw", cache_dir=root / "data" / "cache")
    split(cfg, root / "data" / "raw" / "manifest.csv", root / "data" / "split.csv")
    return Workspace(root, root / "data" / "raw", root / "data" / "split.csv")


@pytest.fixture(scope="session")
def tiny_model(tiny_data, tmp_path_factory) -> Path:
    """A defectnet trained one epoch on the fixture; returns models/model.pt."""
    from neu_model.training.train import train

    out = tmp_path_factory.mktemp("model")
    train(tiny_config(), tiny_data.split, tiny_data.images, out / "model.pt", out / "checkpoint.pt",
          out / "train_log.csv", out / "train_metrics.json", tiny_data.raw / "manifest.csv")
    return out / "model.pt"


def documented_onnx_client() -> dict:
    """The names that docs/mlflow.md's ONNX client block defines (``champion_onnx``, ``classify``),
    run as a reader would paste it: the tests use the documented code itself, so it cannot drift."""
    mark = "<!-- onnx-client -->"
    block = re.search(re.escape(mark) + r"\s*```python\n(.*?)```", (ROOT / "docs" / "mlflow.md").read_text(), re.S)
    assert block, f"docs/mlflow.md: no python block after {mark}"
    names: dict = {}
    exec(compile(block.group(1), "docs/mlflow.md", "exec"), names)
    return names


def export_model(model: Path, data: Workspace, out: Path, *options: str) -> Path:
    """The export stage on ``model`` over ``data``'s split; returns ``out``, which then holds
    model.onnx, model.int8.onnx and export.json."""
    from neu_model.inference.export import main

    main(["--model", str(model), "--split", str(data.split), "--images", str(data.images), "--out-dir", str(out),
          "--report", str(out / "export.json"), *options])
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_data, tiny_model, tmp_path_factory) -> Path:
    """The tiny model exported without mirror averaging (``export_model``'s folder)."""
    return export_model(tiny_model, tiny_data, tmp_path_factory.mktemp("export"), "--set", "inference.mirror=false")


PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "neu_model", "flows", "tasks", ".dvc/config",
                 ".dvcignore"]


def make_project(root: Path, *overrides: str) -> Path:
    """A fresh git + DVC copy of the project in ``root`` whose params.yaml is fixture-sized."""
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    raw = apply_overrides(yaml.safe_load((root / "params.yaml").read_text()), [*TINY, *overrides])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def run_in_project(args, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a command in a project copy with the venv first on PATH and the fixture as data source."""
    full_env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                             "PYTHONPATH": str(cwd), DATA_SOURCE_ENV: str(FIXTURE_IMAGES)} | env
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def die_in_epoch(monkeypatch, epoch: int):
    """Make training raise KeyboardInterrupt (a kill) when ``epoch`` (1-based) starts; returns the undo."""
    import neu_model.training.train as train_mod

    real_epoch, calls = train_mod.train_one_epoch, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", dies)
    return lambda: monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)


@pytest.fixture(scope="session")
def plain_params(tmp_path_factory) -> Path:
    """The repository's params.yaml with mirror averaging off: for tests comparing ``neu-predict``
    on a saved ``.pt`` model with a plain (unmirrored) network or ONNX file."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["inference"]["mirror"] = False
    path = tmp_path_factory.mktemp("plain-params") / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def without_mirror(plain_params, monkeypatch) -> Path:
    """``neu-predict``'s default params file is ``plain_params`` for this test."""
    monkeypatch.setattr("neu_model.inference.predict.PARAMS_FILE", plain_params)
    return plain_params
