"""The plant's labelled images as ``neu-review commit`` leaves them, made from the real fixture images;
the public set as its checksum list names it."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from neu_model.core.paths import ROOT
from neu_model.data.checks import read_checksums
from neu_model.data.labels import LABELS_MANIFEST_COLUMNS

from conftest import FIXTURE_IMAGES

TWELVE = [(c, n) for c in ("Cr", "In", "Pa", "PS", "RS", "Sc") for n in (1, 2)]  # two a class


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_labels(folder: Path, tiles: list[tuple[str, np.ndarray]], origin: str = "line/coil-7.png") -> Path:
    """A labels folder as ``neu-review commit`` leaves it: PNGs named by class and hash, a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, now = [], dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    for i, (label, pixels) in enumerate(tiles):
        data = png_bytes(pixels)
        digest = hashlib.sha256(data).hexdigest()
        name = f"{label}_{digest[:16]}.png"
        (folder / name).write_bytes(data)
        rows.append({"file": name, "label": label, "sha256": digest, "origin": origin, "x": 200 * i, "y": 0,
                     "reviewer": "alice", "time": now, "audit_id": i + 1,
                     "model_version": "models:/neu-defect-classifier/1", "predicted": "Cr", "confidence": 0.5})
    with open(folder / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, LABELS_MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def darker(label: str, n: int, factor: float = 0.8) -> np.ndarray:
    """A darker copy of a real fixture image: new bytes, the same defect."""
    pixels = np.asarray(Image.open(FIXTURE_IMAGES / f"{label}_{n}.bmp").convert("L"), dtype=np.float32)
    return (pixels * factor).astype(np.uint8)


CHECKSUMS = ROOT / "neu_model" / "data" / "NEU-CLS.sha256"


def public_manifest() -> pd.DataFrame:
    """The 1,800 public images as a manifest (file, label, sha256), from the checksum list in git."""
    sums = read_checksums(CHECKSUMS)
    return pd.DataFrame({"file": list(sums), "label": [n.split("_")[0] for n in sums], "sha256": list(sums.values())})
