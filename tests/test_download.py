"""Tests of the download stage: layouts, archives, HTTP, validation, atomic publishing."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from neu_model.core.config import DATA_SOURCE_ENV, load_config
from neu_model.core.files import sha256_file
from neu_model.core.stage import StageError
from neu_model.data import download as dl

from download_support import FAST, FIXTURE, KAGGLE, assert_unchanged, cfg, kaggle_zip, serve, snapshot

# isort: split
# The fixtures isolated (autouse), tiny and published: pytest finds them among this module's names.
from neu_model.core.paths import PARAMS_FILE, ROOT

from download_support import isolated_work_dir, published_raw, tiny_source  # noqa: F401


def read_manifest() -> list[list[str]]:
    return [line.split(",") for line in Path("data/raw/manifest.csv").read_text().splitlines()]


# ---------------------------------------------------------------- good inputs

def test_flat_folder(tiny):
    result = dl.download(cfg(tiny))
    assert result.n_images == 30
    assert result.counts == {c: 5 for c in ("Cr", "In", "Pa", "PS", "RS", "Sc")}
    assert result.verified_sha256 is False  # 30 names are not the public 1,800
    assert sorted(os.listdir("data/raw/NEU-CLS")) == sorted(os.listdir(FIXTURE))
    rows = read_manifest()
    assert rows[0] == ["file", "label", "sha256", "width", "height", "origin"]
    assert [r[0] for r in rows[1:]] == sorted(os.listdir(FIXTURE))
    for name, label, digest, w, h, origin in rows[1:]:
        assert label == name.split("_")[0] and (w, h) == ("200", "200") and origin == "public"
        assert digest == sha256_file(FIXTURE / name)
    assert result.dataset_version == hashlib.sha256(Path("data/raw/manifest.csv").read_bytes()).hexdigest()[:12]
    assert sorted(os.listdir("data")) == ["raw"]


def test_expected_count_mismatch_fails(tiny, published):
    with pytest.raises(StageError, match=r"5 images of class Cr, expected 300"):
        dl.download(load_config(PARAMS_FILE, [f"data.source={tiny}"]))  # params.yaml says 300
    assert_unchanged(published)


def test_kaggle_zip_over_http_and_cache(tiny, tmp_path):
    dl.download(cfg(tiny))
    flat_manifest = Path("data/raw/manifest.csv").read_bytes()
    body = kaggle_zip(tiny, tmp_path / "k.zip").read_bytes()
    with serve({"/neu.zip": body}) as (base, hits):
        result = dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
        assert result.counts == {c: 5 for c in KAGGLE}
        # Same files, canonical names: byte-identical manifest, so the same dataset version.
        assert Path("data/raw/manifest.csv").read_bytes() == flat_manifest
        assert sorted(os.listdir("data/raw/NEU-CLS")) == sorted(os.listdir(FIXTURE))
        assert len(list(Path("data/cache").iterdir())) == 1
        dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
    assert hits["/neu.zip"] == 1  # the second run used the cache


def test_http_500_is_retried(tiny, tmp_path):
    body = kaggle_zip(tiny, tmp_path / "k.zip").read_bytes()
    with serve({"/neu.zip": body}, fail_first={"/neu.zip": 1}) as (base, hits):
        result = dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
    assert hits["/neu.zip"] == 2 and result.n_images == 30


def test_connection_cut_short_is_retried(tiny, tmp_path):
    body = kaggle_zip(tiny, tmp_path / "k.zip").read_bytes()
    with serve({"/neu.zip": body}, cut_first={"/neu.zip": 2}) as (base, hits):
        result = dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
    assert hits["/neu.zip"] == 3 and result.n_images == 30
    assert [p.read_bytes() for p in Path("data/cache").iterdir()] == [body]  # only the full file


def test_connection_refused_is_retried_then_fails(published):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StageError, match=rf"127.0.0.1:{port}/neu.zip: download failed after 4 attempts"):
        dl.download(cfg(f"http://127.0.0.1:{port}/neu.zip"), retry_delays=FAST)
    assert_unchanged(published)


def test_http_always_500_gives_up(published):
    with serve({"/neu.zip": b"x"}, fail_first={"/neu.zip": 99}) as (base, hits):
        with pytest.raises(StageError, match=r"/neu.zip: download failed after 4 attempts \(HTTP 500"):
            dl.download(cfg(f"{base}/neu.zip"), retry_delays=FAST)
    assert hits["/neu.zip"] == 4
    assert_unchanged(published)
    assert list(Path("data").glob("cache/*")) == []  # nothing is cached from failed attempts


def test_http_404_fails_with_url_and_no_retry(published):
    with serve({}) as (base, hits):
        url = f"{base}/missing.zip"
        with pytest.raises(StageError) as err:
            dl.download(cfg(url), retry_delays=FAST)
    assert url in str(err.value) and "404" in str(err.value) and "\n" not in str(err.value)
    assert hits["/missing.zip"] == 1
    assert_unchanged(published)


def test_local_tar_gz(tiny, tmp_path):
    archive = tmp_path / "neu.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tiny, arcname="NEU-CLS")
    result = dl.download(cfg(archive))
    assert result.n_images == 30
    assert sorted(os.listdir("data/raw/NEU-CLS")) == sorted(os.listdir(FIXTURE))


def test_folder_without_numbers_gets_next_number(tiny, tmp_path):
    crazing = tmp_path / "k" / "Crazing"
    crazing.mkdir(parents=True)
    shutil.copyfile(tiny / "Cr_1.bmp", crazing / "Cr_1.bmp")
    shutil.copyfile(tiny / "Cr_2.bmp", crazing / "scan.bmp")
    names = sorted(e.name for e in dl.scan(tmp_path / "k", ("Cr", "In")))
    assert names == ["Cr_1.bmp", "Cr_2.bmp"]


@pytest.mark.parametrize("palette, ok", [(list(range(256)), True), (list(range(255, -1, -1)), False)])
def test_palette_image_counts_as_grey_only_with_identity_ramp(tiny, palette, ok):
    img = Image.open(tiny / "Cr_1.bmp").convert("L").convert("P")
    img.putpalette([v for v in palette for _ in range(3)])
    (tiny / "Cr_1.bmp").unlink()
    img.save(tiny / "Cr_1.png")
    if ok:
        assert dl.download(cfg(tiny)).counts["Cr"] == 5
        assert "Cr_1.png" in os.listdir("data/raw/NEU-CLS")
    else:
        with pytest.raises(StageError, match=r"Cr_1.png: mode P"):
            dl.download(cfg(tiny))


# ---------------------------------------------------------------- public-set verification

def checksum_list(path: Path) -> Path:
    lines = [f"{sha256_file(f)}  NEU-CLS/{f.name}" for f in sorted(FIXTURE.iterdir())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_public_set_verified_then_modified_file_fails(tiny, tmp_path):
    sums = checksum_list(tmp_path / "tiny.sha256")
    assert dl.download(cfg(tiny, f"data.checksums={sums}")).verified_sha256 is True
    before = snapshot(Path("data/raw"))
    data = bytearray((tiny / "Sc_3.bmp").read_bytes())
    data[-1] ^= 1  # one pixel changes: still a valid image, but not the public file
    (tiny / "Sc_3.bmp").write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"Sc_3.bmp: sha256 .* does not match"):
        dl.download(cfg(tiny, f"data.checksums={sums}"))
    assert_unchanged(before)


def test_other_names_are_format_checked_only(tiny, tmp_path):
    sums = checksum_list(tmp_path / "tiny.sha256")
    (tiny / "Sc_5.bmp").unlink()  # 29 of the 30 listed names: not the public set
    data = bytearray((tiny / "Sc_3.bmp").read_bytes())
    data[-1] ^= 1
    (tiny / "Sc_3.bmp").write_bytes(bytes(data))
    assert dl.download(cfg(tiny, f"data.checksums={sums}")).verified_sha256 is False


# ---------------------------------------------------------------- bad inputs leave data/raw as it was

def _truncated(src, tmp):
    (src / "Cr_1.bmp").write_bytes((src / "Cr_1.bmp").read_bytes()[:5000])
    return src, r"src/Cr_1.bmp: cannot be decoded"


def _text_bmp(src, tmp):
    (src / "In_2.bmp").write_text("this is not an image\n")
    return src, r"src/In_2.bmp: cannot be decoded"


def _small(src, tmp):
    Image.new("L", (100, 100)).save(src / "Pa_2.bmp")
    return src, r"src/Pa_2.bmp: is 100x100, expected 200x200"


def _rgb(src, tmp):
    Image.new("RGB", (200, 200)).save(src / "PS_2.bmp")
    return src, r"src/PS_2.bmp: mode RGB"


def _empty(src, tmp):
    shutil.rmtree(src)
    src.mkdir()
    return src, r"src: no images found"


def _missing_class(src, tmp):
    for f in src.glob("Sc_*"):
        f.unlink()
    return src, r"no images of class Sc"


def _unknown_prefix(src, tmp):
    shutil.copyfile(src / "Cr_1.bmp", src / "Xx_1.bmp")
    return src, r"src/Xx_1.bmp: unknown class prefix 'Xx'"


def _duplicate(src, tmp):
    shutil.copyfile(src / "Cr_2.bmp", src / "Cr_01.bmp")
    return src, r"src/Cr_01.bmp and .*src/Cr_1.bmp both become Cr_1.bmp"


def _zip_slip(src, tmp):
    with zipfile.ZipFile(tmp / "evil.zip", "w") as zf:
        for f in sorted(src.iterdir()):
            zf.write(f, f"NEU-CLS/{f.name}")
        zf.writestr("../x.bmp", (src / "Cr_1.bmp").read_bytes())
    return tmp / "evil.zip", r"evil.zip: member '../x.bmp' would be written outside"


def _tar_slip(src, tmp):
    with tarfile.open(tmp / "evil.tar", "w") as tf:
        tf.add(src, arcname="NEU-CLS")
        tf.add(src / "Cr_1.bmp", arcname="../x.bmp")
    return tmp / "evil.tar", r"evil.tar: member '../x.bmp' would be written outside"


def _missing_source(src, tmp):
    return tmp / "nowhere", r"nowhere: no such file or folder"


BAD = [_truncated, _text_bmp, _small, _rgb, _empty, _missing_class, _unknown_prefix, _duplicate,
       _zip_slip, _tar_slip, _missing_source]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__.lstrip("_") for f in BAD])
def test_bad_input_leaves_raw_unchanged(make_bad, tiny, tmp_path, published):
    source, message = make_bad(tiny, tmp_path)
    with pytest.raises(StageError, match=message) as err:
        dl.download(cfg(source))
    assert "\n" not in str(err.value)
    assert_unchanged(published)
    assert [p for p in tmp_path.rglob("x.bmp")] == []  # nothing was extracted outside


def test_cli_bad_input_prints_one_error_line(tiny, tmp_path):
    (tiny / "In_2.bmp").write_text("this is not an image\n")
    env = {**os.environ, DATA_SOURCE_ENV: str(tiny), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "neu_model.data.download", "--params", str(PARAMS_FILE),
         "--set", "data.expected_per_class=any"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "In_2.bmp" in lines[0]
    assert not (tmp_path / "data" / "raw").exists()


def test_main_prints_summary(tiny, capsys):
    result = dl.main(["--params", str(PARAMS_FILE), "--set", f"data.source={tiny}",
                      "--set", "data.expected_per_class=any", "--raw-dir", "out/raw"])
    out = capsys.readouterr().out
    assert "30 images in out/raw/NEU-CLS (Cr 5, In 5, Pa 5, PS 5, RS 5, Sc 5)" in out
    assert result.dataset_version in out and "format only" in out
    assert len(os.listdir("out/raw/NEU-CLS")) == 30
