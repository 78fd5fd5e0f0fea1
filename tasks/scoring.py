"""Prefect tasks for batch scoring: load the champion, score, write the CSV."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from neu_model.files import write_csv
from neu_model.model_source import load_pyfunc_model
from neu_model.predict import score_inputs, summarize
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
    summary = summarize(frame)
    get_run_logger().info("scored %d images into %s: %s; %d need review", summary["n"], out, summary["counts"],
                          summary["needs_review"])
    return summary
