"""Prediction CSVs for the review tests, written in neu-predict's format over copies of the real
fixture images (copied first, so that every image is older than its CSV, as after a real run)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from neu_model.core.config import CLASSES
from neu_model.inference.tiles import CSV_COLUMNS, LOCATE_COLUMN

from conftest import FIXTURE_IMAGES


def copy_images(folder: Path, names: list[str] | None = None) -> list[Path]:
    """Fixture images (all, or ``names`` without suffix) copied into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [FIXTURE_IMAGES / f"{n}.bmp" for n in names] if names else sorted(FIXTURE_IMAGES.glob("*.bmp"))
    return [Path(shutil.copy(src, folder / src.name)) for src in sources]


def strip(path: Path, names: tuple[str, ...] = ("Cr_1", "In_1", "Pa_1", "PS_1", "RS_1", "Sc_1")) -> Path:
    """A 600x400 strip of six fixture images, three a row: six tiles at x 0/200/400, y 0/200."""
    tiles = [np.asarray(Image.open(FIXTURE_IMAGES / f"{n}.bmp")) for n in names]
    Image.fromarray(np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])])).save(path)
    return path


def row(file: str, predicted: str, confidence: float, x: int = 0, y: int = 0, needs_review: bool | None = None,
        unknown: bool = False, boxes: list | None = None, error: str = "") -> dict:
    """One CSV row: ``confidence`` on ``predicted``, the rest spread evenly."""
    probs = {c: round((1 - confidence) / (len(CLASSES) - 1), 6) for c in CLASSES}
    probs[predicted] = confidence
    flagged = (confidence < 0.6 or unknown) if needs_review is None else needs_review
    return {"file": file, "x": x, "y": y, "predicted": predicted, "confidence": confidence, "needs_review": flagged,
            **{f"p_{c}": p for c, p in probs.items()}, "unknown_score": 5.0 if unknown else 1.0,
            "unknown": unknown, "error": error, **({LOCATE_COLUMN: boxes} if boxes is not None else {})}


def write_predictions(path: Path, rows: list[dict], model: str | None = None) -> Path:
    """A neu-predict CSV of ``rows`` (with a ``boxes`` column when a row has one), and its sidecar."""
    columns = [*CSV_COLUMNS, *([LOCATE_COLUMN] if any(LOCATE_COLUMN in r for r in rows) else [])]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
    if model is not None:
        Path(f"{path}.model.json").write_text(f'{{"model": "{model}", "runtime": "torch"}}\n')
    return path


def flagged_folder(root: Path, model: str | None = "models:/neu-defect-classifier/3") -> Path:
    """``root/pred.csv`` over ``root/img``: the 30 fixture images, the first 12 flagged (confidence
    0.30 to 0.52, the 5th also unknown), the rest confident (0.90)."""
    images = copy_images(root / "img")
    rows = []
    for i, image in enumerate(images):
        confidence = 0.30 + 0.02 * i if i < 12 else 0.90
        rows.append(row(f"img/{image.name}", image.name[:2], round(confidence, 2), unknown=i == 4))
    return write_predictions(root / "pred.csv", rows, model)
