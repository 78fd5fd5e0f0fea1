"""Crash-safe outputs: a failed write keeps the last good file; finished files are readable."""

import os
import stat

import pytest

from neu_model.core.files import atomic_path, replace_dir, write_text


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_finished_file_gets_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.csv", "a,b\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.csv").stat().st_mode) == 0o644


def test_replace_dir_swaps_whole_folders(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "old.bmp").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.bmp").write_text("new")
    replace_dir(tmp_path / "new", tmp_path / "raw")
    assert [p.name for p in (tmp_path / "raw").iterdir()] == ["new.bmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
