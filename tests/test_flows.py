"""The Prefect flows on the tiny fixture, in a tmp copy of the project, against a test Prefect API.

One flow run (module fixture ``first_run``) serves several tests: it downloads the fixture
from a 127.0.0.1 server that fails at first, fewer times than the download stage tries, so the
stage's own retries recover (Prefect does not retry that task on top). Its URL carries
credentials, given as NEU_DATA_SOURCE, which must never show. The later runs find that server
gone: the source stage keeps the last fingerprint, so nothing is downloaded again.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from neu_model.core.config import CLASSES, DATA_SOURCE_ENV, load_config
from neu_model.data.download import RETRY_DELAYS
from neu_model.inference.tiles import CSV_COLUMNS
from neu_model.ops import orchestrate

from conftest import FIXTURE_IMAGES, make_project

# A 1-epoch model must pass the gate so that there is a champion to score with.
# (evaluate.robustness=false would be quicker, but dvc.yaml declares robustness.csv an output.)
PROJECT_OVERRIDES = ("register.accuracy_floor=0.0",)
STAGE_ATTEMPTS = len(RETRY_DELAYS) + 1  # what one run of the download stage tries before failing
SECRET = "s3cret-t0ken"


@pytest.fixture(scope="session")
def prefect_api():
    """A throwaway Prefect API (SQLite) for the whole session; a loaded machine needs time to start it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def fixture_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(FIXTURE_IMAGES.iterdir()):
            zf.write(f, f"NEU-CLS/{f.name}")
    return buf.getvalue()


@contextlib.contextmanager
def flaky_server(body: bytes, failures: int):
    """Serve ``body`` at /neu.zip on 127.0.0.1, answering 500 to the first ``failures`` GETs.

    HEAD (the source stage's question about the content) always answers and is not counted.
    """
    hits = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{len(body)}"')
            self.end_headers()

        def do_GET(self):  # noqa: N802 (http.server's naming)
            hits[self.path] += 1
            if hits[self.path] <= failures:
                self.send_error(500)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/neu.zip", hits
    finally:
        server.shutdown()


def flow_artifacts(state) -> dict:
    """{key: artifact} of the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {a.key: a for a in found}


def task_runs(state) -> dict:
    """{task name: task run} of the flow run behind ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def dvc_status(project: Path) -> dict:
    """``dvc status`` as JSON; ``{"source": ["always changed"]}`` when there is nothing to do."""
    env = orchestrate.stage_env(project)
    out = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory, monkeypatch_module):
    """The training flow on a fresh project, its data behind a server that fails at first.

    The URL carries credentials and reaches the flow as NEU_DATA_SOURCE, as ``python -m
    flows.training --data-source URL`` passes a URL with credentials (Prefect stores parameters).
    """
    from flows.training import training_flow

    project = make_project(tmp_path_factory.mktemp("flow-project"), *PROJECT_OVERRIDES)
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    with flaky_server(fixture_zip(), failures=STAGE_ATTEMPTS - 1) as (url, hits):
        url = url.replace("http://", f"http://ci:{SECRET}@")
        monkeypatch_module.setenv(DATA_SOURCE_ENV, url)
        state = training_flow(project=str(project), retry_backoff_seconds=0.1, return_state=True)
        monkeypatch_module.delenv(DATA_SOURCE_ENV)
    return project, state, hits, url


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.slow
def test_flow_runs_every_stage_and_leaves_artifacts(first_run):
    project, state, _, _ = first_run
    assert state.is_completed(), state.message
    result = state.result()
    assert all(result["ran"].values())  # every stage, register included; source: new data
    artifacts = flow_artifacts(state)
    summary = artifacts["neu-training-summary"].data
    for text in ("dataset version", "test accuracy", "promotion", "MLflow run", "| Sc (scratches) |"):
        assert text in summary
    table = artifacts["neu-per-class-metrics"].data
    assert [row["class"] for row in (table if isinstance(table, list) else json.loads(table))] == list(CLASSES)
    assert result["mlflow_run_id"] and result["mlflow_run_id"] in summary
    assert result["registration"]["decision"] == "promoted"  # the tiny project's floor is 0
    assert "promoted (neu-defect-classifier v1)" in summary
    assert dvc_status(project) == {"source": ["always changed"]}  # the fingerprint stage runs every time, by design


@pytest.mark.slow
def test_download_failing_at_first_is_retried_by_the_stage_alone(first_run):
    _, state, hits, _ = first_run
    assert state.is_completed()
    # The stage's last attempt got the file; the task ran once (Prefect does not retry it on top).
    assert hits["/neu.zip"] == STAGE_ATTEMPTS
    runs = task_runs(state)
    assert runs["download"].run_count == 1 and runs["train"].run_count == 1


@pytest.mark.slow
def test_credentials_in_the_source_never_show(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    project, state, _, _ = first_run
    run_id = state.result()["mlflow_run_id"]
    logged = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id).data
    assert logged.params["data.source"].startswith("http://***@127.0.0.1:")
    logs, page = [], LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(log_filter=page, limit=200, offset=len(logs)):
            logs += batch
    texts = {"MLflow params": json.dumps(logged.params), "MLflow tags": json.dumps(logged.tags),
             "summary": flow_artifacts(state)["neu-training-summary"].data,
             "flow run logs": "\n".join(log.message for log in logs),
             "source.json": (project / "data" / "source.json").read_text(),
             "dvc.lock": (project / "dvc.lock").read_text(), "params.yaml": (project / "params.yaml").read_text()}
    assert "Running stage 'download'" in texts["flow run logs"]  # the stages' output lines are there
    assert "***@127.0.0.1" in texts["summary"] and "***@127.0.0.1" in texts["source.json"]
    assert [where for where, text in texts.items() if SECRET in text] == []


