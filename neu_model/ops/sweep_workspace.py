"""A workspace of its own for every sweep trial: a shared git clone of the project, never the project itself.

The project (the shared workspace) is only read: its commit, the diff of its tracked files
(``git diff HEAD``, with git's optional index refresh turned off), ``data/source.json`` and the
path of its DVC cache. Each trial then

1. clones the project with ``git clone --shared`` (objects borrowed, nothing copied), checks
   out that commit and applies that diff: the trial starts from the workspace as it is, as
   ``dvc exp run --temp`` would (untracked files are not included, as there);
2. points its DVC at the project's cache and checks out what ``dvc.lock`` names, so unchanged
   stages (download, and split for the same seed) are skipped and the data is not fetched again;
3. writes its overrides into its own params.yaml and runs the stages up to evaluate, train
   and evaluate forced, so every trial trains and is its own MLflow run. The register stage
   is never run: a sweep cannot move the registry's ``champion``.

``dvc exp run --temp`` is not used for this: before its run moves to ``.dvc/tmp/exps`` it
stashes the workspace, writes the overrides into the workspace's params.yaml, commits the data
dependencies there and resets it (``dvc.repo.experiments.queue.base._stash_exp``), which a
stage running in the workspace at that moment would see.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from neu_model.core import paths
from neu_model.core.stage import StageError
from neu_model.ops import orchestrate, run_params

# The stages a trial runs; register is left out on purpose (see the module docstring).
FORCED = ("train", "evaluate")  # run even when DVC finds them unchanged: every trial is a training
PATCH, SOURCE_COPY = "workspace.patch", "source.json"
Log = Callable[[str], None]


class TrialFailed(RuntimeError):
    """A trial's step failed. One plain message, so that it reaches the flow from a Dask worker intact:
    ``orchestrate.StageFailed`` takes three arguments, which pickling does not restore."""


@dataclass(frozen=True)
class Baseline:
    """What every trial starts from, captured once from the project (paths as strings: it travels to workers)."""

    project: str
    commit: str
    patch: str | None  # the diff of the tracked files against ``commit``; None when there is none
    source_record: str | None  # a copy of the project's data/source.json, when it has one
    cache_dir: str
    untracked: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _run(cmd: Sequence[str], cwd: Path | str, what: str, timeout: float = 600) -> str:
    env = os.environ | {"GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0"}  # read-only: no index refresh
    try:
        done = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageError(f"{cwd}: {what} failed ({exc})") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise StageError(f"{cwd}: {what} failed ({lines[-1]})")
    return done.stdout


def dvc_bin() -> str:
    """The ``dvc`` beside the running interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / "dvc")


def capture_baseline(project: Path | str, workdir: Path | str) -> Baseline:
    """Read what the trials start from out of ``project`` into ``workdir``; ``project`` is not changed.

    Raises:
        StageError: the project is not a git checkout with a commit, or DVC cannot name its cache.
    """
    project, workdir = Path(project).resolve(), Path(workdir).resolve()
    commit = _run(["git", "rev-parse", "--verify", "HEAD^{commit}"], project,
                  "git rev-parse HEAD (a sweep starts from a commit: commit the project first)").strip()
    workdir.mkdir(parents=True, exist_ok=True)
    diff = _run(["git", "diff", "--binary", "HEAD"], project, "git diff HEAD")
    patch = None
    if diff:
        patch = workdir / PATCH
        patch.write_text(diff)
    untracked = _run(["git", "ls-files", "--others", "--exclude-standard"], project, "git ls-files").split()
    source = project / paths.SOURCE_FILE
    copy = None
    if source.is_file():
        copy = workdir / SOURCE_COPY
        shutil.copy2(source, copy)
    cache = _run([dvc_bin(), "cache", "dir"], project, "dvc cache dir").strip()
    return Baseline(str(project), commit, str(patch) if patch else None, str(copy) if copy else None,
                    str((project / cache).resolve()), tuple(untracked))


def create(baseline: Baseline, dest: Path | str, log: Log) -> Path:
    """A clone of the baseline's project at ``dest``, in the baseline's state, sharing its DVC cache.

    Raises:
        StageError: ``dest`` exists already, or a git or DVC step failed (the message names it).
    """
    dest = Path(dest)
    if dest.exists():
        raise StageError(f"{dest}: a trial workspace is there already; remove it or choose another --workdir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["git", "clone", "--quiet", "--shared", "--no-checkout", baseline.project, str(dest)], dest.parent,
         "git clone --shared")
    _run(["git", "checkout", "--quiet", "--detach", baseline.commit], dest, "git checkout")
    if baseline.patch:
        _run(["git", "apply", "--binary", "--whitespace=nowarn", baseline.patch], dest,
             "applying the workspace's uncommitted changes")
    if baseline.source_record:
        # The source stage compares with the last fingerprint: the same one means no new download.
        target = dest / paths.SOURCE_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(baseline.source_record, target)
    _run([dvc_bin(), "cache", "dir", "--local", baseline.cache_dir], dest, "dvc cache dir --local")
    _run([dvc_bin(), "checkout", "--quiet", "--allow-missing"], dest, "dvc checkout", timeout=3600)
    log(f"trial workspace {dest}: commit {baseline.commit[:12]}"
        + (" with the workspace's uncommitted changes" if baseline.patch else ""))
    return dest


def run_stages(workspace: Path, overrides: Sequence[str], env: dict[str, str], timeouts: dict[str, float],
               log: Log, after_train: Callable[[], None] | None = None) -> list[str]:
    """Write ``overrides`` into the workspace's params.yaml and run the stages up to evaluate.

    ``after_train`` is called once the train stage has finished (its MLflow run exists then).

    Returns:
        The stages DVC ran (source always; download and split only when they changed).

    Raises:
        orchestrate.StageFailed: a stage failed; ConfigError: an override params.yaml rejects.
    """
    run_params.apply(workspace, overrides)
    ran = []
    for stage in trial_stages(workspace):
        if stage in FORCED:
            cmd = [dvc_bin(), "repro", "--single-item", "--force", stage]
            orchestrate.run_logged(cmd, workspace, env, timeouts.get(stage), _quiet(log), stage)
            ran.append(stage)
        elif orchestrate.repro(stage, workspace, env, timeouts.get(stage), log):
            ran.append(stage)
        if stage == "train" and after_train is not None:
            after_train()
    return ran


def trial_stages(workspace: Path) -> list[str]:
    """The stages of the workspace's ``dvc.yaml`` up to evaluate: a trial exports and registers nothing."""
    names = [stage.name for stage in orchestrate.pipeline_stages(workspace)]
    return names[: names.index("evaluate") + 1]


def _quiet(log: Log) -> Log:
    def useful(line: str) -> None:
        if not line.strip().startswith(orchestrate.DVC_HINTS):
            log(line)

    return useful


def remove(workspace: Path | str) -> None:
    """Delete a trial workspace (its data came from the shared cache; its results are in MLflow)."""
    shutil.rmtree(workspace, ignore_errors=True)
