"""The split never moves an image: the public set keeps its stratified 1,260/540 protocol, any other
image takes its part from its own sha256 and the seed, and byte-identical images share a part."""

import hashlib

import pandas as pd
import pytest

from neu_model.core.config import CLASSES, SplitConfig
from neu_model.data.checks import read_checksums
from neu_model.data.split import hashed_part, public_parts, split_frame, stratified_parts

from labels_support import CHECKSUMS, public_manifest

PROTOCOL = SplitConfig(test_fraction=0.3, val_fraction=0.1)


def manifest(per_class: int = 300, duplicates: dict[str, str] | None = None) -> pd.DataFrame:
    rows = [(f"{c}_{i}.bmp", c, hashlib.sha256(f"{c}{i}".encode()).hexdigest())
            for c in CLASSES for i in range(1, per_class + 1)]
    frame = pd.DataFrame(rows, columns=["file", "label", "sha256"])
    for file, same_as in (duplicates or {}).items():
        frame.loc[frame["file"] == file, "sha256"] = frame.loc[frame["file"] == same_as, "sha256"].item()
    return frame


def test_public_protocol_counts():
    table = split_frame(public_manifest(), PROTOCOL, 0, public_parts(CHECKSUMS, PROTOCOL, 0))
    counts = table.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 90).all()  # 540 test images, as the public baseline
    assert (counts.loc["val"] == 21).all()
    assert (counts.loc["train"] == 189).all()


def test_public_images_keep_the_stratified_split_of_the_whole_list_whatever_else_is_there():
    whole = stratified_parts(public_manifest(), PROTOCOL, 0).set_index("file")["split"]
    some = public_manifest().iloc[::7]  # a plant holding only part of the public set
    table = split_frame(some, PROTOCOL, 0, public_parts(CHECKSUMS, PROTOCOL, 0)).set_index("file")["split"]
    assert table.equals(whole[table.index])


@pytest.mark.parametrize("seed", [0, 1])
def test_adding_images_moves_none_and_new_ones_land_in_test_at_the_fraction(seed):
    public = public_parts(CHECKSUMS, PROTOCOL, seed)
    before = split_frame(public_manifest(), PROTOCOL, seed, public).set_index("file")["split"]
    added = manifest(per_class=1000).assign(file=lambda f: "plant_" + f["file"])
    after = split_frame(pd.concat([public_manifest(), added]), PROTOCOL, seed, public).set_index("file")["split"]
    assert (after[before.index] == before).all()  # 0 of the 1,800 change part
    share = after[added["file"]].value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.3, abs=0.02)
    assert share["val"] == pytest.approx(0.07, abs=0.015)


def test_the_part_of_an_image_outside_the_public_set_depends_on_its_content_and_the_seed_alone():
    frame = manifest(per_class=50)
    a = split_frame(frame, PROTOCOL, 0).set_index("file")["split"]
    b = split_frame(frame.iloc[::-1].iloc[::2], PROTOCOL, 0).set_index("file")["split"]  # fewer, other order
    assert (a[b.index] == b).all()
    assert not a.equals(split_frame(frame, PROTOCOL, 1).set_index("file")["split"])
    assert a["Cr_1.bmp"] == hashed_part(frame.loc[0, "sha256"], PROTOCOL, 0)


@pytest.mark.parametrize("seed", range(10))
def test_identical_images_share_a_part(seed):
    table = split_frame(manifest(duplicates={"Pa_105.bmp": "Pa_101.bmp"}), PROTOCOL, seed)
    parts = table.set_index("file")["split"]
    assert parts["Pa_101.bmp"] == parts["Pa_105.bmp"]
    public = public_parts(CHECKSUMS, PROTOCOL, seed)  # the public set's own pair (identical bytes)
    sums = read_checksums(CHECKSUMS)
    assert sums["Pa_101.bmp"] == sums["Pa_105.bmp"] and public[sums["Pa_101.bmp"]] in ("train", "val", "test")


def test_every_file_gets_exactly_one_part():
    table = split_frame(manifest(per_class=7), PROTOCOL, seed=3)
    assert len(table) == 42 and table["split"].isin(["train", "val", "test"]).all()
