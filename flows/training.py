"""The training flow: source → download → boxes → split → train → evaluate → export → register (dvc.yaml's
stages).

    python -m flows.training [--set KEY=VALUE ...] [--data-source SRC] [--device DEV]   # one run
    python -m flows.training serve [--cron "0 3 * * 1"]              # scheduled, and on commits of labels
    python -m flows.training deploy --pool neu-process [--cron ... | --no-schedule]    # into a work pool

``make retrain`` / ``make serve`` / ``make deploy`` wrap these; ``make worker`` runs a pool's
flows. With no ``PREFECT_API_URL`` a run starts a temporary local API (prefect.toml keeps its
state in .prefect/); with it, runs report there.
The flow holds the order, retries, schedule, concurrency and artifacts; the stages
themselves are ``dvc.yaml``'s, run by the tasks in ``tasks/stages.py``. A run holds the
workspace lock throughout (another run is refused, naming it, or waited for with ``--wait``)
and leaves params.yaml as it found it (``neu_model.ops.run_params``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import os
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import DeploymentEventTrigger
from prefect.settings import get_current_settings
from prefect.tasks import exponential_backoff

from flows.report import per_class_rows, training_markdown
from neu_model.core.config import DATA_SOURCE_ENV, ConfigError
from neu_model.core.redact import install_log_redaction, redact_url
from neu_model.core.stage import disable_telemetry
from neu_model.ops import orchestrate, run_params
from neu_model.ops.label_trigger import LABELS_EVENT
from tasks import stages

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "retrain"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00: weekly, outside the working day
SUMMARY_KEY, TABLE_KEY = "neu-training-summary", "neu-per-class-metrics"
MLFLOW_UI = "http://127.0.0.1:5000"


@flow(name="neu-training", timeout_seconds=12 * 3600)
def training_flow(overrides: list[str] | None = None, data_source: str | None = None, device: str | None = None,
                  project: str | None = None, retry_backoff_seconds: float = 10.0,
                  mlflow_ui: str = MLFLOW_UI, wait: bool = False, trigger: str = "schedule",
                  labels_version: str | None = None) -> dict:
    """Bring the model up to date with the data source, and let the gate decide on promotion.

    Args:
        overrides: params.yaml keys for this run, dotted as ``dvc exp run -S`` takes them,
            e.g. ``["train.recipes.defectnet.epochs=5"]``; params.yaml is put back when the run
            ends. ``data.source=...`` is taken as ``data_source``.
        data_source: folder, archive or URL of the images (NEU_DATA_SOURCE for the stages);
            default: NEU_DATA_SOURCE of the flow's process, else params.yaml's data.source.
        device: ``train.device`` for this run (cpu, cuda, cuda:1, auto).
        project: the workspace (a checkout with dvc.yaml); default: the one holding this file.
        retry_backoff_seconds: the first register retry waits this long, then doubles.
        mlflow_ui: base URL of the MLflow UI, for the link in the summary.
        wait: wait for a run that holds the workspace instead of failing at once.
        trigger: ``labels`` when the event ``neu.labels.committed`` started the run (the
            deployment's trigger): it trains only with enough new labels
            (``neu_model.ops.label_trigger``); anything else (the schedule, by hand) always runs.
        labels_version: the labels' data version the event announced (shown in the run's log).

    Returns:
        Which stages ran, the MLflow run id and the registry decision; with too few new labels,
        ``{"skipped": why}``.
    """
    logger = get_run_logger()
    redact_every_log()
    root = str(Path(project or ROOT).resolve())
    if trigger == "labels":
        logger.info("started by %s (labels version %s)", LABELS_EVENT, labels_version or "?")
        found = stages.new_labels(root)
        if not found.enough:
            return {"skipped": found.describe()}
    run_overrides, data_source = source_override([*(overrides or []), *([f"train.device={device}"] if device else [])],
                                                 data_source)
    with orchestrate.hold_workspace(root, wait=math.inf if wait else 0, note=logger.warning):
        try:
            return _run(root, run_overrides, data_source, retry_backoff_seconds, mlflow_ui)
        finally:
            run_params.restore(root, logger.info, ending=True)


def _run(root: str, run_overrides: list[str], data_source: str | None, retry_backoff_seconds: float,
         mlflow_ui: str) -> dict:
    """The stages in order, under the workspace lock; then the summary."""
    logger = get_run_logger()
    # ran["source"]: whether the source stage found new data (DVC runs that stage every time).
    pipeline = orchestrate.pipeline_stages(root)  # dvc.yaml's stages, in its order
    ran = {stage.name: False for stage in pipeline}
    changed = []
    backoff = {"retry_delay_seconds": exponential_backoff(retry_backoff_seconds)}
    steps = [stages.stage_task(stage, **(backoff if stage.name in stages.RETRIED else {})) for stage in pipeline]
    try:
        changed = run_params.apply(root, run_overrides, logger.warning)  # refused here: nothing has run yet
        logger.info("params for this run: %s", ", ".join(run_overrides) or "params.yaml as it is")
        for stage, step in zip(pipeline, steps, strict=True):
            ran[stage.name] = step(root, stage, data_source)
    except Exception as exc:
        # A failed run leaves its summary too: which stage, and what the workspace holds now.
        try:
            _publish(root, ran, changed, mlflow_ui, run_overrides, failed=redact_url(str(exc).splitlines()[0]))
        except Exception as publish_error:  # noqa: BLE001 - the stage's failure is the one to report
            logger.warning("could not publish the failure summary: %s", publish_error)
        if isinstance(exc, ConfigError) and redact_url(str(exc)) != str(exc):
            raise ConfigError(redact_url(str(exc))) from None
        raise
    summary = _publish(root, ran, changed, mlflow_ui, run_overrides)
    result = {"ran": ran, "mlflow_run_id": summary["run"].get("run_id"),
              "registration": summary["registration"], "test_accuracy": summary["metrics"].get("accuracy")}
    if not any(ran.values()):
        logger.info("nothing changed (data source, params and code as in dvc.lock): nothing trained or registered")
    else:
        logger.info("ran %s; MLflow run %s; registry: %s", [s for s, r in ran.items() if r],
                    result["mlflow_run_id"], summary["registration"] or "no decision recorded")
    return result


def source_override(overrides: list[str], data_source: str | None) -> tuple[list[str], str | None]:
    """Take a ``data.source=...`` override out of ``overrides``, as the run's data source.

    The data source reaches the stages as NEU_DATA_SOURCE, never params.yaml: the
    credentials of a URL must not reach params.yaml or dvc.lock, which are committed.

    Raises:
        ConfigError: a data source given both ways.
    """
    rest, given = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "data.source":
            given.append(str(yaml.safe_load(value)))
        else:
            rest.append(item)
    if len(given) + bool(data_source) > 1:
        raise ConfigError("the data source is given more than once (data_source / --data-source and "
                          "data.source=...); give it once")
    return rest, data_source or (given[0] if given else None)


def redact_every_log() -> None:
    """Put ``RedactingFilter`` on every log handler of this process (Prefect's API and console ones too)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for logger in loggers:
        install_log_redaction(logger)


def _publish(root: str, ran: dict, changed: list, mlflow_ui: str, overrides: list[str],
             failed: str | None = None) -> dict:
    """Create the run's artifacts: the markdown summary and the per-class metrics table (credentials
    of a URL in them are masked by ``training_markdown``)."""
    summary = stages.read_reports(root)
    link = orchestrate.mlflow_run_link(summary["run"], mlflow_ui)
    create_markdown_artifact(training_markdown(summary, ran, changed, ran["source"], link, failed, overrides),
                             key=SUMMARY_KEY,
                             description="NEU-CLS training run: data, model, accuracy, promotion decision")
    rows = per_class_rows(summary["metrics"])
    if rows:
        create_table_artifact(rows, key=TABLE_KEY, description=f"Per-class test metrics, dataset "
                                                                f"{summary['dataset_version']}")
    return summary


def labels_trigger() -> DeploymentEventTrigger:
    """Start the deployment on every ``neu.labels.committed`` event (``neu-review commit``); the run
    then trains only with enough new labels in the window ``retrain.within_hours``
    (``neu_model.ops.label_trigger``: Prefect's threshold counts events, not the images each commit
    carries). ``within=0``: a reactive trigger fires at most once per ``within``, and a later commit
    must not wait for the window to close."""
    return DeploymentEventTrigger(name="labels committed", expect={LABELS_EVENT}, posture="Reactive", threshold=1,
                                  within=dt.timedelta(0),
                                  parameters={"trigger": "labels",
                                              "labels_version": "{{ event.payload.data_version }}"})


def serve(cron: str = DEFAULT_CRON, parameters: dict | None = None) -> None:
    """Serve the deployment ``neu-training/retrain`` on ``cron`` and on commits of labels, one run at a time.

    ``global_limit=1`` is the deployment's concurrency limit and ``limit=1`` caps this runner:
    a scheduled run, one started by labels and one started by hand queue instead of failing on the
    workspace lock, which each run takes (and which also keeps ``make pipeline`` and ``make retrain`` out).
    """
    training_flow.serve(name=DEPLOYMENT, cron=cron, global_limit=1, limit=1, parameters=parameters or {},
                        triggers=[labels_trigger()], tags=["neu-cls", "training"], pause_on_shutdown=False)


def deploy(pool: str, name: str | None = None, cron: str | None = DEFAULT_CRON, parameters: dict | None = None,
           source: str | Path = ROOT) -> str:
    """Create or update the deployment ``neu-training/<name>`` in the work pool ``pool``.

    A worker polling the pool (``prefect worker start --pool <pool>``) runs it. The flow's
    code is loaded from ``source``: by default this checkout, a folder the worker must have at
    the same path, because the run works there (DVC's cache, data and dvc.lock stay between
    runs). A missing pool is created as a process pool. Concurrency 1: one ``dvc repro`` per
    workspace, as with ``serve``.

    Returns:
        The deployment's id.
    """
    _ensure_process_pool(pool)
    remote_flow = training_flow.from_source(str(source), "flows/training.py:training_flow")
    deployment_id = remote_flow.deploy(name=name or f"retrain-{pool}", work_pool_name=pool, cron=cron or None,
                                       triggers=[labels_trigger()],
                                       concurrency_limit=1, parameters=parameters or {},
                                       tags=["neu-cls", "training"], print_next_steps=False, ignore_warnings=True)
    return str(deployment_id)


def _ensure_process_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        if problem is not None:
            raise ConnectionError(f"the Prefect server at {client.api_url} did not answer ({problem}): is it running "
                                  "(prefect server start), and PREFECT_API_URL right?")
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"created the process work pool {pool!r}", file=sys.stderr)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "serve", "deploy"], default="run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override for this run (repeatable)")
    parser.add_argument("--data-source", help="folder, archive or URL of the images")
    parser.add_argument("--device", help="train.device for this run")
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"serve, deploy: the schedule (default {DEFAULT_CRON!r})")
    parser.add_argument("--no-schedule", action="store_true", help="deploy: runs only when started by hand")
    parser.add_argument("--pool", help="deploy: the work pool (created as a process pool when missing)")
    parser.add_argument("--name", help="deploy: the deployment's name (default retrain-<pool>)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for a run that holds the workspace (default: fail at once, naming it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    disable_telemetry()
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        overrides, data_source = source_override(args.overrides, args.data_source)
        # Refused here, in one line, before Prefect starts (the flow checks again: deployments).
        run_params.check(ROOT, [*overrides, *([f"train.device={args.device}"] if args.device else [])])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if data_source and redact_url(data_source) != data_source:
        # Prefect stores a flow run's parameters (and a deployment's): a URL with credentials
        # reaches the stages through the environment only, as NEU_DATA_SOURCE.
        os.environ[DATA_SOURCE_ENV], data_source = data_source, None
    # Parameters given here become the deployment's defaults for every scheduled run.
    params = {k: v for k, v in {"overrides": overrides or None, "data_source": data_source,
                                "device": args.device, "wait": args.wait}.items() if v}
    if args.command == "serve":
        serve(args.cron, params)
        return 0
    if args.command == "deploy":
        if not args.pool:
            parser.error("deploy needs --pool NAME (make deploy POOL=NAME)")
        if not get_current_settings().api.url:  # a temporary API would forget the deployment at exit
            parser.error("deploy needs a running Prefect server: set PREFECT_API_URL (docs/orchestration.md)")
        try:
            print(deploy(args.pool, args.name, None if args.no_schedule else args.cron, params))
        except ConnectionError as exc:
            parser.exit(2, f"error: {exc}\n")
        return 0
    state = training_flow(overrides, data_source, args.device, wait=args.wait, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
