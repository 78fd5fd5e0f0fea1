"""The plant's labelled images as data: merged by download beside the public ones, checked, and
split without moving any image already split."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError
from neu_model.data import download as dl
from neu_model.data.labels import labels_version, read_labels
from neu_model.data.split import split

from conftest import FIXTURE_IMAGES, tiny_config
from labels_support import TWELVE, darker, png_bytes, write_labels


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_twelve_labelled_images_join_the_data_and_move_none_of_the_images_already_split(workspace):
    cfg = tiny_config()
    dl.download(cfg)
    before = split(cfg).set_index("file")["split"]
    write_labels(workspace / "labels", [(c, darker(c, n)) for c, n in TWELVE] + [("unknown", darker("Cr", 3))])
    result = dl.download(cfg)
    assert (result.plant, result.plant_unknown, result.n_images) == (12, 1, 42)
    assert result.labels_version == labels_version(workspace / "labels")
    manifest = pd.read_csv("data/raw/manifest.csv")
    assert (manifest["origin"] == "plant").sum() == 12 and not manifest["file"].str.startswith("unknown").any()
    after = split(cfg).set_index("file")["split"]
    assert (after[before.index] == before).all()  # 0 of the images already split change part
    plant = after[manifest.loc[manifest["origin"] == "plant", "file"]]
    assert set(plant) <= {"train", "val", "test"} and len(plant) == 12
    assert json.loads(Path("data/raw/labels.json").read_text()) == {
        "labels_version": result.labels_version, "plant": 12, "plant_unknown": 1}
    # the plant's images are the pixels committed, losslessly
    name = manifest.loc[manifest["origin"] == "plant", "file"].iloc[0]
    assert (np.asarray(Image.open(f"data/raw/NEU-CLS/{name}")) == np.asarray(Image.open(f"labels/{name}"))).all()


def test_one_image_labelled_with_two_classes_is_an_error_naming_both(workspace):
    pixels = darker("Pa", 1)
    write_labels(workspace / "labels", [("Pa", pixels), ("Sc", pixels)])
    with pytest.raises(StageError, match=r"the same image labelled Pa and Sc"):
        read_labels(workspace / "labels", tiny_config().data.classes, 200)
    before = {p.name for p in FIXTURE_IMAGES.iterdir()}
    shutil.rmtree(workspace / "labels")
    # a plant label on a public image's exact bytes that contradicts its class
    folder = workspace / "labels"
    folder.mkdir()
    data = (FIXTURE_IMAGES / "Cr_1.bmp").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (folder / f"In_{digest[:16]}.bmp").write_bytes(data)
    pd.DataFrame([{"file": f"In_{digest[:16]}.bmp", "label": "In", "sha256": digest, "origin": "x", "x": 0, "y": 0}]
                 ).to_csv(folder / "manifest.csv", index=False)
    with pytest.raises(StageError, match=r"\(In\) and .*Cr_1.bmp \(Cr\): the same image labelled In and Cr"):
        dl.download(tiny_config())
    assert before  # the fixture is untouched


@pytest.mark.parametrize("fault, message", [
    ("changed", "differs from its manifest row; the file changed after `neu-review commit`: run `dvc checkout"),
    ("missing", "listed in labels/manifest.csv but missing; run `dvc checkout labels.dvc`"),
    ("size", "is 100x100, expected 200x200"),
    ("label", "label 'Xx' is neither a class"),
])
def test_bad_labelled_images_are_refused_naming_the_file_and_the_fix(workspace, fault, message):
    pixels = darker("RS", 1) if fault != "size" else darker("RS", 1)[:100, :100]
    folder = write_labels(workspace / "labels", [("Xx" if fault == "label" else "RS", pixels)])
    image = next(folder.glob("*.png"))
    if fault == "changed":
        image.write_bytes(png_bytes(darker("RS", 2)))
    elif fault == "missing":
        image.unlink()
    with pytest.raises(StageError) as err:
        read_labels(Path("labels"), tiny_config().data.classes, 200)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_source_stage_fingerprints_the_labels_and_asks_for_a_pull_when_dvc_tracks_missing_ones(workspace):
    import subprocess
    import sys

    def stage() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "neu_model.data.source", "--params", str(ROOT / "params.yaml"),
                               "--set", f"data.source={FIXTURE_IMAGES}"], capture_output=True, text=True, timeout=120)

    assert stage().returncode == 0
    assert json.loads(Path("data/labels_source.json").read_text()) == {"source": None}
    write_labels(workspace / "labels", [("Cr", darker("Cr", 1))])
    assert stage().returncode == 0
    first = json.loads(Path("data/labels_source.json").read_text())
    assert first["source"] == "labels" and len(first["sha256"]) == 64
    shutil.rmtree("labels")
    Path("labels.dvc").write_text("outs:\n- path: labels\n")
    done = stage()
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: labels.dvc: the labelled images it versions are missing; "
                                                    "run `dvc pull labels.dvc` (or `dvc checkout labels.dvc`)")
