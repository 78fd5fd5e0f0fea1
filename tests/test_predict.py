"""neu-predict on real fixture images: tiles, bit depths, bad files, archives, maps, exit status, model choice.

--locate and --overlays: tests/test_predict_locate.py; --runtime and registry files: tests/test_predict_runtime.py.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neu_model.core.config import CLASSES, load_config
from neu_model.core.paths import ROOT
from neu_model.inference.loading import load_predictor
from neu_model.inference.predict import cli, score_inputs, tile_counts
from neu_model.inference.tiles import CSV_COLUMNS

from conftest import FIXTURE_IMAGES

# The saved tiny model is compared with its plain network and ONNX file: mirror averaging off.
pytestmark = pytest.mark.usefixtures("without_mirror")

PROBS = [f"p_{c}" for c in CLASSES]
GRID = [["Cr_1", "In_1", "Pa_1"], ["PS_1", "RS_1", "Sc_1"]]  # the 3x2 mosaic, row by row


def gray(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE_IMAGES / f"{name}.bmp"))


def predict(capsys, model: Path, *args: str) -> tuple[int, pd.DataFrame, str]:
    """Run the command in this process; its exit status, CSV (from stdout) and stderr."""
    status = cli(["--model", str(model), "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(out), keep_default_na=False) if out else pd.DataFrame()
    return status, frame, err


def mosaic(path: Path) -> Path:
    Image.fromarray(np.vstack([np.hstack([gray(n) for n in row]) for row in GRID])).save(path)
    return path


def test_a_folder_gives_one_row_per_image_with_the_csv_contract(tiny_model, capsys):
    status, frame, err = predict(capsys, tiny_model, FIXTURE_IMAGES)
    assert status == 0, err
    assert list(frame.columns) == list(CSV_COLUMNS) and len(frame) == 30
    assert (frame[["x", "y"]] == 0).all().all() and (frame["error"] == "").all()
    probs = frame[PROBS].astype(float)
    assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert (frame["predicted"] == probs.idxmax(axis=1).str[2:]).all()
    threshold = load_config().review.below_confidence
    assert (frame["needs_review"].astype(str) == (frame["confidence"].astype(float) < threshold).astype(str)).all()
    assert err.strip().splitlines()[-1].startswith("scored 30 images, 30 tiles: ")


def test_16_bit_copies_get_the_predictions_of_their_8_bit_originals(tiny_model, tmp_path, capsys):
    names = [n for row in GRID for n in row]
    for name in names:
        shutil.copy(FIXTURE_IMAGES / f"{name}.bmp", tmp_path / f"{name}.bmp")
        Image.fromarray(gray(name).astype(np.uint16) * 257).save(tmp_path / f"{name}_16.png")
    status, frame, err = predict(capsys, tiny_model, tmp_path)
    assert status == 0, err
    frame["name"] = frame["file"].map(lambda f: Path(f).stem.removesuffix("_16"))
    originals = frame[frame["file"].str.endswith(".bmp")].set_index("name")
    copies = frame[frame["file"].str.endswith("_16.png")].set_index("name").loc[originals.index]
    assert len(copies) == len(names)
    assert list(copies["predicted"]) == list(originals["predicted"])
    np.testing.assert_allclose(copies[PROBS].astype(float), originals[PROBS].astype(float), atol=1e-5)


def test_bad_files_become_error_rows_and_exit_1(tiny_model, tmp_path, capsys):
    shutil.copy(FIXTURE_IMAGES / "Sc_1.bmp", tmp_path / "Sc_1.bmp")
    (tmp_path / "notes.bmp").write_text("not an image, whatever its name says\n")
    Image.new("L", (100, 100)).save(tmp_path / "small.png")
    status, frame, err = predict(capsys, tiny_model, tmp_path)
    assert status == 1
    rows = frame.set_index(frame["file"].map(lambda f: Path(f).name))
    assert rows.loc["Sc_1.bmp", "error"] == "" and rows.loc["Sc_1.bmp", "predicted"] in CLASSES
    assert "not an image file" in rows.loc["notes.bmp", "error"]
    assert "100x100, smaller than the 200x200" in rows.loc["small.png", "error"]
    for bad in ("notes.bmp", "small.png"):
        assert rows.loc[bad, "predicted"] == "" and str(rows.loc[bad, "needs_review"]) == "True"
        assert f"{bad}: unreadable: " in err
    assert "2 unreadable files (error rows)" in err.splitlines()[-1]


def test_a_mosaic_gives_its_tiles_at_their_grid_positions(tiny_model, tmp_path, capsys):
    status, frame, err = predict(capsys, tiny_model, mosaic(tmp_path / "strip.png"), "--batch-size", "4")
    assert status == 0, err
    assert [(r.x, r.y) for r in frame.itertuples()] == [(x, y) for y in (0, 200) for x in (0, 200, 400)]
    # each tile alone, straight through the model: the same class and probabilities
    model = load_predictor(tiny_model, device="cpu")
    for row in frame.itertuples():
        tile = gray(GRID[row.y // 200][row.x // 200])[None, None] / np.float32(255)
        alone = model.predict(tile)[0]
        assert row.predicted == CLASSES[int(alone.argmax())]
        np.testing.assert_allclose([float(getattr(row, p)) for p in PROBS], alone, atol=1e-5)
    assert "strip.png: 6 tiles: " in err


def test_stride_overlaps_the_tiles(tiny_model, tmp_path, capsys):
    status, frame, _ = predict(capsys, tiny_model, mosaic(tmp_path / "strip.png"), "--stride", "100")
    assert status == 0
    assert [(r.x, r.y) for r in frame.itertuples()] == [(x, y) for y in (0, 100, 200) for x in range(0, 401, 100)]
    with pytest.raises(SystemExit) as usage:
        cli(["--stride", "300", str(FIXTURE_IMAGES)])
    assert usage.value.code == 2 and "above the tile size 200" in capsys.readouterr().err


def test_map_draws_every_image_larger_than_a_tile(tiny_model, tmp_path, capsys):
    folder = tmp_path / "in line 1"
    folder.mkdir()
    mosaic(folder / "strip 1.png")
    shutil.copy(FIXTURE_IMAGES / "Cr_1.bmp", folder / "Cr_1.bmp")
    status, frame, err = predict(capsys, tiny_model, folder, "--map", tmp_path / "maps")
    assert status == 0, err
    [drawn] = (tmp_path / "maps").iterdir()  # none for the single-tile image
    assert drawn.name.endswith("in_line_1_strip_1.png") and f"map {drawn}" in err
    with Image.open(drawn) as png:
        assert png.format == "PNG" and png.width == 600 and png.height > 400  # the legend under the image


def test_archive_members_are_named_archive_colon_member(tiny_model, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "day1.zip", "w") as zf:
        zf.write(FIXTURE_IMAGES / "Cr_1.bmp", "line1/Cr_1.bmp")
    with tarfile.open(tmp_path / "day2.tar.gz", "w:gz") as tf:
        tf.add(FIXTURE_IMAGES / "Sc_1.bmp", "line2/Sc_1.bmp")
    status, frame, err = predict(capsys, tiny_model, tmp_path / "day1.zip", tmp_path / "day2.tar.gz")
    assert status == 0, err
    assert list(frame["file"]) == [f"{tmp_path / 'day1.zip'}:line1/Cr_1.bmp",
                                   f"{tmp_path / 'day2.tar.gz'}:line2/Sc_1.bmp"]


def test_out_file_matches_the_scoring_functions_frame(tiny_model, tmp_path, capsys):
    inputs = [FIXTURE_IMAGES / "Cr_1.bmp", mosaic(tmp_path / "strip.png")]
    (tmp_path / "bad.bmp").write_bytes(b"")
    status = cli(["--model", str(tiny_model), "--device", "cpu", "--review-below", "0.5", "--out",
                  str(tmp_path / "p.csv"), *map(str, inputs), str(tmp_path / "bad.bmp")])
    assert status == 1 and "wrote " in capsys.readouterr().err
    frame = score_inputs([*inputs, tmp_path / "bad.bmp"], load_predictor(tiny_model, device="cpu"), 0.5)
    assert (tmp_path / "p.csv").read_text() == frame.to_csv(index=False)
    summary = tile_counts(frame)
    assert summary["n"] == 8 and summary["errors"] == 1 and sum(summary["counts"].values()) == 7


def test_review_threshold_flags_the_less_confident_and_the_unknown(tiny_model, capsys):
    _, frame, _ = predict(capsys, tiny_model, FIXTURE_IMAGES, "--review-below", "0")
    unknown = frame["unknown"].astype(str) == "True"
    assert list(frame["needs_review"].astype(str) == "True") == list(unknown)  # confidence flags nothing
    threshold = torch.load(tiny_model, weights_only=True)["unknown"]["threshold"]
    assert list(unknown) == list(frame["unknown_score"].astype(float) > threshold)
    # halfway between two confidences, so that no tile's unrounded confidence sits on the threshold
    ranked = sorted(set(frame["confidence"].astype(float)))
    middle = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2
    _, flagged, _ = predict(capsys, tiny_model, FIXTURE_IMAGES, "--review-below", str(middle))
    expected = (frame["confidence"].astype(float) < middle) | unknown
    assert list(flagged["needs_review"].astype(str) == "True") == list(expected)
    assert 0 < (frame["confidence"].astype(float) < middle).sum() < len(frame)


@pytest.mark.slow
def test_usage_errors_exit_2_with_one_line(tiny_model, tmp_path, capsys):
    cmd = [sys.executable, "-m", "neu_model.inference.predict", "--model", str(tiny_model), str(tmp_path / "missing")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or folder; check the path"
    with pytest.raises(SystemExit) as usage:
        cli([str(FIXTURE_IMAGES), "--review-below", "70"])
    assert usage.value.code == 2 and "'70' is not a confidence in [0, 1]" in capsys.readouterr().err


def test_default_champion_without_a_store_says_how_to_get_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    assert cli([str(FIXTURE_IMAGES)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: models:/neu-defect-classifier@champion: no MLflow store")
    assert "make pipeline" in err and "--model models/model.pt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()  # no empty store was created
