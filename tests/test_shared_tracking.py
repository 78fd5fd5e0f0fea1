"""The pipeline against a shared MLflow server: PostgreSQL backend store, artifacts proxied by the server.

A real PostgreSQL (``neu_model.ops.pgserver``: an unprivileged account, a free loopback port),
the server as ``make mlflow-server`` starts it, and the real ``dvc repro`` chain on the fixture
(1 epoch) with ``MLFLOW_TRACKING_URI`` pointing at the server. Everything is then read back the
way a colleague's machine would: over HTTP, and from the database itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from neu_model.core.config import CLASSES
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.ops import pgserver

from conftest import FIXTURE_IMAGES, make_project, run_in_project
from server_support import running_server

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MODEL_NAME = "neu-defect-classifier"  # register.model_name in params.yaml
STARTUP_SECONDS = 300  # MLflow creates its tables in PostgreSQL on first start; 2 busy cores are slow


@pytest.fixture(scope="module")
def postgres_dir():
    """A folder for a throwaway cluster; the cluster is stopped and removed afterwards."""
    try:
        pgserver.bin_dir()
    except StageError as exc:
        pytest.skip(f"no PostgreSQL server programs: {exc}")
    if os.geteuid() == 0 and not shutil.which("useradd"):
        pytest.skip("running as root without useradd: no unprivileged account can own the cluster")
    # Not pytest's tmp_path: its tree is private (0700), and the cluster's account must enter the folder.
    root = Path(tempfile.mkdtemp(prefix="neu-pg-"))
    root.chmod(0o755)
    try:
        yield root / "pg"
    finally:
        try:
            pgserver.stop(root / "pg")
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres_dir, tmp_path_factory):
    """``make mlflow-server`` on the throwaway cluster; yields (URL, artifact folder)."""
    work = tmp_path_factory.mktemp("mlflow-server")
    artifacts = work / "artifacts"
    port = pgserver.free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_BACKEND_STORE_URI"}  # the local cluster, not a real one
    venv = Path(sys.prefix)
    cmd = ["make", "--no-print-directory", "-o", f"{venv}/.installed", "mlflow-server", f"VENV={venv}",
           f"PG_DIR={postgres_dir}", f"MLFLOW_PORT={port}", f"MLFLOW_ARTIFACTS={artifacts}", "MLFLOW_WORKERS=1"]
    url = f"http://127.0.0.1:{port}"
    with running_server(cmd, f"{url}/health", work / "server.log", STARTUP_SECONDS, cwd=ROOT, env=env):
        yield url, artifacts


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """``dvc repro`` on the fixture, tracked on the server; yields (project, run id)."""
    url, _ = server
    # A 1-epoch model must pass the gate, so that there is a champion to load.
    project = make_project(tmp_path_factory.mktemp("shared-project"), "register.accuracy_floor=0.0")
    done = run_in_project([str(Path(sys.executable).parent / "dvc"), "repro"], project, MLFLOW_TRACKING_URI=url)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return project, json.loads((project / "reports" / "run.json").read_text())["run_id"]


def test_starting_the_running_cluster_again_changes_nothing(server, postgres_dir):
    running = pgserver.status(postgres_dir)
    assert running == f"postgresql://mlflow@127.0.0.1:{int((postgres_dir / 'port').read_text())}/mlflow"
    assert pgserver.start(postgres_dir) == running  # idempotent: the MLflow server keeps its database
    with pytest.raises(StageError, match="already runs on port"):
        pgserver.start(postgres_dir, port=pgserver.free_port())


def test_the_run_is_on_the_server_and_in_postgresql(server, pipeline, postgres_dir):
    import psycopg2

    url, artifacts = server
    project, run_id = pipeline
    run = MlflowClient(tracking_uri=url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == json.loads((project / "reports" / "metrics.json").read_text())[
        "accuracy"]
    # Proxied artifacts: the client wrote through the server into the server's folder.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {"figures", "evaluation"} <= {a.path for a in MlflowClient(tracking_uri=url).list_artifacts(run_id)}
    assert list(artifacts.rglob("confusion.png"))

    port = int((postgres_dir / "port").read_text())
    with psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="mlflow", connect_timeout=10,
                          passfile=str(postgres_dir / "pgpass")) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchall() == [("FINISHED",)]
    conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password"):  # no password, no entry
        psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="mlflow", connect_timeout=10,
                         passfile=os.devnull)


def test_the_registry_gate_ran_on_the_server(server, pipeline):
    url, _ = server
    project, run_id = pipeline
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["decision"] == "promoted" and registration["run_id"] == run_id
    client = MlflowClient(tracking_uri=url)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    challenger = client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert champion.version == challenger.version == registration["version"]
    assert champion.run_id == run_id
    assert champion.tags["gate.decision"] == "promoted"
    assert {"promotion.at", "promotion.replaced"} <= set(champion.tags)


def test_the_champion_predicts_through_the_server(server, pipeline):
    import mlflow

    url, _ = server
    project, _ = pipeline
    files = sorted(FIXTURE_IMAGES.glob("*.bmp"))
    x = np.stack([np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255 for f in files])[:, None]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(url)  # models:/ resolves through the global URI; the process keeps its own after
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    probs = np.asarray(model.predict(x))[:, :len(CLASSES)]  # then the unknown score and flag
    assert probs.shape == (len(files), len(CLASSES))
    assert (probs >= 0).all() and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    # The same model as the evaluate stage's: its test-part predictions, file by file.
    expected = pd.read_csv(project / "reports" / "predictions.csv").set_index("file")
    rows = [i for i, f in enumerate(files) if f.name in expected.index]
    assert rows
    columns = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(probs[rows], expected.loc[[files[i].name for i in rows], columns].to_numpy(), atol=1e-3)
