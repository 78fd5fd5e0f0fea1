"""Run the DVC stages from an orchestrator: the workspace lock, environment, ``dvc repro``, summary.

Nothing here imports Prefect: ``tasks/`` wraps these functions in thin Prefect tasks and
``flows/`` puts them in order. ``dvc.yaml`` stays the one definition of the stages; every
stage runs through ``dvc repro --single-item <stage>``, so ``dvc.lock`` stays true and DVC
alone decides what changed (an unchanged stage is skipped in about a second). A run holds the
workspace lock (``hold_workspace``) from its first stage to its last; per-run params live in
``neu_model.ops.run_params``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from neu_model.core import provenance
from neu_model.core.config import DATA_SOURCE_ENV, ConfigError
from neu_model.core.paths import DVC_FILE, ROOT, SOURCE_FILE
from neu_model.core.redact import redact_url
from neu_model.core.stage import TELEMETRY_OFF, StageError
from neu_model.core.store import default_tracking_uri
from neu_model.ops.workspace_lock import HeldLock, workspace_lock

# Seconds a stage has to end after SIGTERM (its MLflow run is closed) before SIGKILL.
STOP_GRACE = 15.0

# Messages of bad-input failures (exit 2) that are not about the input: an MLflow store that
# does not answer (neu_model.registry.tracking.connect) may answer a minute later.
TRANSIENT_MARKERS = ("does not answer",)

# DVC's advice after each stage (git add ..., dvc push ...): noise in a flow's log.
DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
             "Use `dvc push`")

log = logging.getLogger("neu_model.ops.orchestrate")
Log = Callable[[str], None]


@dataclass(frozen=True)
class PipelineStage:
    """One stage of ``dvc.yaml``, as an orchestrator needs it.

    Attributes:
        always_changed: DVC runs it on every ``dvc repro`` (a fingerprint of something outside the
            repository); whether it "ran" is then whether its first output changed.
        record: that output (relative to the project), None for other stages.
    """

    name: str
    always_changed: bool = False
    record: Path | None = None


def pipeline_stages(project: Path | str = ROOT) -> list[PipelineStage]:
    """The stages of ``project``'s ``dvc.yaml``, in its order: the one list of the pipeline."""
    import yaml

    stages = yaml.safe_load((Path(project) / DVC_FILE.name).read_text())["stages"]
    found = []
    for name, spec in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec.get("outs", [])]
        always = bool(spec.get("always_changed", False))
        found.append(PipelineStage(name, always, Path(outs[0]) if always and outs else None))
    return found


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


_held: list[HeldLock] = []  # the workspace lock this process holds (hold_workspace), innermost last


@contextlib.contextmanager
def hold_workspace(project: Path | str, wait: float = 0, note: Log = log.warning) -> Iterator[HeldLock]:
    """Hold the workspace lock of ``project`` (``neu_model.ops.workspace_lock``) for a run of stages.

    Under ``python -m neu_model.ops.workspace_lock run`` (``make retrain``) the lock passed on is
    used. Every stage started meanwhile gets the lock too, as ``run``'s command does: a stage
    that outlives this process (killed alone by SIGKILL) keeps the workspace locked, and named
    in the lock's record, until it ends.

    Raises:
        WorkspaceBusy: another run holds it (after ``wait`` seconds); the message names it.
    """
    with workspace_lock(project, wait=wait, note=note) as held:
        _held.append(held)
        try:
            yield held
        finally:
            _held.remove(held)


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """End ``proc``'s whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: Sequence[str], cwd: Path, env: dict[str, str], timeout: float | None,
               log_line: Log, name: str) -> list[str]:
    """Run ``cmd``, passing each output line to ``log_line`` as it comes; return all lines.

    ``cmd`` runs in a process group of its own. On timeout that whole group is killed, and on
    anything that ends this call early (SIGTERM from Prefect cancelling the run, Ctrl-C) it is
    stopped (``stop_group``): ending only ``dvc`` would leave the stage's python running and
    holding DVC's lock. Lines pass through ``redact_url``.

    Raises:
        StageFailed: non-zero exit or timeout, named ``name``.
    """
    held = _held[-1] if _held else None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True, pass_fds=(held.fd,) if held else ())
    previous_child = held.holder.child if held else None
    if held:
        held.record_child(proc.pid)
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
            line = redact_url(line.rstrip())
            if line:
                lines.append(line)
                log_line(line)
        code = proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        proc.stdout.close()
        if held:
            held.record_child(previous_child)
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


def repro_changed(stage: str, record: Path, project: Path, env: dict[str, str], timeout: float | None,
                  log_line: Log) -> bool:
    """A stage DVC runs every time (source, boxes) through ``repro``; returns whether it changed
    its output ``record`` (relative to ``project``)."""
    out = Path(project) / record
    before = out.read_bytes() if out.exists() else None
    repro(stage, project, env, timeout, log_line)
    return (out.read_bytes() if out.exists() else None) != before


# ---------------------------------------------------------------- what a run left behind

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_reports(project: Path) -> dict:
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
        "data_source": redact_url(str(_read_json(project / SOURCE_FILE).get("source", "unknown"))),
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


__all__ = ["PipelineStage", "pipeline_stages", "SOURCE_FILE", "StageFailed", "ConfigError", "is_transient",
           "hold_workspace", "stage_env",
           "stop_group", "run_logged", "repro", "repro_changed", "read_reports", "mlflow_run_link"]
