"""Sweeps and sharded batch scoring.

Fast: the sweep file, its grid, the trials' table and the best trial, the shards and their merge
(``neu_model.ops.sweep``), without Prefect. Slow and distributed: the sweep flow and the scoring
flow on a local Dask cluster of 2 worker processes, in a committed tmp copy of the project that
has run the whole pipeline once on the fixture (1 epoch), against a test Prefect API.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.ops.sweep import (
    choose_best,
    expand_grid,
    expand_inputs,
    load_sweep,
    merge_shards,
    override,
    shard,
    table,
    trial_row,
    with_seed_means,
)

from conftest import FIXTURE_IMAGES, make_project, run_in_project

PARAMS = ROOT / "params.yaml"


def write_sweep(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- fast: the plan

def test_grid_expands_every_combination_last_key_fastest():
    assert expand_grid({"seed": [0, 1], "train.model": ["defectnet", "seed_cnn"]}) == [
        {"seed": 0, "train.model": "defectnet"}, {"seed": 0, "train.model": "seed_cnn"},
        {"seed": 1, "train.model": "defectnet"}, {"seed": 1, "train.model": "seed_cnn"}]


def test_override_values_read_back_as_the_same_yaml():
    assert override("seed", 3) == "seed=3"
    assert override("train.device", "cpu") == "train.device=cpu"
    assert override("mlflow.experiment", "0.3") == 'mlflow.experiment="0.3"'  # stays a string
    assert override("x.widths", [16, 32]) == "x.widths=[16, 32]"


def test_the_seeds_sweep_plans_six_trials_checked_against_params():
    sweep = load_sweep(ROOT / "sweeps" / "seeds.yaml", PARAMS)
    assert sweep.name == "seeds" and (sweep.metric, sweep.goal) == ("val_acc_%", "max")
    assert [t.name for t in sweep.trials] == ["t01", "t02", "t03", "t04", "t05", "t06"]
    assert sweep.trials[1].values == {"seed": 0, "train.recipes.defectnet.roll_mark_share": 0.3}
    assert sweep.trials[1].overrides == ["train.model=defectnet", "seed=0",
                                         "train.recipes.defectnet.roll_mark_share=0.3"]
    assert load_sweep(ROOT / "sweeps" / "seeds.yaml", PARAMS, metric="train_s").goal == "min"


@pytest.mark.parametrize(("text", "message"), [
    ("grid: {train.nope: [1, 2]}", "no key 'train.nope'"),
    ("grid: {seed: 3}", "non-empty list"),
    ("grid: {seed: [1, 1]}", "lists a value twice"),
    ("grid: {seed: [0, 1]}\nset: {seed: 2}", "seed is both varied"),
    ("grid: {seed: [0, 1]}\nselect: test_acc_%", "never chosen by"),
    ("grid: {train.recipes.defectnet.roll_mark_share: [0.3, 2]}", "must be a share"),
    ("grid: {seed: [0]}\nsweep: 1", "expected a mapping with keys"),
])
def test_a_bad_sweep_file_is_refused_naming_the_file(tmp_path, text, message):
    path = write_sweep(tmp_path, text)
    with pytest.raises(StageError, match=message) as error:
        load_sweep(path, PARAMS)
    assert str(error.value).startswith(f"{path}: ")


def test_the_command_refuses_a_bad_sweep_file_in_one_line_before_any_flow(tmp_path, capsys):
    from flows.sweep import main

    path = write_sweep(tmp_path, "grid: {train.nope: [1, 2]}")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: trial ") and "no key 'train.nope'" in err[0]


# ---------------------------------------------------------------- fast: the table and the best trial

def summary(val: float | None, test: float, seconds: float = 10.0) -> dict:
    """What a trial's workspace reports hold (orchestrate.read_reports), reduced to what the table reads."""
    return {"train": {"model": "defectnet", "epochs": 3, "best_epoch": 2, "val_accuracy": val,
                      "train_seconds": seconds, "train_images_per_second": 100.0, "params": 395454, "macs": 14444160},
            "metrics": {"accuracy": test, "macro_f1": test, "errors": round((1 - test) * 540), "in_ps_errors": 0,
                        "inference_images_per_second": 1000.0, "robustness": {"mean_accuracy": 0.98},
                        "review": {"flagged_share": 0.0074, "accepted_errors": 0}},
            "run": {"run_id": f"run-{val}-{test}"}}


