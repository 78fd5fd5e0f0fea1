"""Run the DVC stages from an orchestrator: environment, per-run params, ``dvc repro``, summary.

Nothing here imports Prefect: ``tasks/`` wraps these functions in thin Prefect tasks and
``flows/`` puts them in order. ``dvc.yaml`` stays the one definition of the stages; every
stage runs through ``dvc repro --single-item <stage>``, so ``dvc.lock`` stays true and DVC
alone decides what changed (an unchanged stage is skipped in about a second).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import yaml

from neu_model import provenance
from neu_model.cli import TELEMETRY_OFF, StageError, default_tracking_uri
from neu_model.config import DATA_SOURCE_ENV, ConfigError, apply_overrides, from_dict

STAGES = ("source", "download", "split", "train", "evaluate", "register")
# The source stage's output: rewritten only when there are new images at the source.
SOURCE_RECORD = Path("data/source.json")
# Where the flow remembers params.yaml as it was before it applied a run's overrides.
# .dvc/tmp is per-workspace scratch that git ignores, like the rest of DVC's run state.
PARAMS_RECORD = Path(".dvc/tmp/flow-params.json")

# Messages of bad-input failures (exit 2) that are not about the input: an MLflow store that
# does not answer (neu_model.tracking.connect) may answer a minute later.
TRANSIENT_MARKERS = ("does not answer",)

# DVC's advice after each stage (git add ..., dvc push ...): noise in a flow's log.
DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
             "Use `dvc push`")

log = logging.getLogger("neu_model.orchestrate")
Log = Callable[[str], None]


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message names it and its last lines."""

    def __init__(self, stage: str, exit_code: int | None, tail: Sequence[str]):
        self.stage, self.exit_code = stage, exit_code
        # The stage's own one-line "error: ..." is the useful part; keep the last few lines.
        lines = "\n".join(tail[-8:])
        how = "timed out" if exit_code is None else f"exited with {exit_code}"
        super().__init__(f"stage '{stage}' failed ({how}):\n{lines}")


def is_transient(exc: BaseException) -> bool:
    """Whether a second attempt may succeed where ``exc`` was raised.

    Bad input fails the same way again: a stage's own exit 2, or a StageError or ConfigError
    raised in this process (an unknown registry alias, an unreadable image). An unreachable
    MLflow store is reported the same way but may pass. Anything else (a crash, a timeout, a
    registry server hiccup) may pass too.
    """
    bad_input = exc.exit_code == 2 if isinstance(exc, StageFailed) else isinstance(exc, (StageError, ConfigError))
    return not bad_input or any(m in str(exc) for m in TRANSIENT_MARKERS)


