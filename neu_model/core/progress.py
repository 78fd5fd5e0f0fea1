"""Progress bars on a terminal, nothing otherwise (CI logs, Prefect logs, DVC in the background)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def show_bars() -> bool:
    """Bars only when stderr is a terminal and NEU_PROGRESS is not 0."""
    return sys.stderr.isatty() and os.environ.get("NEU_PROGRESS", "1") != "0"


def progress(items: Iterable[T], **kwargs) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when bars are wanted; the caller logs plain lines either way."""
    if not show_bars():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, leave=False, **kwargs)
