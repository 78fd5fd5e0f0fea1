"""Reading the manifest and split, and holding the images in memory.

The whole set is 72 MB as uint8, so it is decoded once per stage and kept as one tensor
instead of being re-read from disk every epoch. A training set beyond ``train.memory_budget_mb``
is memory-mapped from one packed file instead (``neu_model.training.packed``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from neu_model.core.config import CLASSES
from neu_model.core.paths import IMAGE_DIR, MANIFEST, SPLIT_FILE
from neu_model.core.stage import StageError


@dataclass(frozen=True)
class ImageSet:
    """Images of one split held in memory.

    Attributes:
        files: file names, in row order.
        images: uint8 tensor of shape (N, 1, H, W), in memory or memory-mapped.
        labels: int64 class indices into ``CLASSES``.
    """

    files: tuple[str, ...]
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)

    def to(self, device: torch.device | str) -> ImageSet:
        """The set with its images and labels on ``device`` (itself when they are there already):
        a GPU then gathers its batches without a copy from the host."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def read_csv(path: Path, columns: Sequence[str], fix: str) -> pd.DataFrame:
    """Read a CSV that must have ``columns``; ``fix`` says which stage makes it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found; {fix}")
    frame = pd.read_csv(path, dtype=str)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise StageError(f"{path}: missing columns {missing}; {fix}")
    return frame


def read_manifest(path: Path = MANIFEST) -> pd.DataFrame:
    """The download stage's manifest: file, label, sha256, width, height."""
    return read_csv(path, ["file", "label", "sha256"], "run the download stage (dvc repro download)")


def read_split(path: Path = SPLIT_FILE) -> pd.DataFrame:
    """The split stage's table: file, label, split."""
    return read_csv(path, ["file", "label", "split"], "run the split stage (dvc repro split)")


def label_index(labels: Sequence[str]) -> torch.Tensor:
    """Class codes to indices in ``CLASSES`` order."""
    lookup = {c: i for i, c in enumerate(CLASSES)}
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise StageError(f"unknown class labels {unknown}; expected codes among {list(CLASSES)}")
    return torch.tensor([lookup[label] for label in labels], dtype=torch.int64)


def decode_gray(path: Path) -> np.ndarray:
    """Decode one image file to a uint8 (H, W) array."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot be decoded as an image ({exc}); replace or remove it") from None


def load_images(paths: Sequence[Path]) -> torch.Tensor:
    """Decode files into one uint8 tensor of shape (N, 1, H, W); all must share one size."""
    arrays = [decode_gray(Path(p)) for p in paths]
    if not arrays:
        return torch.empty((0, 1, 0, 0), dtype=torch.uint8)
    shape = arrays[0].shape
    for path, arr in zip(paths, arrays, strict=False):
        if arr.shape != shape:
            raise StageError(f"{path}: size {arr.shape[::-1]} differs from {shape[::-1]}; resize it or remove it")
    return torch.from_numpy(np.stack(arrays)[:, None])


def load_split(split: str, split_file: Path = SPLIT_FILE, image_dir: Path = IMAGE_DIR) -> ImageSet:
    """Load the images of one split (train, val or test) into memory."""
    table = read_split(split_file)
    rows = table[table["split"] == split]
    files = tuple(rows["file"])
    return ImageSet(
        files=files,
        images=load_images([Path(image_dir) / f for f in files]),
        labels=label_index(list(rows["label"])),
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1]: the input every model takes."""
    return images.float().div_(255.0)
