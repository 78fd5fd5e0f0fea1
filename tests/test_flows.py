"""The Prefect flows on the tiny fixture, in a tmp copy of the project, against a test Prefect API.

One flow run (module fixture ``first_run``) serves several tests: it downloads the fixture
from a 127.0.0.1 server that fails until the download stage's own retries are spent, so
Prefect's retry of the download task is what lets the flow complete. The later runs find that
server gone: the source stage keeps the last fingerprint, so nothing is downloaded again.
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

from neu_model import orchestrate
from neu_model.config import CLASSES, load_config
from neu_model.download import RETRY_DELAYS
from neu_model.reader import CSV_COLUMNS

from conftest import FIXTURE_IMAGES, make_project

# A 1-epoch model must pass the gate so that there is a champion to score with.
# (evaluate.robustness=false would be quicker, but dvc.yaml declares robustness.csv an output.)
PROJECT_OVERRIDES = ("register.accuracy_floor=0.0",)
STAGE_ATTEMPTS = len(RETRY_DELAYS) + 1  # what one run of the download stage tries before failing


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
    """The training flow on a fresh project, its data behind a server that fails at first."""
    from flows.training import training_flow

    project = make_project(tmp_path_factory.mktemp("flow-project"), *PROJECT_OVERRIDES)
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    with flaky_server(fixture_zip(), failures=STAGE_ATTEMPTS) as (url, hits):
        state = training_flow(data_source=url, project=str(project), retry_backoff_seconds=0.1, return_state=True)
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
    assert dvc_status(project) == {"source": ["always changed"]}  # runs every time, by design


@pytest.mark.slow
def test_download_failing_at_first_is_retried_by_prefect(first_run):
    _, state, hits, _ = first_run
    assert state.is_completed()
    # The first task attempt spent all the stage's own attempts; the second one got the file.
    assert hits["/neu.zip"] == STAGE_ATTEMPTS + 1
    runs = task_runs(state)
    assert runs["download"].run_count == 2 and runs["train"].run_count == 1


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
def test_failing_stage_fails_the_flow_and_names_it(first_run, tmp_path):
    from flows.training import training_flow

    project = Path(shutil.copytree(first_run[0], tmp_path / "copy", symlinks=True))
    # torch rejects the device name: the train stage exits non-zero, on any machine.
    state = training_flow(data_source=first_run[3], project=str(project), device="no-such-device", return_state=True)
    assert state.is_failed()
    assert "stage 'train' failed" in state.message
    assert task_runs(state)["train"].run_count == 1  # training is not retried
    assert "Failed:** stage 'train'" in flow_artifacts(state)["neu-training-summary"].data


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
    flagged = int((frame["confidence"] < load_config(project / "params.yaml").review.below_confidence).sum())
    assert frame["needs_review"].sum() == flagged
    assert f"Need review (confidence below the threshold): **{flagged}**" in summary


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
    from neu_model.predict import score_inputs, summarize

    archive = tmp_path / "b.zip"
    archive.write_bytes(fixture_zip())
    frame = score_inputs([FIXTURE_IMAGES, archive], Uniform(), review_below=0.45, batch_size=16)
    assert len(frame) == 60 and frame["file"].iloc[-1].startswith(f"{archive}:NEU-CLS/")
    summary = summarize(frame, n_least=2)
    assert summary["counts"] == {"Cr": 4, "In": 0, "Pa": 0, "PS": 0, "RS": 0, "Sc": 56}  # batches of 16
    assert summary["least_confident"][0]["confidence"] == pytest.approx(0.4)
    assert summary["needs_review"] == 4 and list(frame["needs_review"]) == list(frame["predicted"] == "Cr")


def test_params_override_lasts_one_run(tmp_path):
    params = tmp_path / "params.yaml"
    original = (FIXTURE_IMAGES.parents[2] / "params.yaml").read_text()
    params.write_text(original)
    assert orchestrate.apply_params(tmp_path, ["train.recipes.defectnet.epochs=3", "seed=0"]) == \
        ["train.recipes.defectnet.epochs=3"]  # seed was 0 already
    text = params.read_text()
    assert "epochs: 3" in text and "# The one source of configuration" in text  # comments kept
    assert orchestrate.apply_params(tmp_path, []) == []
    assert params.read_text() == original  # the next run starts from the file as it was
    orchestrate.apply_params(tmp_path, ["seed=5"])
    params.write_text(params.read_text().replace("batch_size: 64", "batch_size: 32"))  # a person edits it
    orchestrate.apply_params(tmp_path, [])
    assert "seed: 5" in params.read_text() and "batch_size: 32" in params.read_text()  # their edit wins
    with pytest.raises(orchestrate.ConfigError, match="no key 'train.nope'"):
        orchestrate.apply_params(tmp_path, ["train.nope=1"])
    assert "seed: 5" in params.read_text()  # a bad override writes nothing
