"""The training deployment in a Prefect process work pool, run by a worker, as a team runs it.

A real ``prefect server start`` (its own PREFECT_HOME), ``python -m flows.training deploy``
into a process pool from a temporary project on the fixture (1 epoch), ``prefect deployment
run``, then ``prefect worker start --run-once``: the worker picks the run up and the whole
chain completes in the project's folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from neu_model.ops.orchestrate import stop_group
from neu_model.ops.pgserver import free_port

from conftest import FIXTURE_IMAGES, make_project, run_in_project
from server_support import running_server

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

POOL = "neu-process"
DEPLOYMENT = f"neu-training/retrain-{POOL}"  # flows.training.deploy's default name
PREFECT = str(Path(sys.executable).parent / "prefect")
STARTUP_SECONDS = 240  # a Prefect server's first start (database migrations) on 2 busy cores


def api_get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}{path}", timeout=30) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    """A running Prefect server; yields the environment that points clients at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1"}
    api = f"http://127.0.0.1:{port}/api"
    # cwd: no prefect.toml there to override PREFECT_HOME's defaults
    with running_server([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], f"{api}/health",
                        home / "server.log", STARTUP_SECONDS, cwd=home, env=env):
        yield env | {"PREFECT_API_URL": api}


def test_a_worker_runs_the_training_deployment_from_the_pool(prefect_env, tmp_path):
    project = make_project(tmp_path / "project")
    # The project's own MLflow store: the registry decision must not depend on other tests' models.
    env = prefect_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    deployed = run_in_project([sys.executable, "-m", "flows.training", "deploy", "--pool", POOL, "--no-schedule",
                               "--data-source", str(FIXTURE_IMAGES)], project, **env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr[-3000:]
    api = env["PREFECT_API_URL"]
    deployment = api_get(api, f"/deployments/{deployed.stdout.split()[-1]}")
    assert deployment["work_pool_name"] == POOL and deployment["entrypoint"] == "flows/training.py:training_flow"
    assert deployment["parameters"] == {"data_source": str(FIXTURE_IMAGES)}
    assert api_get(api, f"/work_pools/{POOL}")["type"] == "process"  # created by deploy, the pool was missing

    started = run_in_project([PREFECT, "deployment", "run", DEPLOYMENT], project, **env)
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    assert api_get(api, f"/flow_runs/{flow_run_id}")["state_type"] == "SCHEDULED"  # nobody has run it yet

    # The worker's folder is not the project's: the deployment says where the flow runs.
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once",
                                   "--limit", "1"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  env=os.environ | env | {"PYTHONPATH": str(project)}, start_new_session=True)
    try:
        worker.wait(timeout=900)  # --run-once --limit 1: it returns once the run it took has finished
    finally:
        stop_group(worker)
    flow_run = api_get(api, f"/flow_runs/{flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state']}\n{log.read_text()[-4000:]}"
    assert flow_run["work_pool_name"] == POOL and flow_run["deployment_id"] == deployment["id"]
    assert f"submitting flow run '{flow_run_id}'" in log.read_text()  # this worker took it
    # It ran the whole chain in the project's folder.
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["run_id"] == json.loads((project / "reports" / "run.json").read_text())["run_id"]
    assert (project / "models" / "model.pt").exists()
