"""Sweeps without Prefect: the sweep file, its grid of trials, the trials' table, the best trial,
and the shards of a batch-scoring run.

A sweep file (``sweeps/seeds.yaml``) maps params.yaml keys to the values each takes (``grid``:
every combination is one trial), adds overrides every trial shares (``set``) and says how the
best trial is chosen (``select``). The best trial is chosen by a training-side figure only
(validation accuracy by default), never by a test figure: choosing on the test part would make
its figures an optimistic estimate. ``flows/sweep.py`` runs the trials
(``neu_model.ops.sweep_workspace``); this module plans and reports.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import pandas as pd
import yaml

from neu_model.core.config import ConfigError, apply_overrides, from_dict, load_raw
from neu_model.core.stage import StageError

T = TypeVar("T")
SPEC_KEYS = {"name", "grid", "set", "select"}
# Figures a best trial may be chosen by, with the better direction. None is measured on the test part.
SELECTABLE = {"val_acc_%": "max", "train_s": "min", "train_img/s": "max", "MMACs": "min", "params_k": "min"}
DEFAULT_SELECT = "val_acc_%"
# The result columns, named as in benchmarks/bench_models.py where the figure is the same.
RESULT_COLUMNS = ("model", "seed", "epochs", "best_epoch", "val_acc_%", "test_acc_%", "macro_f1_%", "robust_%",
                  "in_ps_err", "errors", "review_%", "accepted_err", "train_s", "train_img/s", "infer_img/s",
                  "MMACs", "params_k")
TAIL_COLUMNS = ("status", "mlflow_run")


@dataclass(frozen=True)
class Trial:
    """One combination of the grid: its name, the values it sets and the overrides that set them."""

    name: str
    values: dict[str, Any]
    overrides: list[str]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    name: str
    grid: dict[str, list]
    fixed: list[str]  # key=value overrides shared by every trial
    metric: str = DEFAULT_SELECT
    goal: str = SELECTABLE[DEFAULT_SELECT]
    trials: list[Trial] = field(default_factory=list)

    @property
    def varied(self) -> list[str]:
        return list(self.grid)


def override(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` and ``dvc exp run -S`` take it; the value reads back as the same YAML."""
    text = value if isinstance(value, str) else json.dumps(value)
    if yaml.safe_load(text) != value:  # a string such as "0.3" or "yes" must stay a string
        text = json.dumps(value)
    return f"{key}={text}"


