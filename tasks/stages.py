"""Prefect tasks for the training flow: one per DVC stage, plus the steps around them.

Each stage task runs ``dvc repro --single-item <stage>`` (see ``neu_model.ops.orchestrate``), so
DVC, not Prefect, decides what changed: caching is off (Prefect would key on the argument
values, which are the same when the images changed). A task returns whether DVC ran its
stage. Retries go where a second attempt can succeed and nothing retries already: the model
registry. The download stage retries each request itself (``neu_model.data.fetch``), so its task
is not retried on top; split, train and evaluate fail the same way again on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from neu_model.core import paths
from neu_model.ops import orchestrate
from tasks.retry import retry_if_transient

# Seconds a stage may take before its process group is killed; Prefect's own timeout is a
# backstop a minute later (it cannot interrupt a thread blocked on a pipe).
TIMEOUTS = {"source": 600, "download": 1800, "boxes": 600, "split": 600, "train": 8 * 3600, "evaluate": 3600,
            "export": 1800,
            "register": 900}
MARGIN = 60


def _repro(stage: str, project: str, data_source: str | None) -> bool:
    logger = get_run_logger()
    env = orchestrate.stage_env(Path(project), data_source)
    ran = orchestrate.repro(stage, Path(project), env, TIMEOUTS[stage], logger.info)
    logger.info("stage %s: %s", stage, "ran" if ran else "unchanged, skipped by DVC")
    return ran


@task(name="source", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["source"] + MARGIN)
def source(project: str, data_source: str | None = None) -> bool:
    """The source stage; returns whether it found new data (data/source.json changed), since
    DVC runs this stage every time. Not retried: an unreachable server is no failure (the
    stage keeps the last fingerprint), and the download's retries cover the network."""
    logger = get_run_logger()
    env = orchestrate.stage_env(Path(project), data_source)
    changed = orchestrate.repro_source(Path(project), env, TIMEOUTS["source"], logger.info)
    logger.info("data source %s", "changed: new data will be downloaded" if changed else "unchanged")
    return changed


@task(name="download", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["download"] + MARGIN)
def download(project: str, data_source: str | None = None) -> bool:
    """The download stage; not retried here: the stage retries each request itself (4 attempts,
    1 s, 2 s, 4 s apart), and a task retry on top multiplied the requests to a failing server."""
    return _repro("download", project, data_source)


@task(name="boxes", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["boxes"] + MARGIN)
def boxes(project: str, data_source: str | None = None) -> bool:
    """The boxes stage; returns whether data/boxes.csv changed, since DVC runs this stage every
    time. Not retried: a URL's download retries each request itself."""
    logger = get_run_logger()
    env = orchestrate.stage_env(Path(project), data_source)
    changed = orchestrate.repro_changed("boxes", paths.BOXES_FILE, Path(project), env, TIMEOUTS["boxes"],
                                        logger.info)
    logger.info("localisation boxes %s", "changed: evaluate will run" if changed else "unchanged")
    return changed


@task(name="split", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["split"] + MARGIN)
def split(project: str, data_source: str | None = None) -> bool:
    """The split stage."""
    return _repro("split", project, data_source)


@task(name="train", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["train"] + MARGIN)
def train(project: str, data_source: str | None = None) -> bool:
    """The train stage; not retried: the same data and params fail the same way again."""
    return _repro("train", project, data_source)


@task(name="evaluate", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["evaluate"] + MARGIN)
def evaluate(project: str, data_source: str | None = None) -> bool:
    """The evaluate stage."""
    return _repro("evaluate", project, data_source)


@task(name="export", cache_policy=NO_CACHE, timeout_seconds=TIMEOUTS["export"] + MARGIN)
def export(project: str, data_source: str | None = None) -> bool:
    """The export stage (ONNX files and their parity report); not retried: it fails the same way again."""
    return _repro("export", project, data_source)


# The flow may shorten the backoff with .with_options (tests do); these are the defaults.
@task(name="register", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient, timeout_seconds=TIMEOUTS["register"] + MARGIN)
def register(project: str, data_source: str | None = None) -> bool:
    """The register stage; registry trouble is retried, bad input (exit 2) is not (see ``retry_if_transient``).

    A model that fails the gate is no failure at all: register records "rejected" and exits 0.
    """
    return _repro("register", project, data_source)


@task(name="summarize", cache_policy=NO_CACHE, timeout_seconds=120)
def summarize(project: str) -> dict:
    """Read what the workspace's reports say now (see ``orchestrate.run_summary``)."""
    return orchestrate.run_summary(Path(project))
