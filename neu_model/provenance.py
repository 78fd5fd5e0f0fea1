"""Where a model came from: git commit, dataset version, device."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from neu_model.config import ROOT
from neu_model.data import MANIFEST


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha() -> str:
    """The commit the code was run from, or ``unknown`` outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool:
    """Whether tracked files differ from the commit."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return bool(status)


def dataset_version(manifest: Path = MANIFEST) -> str:
    """The dataset version: the first 12 hex digits of the manifest's sha256."""
    return hashlib.sha256(Path(manifest).read_bytes()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, for resume keys and lineage."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
