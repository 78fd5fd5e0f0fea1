"""The split is deterministic, stratified, and never separates byte-identical images."""

import pandas as pd
import pytest

from neu_model.core.config import CLASSES, SplitConfig
from neu_model.data.split import split_frame


def manifest(per_class: int = 300, duplicates: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [(f"{c}_{i}.bmp", c, f"{c}{i}") for c in CLASSES for i in range(1, per_class + 1)]
    frame = pd.DataFrame(rows, columns=["file", "label", "sha256"])
    for file, same_as in (duplicates or {}).items():
        frame.loc[frame["file"] == file, "sha256"] = frame.loc[frame["file"] == same_as, "sha256"].item()
    return frame


PROTOCOL = SplitConfig(test_fraction=0.3, val_fraction=0.1)


def test_public_protocol_counts():
    table = split_frame(manifest(), PROTOCOL, seed=0)
    counts = table.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 90).all()  # 540 test images, as the public baseline
    assert (counts.loc["val"] == 21).all()
    assert (counts.loc["train"] == 189).all()


def test_same_seed_same_split_other_seed_differs():
    a = split_frame(manifest(), PROTOCOL, seed=0)
    assert a.equals(split_frame(manifest(), PROTOCOL, seed=0))
    assert not a.equals(split_frame(manifest(), PROTOCOL, seed=1))


@pytest.mark.parametrize("seed", range(10))
def test_identical_images_share_a_part(seed):
    table = split_frame(manifest(duplicates={"Pa_105.bmp": "Pa_101.bmp"}), PROTOCOL, seed)
    parts = table.set_index("file")["split"]
    assert parts["Pa_101.bmp"] == parts["Pa_105.bmp"]


def test_every_file_gets_exactly_one_part():
    table = split_frame(manifest(per_class=7), PROTOCOL, seed=3)
    assert len(table) == 42 and table["split"].isin(["train", "val", "test"]).all()