def stage_env(project: Path, data_source: str | None = None) -> dict[str, str]:
    """The environment for stage subprocesses.

    The running interpreter's bin folder goes first on PATH because dvc runs each stage's
    ``python`` from PATH; NEU_PROGRESS=0 keeps progress bars out of captured logs.
    """
    env = dict(os.environ) | TELEMETRY_OFF | {"NEU_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(project))  # as the Makefile
    if data_source:
        env[DATA_SOURCE_ENV] = data_source
    return env


def run_logged(cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout: float | None,
               log_line: Log, name: str) -> list[str]:
    """Run ``cmd``, passing each output line to ``log_line`` as it comes; return all lines.

    On timeout the whole process group is killed: killing only ``dvc`` would leave the
    stage's python running and holding DVC's lock.

    Raises:
        StageFailed: non-zero exit or timeout, named ``name``.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.daemon = True
        timer.start()
    lines: list[str] = []
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                log_line(line)
        code = proc.wait()
    finally:
        if timer:
            timer.cancel()
        proc.stdout.close()
    if timed_out.is_set():
        raise StageFailed(name, None, [*lines, f"killed after {timeout:g}s"])
    if code != 0:
        # dvc reports "failed to run: <cmd>, exited with N": N is the stage's own exit code.
        stage_code = next((int(ln.rsplit("exited with", 1)[1].strip(" .")) for ln in reversed(lines)
                           if "exited with" in ln and ln.rsplit("exited with", 1)[1].strip(" .").isdigit()), code)
        raise StageFailed(name, stage_code, lines)
    return lines


def repro(stage: str, project: Path, env: dict[str, str], timeout: float | None, log_line: Log) -> bool:
    """``dvc repro --single-item <stage>``; returns whether DVC ran it (False: unchanged, skipped).

    ``--single-item`` because the flow runs the upstream stages as tasks of their own.
    """
    dvc = str(Path(sys.executable).parent / "dvc")

    def useful(line: str) -> None:
        if not line.strip().startswith(DVC_HINTS):
            log_line(line)

    lines = run_logged([dvc, "repro", "--single-item", stage], project, env, timeout, useful, stage)
    return any(f"Running stage '{stage}'" in ln for ln in lines)


def repro_source(project: Path, env: dict[str, str], timeout: float | None, log_line: Log) -> bool:
    """The source stage through ``repro``; returns whether it changed data/source.json (new data).

    DVC runs this stage every time (``always_changed``), so whether it ran says nothing: the
    file's bytes before and after do.
    """
    out = Path(project) / SOURCE_RECORD
    before = out.read_bytes() if out.exists() else None
    repro("source", project, env, timeout, log_line)
    return (out.read_bytes() if out.exists() else None) != before


# ---------------------------------------------------------------- per-run params

def _dump_round_trip(text: str, values: dict) -> str:
    """``text`` (a params.yaml) with leaf values from ``values`` written in, comments kept.

    ruamel's round-trip mode is what ``dvc exp run -S`` uses to edit params.yaml.
    """
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096  # no re-quoting, no wrapping of the long source URL
    doc = rt.load(text)

    def merge(node, new) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            elif node.get(key) != value:
                node[key] = value

    merge(doc, values)
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def apply_params(project: Path, overrides: Sequence[str]) -> list[str]:
    """Write this run's ``key=value`` overrides into params.yaml, undoing the previous run's.

    The overrides go into params.yaml, as ``dvc exp run -S`` puts them, so that the stages
    read them, dvc.lock records them and ``dvc status`` is clean after the run. The file as
    it was before is remembered in PARAMS_RECORD; the next run starts from it again unless
    someone has edited params.yaml since, so an override lasts one run, not forever.

    Returns:
        The overrides that changed params.yaml (empty when the file was left as it is).

    Raises:
        ConfigError: an unknown key or a value the config rejects; params.yaml is untouched.
    """
    params, record = Path(project) / "params.yaml", Path(project) / PARAMS_RECORD
    current = params.read_text()
    base = current
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("applied") == current:  # nobody edited it since the last run
            base = saved["base"]
    raw = apply_overrides(yaml.safe_load(base), overrides)
    from_dict(raw)  # validate before writing anything
    text = _dump_round_trip(base, raw) if overrides else base
    if text != current:
        params.write_text(text)
    if text != base:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"base": base, "applied": text}))
    else:
        record.unlink(missing_ok=True)
    old = yaml.safe_load(current)
    return [o for o in overrides if _get(old, o.partition("=")[0]) != _get(raw, o.partition("=")[0])]


def _get(raw: dict, key: str):
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


# ---------------------------------------------------------------- what a run left behind

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_summary(project: Path) -> dict:
    """What the workspace's reports say now: data version, model, metrics, MLflow run, registry.

    Returns:
        ``dataset_version``, ``data_source``, ``metrics`` (reports/metrics.json), ``train``
        (reports/train_metrics.json), ``run`` (reports/run.json: the MLflow run) and
        ``registration`` (reports/registration.json: the registry decision); missing files
        give empty dicts.
    """
    project = Path(project)
    return {
        "dataset_version": provenance.dataset_version(project / "data" / "raw" / "manifest.csv"),
        "data_source": _read_json(project / SOURCE_RECORD).get("source", "unknown"),
        "metrics": _read_json(project / "reports" / "metrics.json"),
        "train": _read_json(project / "reports" / "train_metrics.json"),
        "run": _read_json(project / "reports" / "run.json"),
        "registration": _read_json(project / "reports" / "registration.json"),
    }


def mlflow_run_link(run: dict, ui: str) -> str | None:
    """A link to the MLflow run in ``ui`` (the MLflow UI's base URL), or None without a run id."""
    run_id = run.get("run_id")
    if not run_id:
        return None
    experiment = run.get("experiment_id")
    if experiment is None:
        try:  # run.json may carry only the run id: ask the tracking store for the experiment
            import mlflow

            experiment = mlflow.get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link is a convenience; the summary must not fail
            return f"{ui.rstrip('/')}/#/runs/{run_id}"
    return f"{ui.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


__all__ = ["STAGES", "SOURCE_RECORD", "StageFailed", "ConfigError", "is_transient", "stage_env", "run_logged",
           "repro", "repro_source", "apply_params", "run_summary", "mlflow_run_link"]
