"""After ``neu-review commit`` wrote ``labels/``: version it with DVC and git, announce it to Prefect.

``dvc add labels`` records the folder's content hash in ``labels.dvc``; git then commits that
file alone (``git commit -- labels.dvc``: whatever else is staged in the workspace stays
staged), and ``dvc push labels.dvc`` uploads the images when a DVC remote is configured. The
commands run as subprocesses in the workspace, DVC from this interpreter (``python -m dvc``).

The Prefect event ``neu.labels.committed`` lets a deployment retrain on new labels
(``emit_event``). Without ``PREFECT_API_URL`` Prefect's ``emit_event`` would start a temporary
local API of its own and the event would reach no deployment, so it is not called: the summary
says so instead. Events are sent by a background worker in batches; ``announce`` drains it
before returning, so the process does not exit with the event still queued, and reports a
failure to deliver it.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from neu_model.core.stage import StageError
from neu_model.data.labels import LABELS_EVENT

EVENT = LABELS_EVENT
NO_API = "no PREFECT_API_URL: no event sent; retraining waits for its schedule"
DRAIN_SECONDS = 60.0  # the events client retries a refused connection for about 10 s


def run(args: list[str], cwd: Path, fix: str) -> str:
    """Run a command in ``cwd``; its stdout.

    Raises:
        StageError: it failed; names the command, its last error line and ``fix``.
    """
    shown = shlex.join(["dvc", *args[3:]] if args[:3] == [sys.executable, "-m", "dvc"] else args)
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StageError(f"{cwd}: `{shown}` did not run ({exc}); {fix}") from None
    if done.returncode:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise StageError(f"{cwd}: `{shown}` failed ({lines[-1] if lines else f'exit {done.returncode}'}); {fix}")
    return done.stdout


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def check_workspace(workspace: Path, labels: Path) -> None:
    """Refuse before writing anything when git or DVC could not version ``labels``.

    Raises:
        StageError: no git or DVC repository, or ``labels`` outside the workspace.
    """
    if not (workspace / ".git").exists() or not (workspace / ".dvc").is_dir():
        raise StageError(f"{workspace}: not a git repository with DVC (no .git or .dvc); run neu-review commit in "
                         "the project's checkout (or pass --workspace), `dvc init` there, or pass --no-git")
    try:
        labels.resolve().relative_to(workspace.resolve())
    except ValueError:
        raise StageError(f"{labels}: outside the workspace {workspace}; DVC versions folders inside it: pass "
                         "--labels labels, or --no-git") from None


def version_folder(workspace: Path, labels: Path, message: str) -> tuple[str, list[str]]:
    """``dvc add``, a git commit of the ``.dvc`` file alone, ``dvc push`` when there is a remote.

    Returns:
        The new commit's short sha, and notes (pushed or not; a .gitignore that dvc changed).
    """
    relative = labels.resolve().relative_to(workspace.resolve())
    dvc_file = str(relative.with_name(relative.name + ".dvc"))
    ignore_before = gitignore_state(workspace)
    run(dvc("add", str(relative)), workspace, "check the folder and the DVC cache, then rerun")
    run(["git", "add", "--", dvc_file], workspace, "check the git repository")
    run(["git", "commit", "-q", "-m", message, "--", dvc_file], workspace,
        "set git config user.name and user.email, or fix the commit hook, then rerun")
    sha = run(["git", "rev-parse", "--short", "HEAD"], workspace, "check the git repository").strip()
    notes = []
    if gitignore_state(workspace) != ignore_before:
        notes.append(f"dvc add changed .gitignore (it now ignores /{relative}); commit .gitignore")
    if run(dvc("remote", "list"), workspace, "check .dvc/config").strip():
        run(dvc("push", dvc_file), workspace, f"the commit is made; push the images with `dvc push {dvc_file}` "
                                              "when the remote answers")
        notes.append(f"pushed {relative} to the DVC remote")
    else:
        notes.append(f"no DVC remote: {relative} is in this workspace's DVC cache only (dvc remote add -d NAME URL, "
                     f"then dvc push {dvc_file})")
    return sha, notes


def gitignore_state(workspace: Path) -> bytes | None:
    path = workspace / ".gitignore"
    return path.read_bytes() if path.is_file() else None


class _Failures(logging.Handler):
    """Collects what Prefect's events worker reports as failing (it logs, it does not raise)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def announce(workspace: Path, payload: dict) -> str:
    """Send ``neu.labels.committed`` for ``workspace`` to the Prefect API; "sent" or why not."""
    # The workspace's prefect.toml is read from the working folder, as the flows read it.
    with contextlib.chdir(workspace):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print(NO_API, file=sys.stderr)
            return "not sent (no PREFECT_API_URL)"
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        failures = _Failures()
        watched = [logging.getLogger(name) for name in ("prefect._internal.concurrency", "prefect.events.clients")]
        for logger in watched:
            logger.addHandler(failures)
        try:
            event = emit_event(event=EVENT, resource={"prefect.resource.id": f"neu.labels.{workspace.resolve().name}"},
                               payload=payload)
            _, pending = EventsWorker.drain_all(timeout=DRAIN_SECONDS)
        finally:
            for logger in watched:
                logger.removeHandler(failures)
    if event is None or pending or failures.messages:
        first = failures.messages[0] if failures.messages else "the events worker did not finish"
        why = first.partition("Reason: ")[2].partition(". Set PREFECT")[0] or first
        print(f"event {EVENT} not delivered to {PREFECT_API_URL.value()} ({why}); retraining waits for its "
              "schedule", file=sys.stderr)
        return "not sent (Prefect API did not take it)"
    return "sent"
