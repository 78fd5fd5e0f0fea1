"""Clear DVC's run lock ``.dvc/tmp/rwlock`` when every process it names is gone.

``dvc repro`` records in that JSON file which paths each dvc process reads and writes
(``{"read": {path: [{"pid", "cmd"}]}, "write": {path: {"pid", "cmd"}}}``) and takes the
entries out again when it ends. A dvc killed at the wrong moment leaves its entries behind,
or a half-written file that every later dvc command refuses to read; after a reboot the pids
in it may belong to other processes, which DVC takes for live holders and waits on. The
workspace lock (``neu_model.ops.workspace_lock``) calls this once it holds the workspace.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("neu_model.ops.workspace_lock")
HARDLINK_LOCK = re.compile(r"hardlink_lock\s*=\s*true", re.IGNORECASE)  # in .dvc/config: not a flock guard


def _rwlock_holders(lock: dict) -> dict[int, str]:
    """{pid: command} of every entry of a DVC rwlock ({"read": {path: [info]}, "write": {path: info}})."""
    infos = [i for entries in lock.get("read", {}).values() for i in entries] + list(lock.get("write", {}).values())
    return {int(i["pid"]): str(i.get("cmd", "")) for i in infos}


def _running_since_before(pid: int, moment: float) -> bool:
    """Whether ``pid`` is a live process that was already running at ``moment`` (epoch seconds).

    A process started after the rwlock was last written cannot have written it: the pid was
    reused (after a reboot, typically).
    """
    import psutil  # a dependency of DVC

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= moment + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def clear_stale_dvc_rwlock(tmp_dir: Path, note: Callable[[str], None] = log.warning) -> bool:
    """Remove DVC's ``rwlock`` in ``tmp_dir`` when no process it names runs any more.

    Never while one of them runs, nor while a dvc process edits the file (its guard
    ``rwlock.lock`` is flocked, as DVC's zc.lockfile does), nor with ``core.hardlink_lock``
    (then DVC guards it differently).

    Returns:
        Whether the file was removed.
    """
    path, config = tmp_dir / "rwlock", tmp_dir.parent / "config"
    if not path.exists() or (config.exists() and HARDLINK_LOCK.search(config.read_text())):
        return False
    guard = os.open(tmp_dir / "rwlock.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            holders = _rwlock_holders(json.loads(path.read_text() or "{}"))
        except (ValueError, TypeError, KeyError, AttributeError):
            path.unlink()
            note(f"removed unreadable DVC lock {path} (a dvc process was killed while writing it)")
            return True
        written = path.stat().st_mtime
        if not holders or any(_running_since_before(pid, written) for pid in holders):
            return False
        path.unlink()
        gone = ", ".join(f"{pid} ({cmd})" for pid, cmd in sorted(holders.items()))
        note(f"removed stale DVC lock of dead process {gone}: {path}")
        return True
    finally:
        os.close(guard)
