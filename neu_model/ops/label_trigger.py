"""When a commit of labels should start a training run: enough new labelled images within a window.

``neu-review commit`` emits the Prefect event ``neu.labels.committed`` (payload: the commit's
count and the labels' data version). The retraining deployment of ``make serve`` has, beside its
weekly cron, a trigger on that event (``flows.training``); the run it starts first asks
``new_labels`` whether there is enough to learn from: the labelled images of ``data.labels``
that are not yet in the training data (``data/raw/manifest.csv``), not labelled ``unknown``,
and labelled within the last ``retrain.within_hours``. Prefect's own event threshold counts
events, not the images they carry, so the count is taken here, from the folder itself; fewer than
``retrain.min_new_labels`` and the run ends at once, saying so (the weekly run trains on them).
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from neu_model.core.config import load_config
from neu_model.core.paths import MANIFEST, PARAMS_FILE
from neu_model.data.labels import LABELS_EVENT, LABELS_MANIFEST, UNKNOWN_LABEL, labels_version

__all__ = ["LABELS_EVENT", "NewLabels", "new_labels"]


@dataclass(frozen=True)
class NewLabels:
    """What the labels folder holds that the training data does not."""

    new: int  # labelled images not in the training data, labelled within the window
    older: int  # ... labelled before the window (the weekly run takes them)
    needed: int  # retrain.min_new_labels
    within_hours: float
    version: str | None  # the labels' data version

    @property
    def enough(self) -> bool:
        return self.new >= self.needed

    def describe(self) -> str:
        verdict = "enough to retrain" if self.enough else "not enough yet: the weekly run will take them"
        return (f"{self.new} labelled images of labels version {self.version or 'none'} are new to the training data "
                f"within the last {self.within_hours:g} h ({self.older} older), {self.needed} needed: {verdict}")


def new_labels(root: Path, now: dt.datetime | None = None) -> NewLabels:
    """Count the labelled images of the workspace ``root`` not yet in its training data."""
    cfg = load_config(Path(root) / PARAMS_FILE)
    folder = Path(root) / (cfg.data.labels or "labels")
    in_data = _column(Path(root) / MANIFEST, "sha256")
    since = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(hours=cfg.retrain.within_hours)
    new = older = 0
    for row in _rows(folder / LABELS_MANIFEST):
        if row["label"] == UNKNOWN_LABEL or row["sha256"] in in_data:
            continue
        if _when(row.get("time")) >= since:
            new += 1
        else:
            older += 1
    return NewLabels(new, older, cfg.retrain.min_new_labels, cfg.retrain.within_hours, labels_version(folder))


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _column(path: Path, name: str) -> set[str]:
    return {row[name] for row in _rows(path)}


def _when(text: str | None) -> dt.datetime:
    """A manifest row's time; a row without one counts as labelled now."""
    try:
        stamp = dt.datetime.fromisoformat(text or "")
    except ValueError:
        return dt.datetime.now(dt.timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)
