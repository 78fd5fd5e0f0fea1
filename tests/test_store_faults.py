"""An MLflow tracking server that stops answering in the middle of a training run: a real
``mlflow server`` on 127.0.0.1, frozen with SIGSTOP while the train stage runs."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from neu_model.core.paths import ROOT
from neu_model.ops.pgserver import free_port

from conftest import TINY
from kill_support import Watched
from server_support import running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow server on 127.0.0.1 (SQLite store); yields its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    with running_server(cmd, f"{url}/health", tmp_path / "server.log", 600) as proc:  # 2 busy cores: slow
        yield url, proc


def test_mlflow_server_gone_mid_training_is_one_line_and_the_rerun_resumes(tiny_data, tmp_path, mlflow_server):
    url, server = mlflow_server
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(tiny_data.root / "data")
    sets = [a for o in [*TINY, "train.recipes.defectnet.epochs=2"] for a in ("--set", o)]
    # No retries and a short timeout: MLflow's client would otherwise retry for minutes.
    env = os.environ | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "PYTHONUNBUFFERED": "1"}
    train = Watched([sys.executable, "-m", "neu_model.training.train", *sets], work, env)
    train.wait_for("epoch 1/2")  # its checkpoint is written before the epoch is logged to MLflow
    os.killpg(server.pid, signal.SIGSTOP)  # the server stops answering (connections hang)
    assert train.finish() == 2
    errors = [ln for ln in train.lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow store {url} does not answer (")
    assert "start the store" in errors[0] and "Traceback" not in train.output
    assert (work / "models" / "checkpoint.pt").exists() and not (work / "models" / "model.pt").exists()
    assert not list((work / "models").glob(".*.tmp"))
    os.killpg(server.pid, signal.SIGCONT)
    again = Watched([sys.executable, "-m", "neu_model.training.train", *sets], work, env)
    assert again.finish() == 0, again.output
    assert "resuming from models/checkpoint.pt after epoch" in again.output
    assert "continuing MLflow run" in again.output and (work / "models" / "model.pt").exists()
