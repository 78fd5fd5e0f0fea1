"""Real kills: every stage started as a subprocess, SIGKILLed at a chosen moment, then run again.

One fixture-sized project (2 epochs) goes through ``dvc repro`` once; then a new image arrives
at the data source and each stage is killed on its way to the new version, in pipeline order:
after each kill the old output must be intact, after the rerun the new one complete. The
moments come from ``NEU_PAUSE_AT`` (``tests/pause_hooks``) or from files the test
watches, never from sleeps. ``pytest -s`` prints the table of outcomes (docs/reliability.md).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from neu_model.core.paths import ROOT
from neu_model.inference.torch_model import load_torch_model
from neu_model.ops.orchestrate import StageFailed, run_logged

from conftest import FIXTURE_IMAGES, make_project
from kill_support import Watched, ends, project_env, run

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")
NAME = "neu-defect-classifier"
OUTCOMES: list[tuple[str, str, str]] = []
STAGE_COMMANDS = {name: spec["cmd"] for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}


class Project:
    """The project copy, its data source folder and the stages' environment."""

    def __init__(self, root: Path, source: Path):
        self.root, self.source, self.env = root, source, project_env(root, source)

    def stage(self, name: str, pause_at: str | None = None) -> Watched:
        module = STAGE_COMMANDS[name].split()[-1]  # dvc.yaml's `python -m neu_model....`
        done = run([sys.executable, "-m", module], self.root, self.env, pause_at)
        assert pause_at or done.proc.returncode == 0, done.output
        return done

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def client(self) -> MlflowClient:
        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("kills"), "train.recipes.defectnet.epochs=2",
                        "register.accuracy_floor=0.0")
    source = shutil.copytree(FIXTURE_IMAGES, root.parent / "source")
    proj = Project(root, source)
    first = run([DVC, "repro"], root, proj.env)  # the old version of every output
    assert first.proc.returncode == 0, first.output
    shutil.copy(source / "Cr_1.bmp", source / "Cr_6.bmp")  # new data: every stage has work to do
    yield proj
    width = max(len(f"{s} | {m}") for s, m, _ in OUTCOMES) if OUTCOMES else 0
    print("\n\nstage | moment of the SIGKILL".ljust(width + 2) + " | outcome")
    for stage, moment, outcome in OUTCOMES:
        print(f"{stage} | {moment}".ljust(width) + f" | {outcome}")


def raw_is_complete(raw: Path) -> list[str]:
    """The images of ``raw`` after checking they are exactly the manifest's, byte for byte."""
    with open(raw / "manifest.csv") as fh:
        rows = {r["file"]: r["sha256"] for r in csv.DictReader(fh)}
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (raw / "NEU-CLS").iterdir()}
    assert files == rows
    return sorted(files)


def champion_was_evaluated(client: MlflowClient) -> str:
    """The champion's version after checking that it carries the evaluation logged in its run."""
    version = client.get_model_version_by_alias(NAME, "champion")
    logged = client.get_run(version.run_id).data.metrics["test_accuracy"]
    assert float(version.tags["test_accuracy"]) == logged and "gate.decision" in version.tags
    return str(version.version)


def test_source_killed_before_its_rename(project):
    before = project.read("data/source.json")
    project.stage("source", "rename:source.json")
    assert project.read("data/source.json") == before
    project.stage("source")
    assert project.read("data/source.json") != before and json.loads(project.read("data/source.json"))
    OUTCOMES.append(("source", "writing data/source.json", "old fingerprint kept; the rerun writes the new one"))


def test_download_killed_before_and_after_the_swap(project):
    raw = project.root / "data" / "raw"
    old = raw_is_complete(raw)
    project.stage("download", "swap:raw")
    assert raw_is_complete(raw) == old and "Cr_6.bmp" not in old
    leftover = list((project.root / "data").glob(".raw-tmp-*"))
    assert leftover  # the killed run's work folder: ignored by git and DVC, never read
    OUTCOMES.append(("download", "new data/raw complete, before the swap", "old data/raw intact"))
    project.stage("download", "swapped:raw")
    assert raw_is_complete(raw) == sorted([*old, "Cr_6.bmp"])
    OUTCOMES.append(("download", "just after the swap", "new data/raw complete"))
    project.stage("download")
    assert raw_is_complete(raw) == sorted([*old, "Cr_6.bmp"])


