"""Labels start retraining, against a real Prefect server (``prefect server start``).

The deployment that ``make serve`` serves (``python -m flows.training serve``) has a trigger on
``neu.labels.committed``. A commit with too few new labelled images starts a run that trains
nothing; a commit with enough starts a run that trains on the new data version, registers a
version whose tags carry that version, and lets the gate decide on the champion.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from neu_model.data.labels import labels_version

from conftest import make_project
from kill_support import project_env
from labels_support import TWELVE, darker, write_labels

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "neu-defect-classifier"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 with its own home and database, telemetry off."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "DO_NOT_TRACK": "1", "PREFECT_API_URL": url}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 240, "the Prefect server")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def emit(env: dict, project: Path, count: int, version: str) -> None:
    """The event ``neu-review commit`` sends (its own function), from a process of its own as the commit is."""
    code = ("import sys, json; from pathlib import Path; from neu_model.review.publish import announce; "
            "print(announce(Path(sys.argv[1]), json.loads(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(project), json.dumps({"count": count,
                                                                                "data_version": version})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "sent", done.stdout + done.stderr


def flow_runs(deployment_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        named = DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name]))
        return client.read_flow_runs(deployment_filter=named)


def finished_runs(count: int, timeout: float) -> list:
    def done():
        runs = flow_runs("retrain")
        final = [r for r in runs if r.state and r.state.is_final()]
        return sorted(final, key=lambda r: r.start_time) if len(final) >= count else None
    return wait_for(done, timeout, f"{count} finished run(s) of the deployment", every=2.0)


def run_logs(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return "\n".join(log.message for log in logs)


def test_a_commit_of_enough_labels_retrains_registers_and_gates(prefect_server, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # a session fixture of other tests (prefect_test_harness) may hold temporary settings that win over
    # the environment: this test talks to its own server whatever ran before it
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        loop(prefect_server, tmp_path)


def loop(prefect_server: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", "register.accuracy_floor=0.0")
    env = project_env(project) | {"PREFECT_API_URL": prefect_server}
    first = subprocess.run([sys.executable, "-m", "flows.training", "run"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    mlflow = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert str(mlflow.get_model_version_by_alias(MODEL, "champion").version) == "1"

    serve = subprocess.Popen([sys.executable, "-m", "flows.training", "serve"], cwd=project, env=env,
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: _deployment_ready(), 600, "the retrain deployment and its trigger")
        # Too few: 3 new labelled images (retrain.min_new_labels is 10): the run trains nothing.
        labels = write_labels(project / "labels", [(c, darker(c, n)) for c, n in TWELVE[:3]])
        emit(env, project, 3, labels_version(labels))
        skipped = finished_runs(1, 300)[0]
        assert skipped.state.is_completed()
        logs = wait_for(lambda: (lambda text: text if "not enough yet" in text else "")(run_logs(skipped.id)), 60,
                        "the skipped run's log (sent to the server in batches)")
        assert "3 labelled images of labels version" in logs and "10 needed" in logs
        assert len(mlflow.search_model_versions(f"name = '{MODEL}'")) == 1

        # Enough: 12 more (15 new), committed as one data version.
        write_labels(project / "labels", [(c, darker(c, n)) for c, n in TWELVE[:3]]
                     + [(c, darker(c, n, 0.7)) for c, n in TWELVE])
        version = labels_version(project / "labels")
        committed = time.monotonic()
        emit(env, project, 12, version)
        trained = finished_runs(2, 1200)[1]
        seconds = time.monotonic() - committed
        assert trained.state.is_completed(), run_logs(trained.id)[-3000:]
        assert trained.parameters["trigger"] == "labels" and trained.parameters["labels_version"] == version
        new = mlflow.get_model_version(MODEL, "2")
        assert new.tags["labels_version"] == version and new.tags["gate.decision"] in ("promoted", "rejected")
        champion = str(mlflow.get_model_version_by_alias(MODEL, "champion").version)
        assert champion == ("2" if new.tags["gate.decision"] == "promoted" else "1")
        figures = json.loads(new.tags["gate.figures"])
        assert figures["challenger"]["plant"]["images"] == int(new.tags["test_images_plant"])
        run = mlflow.get_run(new.run_id)
        data = next(i for i in run.inputs.dataset_inputs if i.dataset.name == "training-data")
        assert data.dataset.digest == version
        assert {t.key: t.value for t in data.tags}["plant_images"] == "15"
        print(f"\ncommit -> gate decision ({new.tags['gate.decision']}): {seconds:.0f} s; "
              f"figures {new.tags['gate.figures']}")
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def _deployment_ready() -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name("neu-training/retrain")
        except Exception:  # noqa: BLE001 - not there yet
            return False
        return deployment is not None and bool(client.read_automations_by_name("labels committed"))
