"""Crash-safe file output: everything is written to a temporary name, then renamed.

A killed run therefore leaves either the previous good file or the new complete one. The
temporary name carries the writer's pid (``.model.pt.<pid>.<random>.tmp``): the next write of
the same file removes what a writer that died left behind.

Tests kill writers exactly before and after these renames (``tests/pause_hooks``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from neu_model.core.stage import StageError

if TYPE_CHECKING:  # pandas is not imported here: the stages that write no table need not load it
    import pandas as pd

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it cannot be signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_writers_temporaries(path: Path) -> None:
    """Remove ``.<name>.<pid>.*.tmp`` beside ``path`` left by a writer that is gone (killed mid-write)."""
    own = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        match = own.fullmatch(leftover.name)
        if match and not process_alive(int(match.group(1))):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Raises:
        StageError: the disk is full (the temporary is removed; ``path`` keeps its old content).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; a finished output gets the usual permissions (0644 under umask 022)
    # so that an MLflow server or a colleague's account can read models and reports.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise StageError(f"{path}: the disk is full ({exc.strerror}); free disk space on "
                             f"{path.parent.resolve()} and rerun (the previous {path.name} is kept)") from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path | str, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv(frame: pd.DataFrame, path: Path | str) -> None:
    """Atomically write ``frame`` as CSV, without its index."""
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    write_text(path, buf.getvalue())


def torch_save(obj: Any, path: Path | str) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``.

    Serialised in memory first and written by Python, so that a full disk is an ``OSError``
    (ENOSPC) that atomic_path names, not torch's "file write failed".
    """
    import torch

    with atomic_path(path) as tmp:
        buf = io.BytesIO()
        torch.save(obj, buf)
        tmp.write_bytes(buf.getbuffer())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` onto ``target``; ``new`` is gone afterwards.

    On Linux the two folders are exchanged in one step, so ``target`` is at every instant the
    old or the new complete folder. Elsewhere the old folder is first renamed aside
    (``.<target>.old``): a kill between the two renames leaves it there, complete.
    """
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        if _exchange(Path(new), target):
            shutil.rmtree(new)  # the old folder, now under the new one's name
            return
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
