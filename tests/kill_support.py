"""Real processes to kill at chosen moments: output watched line by line, the whole tree killed.

A moment is chosen by a line the process prints (``NEU_PAUSE_AT=<point>`` with
``tests/pause_hooks`` on PYTHONPATH makes a stage print ``NEU_PAUSE_AT reached: <point>`` and
wait there, see ``pause_hooks/sitecustomize.py``) or by a file the test polls for, never by a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import psutil

from conftest import FIXTURE_IMAGES

PAUSE_ENV = "NEU_PAUSE_AT"
PAUSE_HOOKS = Path(__file__).parent / "pause_hooks"  # its sitecustomize.py installs the pause points
TIMEOUT = 600  # seconds to wait for a moment: generous, a loaded 2-core machine is slow


def project_env(project: Path, source: Path = FIXTURE_IMAGES, **extra: str) -> dict[str, str]:
    """The environment of a stage in ``project``: the venv first on PATH, the project's code and MLflow store."""
    return os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                         "PYTHONPATH": str(project), "NEU_DATA_SOURCE": str(source), "NEU_PROGRESS": "0",
                         "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db", "PYTHONUNBUFFERED": "1"} | extra


class Watched:
    """A command in its own session whose merged output is collected line by line as it comes."""

    def __init__(self, cmd: Sequence[str], cwd: Path, env: dict[str, str], pause_at: str | None = None):
        if pause_at:
            path = os.pathsep.join(p for p in (str(PAUSE_HOOKS), env.get("PYTHONPATH", "")) if p)
            env = env | {PAUSE_ENV: pause_at, "PYTHONPATH": path}
        self.cmd = list(cmd)
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self.done = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip())
                self._changed.notify_all()
        with self._changed:
            self.done = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first output line containing ``text``, once it has come.

        Raises:
            AssertionError: the process ended, or ``timeout`` passed, without that line.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((ln for ln in self.lines if text in ln), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    how = f"exited {self.proc.wait()}" if self.done else "timed out"
                    raise AssertionError(f"{self.cmd}: no line with {text!r} ({how}):\n" + "\n".join(self.lines[-30:]))
                self._changed.wait(left)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Poll ``condition`` until it holds while the process runs."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.cmd}: {what} did not happen (exit {self.proc.poll()}):\n"
                                     + "\n".join(self.lines[-30:]))
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its session and children that left it)."""
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=60)

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the process to end; returns its exit code (the output is complete then)."""
        code = self.proc.wait(timeout=timeout)
        with self._changed:
            self._changed.wait_for(lambda: self.done, timeout=60)
        return code


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``, every descendant and every process of its group; returns the pids killed."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return [p.pid for p in procs]


def run(cmd: Sequence[str], cwd: Path, env: dict[str, str], pause_at: str | None = None) -> Watched:
    """Run ``cmd`` to the end (or to its pause point, then kill it); returns the finished process."""
    proc = Watched(cmd, cwd, env, pause_at)
    if pause_at:
        proc.wait_for(f"{PAUSE_ENV} reached: {pause_at}")
        proc.kill()
    else:
        proc.finish()
    return proc


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ends(pid: int, timeout: float = 60) -> bool:
    """Whether ``pid`` is gone within ``timeout`` seconds (a killed process takes a moment to exit)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
