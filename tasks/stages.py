"""Prefect tasks for the training flow: one per DVC stage, plus the steps around them.

One task runs any stage of ``dvc.yaml``: ``dvc repro --single-item <stage>`` (see
``neu_model.ops.orchestrate``), so DVC, not Prefect, decides what changed: caching is off
(Prefect would key on the argument values, which are the same when the images changed). A task
returns whether DVC ran its stage. Only the register stage is retried: the download stage
retries each request itself (``neu_model.data.fetch``); split, train, evaluate and export fail
the same way again on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from neu_model.ops import label_trigger, orchestrate
from tasks.retry import retry_if_transient

# Seconds a stage may take before its process group is killed (default: an hour); Prefect's own
# timeout is a backstop a minute later (it cannot interrupt a thread blocked on a pipe).
TIMEOUTS = {"train": 8 * 3600, "source": 600, "boxes": 600, "split": 600}
DEFAULT_TIMEOUT = 3600
MARGIN = 60
# Retries go where a second attempt can succeed and nothing retries already: the registry. The
# flow may shorten the backoff with .with_options (tests do); these are the defaults.
RETRIED = {"register": {"retries": 3, "retry_delay_seconds": exponential_backoff(5),
                        "retry_condition_fn": retry_if_transient}}


@task(cache_policy=NO_CACHE)
def run_stage(project: str, stage: orchestrate.PipelineStage, data_source: str | None = None) -> bool:
    """``dvc repro --single-item`` of one stage; returns whether DVC ran it or, for a stage DVC runs
    every time (source, boxes), whether its output changed (new data, new boxes)."""
    logger = get_run_logger()
    env = orchestrate.stage_env(Path(project), data_source)
    timeout = TIMEOUTS.get(stage.name, DEFAULT_TIMEOUT)
    if stage.record is not None:
        changed = orchestrate.repro_changed(stage.name, stage.record, Path(project), env, timeout, logger.info)
        logger.info("stage %s: %s changed: %s", stage.name, stage.record, "yes" if changed else "no")
        return changed
    ran = orchestrate.repro(stage.name, Path(project), env, timeout, logger.info)
    logger.info("stage %s: %s", stage.name, "ran" if ran else "unchanged, skipped by DVC")
    return ran


def stage_task(stage: orchestrate.PipelineStage, **options):
    """``run_stage`` named after ``stage``, with its timeout and (for the registry) its retries."""
    settings = {"name": stage.name, "timeout_seconds": TIMEOUTS.get(stage.name, DEFAULT_TIMEOUT) + MARGIN,
                **RETRIED.get(stage.name, {}), **options}
    return run_stage.with_options(**settings)


@task(name="read_reports", cache_policy=NO_CACHE, timeout_seconds=120)
def read_reports(project: str) -> dict:
    """Read what the workspace's reports say now (see ``orchestrate.read_reports``)."""
    return orchestrate.read_reports(Path(project))


@task(cache_policy=NO_CACHE)
def new_labels(project: str) -> label_trigger.NewLabels:
    """Whether the committed labels are enough to retrain on (``neu_model.ops.label_trigger``)."""
    found = label_trigger.new_labels(Path(project))
    get_run_logger().info("%s", found.describe())
    return found
