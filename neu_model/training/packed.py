"""Training images beyond memory: one packed uint8 file per split, memory-mapped.

Within ``train.memory_budget_mb`` the train stage decodes the training and validation images into
memory (on CUDA: into the GPU's memory, once). Above it, it packs each split once into
``data/cache/packed/<split>-<key>.npy`` (N x 1 x H x W uint8, the split table's order) and maps
that file: the OS reads the rows each batch needs and keeps what fits in its page cache, so the
process's own memory does not grow with the archive. The key hashes the split's rows, the
manifest, and each image's size and modification time: a changed image or split builds a new
pack, which replaces the old one. The values are the decoded pixels either way, so training gives
the same weights from a pack as from memory.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neu_model.core.config import Config
from neu_model.core.files import atomic_path, sha256_file
from neu_model.core.paths import IMAGE_DIR, MANIFEST, SPLIT_FILE
from neu_model.core.stage import StageError
from neu_model.data.dataset import ImageSet, decode_gray, label_index, load_split, read_split
from neu_model.training.distributed import Context

log = logging.getLogger("neu_model.training.packed")

FIT_SPLITS = ("train", "val")  # what the train stage holds


def pack_dir(split_file: Path) -> Path:
    """``data/cache/packed`` beside ``data/split.csv``: the download stage's cache folder."""
    return Path(split_file).parent / "cache" / "packed"


def pack_key(rows: pd.DataFrame, image_dir: Path, manifest: Path) -> str:
    """What a pack must match: the split's files and labels, the manifest, each file's size and time."""
    digest = hashlib.sha256(sha256_file(manifest).encode() if Path(manifest).is_file() else b"no manifest")
    for file, label in zip(rows["file"], rows["label"], strict=True):
        path = Path(image_dir) / file
        try:
            stat = path.stat()
        except OSError as exc:
            raise StageError(f"{path}: cannot be read ({exc.strerror}); run the download stage "
                             "(dvc repro download)") from None
        digest.update(f"{file},{label},{stat.st_size},{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def write_pack(paths: list[Path], target: Path) -> None:
    """Decode ``paths`` one at a time into the uint8 file ``target`` (written under a temporary
    name, then renamed); all images must share the first one's size."""
    first = decode_gray(paths[0])
    with atomic_path(target) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 1, *first.shape))
        for i, path in enumerate(paths):
            image = first if i == 0 else decode_gray(path)
            if image.shape != first.shape:
                raise StageError(f"{path}: size {image.shape[::-1]} differs from {first.shape[::-1]}; "
                                 "resize it or remove it")
            array[i, 0] = image
        array.flush()
        del array


def packed_split(split: str, split_file: Path = SPLIT_FILE, image_dir: Path = IMAGE_DIR,
                 manifest: Path = MANIFEST, build: bool = True) -> ImageSet:
    """The images of one split memory-mapped from their pack, which is built first when missing
    (``build``; False: another process builds it, and has by now).

    Raises:
        StageError: a pack that should exist is missing, or an image cannot be read.
    """
    rows = read_split(split_file)
    rows = rows[rows["split"] == split]
    files, labels = tuple(rows["file"]), label_index(list(rows["label"]))
    if not files:
        return ImageSet(files, torch.empty((0, 1, 0, 0), dtype=torch.uint8), labels)
    folder = pack_dir(split_file)
    target = folder / f"{split}-{pack_key(rows, image_dir, manifest)}.npy"
    if build and not target.exists():
        log.info("packing %d %s images into %s", len(files), split, target)
        write_pack([Path(image_dir) / f for f in files], target)
        for old in folder.glob(f"{split}-*.npy"):
            if old != target:
                old.unlink(missing_ok=True)  # a pack of an older split or older images
    if not target.exists():
        raise StageError(f"{target}: no pack of the {split} images; the folder must be shared by the "
                         "processes of one machine")
    # "c": copy-on-write, a writable mapping that never changes the file (torch wants writable arrays)
    images = torch.from_numpy(np.load(target, mmap_mode="c"))
    if len(images) != len(files):
        raise StageError(f"{target}: {len(images)} images for {len(files)} in {split_file}; delete it and rerun")
    return ImageSet(files, images, labels)


def fit_sets(cfg: Config, split_file: Path, image_dir: Path, manifest: Path,
             ctx: Context) -> tuple[ImageSet, ImageSet]:
    """The training and validation images: in memory (on ``ctx.device``) within
    ``train.memory_budget_mb``, else memory-mapped from their packs (built by each machine's first
    process while the others wait)."""
    table = read_split(split_file)
    count = int(table["split"].isin(FIT_SPLITS).sum())
    megabytes = count * cfg.data.image_size ** 2 / 2 ** 20
    if megabytes <= cfg.train.memory_budget_mb:
        return tuple(load_split(s, split_file, image_dir).to(ctx.device) for s in FIT_SPLITS)
    log.info("%d images (%.0f MB) exceed train.memory_budget_mb=%d: memory-mapped from %s",
             count, megabytes, cfg.train.memory_budget_mb, pack_dir(split_file))
    if ctx.local_rank == 0:
        for split in FIT_SPLITS:
            packed_split(split, split_file, image_dir, manifest)
    ctx.barrier()
    return tuple(packed_split(s, split_file, image_dir, manifest, build=False) for s in FIT_SPLITS)
