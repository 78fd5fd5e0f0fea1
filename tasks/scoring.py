"""Prefect tasks for batch scoring: load the champion, score, write the CSV."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from neu_model.core.files import write_csv
from neu_model.inference.input_files import NoImagesError
from neu_model.inference.predict import rows_frame, score_inputs, tile_counts
from neu_model.inference.registry_files import load_pyfunc_model
from neu_model.ops import sweep
from tasks.retry import retry_if_transient


# An unknown alias fails the same way again (a StageError: not retried); a registry hiccup may pass.
@task(name="load-champion", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient, timeout_seconds=600)
def load_champion(model_uri: str, tracking_uri: str):
    """Load the model behind ``model_uri`` from ``tracking_uri`` (a registry call, hence the retries)."""
    get_run_logger().info("loading %s from %s", model_uri, tracking_uri)
    return load_pyfunc_model(model_uri, tracking_uri)


@task(name="score-images", cache_policy=NO_CACHE, timeout_seconds=3600)
def score_images(inputs: list[str], model, out: str, review_below: float) -> dict:
    """Score ``inputs``, write the predictions CSV to ``out``; returns the summary."""
    frame = score_inputs([Path(p) for p in inputs], model, review_below)
    write_csv(frame, Path(out))
    summary = tile_counts(frame)
    get_run_logger().info("scored %d images into %s: %s; %d need review", summary["n"], out, summary["counts"],
                          summary["needs_review"])
    return summary


# ---------------------------------------------------------------- several workers: one shard each

@task(name="pin-model-version", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient, timeout_seconds=300)
def pin_model_version(model_uri: str, tracking_uri: str) -> str:
    """The version ``model_uri``'s alias names now (``models:/<name>/<version>``), for every shard."""
    pinned = sweep.pinned_uri(model_uri, tracking_uri)
    get_run_logger().info("%s is %s", model_uri, pinned)
    return pinned


# No task timeout (Prefect cannot interrupt a Dask worker's thread); the flow's own timeout bounds it.
@task(name="score-shard", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_if_transient)
def score_shard(inputs: list[str], model_uri: str, tracking_uri: str, review_below: float):
    """Load the model in this worker and score one shard of the inputs; returns its predictions frame."""
    model = load_champion.fn(model_uri, tracking_uri)
    try:
        frame = score_inputs([Path(p) for p in inputs], model, review_below)
    except NoImagesError:
        frame = rows_frame([])  # e.g. an empty archive: other shards may have images (write_scores checks)
    get_run_logger().info("scored %d tiles from %d inputs", len(frame), len(inputs))
    return frame


@task(name="write-scores", cache_policy=NO_CACHE, timeout_seconds=600)
def write_scores(frame, out: str, inputs: list[str]) -> dict:
    """Write the merged predictions CSV to ``out``; returns the summary.

    Raises:
        NoImagesError: no shard found an image, as one worker would have said.
    """
    if frame.empty:
        raise NoImagesError(f"{', '.join(inputs)}: no images found (.bmp, .png, .jpg, .tif)")
    write_csv(frame, Path(out))
    summary = tile_counts(frame)
    get_run_logger().info("wrote %d predictions to %s: %s; %d need review", summary["n"], out, summary["counts"],
                          summary["needs_review"])
    return summary
