"""Prefect tasks for sweeps: capture the baseline, the MLflow parent run, one trial, the closing log.

A trial runs in a Dask worker process in a workspace of its own (``neu_model.ops.sweep_workspace``):
a shared clone of the project, its stages up to evaluate run through DVC there, its MLflow
training run nested under the sweep's parent. Caching is off, as for the stage tasks: DVC
decides what changed. Trials are not retried: the same params fail the same way again.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from neu_model.ops import orchestrate, sweep_mlflow, sweep_workspace
from tasks.retry import retry_if_transient
from tasks.stages import TIMEOUTS


@task(name="capture-baseline", cache_policy=NO_CACHE, timeout_seconds=600)
def capture_baseline(project: str, workdir: str) -> dict:
    """Read the project's commit, uncommitted diff, source fingerprint and DVC cache (the project is not changed)."""
    baseline = sweep_workspace.capture_baseline(Path(project), Path(workdir))
    logger = get_run_logger()
    logger.info("trials start from commit %s%s", baseline.commit[:12],
                " with the workspace's uncommitted changes" if baseline.patch else "")
    if baseline.untracked:
        logger.warning("untracked files are not part of the trials (git add them to include them): %s",
                       ", ".join(baseline.untracked[:20]) + (" ..." if len(baseline.untracked) > 20 else ""))
    return baseline.to_dict()


@task(name="start-parent-run", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient, timeout_seconds=300)
def start_parent(store: str, experiment: str, sweep_name: str, params: dict, tags: dict) -> str:
    """Create the sweep's MLflow parent run; returns its id."""
    run_id = sweep_mlflow.start_parent(store, experiment, sweep_name, params, tags)
    get_run_logger().info("MLflow parent run %s in experiment %r (%s)", run_id, experiment, store)
    return run_id


# No task timeout: in a Dask worker it runs in a thread, which Prefect cannot interrupt (it warns
# so); every stage has its own timeout instead (tasks.stages.TIMEOUTS), killing its process group.
@task(name="trial", cache_policy=NO_CACHE)
def run_trial(trial: dict, baseline: dict, workdir: str, store: str, parent_id: str, sweep_name: str,
              data_source: str | None = None, keep_workspace: bool = False) -> dict:
    """Train and evaluate one trial in its own workspace; returns what its reports say.

    Args:
        trial: ``name``, ``overrides`` (key=value) of a ``neu_model.ops.sweep.Trial``.
        baseline: ``sweep_workspace.Baseline`` as a dict.
        workdir: the folder the trial's workspace goes into (``<workdir>/<trial name>``).
        store: the MLflow tracking URI every trial logs to.
        parent_id: the sweep's MLflow parent run.
        sweep_name: for the run's name and tags.
        data_source: NEU_DATA_SOURCE for the stages, as the training flow takes it.
        keep_workspace: keep the workspace after a finished trial (a failed one is always kept).

    Returns:
        ``summary`` (``orchestrate.read_reports`` of the workspace), ``ran`` (stages DVC ran) and
        ``workspace`` (its path, or None when removed).
    """
    logger = get_run_logger()
    base = sweep_workspace.Baseline(**{k: tuple(v) if k == "untracked" else v for k, v in baseline.items()})
    workspace = sweep_workspace.create(base, Path(workdir) / trial["name"], logger.info)
    env = orchestrate.stage_env(workspace, data_source) | {"MLFLOW_TRACKING_URI": store,
                                                          sweep_mlflow.PARENT_ENV: parent_id}

    def adopt_run() -> None:
        run_id = json.loads((workspace / "reports" / "run.json").read_text())["run_id"]
        sweep_mlflow.adopt(store, run_id, parent_id, sweep_name, trial["name"], trial["overrides"])
        logger.info("trial %s: MLflow run %s, nested under %s", trial["name"], run_id, parent_id)

    try:
        ran = sweep_workspace.run_stages(workspace, trial["overrides"], env, TIMEOUTS, logger.info, adopt_run)
        summary = orchestrate.read_reports(workspace)
    except Exception as exc:
        logger.error("trial %s failed; its workspace is kept for a look: %s", trial["name"], workspace)
        raise sweep_workspace.TrialFailed(str(exc)) from exc
    if not keep_workspace:
        sweep_workspace.remove(workspace)
    return {"summary": summary, "ran": ran, "workspace": str(workspace) if keep_workspace else None}


@task(name="finish-parent-run", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient, timeout_seconds=300)
def finish_parent(store: str, parent_id: str, frame, markdown: str, best: dict | None, failed: int) -> None:
    """Log the trials' table and the best trial on the parent run, and end it."""
    sweep_mlflow.finish_parent(store, parent_id, frame, markdown, best, failed)