@pytest.mark.slow
def test_no_change_run_trains_and_registers_nothing(first_run):
    from flows.training import training_flow

    project, _, _, url = first_run
    lock = (project / "dvc.lock").read_text()
    start = time.monotonic()
    # The server is gone: the source stage keeps the last fingerprint, so nothing is downloaded.
    state = training_flow(data_source=url, project=str(project), return_state=True)
    assert state.is_completed(), state.message
    assert not any(state.result()["ran"].values())
    assert task_runs(state)["source"].state.is_completed()
    assert (project / "dvc.lock").read_text() == lock
    assert "No change" in flow_artifacts(state)["neu-training-summary"].data
    print(f"no-change run: {time.monotonic() - start:.1f}s")


@pytest.mark.slow
def test_failing_stage_fails_the_flow_names_it_and_puts_params_back(first_run, tmp_path):
    from flows.training import training_flow

    project = Path(shutil.copytree(first_run[0], tmp_path / "copy", symlinks=True))
    params = (project / "params.yaml").read_text()
    # The train stage refuses the optimizer (params are checked for keys and types, not every value).
    state = training_flow(overrides=["train.recipes.defectnet.optimizer=sgd"], data_source=first_run[3],
                          project=str(project), return_state=True)
    assert state.is_failed()
    assert "stage 'train' failed (exited with 2)" in state.message and "optimizer 'sgd' unknown" in state.message
    assert task_runs(state)["train"].run_count == 1  # training is not retried
    assert "Failed:** stage 'train'" in flow_artifacts(state)["neu-training-summary"].data
    assert (project / "params.yaml").read_text() == params  # the run's override undone


@pytest.mark.slow
@pytest.mark.parametrize("override,named", [
    ("train.recipes.defectnet.epochz=1", "no key 'train.recipes.defectnet.epochz' in params.yaml; check the "
                                         "spelling; keys there: epochs, batch_size"),
    ("train.recipes.defectnet.epochs=abc", "train.recipes.defectnet.epochs='abc' must be an integer")])
def test_a_bad_override_is_refused_before_any_stage(first_run, override, named):
    from flows.training import training_flow

    project = first_run[0]
    params, lock = (project / "params.yaml").read_text(), (project / "dvc.lock").read_text()
    state = training_flow(overrides=[override], data_source=first_run[3], project=str(project), return_state=True)
    assert state.is_failed() and named in state.message
    assert set(task_runs(state)) <= {"read_reports"}  # no stage ran
    assert (project / "params.yaml").read_text() == params and (project / "dvc.lock").read_text() == lock


@pytest.mark.slow
def test_scoring_flow_scores_an_archive_with_the_champion(first_run, tmp_path):
    from flows.scoring import scoring_flow

    project = first_run[0]
    assert json.loads((project / "reports" / "registration.json").read_text())["champion"]
    archive = tmp_path / "batch.zip"
    archive.write_bytes(fixture_zip())
    state = scoring_flow([str(archive)], out=str(tmp_path / "scores.csv"), project=str(project), return_state=True)
    assert state.is_completed(), state.message
    frame = pd.read_csv(tmp_path / "scores.csv")
    assert list(frame.columns) == list(CSV_COLUMNS)
    assert len(frame) == 30 and frame["file"].iloc[0].startswith(f"{archive}:NEU-CLS/")
    summary = flow_artifacts(state)["neu-scoring-summary"].data
    assert "Least confident" in summary and "images scored: 30" in summary
    unknown = frame["unknown"].astype(str) == "True"  # the champion's pyfunc carries the unknown flag
    assert frame["unknown_score"].notna().all()
    flagged = int(((frame["confidence"] < load_config(project / "params.yaml").review.below_confidence)
                   | unknown).sum())
    assert frame["needs_review"].sum() == flagged
    assert f"Need review (confidence below the threshold, or unknown input): **{flagged}**, " in summary
    assert f"of them unknown input (not NEU steel): **{int(unknown.sum())}**" in summary


# ---------------------------------------------------------------- fast: no flow run

class Uniform:
    """A stand-in pyfunc: probability 0.5 for Sc, the rest spread over the other classes."""

    def predict(self, data: np.ndarray) -> np.ndarray:
        assert data.dtype == np.float32 and data.shape[1:] == (1, 200, 200) and data.max() <= 1
        probs = np.full((len(data), len(CLASSES)), 0.1, dtype=np.float32)
        probs[:, -1] = 0.5
        probs[0, -1], probs[0, 0] = 0.2, 0.4  # one less sure image, predicted Cr
        return probs


def test_score_reads_folders_and_archives(tmp_path):
    from neu_model.inference.predict import score_inputs, tile_counts

    archive = tmp_path / "b.zip"
    archive.write_bytes(fixture_zip())
    frame = score_inputs([FIXTURE_IMAGES, archive], Uniform(), review_below=0.45, batch_size=16)
    assert len(frame) == 60 and frame["file"].iloc[-1].startswith(f"{archive}:NEU-CLS/")
    summary = tile_counts(frame, n_least=2)
    assert summary["counts"] == {"Cr": 4, "In": 0, "Pa": 0, "PS": 0, "RS": 0, "Sc": 56}  # batches of 16
    assert summary["least_confident"][0]["confidence"] == pytest.approx(0.4)
    assert summary["needs_review"] == 4 and list(frame["needs_review"]) == list(frame["predicted"] == "Cr")