def sweep_rows(tmp_path, outcomes):
    sweep = load_sweep(write_sweep(tmp_path, "grid: {seed: [0, 1], train.recipes.defectnet.roll_mark_share: [0, 0.3]}"),
                       PARAMS)
    rows = [trial_row(sweep, t, o, seed=0, error=None if o else "stage 'train' failed (exited with 1):\nboom")
            for t, o in zip(sweep.trials, outcomes, strict=True)]
    return sweep, table(rows)


def test_the_table_has_the_benchmark_columns_and_the_varied_values(tmp_path):
    _, frame = sweep_rows(tmp_path, [summary(1.0, 0.9981), summary(0.99, 1.0), summary(1.0, 0.9926), None])
    assert list(frame.columns[:3]) == ["trial", "roll_mark_share", "model"]
    first = frame.iloc[0]
    assert (first["seed"], first["test_acc_%"], first["val_acc_%"], first["errors"]) == (0, 99.81, 100.0, 1)
    assert (first["MMACs"], first["params_k"], first["robust_%"], first["review_%"]) == (14.4, 395, 98.0, 0.74)
    assert list(frame["roll_mark_share"]) == [0, 0.3, 0, 0.3] and list(frame["seed"]) == [0, 0, 1, 1]
    assert frame.iloc[3]["status"] == "failed: stage 'train' failed (exited with 1): boom"
    assert pd.isna(frame.iloc[3]["test_acc_%"])


def test_best_is_chosen_on_validation_never_on_test(tmp_path):
    sweep, frame = sweep_rows(tmp_path, [summary(0.99, 1.0), summary(1.0, 0.99), summary(1.0, 0.995), None])
    best, note = choose_best(frame, sweep.metric, sweep.goal)
    assert best["trial"] == "t02"  # t01 has the best test accuracy, but a lower validation accuracy
    assert "tied with t03" in note
    fastest, _ = choose_best(frame, "train_s", "min")
    assert fastest["trial"] == "t01"


def test_no_best_without_a_validation_part(tmp_path):
    sweep, frame = sweep_rows(tmp_path, [summary(None, 1.0), summary(None, 0.99), None, None])
    best, note = choose_best(frame, sweep.metric, sweep.goal)
    assert best is None and "no validation part" in note


def test_seed_means_per_combination_of_the_other_values(tmp_path):
    sweep, frame = sweep_rows(tmp_path, [summary(1.0, 0.99), summary(1.0, 0.96), summary(1.0, 0.97), None])
    means = with_seed_means(frame, sweep)
    mean_rows = means[means["trial"] == "mean"].set_index("roll_mark_share")
    assert len(means) == 6
    assert mean_rows.loc[0, "test_acc_%"] == pytest.approx(98.0)  # seeds 0 and 1 without roll marks
    assert mean_rows.loc[0.3, "test_acc_%"] == pytest.approx(96.0)  # seed 1's trial failed: seed 0's alone
    assert choose_best(means, "val_acc_%", "max")[0]["trial"] == "t01"  # a mean row is never the best


# ---------------------------------------------------------------- fast: shards

@pytest.mark.parametrize(("n_items", "n_shards"), [(1, 4), (5, 2), (10, 3), (7, 7), (30, 4)])
def test_shards_are_contiguous_non_empty_and_keep_the_order(n_items, n_shards):
    items = list(range(n_items))
    shards = shard(items, n_shards, weights=[1 + (i * 7) % 5 for i in items])
    assert [x for s in shards for x in s] == items
    assert len(shards) == min(n_items, n_shards) and all(shards)


