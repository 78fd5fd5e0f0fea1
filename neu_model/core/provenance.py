"""Where a model came from: git commit and dataset version."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from neu_model.core.paths import ROOT

UNKNOWN = "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha() -> str:
    """The commit the code was run from, or ``unknown`` outside a git checkout."""
    return _git("rev-parse", "HEAD") or UNKNOWN


def git_dirty() -> bool:
    """Whether tracked files differ from the commit."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return bool(status)


def dataset_version(manifest: Path) -> str:
    """The dataset version: the first 12 hex digits of the manifest's sha256; ``unknown`` without one.

    Args:
        manifest: the download stage's ``manifest.csv`` (``neu_model.data.dataset.MANIFEST`` in the
            repository).
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        return UNKNOWN
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
