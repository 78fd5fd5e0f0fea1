"""The predict command: CSV of probabilities; one-line errors for bad input."""

import shutil
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from neu_model.cli import StageError
from neu_model.config import ROOT, load_config
from neu_model.predict import predict_files

from conftest import FIXTURE_IMAGES


def test_predicts_a_folder(tiny_model):
    frame = predict_files([FIXTURE_IMAGES], tiny_model, device="cpu")
    assert len(frame) == 30
    probs = frame[[f"p_{c}" for c in ("Cr", "In", "Pa", "PS", "RS", "Sc")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert (frame["confidence"] == probs.max(axis=1)).all()
    threshold = load_config().review.below_confidence  # the default
    assert (frame["needs_review"] == (frame["confidence"] < threshold)).all()


def test_review_threshold_flags_the_less_confident(tiny_model):
    frame = predict_files([FIXTURE_IMAGES], tiny_model, device="cpu", review_below=0.0)
    assert not frame["needs_review"].any()
    middle = float(frame["confidence"].median())
    flagged = predict_files([FIXTURE_IMAGES], tiny_model, device="cpu", review_below=middle)["needs_review"]
    assert list(flagged) == list(frame["confidence"] < middle) and 0 < flagged.sum() < len(frame)


def test_wrong_size_names_the_file(tiny_model, tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "small.bmp")
    with pytest.raises(StageError, match="small.bmp.*100x100"):
        predict_files([tmp_path], tiny_model, device="cpu")


def test_cli_writes_csv_and_fails_cleanly(tiny_model, tmp_path):
    shutil.copy(FIXTURE_IMAGES / "Sc_1.bmp", tmp_path / "Sc_1.bmp")
    cmd = [sys.executable, "-m", "neu_model.predict", "--model", str(tiny_model), "--device", "cpu"]
    ok = subprocess.run([*cmd, str(tmp_path), "--out", str(tmp_path / "p.csv")], cwd=ROOT, capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert list(pd.read_csv(tmp_path / "p.csv")["file"]) == [str(tmp_path / "Sc_1.bmp")]
    bad = subprocess.run([*cmd, str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_refuses_a_review_threshold_that_is_no_confidence(tiny_model, tmp_path):
    cmd = [sys.executable, "-m", "neu_model.predict", "--model", str(tiny_model), str(FIXTURE_IMAGES)]
    bad = subprocess.run([*cmd, "--review-below", "70"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--review-below: '70' is not a confidence in [0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr
