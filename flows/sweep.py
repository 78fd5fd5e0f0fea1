"""Sweeps: train the combinations of a sweep file's params in parallel, each in a workspace of its own.

    python -m flows.sweep sweeps/seeds.yaml --workers 2            # a local Dask cluster of 2 processes
    python -m flows.sweep sweeps/seeds.yaml --address tcp://10.0.0.5:8786   # a running Dask scheduler
    python -m flows.sweep sweeps/seeds.yaml --select train_s --data-source ../shared/data/NEU-CLS

Every trial is a shared git clone of this checkout (its commit plus its uncommitted changes),
runs the stages up to evaluate there through DVC and logs one MLflow run, nested under the
sweep's parent run. The shared workspace (params.yaml, dvc.lock, models/, reports/) is not
touched and the register stage never runs, so ``champion`` stays where it is. The flow leaves
the table of trials and the best trial (chosen by validation accuracy unless ``select`` says
otherwise; never by a test figure) as Prefect artifacts and on the parent run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait

from flows.runners import dask_runner, threads_per_trial, workers_report_here
from flows.sweep_report import sweep_markdown, table_rows
from neu_model.core.config import ConfigError, load_config
from neu_model.core.stage import StageError, disable_telemetry
from neu_model.core.store import tracking_uri
from neu_model.ops import orchestrate, sweep_mlflow, sweep_workspace
from neu_model.ops.sweep import Sweep, choose_best, load_sweep, table, trial_row, with_seed_means
from tasks import sweep as sweep_tasks

ROOT = Path(__file__).resolve().parent.parent
SWEEP_DIR = Path(".dvc/tmp/sweeps")  # per-workspace scratch that git and DVC ignore, like .dvc/tmp/exps
SUMMARY_KEY, TABLE_KEY = "neu-sweep-summary", "neu-sweep-trials"
MLFLOW_UI = "http://127.0.0.1:5000"


@flow(name="neu-sweep")
def sweep_flow(sweep_file: str, project: str | None = None, data_source: str | None = None,
               select: str | None = None, goal: str | None = None, threads: int | None = None,
               workdir: str | None = None, keep_workspaces: bool = False, mlflow_ui: str = MLFLOW_UI) -> dict:
    """Run every trial of ``sweep_file`` on the flow's task runner; report the table and the best trial.

    Args:
        sweep_file: the sweep (``grid``, ``set``, ``select``; see ``neu_model.ops.sweep``).
        project: the checkout the trials start from; default the one holding this file.
        data_source: folder, archive or URL of the images (NEU_DATA_SOURCE for the stages).
        select: the figure the best trial is chosen by, instead of the file's (``val_acc_%``...).
        goal: ``max`` or ``min`` for ``select``; default the figure's better direction.
        threads: ``train.num_threads`` of every trial unless the sweep sets it (trials side by side
            on one machine must share its cores).
        workdir: where the trials' workspaces go; default ``<project>/.dvc/tmp/sweeps``.
        keep_workspaces: keep each finished trial's workspace (a failed one is always kept).
        mlflow_ui: base URL of the MLflow UI, for the link in the summary.

    Returns:
        ``trials`` (the table's rows), ``best`` (the best row or None), ``parent_run_id``.

    Raises:
        RuntimeError: a trial failed; the artifacts and the parent run's table are written first.
    """
    logger = get_run_logger()
    root = Path(project or ROOT).resolve()
    sweep = _with_threads(load_sweep(sweep_file, root / "params.yaml", select, goal), threads)
    base = load_config(root / "params.yaml", sweep.fixed)
    sweep_id = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    workspaces = (Path(workdir).resolve() if workdir else root / SWEEP_DIR) / sweep_id
    baseline = sweep_tasks.capture_baseline(str(root), str(workspaces))
    store = tracking_uri(root)
    parent_id = sweep_tasks.start_parent(
        store, base.mlflow.experiment, sweep.name,
        params={f"sweep.grid.{k}": v for k, v in sweep.grid.items()} | {"sweep.set": " ".join(sweep.fixed),
                                                                        "sweep.select": sweep.metric},
        tags={"git_sha": baseline["commit"], "neu.sweep.file": sweep_file, "neu.sweep.trials": len(sweep.trials)})
    logger.info("sweep %s: %d trials, parent run %s", sweep.name, len(sweep.trials), parent_id)
    try:
        with workers_report_here():
            futures = [sweep_tasks.run_trial.with_options(task_run_name=f"trial-{t.name}").submit(
                {"name": t.name, "overrides": t.overrides}, baseline, str(workspaces), store, parent_id,
                sweep.name, data_source, keep_workspaces) for t in sweep.trials]
            wait(futures)
    except BaseException:
        sweep_mlflow.fail_parent(store, parent_id)
        raise
    rows = _rows(sweep, futures, base.seed)
    frame = with_seed_means(table(rows), sweep)
    best, note = choose_best(frame, sweep.metric, sweep.goal)
    link = orchestrate.mlflow_run_link({"run_id": parent_id}, mlflow_ui)
    markdown = sweep_markdown(sweep, frame, best, note, baseline, link)
    create_table_artifact(table_rows(frame), key=TABLE_KEY, description=f"Sweep {sweep.name}: one row per trial")
    create_markdown_artifact(markdown, key=SUMMARY_KEY, description=f"Sweep {sweep.name}: the best trial and the table")
    failed = [r for r in rows if r["status"] != "ok"]
    sweep_tasks.finish_parent(store, parent_id, frame, markdown, best, len(failed))
    logger.info(note)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} trials failed: "
                           + "; ".join(f"{r['trial']} {r['status']}" for r in failed))
    if not keep_workspaces:
        sweep_workspace.remove(workspaces)  # the baseline's copies; the results are in MLflow
    return {"trials": table_rows(frame), "best": best, "parent_run_id": parent_id, "sweep_id": sweep_id}


def _rows(sweep: Sweep, futures: list, seed: int) -> list[dict]:
    """One table row per trial, in grid order; a failed trial's row carries its error."""
    rows = []
    for trial, future in zip(sweep.trials, futures, strict=True):
        try:
            rows.append(trial_row(sweep, trial, future.result()["summary"], seed))
        except Exception as exc:  # noqa: BLE001 - a failed trial is a row of the table; the flow fails after
            rows.append(trial_row(sweep, trial, None, seed, error=str(exc) or type(exc).__name__))
    return rows


def _with_threads(sweep: Sweep, threads: int | None) -> Sweep:
    """The sweep with ``train.num_threads=<threads>`` fixed, unless it sets that key itself."""
    key = "train.num_threads"
    if not threads or key in sweep.grid or any(o.startswith(key + "=") for o in sweep.fixed):
        return sweep
    extra = f"{key}={threads}"
    trials = [dataclasses.replace(t, overrides=[extra, *t.overrides]) for t in sweep.trials]
    return dataclasses.replace(sweep, fixed=[extra, *sweep.fixed], trials=trials)


def run(sweep_file: str, workers: int = 2, address: str | None = None, **kwargs):
    """``sweep_flow`` on a Dask task runner (see ``flows.runners``); returns the flow's final state."""
    kwargs.setdefault("threads", threads_per_trial(workers, address))
    runner = dask_runner(workers, address)
    return sweep_flow.with_options(task_runner=runner)(sweep_file, return_state=True, **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", help="the sweep (YAML), e.g. sweeps/seeds.yaml")
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes (default 2)")
    parser.add_argument("--address", help="a running Dask scheduler (tcp://host:8786) instead of a local cluster")
    parser.add_argument("--data-source", help="folder, archive or URL of the images")
    parser.add_argument("--select", help="choose the best trial by this figure (default: the file's, else val_acc_%%)")
    parser.add_argument("--goal", choices=["max", "min"], help="whether --select is better high or low")
    parser.add_argument("--threads", type=int, help="train.num_threads of each trial (default: cores / workers)")
    parser.add_argument("--workdir", help="where the trial workspaces go (default .dvc/tmp/sweeps)")
    parser.add_argument("--keep-workspaces", action="store_true", help="keep finished trials' workspaces")
    return parser


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    args = get_args_parser().parse_args(argv)
    try:  # a bad sweep file is a one-line error before any flow, cluster or MLflow run starts
        load_sweep(args.sweep_file, ROOT / "params.yaml", args.select, args.goal)
    except (StageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = run(str(Path(args.sweep_file).resolve()), args.workers, args.address,
                data_source=args.data_source, select=args.select, goal=args.goal, workdir=args.workdir,
                keep_workspaces=args.keep_workspaces, **({"threads": args.threads} if args.threads else {}))
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
