"""Prefect's retry condition for the tasks that may be retried: retry what may pass, not bad input."""

from __future__ import annotations

from neu_model.ops import orchestrate


def retry_if_transient(task, task_run, state) -> bool:
    """``retry_condition_fn`` of a task: retry unless it failed on bad input (``orchestrate.is_transient``)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - is_transient tells the kinds apart
        return orchestrate.is_transient(exc)
    return True
