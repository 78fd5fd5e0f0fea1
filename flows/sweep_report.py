"""The text of the sweep flow's artifacts: plain functions of the trials' table, easy to test."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import pandas as pd

from neu_model.ops.sweep import Sweep

# What the best trial's line shows beside the figure it was chosen by: the test part's figures.
TEST_FIGURES = ("test_acc_%", "macro_f1_%", "errors", "in_ps_err", "robust_%", "review_%", "accepted_err")
COUNTS = ("seed", "epochs", "best_epoch", "in_ps_err", "errors", "accepted_err", "params_k")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table (no ``tabulate`` needed)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if key in COUNTS and isinstance(value, float) and value.is_integer():
        return int(value)  # pandas made the column float because a failed trial left it empty
    return value


def table_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The trials (no mean rows) as plain records, for a Prefect table artifact and the flow's result."""
    trials = frame[frame["trial"] != "mean"]
    return [{k: _plain(k, v) for k, v in row.items()} for row in trials.to_dict("records")]


def sweep_markdown(sweep: Sweep, frame: pd.DataFrame, best: Mapping[str, Any] | None, note: str,
                   baseline: Mapping[str, Any], parent_link: str | None, workers: Sequence[str] = ()) -> str:
    """The sweep's summary artifact: what varied, the best trial (with its test figures beside) and the table."""
    failed = int((~frame["status"].isin(["ok"]) & (frame["trial"] != "mean")).sum())
    n = int((frame["trial"] != "mean").sum())
    lines = [
        f"# Sweep `{sweep.name}`", "",
        f"- trials: {n} ({failed} failed)" + (f" on {', '.join(workers)}" if workers else ""),
        "- varied: " + ", ".join(f"`{k}` ∈ {v}" for k, v in sweep.grid.items()),
        f"- fixed: {', '.join(f'`{o}`' for o in sweep.fixed) or 'nothing'}",
        f"- from commit `{baseline['commit'][:12]}`"
        + (" with the workspace's uncommitted changes" if baseline.get("patch") else ""),
        f"- MLflow parent run: [{parent_link.rsplit('/', 1)[-1]}]({parent_link})" if parent_link
        else "- MLflow parent run: none",
        "", f"**{note}**",
    ]
    if best:
        beside = ", ".join(f"{k} {_cell(best.get(k)) or 'n/a'}" for k in TEST_FIGURES)
        lines += ["", f"Best trial `{best['trial']}`: {sweep.metric} {_cell(best.get(sweep.metric))}; "
                      f"on the test part (reported, not chosen by): {beside}; MLflow run `{best.get('mlflow_run')}`."]
    lines += ["", markdown_table(frame), ""]
    return "\n".join(lines)
