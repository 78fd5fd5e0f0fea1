"""The plant's labelled images: the folder ``neu-review commit`` writes and DVC tracks (``labels.dvc``).

Layout (``data.labels``, default ``labels/`` in the workspace): flat lossless 8-bit PNGs named
``<label>_<first 16 hex of the PNG's sha256>.png`` and ``manifest.csv`` with one row per image
(``LABELS_MANIFEST_COLUMNS``: where the tile came from, who labelled it, when, which audit-log
entry). ``label`` is a class code or ``unknown`` ("none of these"): unknown images are kept and
counted, never trained on, until a plant adds a class (docs/review.md). The data version of the
folder is the first 12 hex of its manifest's sha256 (``labels_version``).

The download stage merges these images with the source's (``read_labels``): each file's sha256
must match its manifest row, each must be a ``data.image_size`` square of 8-bit grayscale, and
an image labelled twice with different classes is an error naming both labels.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from neu_model.core.files import sha256_file
from neu_model.core.stage import StageError
from neu_model.data.checks import check_image

LABELS_MANIFEST = "manifest.csv"
LABELS_MANIFEST_COLUMNS = ("file", "label", "sha256", "origin", "x", "y", "reviewer", "time", "audit_id",
                           "model_version", "predicted", "confidence")
UNKNOWN_LABEL = "unknown"
# The Prefect event of a commit of labels: neu-review commit sends it, make serve's deployment triggers on it.
LABELS_EVENT = "neu.labels.committed"


def labels_version(folder: Path) -> str | None:
    """The folder's data version: the first 12 hex of its manifest's sha256; None without one."""
    manifest = Path(folder) / LABELS_MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else None


@dataclass(frozen=True)
class LabelledImage:
    """One checked image of the folder."""

    path: Path
    label: str
    sha256: str
    origin: str  # the tile's place in the plant's images: "<file>@<x>,<y>"


@dataclass(frozen=True)
class Labels:
    """What the folder holds: trainable images, and the count of ``unknown`` ones kept aside."""

    images: list[LabelledImage]
    unknown: int
    version: str | None


def read_labels(folder: Path, classes: tuple[str, ...], image_size: int) -> Labels:
    """Read and check the folder (module docstring); an absent folder is no labels.

    Raises:
        StageError: a missing or changed file, a bad image, a foreign label, or one image
            labelled with two classes; each names the file and the fix.
    """
    folder = Path(folder)
    manifest = folder / LABELS_MANIFEST
    if not folder.exists():
        return Labels([], 0, None)
    if not manifest.is_file():
        raise StageError(f"{manifest}: not found; restore the folder with `dvc checkout {folder}.dvc`")
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("file", "label", "sha256", "origin", "x", "y") if rows and c not in rows[0]]
    if missing:
        raise StageError(f"{manifest}: no column {', '.join(missing)}; write the folder with `neu-review commit`")
    images, unknown, seen = [], 0, {}
    for row in rows:
        path, label = folder / row["file"], row["label"]
        if label not in classes and label != UNKNOWN_LABEL:
            raise StageError(f"{path}: label {label!r} is neither a class of data.classes ({', '.join(classes)}) "
                             f"nor {UNKNOWN_LABEL!r}; correct its row in {manifest}")
        if not path.is_file():
            raise StageError(f"{path}: listed in {manifest} but missing; run `dvc checkout {folder}.dvc`")
        digest = sha256_file(path)
        if digest != row["sha256"]:
            raise StageError(f"{path}: sha256 {digest[:12]}... differs from its manifest row; the file changed "
                             f"after `neu-review commit`: run `dvc checkout {folder}.dvc`")
        origin = f"{row['origin']}@{row['x']},{row['y']}"
        if digest in seen and seen[digest].label != label:
            raise StageError(f"{path} ({label}) and {seen[digest].path} ({seen[digest].label}): the same image "
                             f"labelled {seen[digest].label} and {label}; keep one row in {manifest}")
        if digest in seen:
            continue  # the same image committed twice with the same label: one image
        seen[digest] = LabelledImage(path, label, digest, origin)
        if label == UNKNOWN_LABEL:
            unknown += 1
            continue
        check_image(path, str(path), image_size)
        images.append(seen[digest])
    return Labels(images, unknown, labels_version(folder))