def test_shards_balance_their_weight():
    assert [len(s) for s in shard(list(range(10)), 3)] == [4, 3, 3]
    assert shard(["archive", "a", "b", "c", "d"], 2, weights=[10, 1, 1, 1, 1]) == [["archive"], ["a", "b", "c", "d"]]


def test_merge_puts_shards_in_input_order_whatever_finished_first():
    first, second = pd.DataFrame({"file": ["a", "b"]}), pd.DataFrame({"file": ["c"]})
    assert list(merge_shards({1: second, 0: first})["file"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="missing"):
        merge_shards({0: first, 2: second})


def test_folders_are_expanded_as_score_reads_them_and_archives_stay_whole(tmp_path):
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURE_IMAGES / "Cr_1.bmp", "Cr_1.bmp")
    expanded = expand_inputs([FIXTURE_IMAGES, archive])
    assert expanded == [*sorted(FIXTURE_IMAGES.glob("*.bmp")), archive]


# ---------------------------------------------------------------- slow: the flows on a Dask cluster

@pytest.fixture(scope="module")
def prefect_api():
    """A throwaway Prefect API for this module (the Dask workers report to it too)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory) -> Path:
    """A committed project that has run the whole pipeline once (1 epoch; a champion in the registry)."""
    project = make_project(tmp_path_factory.mktemp("shared"), "register.accuracy_floor=0.0")
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")
    (project / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")  # as dvc init writes it
    done = run_in_project([str(Path(sys.executable).parent / "dvc"), "repro"], project)
    assert done.returncode == 0, done.stdout + done.stderr
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)
    return project


def fingerprint(project: Path) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every file under models/ and reports/, plus git's view."""
    files = [project / "params.yaml", project / "dvc.lock", *sorted((project / "models").rglob("*")),
             *sorted((project / "reports").rglob("*"))]
    digest = {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}
    git = {cmd: subprocess.run(["git", *cmd.split()], cwd=project, capture_output=True, text=True).stdout
           for cmd in ("rev-parse HEAD", "status --porcelain", "stash list")}
    return digest | git


