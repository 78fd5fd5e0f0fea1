"""Real servers for the tests (``mlflow server``, ``mlflow models serve``, ``prefect server start``):
started in a session of their own with their output in a log file, waited for until they
answer, and stopped with everything they started."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from neu_model.ops.orchestrate import stop_group


@contextlib.contextmanager
def running_server(cmd: Sequence[str], url: str, log: Path, startup_seconds: float, *, cwd: Path | None = None,
                   env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` until the block ends; the block starts once ``url`` answers 200.

    Args:
        cmd: the server's command line.
        url: a health or ping URL of the server.
        log: the file that gets the server's output; its end is shown when the server fails.
        startup_seconds: how long the server may take to answer.
        cwd: the server's folder.
        env: the server's environment (default: this process's).

    Yields:
        The server's process; its process group is stopped afterwards, frozen (SIGSTOP) or not.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_answers(url, proc, log, startup_seconds)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen process would not act on SIGTERM
        stop_group(proc)


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    """Poll ``url`` until it answers 200; fail the test if ``proc`` exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{shlex.join(proc.args)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {seconds:g} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)
