"""One run at a time per workspace: a lock held for the whole run by every entry that changes it.

    python -m neu_model.ops.workspace_lock run [--wait [SECONDS]] [--root DIR] -- dvc repro
    python -m neu_model.ops.workspace_lock status [--root DIR]

The lock is ``fcntl.flock`` on ``.dvc/tmp/neu-workspace.lock``: the kernel releases it when
its holder dies, even by SIGKILL, so it cannot go stale. The file names the holder (pid,
start time, command line) for the message a second run gets; a record left by a holder that
died is taken over with a note. ``run`` holds the lock while its command runs, passes the
lock on to the command (so it stays held while the command runs even if ``run`` itself is
killed, and a flow under ``run`` that takes the lock again just continues), forwards
SIGINT/SIGTERM/SIGHUP to the command's process group and exits with the command's code
(75, "try again later", when the workspace is busy).

On taking the lock, DVC's own ``.dvc/tmp/rwlock`` is cleared when every process it names is
gone (or the file is unreadable): a ``dvc repro`` killed at the wrong moment leaves it behind,
and after a reboot its pids may belong to other processes, which DVC takes for live holders.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from neu_model.core.files import process_alive
from neu_model.core.paths import LOCK_FILE
from neu_model.core.redact import redact_url
from neu_model.core.stage import StageError
from neu_model.ops.dvc_rwlock import clear_stale_dvc_rwlock

log = logging.getLogger("neu_model.ops.workspace_lock")

FD_ENV = "NEU_WORKSPACE_LOCK_FD"  # the lock's file descriptor, passed on to ``run``'s command
POLL = 0.2  # seconds between tries while waiting
EXIT_BUSY = 75  # sysexits EX_TEMPFAIL: the workspace is busy, try again later
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
Note = Callable[[str], None]


class WorkspaceBusy(StageError):
    """Another run holds the workspace lock; the message names it."""


class NotStarted(StageError):
    """``run``'s command could not be started (no such program, not executable)."""


@dataclass
class Holder:
    """Who holds the lock, as written into the lock file."""

    pid: int
    started: str  # ISO 8601 with the UTC offset
    command: str
    host: str
    child: int | None = None  # the pid of ``run``'s command

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        command = self.command if len(self.command) <= 300 else self.command[:297] + "..."
        text = f"pid {self.pid}{where} (started {self.started}: {command})"
        if self.child and not process_alive(self.pid) and where == "":
            text += f", which is gone, but its command still runs as pid {self.child}"
        return text


@dataclass
class HeldLock:
    """The held lock: its file, descriptor and the record in it."""

    path: Path
    fd: int
    holder: Holder

    def record_child(self, pid: int) -> None:
        self.holder.child = pid
        _write(self.fd, self.holder)


def _read(fd: int) -> Holder | None:
    try:
        return Holder(**json.loads(os.pread(fd, 65536, 0)))
    except (ValueError, TypeError):  # empty (released, or being written) or not ours
        return None


def _write(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)


def lock_path(root: Path | str) -> Path:
    """The lock file of the workspace ``root``.

    Raises:
        StageError: ``root`` is no DVC workspace.
    """
    root = Path(root)
    if not (root / ".dvc").is_dir():
        raise StageError(f"{root.resolve()}: not a DVC workspace (no .dvc folder); run from the project root "
                         f"or pass --root")
    return root / LOCK_FILE


def _inherited(path: Path) -> HeldLock | None:
    """The lock passed on by ``run`` to this process, if ``FD_ENV`` names an open copy of it."""
    try:
        fd = int(os.environ.get(FD_ENV, ""))
        same = os.path.samestat(os.fstat(fd), os.stat(path))
        if same:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op that proves it
    except (ValueError, OSError):
        return None
    return HeldLock(path, fd, _read(fd) or Holder(os.getpid(), "", "", socket.gethostname())) if same else None


