"""Images beyond the memory budget: packed once into a uint8 file, memory-mapped, rebuilt when they change."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neu_model.core.stage import StageError
from neu_model.data.dataset import load_split
from neu_model.training.distributed import Context
from neu_model.training.packed import fit_sets, pack_dir, packed_split

from conftest import tiny_config


@pytest.fixture
def workspace(tiny_data, tmp_path):
    """A copy of the fixture's images and split that a test may change."""
    shutil.copytree(tiny_data.raw, tmp_path / "raw")
    shutil.copy(tiny_data.split, tmp_path / "split.csv")
    return tmp_path


def _mapped_file(images: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's pixels (Linux's /proc/self/maps), if any."""
    address = images.data_ptr()
    for line in open("/proc/self/maps"):
        span, _, _, _, _, *path = line.split()
        low, high = (int(a, 16) for a in span.split("-"))
        if low <= address < high:
            return path[0] if path and path[0].startswith("/") else None  # not [heap], [stack] ...
    return None


def _packed(ws, split="train"):
    return packed_split(split, ws / "split.csv", ws / "raw" / "NEU-CLS", ws / "raw" / "manifest.csv")


def test_a_pack_holds_the_decoded_images_and_labels_in_split_order(workspace):
    packed = _packed(workspace)
    in_memory = load_split("train", workspace / "split.csv", workspace / "raw" / "NEU-CLS")
    assert packed.files == in_memory.files
    assert torch.equal(packed.images, in_memory.images) and torch.equal(packed.labels, in_memory.labels)
    packs = list(pack_dir(workspace / "split.csv").iterdir())
    assert [p.name for p in packs] == [next(iter(packs)).name] and packs[0].name.startswith("train-")
    assert _mapped_file(packed.images) == str(packs[0].resolve())  # mapped from the file, not read into memory


def test_a_pack_is_reused_until_an_image_changes_then_replaced(workspace):
    _packed(workspace)
    pack = next(pack_dir(workspace / "split.csv").glob("train-*.npy"))
    built = pack.stat().st_mtime_ns
    _packed(workspace)
    assert pack.stat().st_mtime_ns == built  # unchanged images: the same file, not rewritten

    first = _packed(workspace).files[0]
    path = workspace / "raw" / "NEU-CLS" / first
    image = np.array(Image.open(path))
    Image.fromarray(255 - image).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later time, whatever the clock
    rebuilt = _packed(workspace)
    assert torch.equal(rebuilt.images[0, 0], torch.from_numpy(255 - image))
    assert not pack.exists() and len(list(pack_dir(workspace / "split.csv").glob("train-*.npy"))) == 1


def test_an_image_of_another_size_is_named(workspace):
    first = pd.read_csv(workspace / "split.csv").query("split == 'train'")["file"].iloc[1]
    Image.new("L", (64, 64)).save(workspace / "raw" / "NEU-CLS" / first, format="BMP")
    with pytest.raises(StageError, match=f"{first}: size \\(64, 64\\) differs"):
        _packed(workspace)
    assert not list(pack_dir(workspace / "split.csv").glob("*.npy"))  # nothing half-written left


def test_the_budget_chooses_memory_or_the_pack(workspace):
    args = (workspace / "split.csv", workspace / "raw" / "NEU-CLS", workspace / "raw" / "manifest.csv", Context())
    in_memory, _ = fit_sets(tiny_config(), *args)
    mapped, _ = fit_sets(tiny_config("train.memory_budget_mb=0"), *args)
    assert _mapped_file(in_memory.images) is None
    assert _mapped_file(mapped.images).startswith(str(pack_dir(workspace / "split.csv").resolve()))
    assert torch.equal(in_memory.images, mapped.images)