def expand_grid(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in order: the last key varies fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _fail(path: Path, problem: str) -> StageError:
    return StageError(f"{path}: {problem}")


def _fixed_overrides(path: Path, fixed: Any) -> list[str]:
    if fixed is None:
        return []
    if isinstance(fixed, Mapping):
        return [override(k, v) for k, v in fixed.items()]
    if isinstance(fixed, list) and all(isinstance(o, str) and "=" in o for o in fixed):
        return list(fixed)
    raise _fail(path, "'set' must map params.yaml keys to values (train.device: cpu) or list key=value strings")


def _grid(path: Path, grid: Any) -> dict[str, list]:
    if not isinstance(grid, Mapping) or not grid:
        raise _fail(path, "'grid' must map at least one params.yaml key to a list of values, e.g. seed: [0, 1, 2]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(path, f"grid key {key!r} must have a non-empty list of values; write {key}: [{values}]")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise _fail(path, f"grid key {key!r} lists a value twice; each trial must differ")
    return {str(k): list(v) for k, v in grid.items()}


def _select(path: Path, select: Any) -> tuple[str, str]:
    select = {"metric": select} if isinstance(select, str) else dict(select or {})
    metric = select.get("metric", DEFAULT_SELECT)
    if metric not in SELECTABLE:
        raise _fail(path, f"select metric {metric!r} is not one of {', '.join(SELECTABLE)}; test-part figures "
                          "are reported, never chosen by (that would make them optimistic)")
    goal = select.get("goal", SELECTABLE[metric])
    if goal not in ("max", "min"):
        raise _fail(path, f"select goal {goal!r} must be max or min")
    return metric, goal


def load_sweep(path: Path | str, params: Path | str, metric: str | None = None, goal: str | None = None) -> Sweep:
    """Read a sweep file and check every trial's params against ``params`` before anything runs.

    Args:
        path: the sweep file (YAML: ``grid``, optional ``set``, ``select``, ``name``).
        params: the params.yaml the trials start from.
        metric: the figure to choose the best trial by, instead of the file's ``select``.
        goal: ``max`` or ``min``, instead of the file's (default: the figure's better direction).

    Raises:
        StageError: a missing or malformed file, or a trial whose params params.yaml rejects;
            the message names the file and the fix.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise _fail(path, "sweep file not found; see sweeps/ for examples") from None
    except yaml.YAMLError as exc:
        raise _fail(path, f"not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    if not isinstance(spec, Mapping) or set(spec) - SPEC_KEYS:
        raise _fail(path, f"expected a mapping with keys {', '.join(sorted(SPEC_KEYS))}")
    grid, fixed = _grid(path, spec.get("grid")), _fixed_overrides(path, spec.get("set"))
    clash = set(grid) & {o.partition("=")[0] for o in fixed}
    if clash:
        raise _fail(path, f"{', '.join(sorted(clash))} is both varied (grid) and fixed (set); keep it in one")
    selected, default_goal = _select(path, {"metric": metric} if metric else spec.get("select"))
    base = load_raw(params)
    trials = []
    for i, values in enumerate(expand_grid(grid), start=1):
        overrides = [*fixed, *(override(k, v) for k, v in values.items())]
        try:
            from_dict(apply_overrides(base, overrides))
        except ConfigError as exc:
            raise _fail(path, f"trial {values}: {exc}") from None
        trials.append(Trial(f"t{i:02d}", values, overrides))
    if goal not in (None, "max", "min"):
        raise _fail(path, f"select goal {goal!r} must be max or min")
    return Sweep(str(spec.get("name") or path.stem), grid, fixed, selected, goal or default_goal, trials)


# ---------------------------------------------------------------- the trials' table

def column_names(varied: Sequence[str]) -> dict[str, str]:
    """The table column of each varied key: its last part, unless that is ambiguous or a result column."""
    short = {k: k.rsplit(".", 1)[-1] for k in varied}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: s if counts[s] == 1 else k for k, s in short.items()}


def _pct(value: Any) -> float:
    return round(100 * value, 2) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def results(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The result columns from what a trial's workspace holds (``orchestrate.read_reports``)."""
    train, metrics = summary.get("train") or {}, summary.get("metrics") or {}
    review, robust = metrics.get("review") or {}, metrics.get("robustness") or {}
    macs, params = train.get("macs"), train.get("params")
    return {
        "model": train.get("model"), "epochs": train.get("epochs"), "best_epoch": train.get("best_epoch"),
        "val_acc_%": _pct(train.get("val_accuracy")), "test_acc_%": _pct(metrics.get("accuracy")),
        "macro_f1_%": _pct(metrics.get("macro_f1")), "robust_%": _pct(robust.get("mean_accuracy")),
        "in_ps_err": metrics.get("in_ps_errors"), "errors": metrics.get("errors"),
        "review_%": _pct(review.get("flagged_share")), "accepted_err": review.get("accepted_errors"),
        "train_s": train.get("train_seconds"), "train_img/s": train.get("train_images_per_second"),
        "infer_img/s": metrics.get("inference_images_per_second"),
        "MMACs": round(macs / 1e6, 1) if macs else None, "params_k": round(params / 1e3) if params else None,
        "mlflow_run": (summary.get("run") or {}).get("run_id"),
    }


def trial_row(sweep: Sweep, trial: Trial, outcome: Mapping[str, Any] | None, seed: int,
              error: str | None = None) -> dict[str, Any]:
    """One row of the table: the trial, its varied values, its results (empty when it failed) and status."""
    names = column_names(sweep.varied)
    row: dict[str, Any] = {"trial": trial.name}
    row |= {names[k]: v for k, v in trial.values.items() if names[k] not in RESULT_COLUMNS}
    row |= dict.fromkeys(RESULT_COLUMNS) | results(outcome or {}) | {"seed": trial.values.get("seed", seed)}
    row["status"] = "ok" if error is None else f"failed: {_first_and_last(error)}"
    return row


def _first_and_last(error: str) -> str:
    """A stage failure's headline and its last line (the stage's own error), on one line."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()] or ["unknown error"]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows in column order: trial, varied values, results, status."""
    frame = pd.DataFrame(list(rows))
    middle = [c for c in frame.columns if c not in ("trial", *RESULT_COLUMNS, *TAIL_COLUMNS)]
    return frame[["trial", *middle, *RESULT_COLUMNS, *TAIL_COLUMNS]]


def with_seed_means(frame: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """The table plus, when seeds vary, one ``mean`` row per combination of the other varied values
    (as benchmarks/bench_models.py adds per model); failed trials are left out of the means."""
    if len(sweep.grid.get("seed", [])) < 2:
        return frame
    names = column_names(sweep.varied)
    keys = ["model", *(names[k] for k in sweep.varied if names[k] not in RESULT_COLUMNS)]
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return frame
    numeric = [c for c in RESULT_COLUMNS if c not in keys and c != "seed"]
    means = ok.groupby(keys, sort=False, dropna=False)[numeric].mean(numeric_only=False).round(2).reset_index()
    means["trial"], means["seed"], means["status"] = "mean", "mean", f"mean of {ok['seed'].nunique()} seeds"
    return pd.concat([frame, means[[c for c in frame.columns if c in means.columns]]], ignore_index=True)


def choose_best(frame: pd.DataFrame, metric: str, goal: str) -> tuple[dict | None, str]:
    """The best finished trial by ``metric`` (``goal`` max or min), and a sentence saying how it was chosen.

    Ties keep the first trial in grid order, and the sentence names the others.
    """
    ok = frame[(frame["trial"] != "mean") & (frame["status"] == "ok")]
    scored = ok[pd.to_numeric(ok[metric], errors="coerce").notna()]
    if scored.empty:
        why = "no trial finished" if ok.empty else f"no finished trial has {metric}"
        if metric == "val_acc_%" and not ok.empty:
            why += " (no validation part: split.val_fraction is 0 or the data set too small; select by another figure)"
        return None, why
    values = pd.to_numeric(scored[metric])
    top = values.max() if goal == "max" else values.min()
    tied = scored[values == top]
    best = tied.iloc[0].to_dict()
    note = f"best by {metric} ({goal}): {best['trial']} with {top:g}"
    if len(tied) > 1:
        note += f"; tied with {', '.join(tied['trial'].iloc[1:])} (the first in grid order is taken)"
    return best, note


# ---------------------------------------------------------------- batch scoring in shards

def shard(items: Sequence[T], n: int, weights: Sequence[float] | None = None) -> list[list[T]]:
    """Split ``items`` into at most ``n`` contiguous, non-empty shards of about equal total weight.

    Contiguous, so that concatenating the shards' results in shard order gives the input order.
    """
    if not items:
        return []
    n = max(1, min(n, len(items)))
    weights = [max(float(w), 1e-9) for w in (weights or [1.0] * len(items))]
    if len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} items")
    cumulative = list(itertools.accumulate(weights))
    bounds = [0]
    for k in range(1, n):
        cut = bisect.bisect_left(cumulative, cumulative[-1] * k / n) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), len(items) - (n - k)))  # every shard gets one item at least
    bounds.append(len(items))
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def merge_shards(parts: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """The shards' result frames concatenated in shard order (``parts``: shard index → frame),
    whatever order they finished in."""
    if sorted(parts) != list(range(len(parts))):
        raise ValueError(f"shards {sorted(parts)} are not 0..{len(parts) - 1}: one is missing")
    return pd.concat([parts[i] for i in range(len(parts))], ignore_index=True)


def expand_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    """The inputs with folders replaced by their images, in the order the reader reads them
    (``neu_model.inference.input_files``: the same walk, so the same names). Archives and single files stay as
    they are: an archive is scored whole, by one worker.

    Raises:
        StageError: an input that does not exist (before any shard starts).
    """
    from neu_model.inference import input_files as reading

    expanded: list[Path] = []
    for path in reading.check_inputs(inputs):
        expanded += list(reading.walk_images(path)) if path.is_dir() else [path]
    return expanded


def pinned_uri(model_uri: str, store: str) -> str:
    """``models:/<name>@<alias>`` as ``models:/<name>/<version>``: what the alias names now.

    Shards scored in parallel must all use one version, even if the alias moves meanwhile.
    Other URIs are returned as they are.

    Raises:
        StageError: the registry has no such model or alias.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, at, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not at:
        return model_uri
    try:
        version = MlflowClient(store).get_model_version_by_alias(name, alias).version
    except MlflowException as exc:
        raise StageError(f"{model_uri}: not in the registry at {store} ({str(exc).splitlines()[0]}); "
                         "register a model with that alias, or point MLFLOW_TRACKING_URI at its registry") from None
    return f"models:/{name}/{version}"