def _open_locked(path: Path, wait: float, note: Note) -> int:
    """Open ``path`` and flock it, waiting up to ``wait`` seconds; returns the descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline, waiting = time.monotonic() + wait, False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
            os.close(fd)  # the file was removed and made anew while we waited: lock the new one
            continue
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
        except FileNotFoundError:
            os.close(fd)
            continue
        who = holder.describe() if holder else "another process (no details written yet)"
        if time.monotonic() >= deadline:
            retry = "wait for it to finish, or rerun with --wait" if wait == 0 else f"gave up after {wait:g}s"
            raise WorkspaceBusy(f"{path}: the workspace is in use by {who}; {retry}")
        if not waiting:
            note(f"{path}: waiting for {who} to finish")
            waiting = True
        time.sleep(min(POLL, max(deadline - time.monotonic(), 0.0)))


@contextlib.contextmanager
def workspace_lock(root: Path | str = ".", *, wait: float = 0, command: str | None = None,
                   note: Note = log.warning) -> Iterator[HeldLock]:
    """Hold the workspace lock of ``root`` for the ``with`` block.

    Args:
        root: the workspace (the folder holding ``.dvc``).
        wait: seconds to wait for a busy lock (0: refuse at once; ``math.inf``: forever).
        command: how the record names this run (default: this process's command line);
            credentials in it are redacted.
        note: receives the one-line notes (waiting, a stale lock taken over, a DVC lock cleared).

    Raises:
        WorkspaceBusy: another run holds the lock (after ``wait`` seconds).
    """
    path = lock_path(root)
    inherited = _inherited(path)
    if inherited:
        yield inherited
        return
    fd = _open_locked(path, wait, note)
    try:
        previous = _read(fd)
        if previous:
            note(f"{path}: took over the lock of {previous.describe()}, which ended without releasing it")
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        # One line: the record goes into one-line messages.
        shown = redact_url(command or shlex.join(sys.orig_argv)).replace("\n", "\\n")
        held = HeldLock(path, fd, Holder(os.getpid(), started, shown, socket.gethostname()))
        _write(fd, held.holder)
        clear_stale_dvc_rwlock(path.parent, note)
        yield held
    finally:
        os.ftruncate(fd, 0)  # released alive (even by an exception): nothing for the next holder to take over
        os.close(fd)


# ---------------------------------------------------------------- the command line

def run(cmd: Sequence[str], root: Path | str = ".", wait: float = 0, note: Note = log.warning) -> int:
    """Run ``cmd`` holding the workspace lock; returns its exit code (128 + N for signal N).

    Raises:
        WorkspaceBusy: the workspace stayed busy for ``wait`` seconds.
        NotStarted: ``cmd`` cannot be started.
    """
    with workspace_lock(root, wait=wait, command=shlex.join(cmd), note=note) as held:
        child: list[subprocess.Popen] = []
        early: list[int] = []

        def forward(signum, _frame) -> None:
            if child:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child[0].pid, signum)
            else:
                early.append(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            try:
                # Its own process group, so that a signal reaches everything it started; the
                # lock's descriptor goes with it, so the lock lasts as long as the command.
                child.append(subprocess.Popen(list(cmd), env={**os.environ, FD_ENV: str(held.fd)},
                                              pass_fds=(held.fd,), process_group=0))
            except OSError as exc:
                raise NotStarted(f"{cmd[0]}: cannot be started ({exc.strerror}); check the command") from None
            held.record_child(child[0].pid)
            for signum in early:
                os.killpg(child[0].pid, signum)
            code = child[0].wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def status(root: Path | str = ".") -> str:
    """A line saying who holds the workspace lock, or that it is free (read from its record:
    taking the lock to test it could turn away a run starting at that moment)."""
    path = lock_path(root)
    try:
        holder = Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return f"{path}: free"
    if process_alive(holder.pid) or (holder.child and process_alive(holder.child)):
        return f"{path}: held by {holder.describe()}"
    return f"{path}: free (its last holder, {holder.describe()}, ended without releasing it)"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "status"])
    parser.add_argument("--root", default=".", help="the workspace (default: the current folder)")
    parser.add_argument("--wait", nargs="?", type=float, const=math.inf, default=0.0, metavar="SECONDS",
                        help="wait for a busy workspace (forever, or at most SECONDS) instead of refusing")
    parser.epilog = "run: the command follows --, e.g. run --wait -- dvc repro"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the command, options included (argparse would take them).
    split = argv.index("--") if "--" in argv else len(argv)
    args, cmd = get_args_parser().parse_args(argv[:split]), argv[split + 1:]

    def note(message: str) -> None:
        print(f"workspace lock: {message}", file=sys.stderr, flush=True)

    try:
        if args.action == "status":
            print(status(args.root))
            return 0
        if not cmd:
            raise StageError("run: no command given; usage: python -m neu_model.ops.workspace_lock run -- CMD ...")
        return run(cmd, args.root, args.wait, note)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY if isinstance(exc, WorkspaceBusy) else 127 if isinstance(exc, NotStarted) else 2
    except KeyboardInterrupt:
        print("interrupted while waiting for the workspace lock", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
