"""Files that are not what they claim, and a full disk: one line naming the file and the fix,
nothing half-written left behind."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neu_model.core import files
from neu_model.core.paths import ROOT
from neu_model.core.stage import StageError

from conftest import FIXTURE_IMAGES, tiny_config


def truncated(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def foreign(out: Path) -> Path:
    out.write_bytes(FIXTURE_IMAGES.joinpath("Cr_1.bmp").read_bytes())  # an image renamed .pt
    return out


@pytest.mark.parametrize("kind", ["truncated", "foreign", "empty"])
@pytest.mark.slow
def test_unreadable_model_is_one_line_naming_it(tiny_model, tmp_path, kind):
    bad = tmp_path / "model.pt"
    if kind == "truncated":
        truncated(tiny_model, bad)
    elif kind == "foreign":
        foreign(bad)
    else:
        bad.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "neu_model.inference.predict", str(FIXTURE_IMAGES / "Cr_1.bmp"),
                             "--model", str(bad)], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert error == [f"error: {bad}: not a model saved by neu_model.training.train (unreadable: cut short, "
                     f"or not written by torch.save); retrain it"]


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
@pytest.mark.slow
def test_unreadable_checkpoint_is_a_note_and_training_starts_afresh(tiny_data, tiny_model, tmp_path, kind, caplog):
    from neu_model.training.train import train

    checkpoint = tmp_path / "checkpoint.pt"
    if kind == "truncated":
        truncated(tiny_model.with_name("checkpoint.pt"), checkpoint)
    else:
        foreign(checkpoint)
    with caplog.at_level("WARNING", logger="neu_model.training.train"):
        summary = train(tiny_config(), tiny_data.split, tiny_data.images, tmp_path / "model.pt", checkpoint,
                        tmp_path / "log.csv", tmp_path / "metrics.json", tiny_data.raw / "manifest.csv")
    warnings = [r for r in caplog.records if r.name == "neu_model.training.train" and r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == [
        f"{checkpoint} is unreadable: cut short, or not written by torch.save: training starts afresh"]
    assert summary["epochs"] == 1
    assert torch.load(checkpoint, weights_only=True)["state"]["epoch"] == 1  # replaced by a good one


def test_full_disk_during_a_checkpoint_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "models" / "checkpoint.pt"
    files.torch_save({"epoch": 1}, target)
    before = target.read_bytes()

    def disk_full(obj, buf):
        buf.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(StageError) as err:
        files.torch_save({"epoch": 2}, target)
    message = str(err.value)
    assert message.startswith(f"{target}: the disk is full (No space left on device); free disk space on ")
    assert "\n" not in message and "the previous checkpoint.pt is kept" in message
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


@pytest.mark.slow
def test_full_disk_stops_training_with_that_line_and_no_temporary(tiny_data, tmp_path, monkeypatch):
    from neu_model.training.train import train

    def disk_full(obj, buf: io.BytesIO):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(StageError, match=r"checkpoint.pt: the disk is full .*free disk space"):
        train(tiny_config(), tiny_data.split, tiny_data.images, tmp_path / "model.pt", tmp_path / "checkpoint.pt",
              tmp_path / "log.csv", tmp_path / "metrics.json", tiny_data.raw / "manifest.csv")
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "model.pt").exists()


def test_temporary_of_a_killed_writer_goes_with_the_next_write_of_that_file(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".model.pt.{dead.pid}.abc123.tmp"  # as atomic_path names it
    left.write_bytes(b"half")
    other = tmp_path / f".model.pt.{os.getpid()}.def456.tmp"  # a live writer's: kept
    other.write_bytes(b"in progress")
    files.write_text(tmp_path / "model.pt", "new")
    assert not left.exists() and other.exists() and (tmp_path / "model.pt").read_text() == "new"