def flow_artifacts(state) -> dict:
    """{key: artifact} of the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key: a for a in found}


def champion(store: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(store).get_model_version_by_alias("neu-defect-classifier", "champion").version


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_trials_run_apart_and_nest_under_one_parent(prefect_api, shared_project, tmp_path):
    from mlflow import MlflowClient

    from flows import sweep as sweep_flow

    store = os.environ["MLFLOW_TRACKING_URI"]  # conftest's session store, which the project used too
    sweep_file = write_sweep(tmp_path, "grid: {seed: [0, 1]}\nset: {split.val_fraction: 0.3}\n")
    before, champion_before = fingerprint(shared_project), champion(store)
    state = sweep_flow.run(str(sweep_file), workers=2, project=str(shared_project), data_source=str(FIXTURE_IMAGES))
    assert state.is_completed(), state.message
    result = state.result()
    trials = result["trials"]
    assert [(t["trial"], t["seed"], t["status"]) for t in trials] == [("t01", 0, "ok"), ("t02", 1, "ok")]

    client = MlflowClient(store)
    runs = {t["trial"]: client.get_run(t["mlflow_run"]) for t in trials}
    shared_run = json.loads((shared_project / "reports" / "run.json").read_text())["run_id"]
    assert len({r.info.run_id for r in runs.values()} | {shared_run}) == 3  # each trial trained a run of its own
    for name, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
        assert run.data.tags["neu.sweep.trial"] == name and run.info.status == "FINISHED"
        assert "test_accuracy" in run.data.metrics  # evaluate logged into the trial's run
    assert runs["t01"].data.params["seed"] == "0" and runs["t02"].data.params["seed"] == "1"
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == result["best"]["trial"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {"sweep/trials.csv"}

    artifacts = flow_artifacts(state)
    table_data = artifacts["neu-sweep-trials"].data
    listed = table_data if isinstance(table_data, list) else json.loads(table_data)
    assert [row["trial"] for row in listed] == ["t01", "t02"]
    assert "best by val_acc_% (max)" in artifacts["neu-sweep-summary"].data

    assert fingerprint(shared_project) == before  # the shared workspace is untouched
    assert champion(store) == champion_before  # no trial ran the register stage
    assert not (shared_project / ".dvc" / "tmp" / "sweeps" / result["sweep_id"]).exists()  # cleaned up


@pytest.mark.slow
@pytest.mark.distributed
def test_scoring_in_two_shards_writes_the_same_csv_as_one_worker(prefect_api, shared_project, tmp_path):
    from flows import scoring

    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(FIXTURE_IMAGES.iterdir()):
            zf.write(f, f"NEU-CLS/{f.name}")
    inputs = [str(FIXTURE_IMAGES), str(archive)]
    one = scoring.run(inputs, 1, out=str(tmp_path / "one.csv"), project=str(shared_project))
    two = scoring.run(inputs, 2, out=str(tmp_path / "two.csv"), project=str(shared_project))
    assert one.is_completed(), one.message
    assert two.is_completed(), two.message
    assert two.result()["shards"] == 2
    # the champion's version, pinned for every shard (the number depends on earlier registrations)
    assert re.fullmatch(r"models:/neu-defect-classifier/\d+", two.result()["model_version_uri"])
    rows = (tmp_path / "two.csv").read_text().splitlines()
    assert len(rows) == 61 and rows[-1].startswith(f"{archive}:NEU-CLS/")
    # row for row, in input order; scores equal up to float32 rounding (a batch of one and a batch
    # of many take different kernels, and the unknown score's squared distances amplify the last bit)
    one_frame, two_frame = (pd.read_csv(tmp_path / f"{n}.csv", keep_default_na=False) for n in ("one", "two"))
    numeric = [c for c in one_frame.columns if c.startswith("p_") or c in ("confidence", "unknown_score")]
    pd.testing.assert_frame_equal(one_frame.drop(columns=numeric), two_frame.drop(columns=numeric))
    np.testing.assert_allclose(one_frame[numeric].to_numpy(float), two_frame[numeric].to_numpy(float),
                               rtol=1e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_trial_is_a_row_of_the_table_and_fails_the_flow(prefect_api, shared_project, tmp_path):
    from mlflow import MlflowClient

    from flows import sweep as sweep_flow

    # The config accepts cuda:99, no machine here has it: t02's train stage exits non-zero.
    sweep_file = write_sweep(tmp_path, "grid: {train.device: [cpu, 'cuda:99']}\n")
    state = sweep_flow.run(str(sweep_file), workers=2, project=str(shared_project), data_source=str(FIXTURE_IMAGES),
                           workdir=str(tmp_path / "trials"))
    assert state.is_failed()
    assert "1 of 2 trials failed: t02 failed: stage 'train' failed" in state.message
    artifacts = flow_artifacts(state)
    table_data = artifacts["neu-sweep-trials"].data
    rows = {r["trial"]: r for r in (table_data if isinstance(table_data, list) else json.loads(table_data))}
    assert rows["t01"]["status"] == "ok" and rows["t02"]["status"].startswith("failed: stage 'train' failed")
    assert rows["t02"]["test_acc_%"] is None
    # the failed trial is no candidate: the finished one is the best by the validation part (Sc_3)
    assert "best by val_acc_% (max): t01 with" in artifacts["neu-sweep-summary"].data
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_run(rows["t01"]["mlflow_run"]).info.experiment_id
    parent = client.search_runs([experiment], "tags.`neu.sweep.trials` = '2' and tags.failed_trials = '1'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    kept = list((tmp_path / "trials").glob("*/t02"))
    assert len(kept) == 1 and (kept[0] / "dvc.yaml").exists()  # the failed trial's workspace, for a look
    assert not list((tmp_path / "trials").glob("*/t01"))  # the finished one is removed