def test_split_killed_before_its_rename(project):
    before = project.read("data/split.csv")
    project.stage("split", "rename:split.csv")
    assert project.read("data/split.csv") == before and b"Cr_6.bmp" not in before
    project.stage("split")
    assert b"Cr_6.bmp" in project.read("data/split.csv")
    OUTCOMES.append(("split", "writing data/split.csv", "old split kept; the rerun writes the new one"))


def test_train_killed_writing_a_checkpoint(project):
    model, checkpoint = project.read("models/model.pt"), project.read("models/checkpoint.pt")
    project.stage("train", "rename:checkpoint.pt")
    assert project.read("models/checkpoint.pt") == checkpoint and project.read("models/model.pt") == model
    assert list((project.root / "models").glob(".checkpoint.pt.*.tmp"))  # the complete temporary, never read
    OUTCOMES.append(("train", "writing the epoch-1 checkpoint", "old checkpoint and model intact"))


def test_train_killed_mid_epoch_under_dvc_resumes(project):
    model = project.read("models/model.pt")
    log = project.root / "reports" / "train_log.csv"
    proc = Watched([DVC, "repro", "--single-item", "train"], project.root, project.env)
    # DVC removed the old log; the stage rewrites it after each epoch's checkpoint.
    proc.wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, "epoch 1's checkpoint")
    proc.kill()
    assert project.read("models/model.pt") == model  # persist: DVC left it, the stage did not reach it
    ckpt = torch.load(project.root / "models" / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 1
    assert not list((project.root / "models").glob(".checkpoint.pt.*.tmp"))  # the dead writer's is gone
    rwlock = project.root / ".dvc" / "tmp" / "rwlock"
    assert str(proc.proc.pid) in rwlock.read_text()  # DVC's lock names the dead dvc
    again = run([sys.executable, "-m", "neu_model.ops.workspace_lock", "run", "--", DVC, "repro", "--single-item",
                 "train"], project.root, project.env)
    assert again.proc.returncode == 0, again.output
    assert f"removed stale DVC lock of dead process {proc.proc.pid}" in again.output
    assert "resuming from models/checkpoint.pt after epoch 1" in again.output
    _, meta = load_torch_model(project.root / "models" / "model.pt")
    assert meta["summary"]["epochs"] == 2 and project.read("models/model.pt") != model
    OUTCOMES.append(("train (dvc repro)", "mid-epoch 2", "old model intact; DVC's stale lock cleared; "
                                                         "the rerun resumes after epoch 1"))


def test_evaluate_killed_before_metrics_and_register_refuses_the_mix(project):
    before = project.read("reports/metrics.json")
    project.stage("evaluate", "rename:metrics.json")
    assert project.read("reports/metrics.json") == before
    champion = champion_was_evaluated(project.client())
    refused = run([sys.executable, "-m", "neu_model.registry.register"], project.root, project.env)
    assert refused.proc.returncode == 2 and "rerun the evaluate stage" in refused.output
    assert champion_was_evaluated(project.client()) == champion
    killed_at = (project.root / "reports/metrics.json").stat().st_mtime_ns
    project.stage("evaluate")
    # the rerun writes the new model's evaluation, the one logged in its MLflow run (the figures
    # themselves may equal the old ones on these few images)
    assert (project.root / "reports/metrics.json").stat().st_mtime_ns > killed_at
    run_id = json.loads(project.read("reports/run.json"))["run_id"]
    logged = project.client().get_run(run_id).data.metrics["test_accuracy"]
    assert json.loads(project.read("reports/metrics.json"))["accuracy"] == logged
    OUTCOMES.append(("evaluate", "writing reports/metrics.json", "old metrics kept; register refuses them for "
                                                                 "the new model; the rerun writes the new ones"))


def test_export_killed_between_its_files_and_register_refuses_the_mix(project):
    before = {name: project.read(f"models/{name}") for name in ("model.onnx", "model.int8.onnx")}
    report = project.read("reports/export.json")
    project.stage("export", "rename:model.int8.onnx")
    # the new fp32 graph is in place, the int8 twin and the report are still the old model's
    assert project.read("models/model.onnx") != before["model.onnx"]
    assert project.read("models/model.int8.onnx") == before["model.int8.onnx"]
    assert project.read("reports/export.json") == report
    champion = champion_was_evaluated(project.client())
    refused = run([sys.executable, "-m", "neu_model.registry.register"], project.root, project.env)
    assert refused.proc.returncode == 2 and "rerun the export stage" in refused.output
    assert champion_was_evaluated(project.client()) == champion
    project.stage("export")
    assert project.read("reports/export.json") != report
    OUTCOMES.append(("export", "between model.onnx and model.int8.onnx", "register refuses the mix; the rerun "
                                                                         "writes both and the report"))


def test_register_killed_between_version_and_alias(project):
    client = project.client()
    champion = champion_was_evaluated(client)
    project.stage("register", "register:version-created")
    versions = client.search_model_versions(f"name = '{NAME}'")
    new = max(versions, key=lambda v: int(v.version))
    assert len(versions) == int(champion) + 1 and champion_was_evaluated(client) == champion
    OUTCOMES.append(("register", "version created, no alias moved", "champion unchanged"))
    project.stage("register", "register:before-champion")
    assert champion_was_evaluated(client) == champion
    assert client.get_model_version(NAME, new.version).tags["gate.decision"] == "promoted"
    OUTCOMES.append(("register", "gate decided, champion not moved", "champion unchanged"))
    project.stage("register")
    assert champion_was_evaluated(client) == str(new.version)
    assert len(client.search_model_versions(f"name = '{NAME}'")) == len(versions)  # the version was reused
    assert json.loads(project.read("reports/registration.json"))["champion"] == str(new.version)
    OUTCOMES.append(("register", "(rerun)", "the same version is reused and becomes champion"))


# ---------------------------------------------------------------- a stage's whole process group

# A stage that starts a grandchild (as dvc starts the stage's python) and says both pids.
STAGE = ("import subprocess, sys, time\n"
         "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
         "print('pids', grandchild.pid, flush=True)\ntime.sleep(600)\n")
# An orchestrator process as Prefect runs a flow: SIGTERM (a cancelled or timed-out run) becomes
# Prefect's TerminationSignal exception in the flow's thread, which is inside run_logged.
FLOW = ("import os, sys\nfrom pathlib import Path\nfrom prefect.utilities.engine import capture_sigterm\n"
        "from neu_model.ops.orchestrate import run_logged\nwith capture_sigterm():\n"
        "    run_logged([sys.executable, '-c', sys.argv[1]], Path('.'), dict(os.environ), None, print, 'train')\n")


def test_sigterm_to_the_flow_process_ends_the_stage_and_its_grandchild(tmp_path):
    flow = Watched([sys.executable, "-c", FLOW, STAGE], tmp_path, os.environ | {"PYTHONPATH": str(ROOT)})
    pids = [int(p) for p in flow.wait_for("pids").split()[1:]]
    stage = next(p.pid for p in psutil.Process(flow.proc.pid).children())
    os.kill(flow.proc.pid, signal.SIGTERM)
    assert flow.finish() != 0
    assert ends(stage) and all(ends(p) for p in pids)
    OUTCOMES.append(("any (flow)", "SIGTERM to the flow's process", "the stage's whole process group ends"))


def test_stage_timeout_kills_its_grandchild_too(tmp_path):
    lines: list[str] = []
    with pytest.raises(StageFailed, match="timed out"):
        run_logged([sys.executable, "-c", STAGE], tmp_path, dict(os.environ), 15, lines.append, "train")
    assert ends(int(lines[0].split()[1]))
