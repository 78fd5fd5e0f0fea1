"""The inference reader on real fixture images: bit depths, colour, tiles, bad files, archives, prefetch."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from neu_model.core.stage import StageError
from neu_model.data.dataset import decode_gray
from neu_model.inference.decode import DARK_16_BIT_NOTE
from neu_model.inference.tiles import (
    CSV_COLUMNS,
    Batch,
    NoteTally,
    ReadError,
    TileStream,
    error_row,
    tile_origins,
    with_progress,
)

from conftest import FIXTURE_IMAGES

NAMES = ["Cr_1", "In_2", "Pa_3", "PS_4", "RS_5", "Sc_1"]


def gray(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE_IMAGES / f"{name}.bmp"))


def read_all(*inputs, **kwargs) -> list[Batch | ReadError]:
    return list(TileStream(list(inputs), **kwargs))


def tiles_by_file(items) -> dict[str, list[tuple[int, int, np.ndarray, str]]]:
    """file: [(x, y, tile (size, size), note), ...] over every batch."""
    out: dict[str, list] = {}
    for item in items:
        if isinstance(item, Batch):
            for i, f in enumerate(item.files):
                out.setdefault(f, []).append((item.xs[i], item.ys[i], item.tiles[i, 0], item.notes[i]))
    return out


def errors(items) -> dict[str, str]:
    return {e.file: e.error for e in items if isinstance(e, ReadError)}


def only_tile(path: Path) -> tuple[np.ndarray, str]:
    [(x, y, tile, note)] = tiles_by_file(read_all(path))[str(path)]
    assert (x, y) == (0, 0)
    return tile, note


def write_tiff_12bit(path: Path, values: np.ndarray) -> None:
    """A baseline little-endian TIFF with BitsPerSample 12: two samples packed in three bytes."""
    h, w = values.shape
    pairs = values.astype(np.uint16).reshape(h, w // 2, 2)
    packed = np.stack([pairs[..., 0] >> 4, ((pairs[..., 0] & 0xF) << 4) | (pairs[..., 1] >> 8),
                       pairs[..., 1] & 0xFF], axis=-1).astype(np.uint8).tobytes()
    # (tag, type, value): width, height, BitsPerSample, no compression, min-is-black, strip
    # offset (right after the header), samples per pixel, rows per strip, strip bytes
    tags = [(256, 3, w), (257, 3, h), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 3, h), (279, 4, len(packed))]
    ifd = b"".join(struct.pack("<HHII", t, 4, 1, v) if kind == 4 else struct.pack("<HHIHH", t, 3, 1, v, 0)
                   for t, kind, v in tags)
    path.write_bytes(struct.pack("<2sHI", b"II", 42, 8 + len(packed)) + packed
                     + struct.pack("<H", len(tags)) + ifd + struct.pack("<I", 0))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_copies_read_as_their_8_bit_originals(tmp_path, suffix):
    for name in NAMES:
        path = tmp_path / f"{name}{suffix}"
        Image.fromarray(gray(name).astype(np.uint16) * 257).save(path)
        tile, note = only_tile(path)
        np.testing.assert_allclose(tile, gray(name) / np.float32(255), atol=1e-6, rtol=0)
        assert note == ""
    # what the old 8-bit path makes of the same file: clipped to white
    assert decode_gray(path).min() == 255


def test_12_bit_png_and_tiff_scaled_by_their_sensor_depth(tmp_path):
    for name in NAMES:
        v12 = np.rint(gray(name) * (4095 / 255)).astype(np.uint16)
        sbit = PngImagePlugin.PngInfo()
        sbit.add(b"sBIT", bytes([12]))
        Image.fromarray(v12 << 4).save(tmp_path / "shifted.png", pnginfo=sbit)  # the PNG standard's way
        Image.fromarray(v12).save(tmp_path / "unshifted.png", pnginfo=sbit)  # some cameras' way
        write_tiff_12bit(tmp_path / "packed.tif", v12)
        for file, note in [("shifted.png", ""), ("unshifted.png", "unshifted 12-bit"), ("packed.tif", "")]:
            tile, got_note = only_tile(tmp_path / file)
            np.testing.assert_allclose(tile, v12 / np.float32(4095), atol=1e-6, rtol=0)
            # one 12-bit step is 1/4095: the 8-bit original is within half of it
            np.testing.assert_allclose(tile, gray(name) / 255, atol=0.5 / 4095 + 1e-6, rtol=0)
            assert note in got_note


def test_16_bit_image_with_only_12_bit_values_gets_a_note(tmp_path):
    Image.fromarray(gray("Sc_1").astype(np.uint16) * 16).save(tmp_path / "dark.png")
    tile, note = only_tile(tmp_path / "dark.png")
    assert note == DARK_16_BIT_NOTE
    np.testing.assert_allclose(tile, gray("Sc_1") * 16.0 / 65535, atol=1e-6, rtol=0)


def test_colour_becomes_601_luminance_with_a_note(tmp_path):
    v = gray("Sc_2").astype(np.float64)
    rgb = np.stack([v, v * 0.7, 255 - v], axis=-1).round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    luminance = rgb @ np.array([0.299, 0.587, 0.114]) / 255
    for file, mode in [("colour.png", "RGB"), ("alpha.png", "RGBA")]:
        tile, note = only_tile(tmp_path / file)
        np.testing.assert_allclose(tile, luminance, atol=1 / 255, rtol=0)
        assert note == f"converted from {mode} to luminance"


def test_tile_origins_cover_every_pixel():
    assert tile_origins(200) == [0]
    assert tile_origins(450) == [0, 200, 250]
    assert tile_origins(600) == [0, 200, 400]
    assert tile_origins(450, stride=150) == [0, 150, 250]
    with pytest.raises(ValueError, match="stride 201"):
        tile_origins(450, stride=201)


@pytest.fixture
def mosaic(tmp_path) -> Path:
    """A 600x400 image of six real 200x200 images, three across, two down."""
    rows = [np.hstack([gray(n) for n in NAMES[:3]]), np.hstack([gray(n) for n in NAMES[3:]])]
    path = tmp_path / "strip.png"
    Image.fromarray(np.vstack(rows)).save(path)
    return path


def test_large_images_are_cut_into_tiles_at_their_positions(mosaic, tmp_path):
    [tiles] = tiles_by_file(read_all(mosaic)).values()
    assert [(x, y) for x, y, _, _ in tiles] == [(0, 0), (200, 0), (400, 0), (0, 200), (200, 200), (400, 200)]
    for (_x, _y, tile, _), name in zip(tiles, NAMES, strict=False):
        np.testing.assert_array_equal(tile, gray(name) / np.float32(255))
    crop = np.asarray(Image.open(mosaic))[:300, :450]
    Image.fromarray(crop).save(tmp_path / "crop.bmp")
    [tiles] = tiles_by_file(read_all(tmp_path / "crop.bmp")).values()
    assert [(x, y) for x, y, _, _ in tiles] == [(0, 0), (200, 0), (250, 0), (0, 100), (200, 100), (250, 100)]
    np.testing.assert_array_equal(tiles[-1][2], crop[100:300, 250:450] / np.float32(255))


def test_keep_images_attaches_the_whole_image_to_its_last_tiles_batch(mosaic):
    items = read_all(FIXTURE_IMAGES / "Cr_1.bmp", mosaic, batch_size=4, keep_images=True)
    with_image = [b for b in items if b.images]
    assert len(with_image) == 1 and with_image[0].files[-1] == str(mosaic)
    np.testing.assert_array_equal(with_image[0].images[str(mosaic)], np.asarray(Image.open(mosaic)) / np.float32(255))


def test_bad_files_become_one_line_error_rows_and_the_rest_is_read(tmp_path):
    good = FIXTURE_IMAGES / "In_1.bmp"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_text.bmp").write_text("exposure log, not an image\n")
    (folder / "b_truncated.bmp").write_bytes(good.read_bytes()[:20000])
    Image.fromarray(gray("In_1")[:120, :150]).save(folder / "c_small.png")
    (folder / "d_empty.jpg").write_bytes(b"")
    (folder / "e_good.bmp").write_bytes(good.read_bytes())
    items = read_all(folder, batch_size=8)
    assert [type(i).__name__ for i in items] == ["ReadError"] * 4 + ["Batch"]
    err = errors(items)
    assert "not an image file" in err[str(folder / "a_text.bmp")]
    assert "truncated or damaged" in err[str(folder / "b_truncated.bmp")]
    assert "150x120, smaller than the 200x200" in err[str(folder / "c_small.png")]
    assert "empty file" in err[str(folder / "d_empty.jpg")]
    assert all("\n" not in e and "; " in e for e in err.values())  # one line, naming a fix
    np.testing.assert_array_equal(items[-1].tiles[0, 0], gray("In_1") / np.float32(255))


def test_an_error_first_hands_over_the_tiles_before_it(tmp_path):
    (tmp_path / "bad.bmp").write_text("x")
    items = read_all(FIXTURE_IMAGES / "Cr_1.bmp", tmp_path / "bad.bmp", FIXTURE_IMAGES / "Cr_2.bmp")
    assert [getattr(i, "files", [getattr(i, "file", None)]) for i in items] == [
        [str(FIXTURE_IMAGES / "Cr_1.bmp")], [str(tmp_path / "bad.bmp")], [str(FIXTURE_IMAGES / "Cr_2.bmp")]]


def test_archive_members_are_streamed_and_named_after_their_archive(tmp_path):
    names = ["Cr_3.bmp", "sub/PS_2.bmp"]
    with zipfile.ZipFile(tmp_path / "day.zip", "w") as zf:
        for n in names:
            zf.write(FIXTURE_IMAGES / Path(n).name, n)
        zf.writestr("README.txt", "skipped")
        zf.writestr("__MACOSX/._Cr_3.bmp", "metadata")
    with tarfile.open(tmp_path / "day.tar.gz", "w:gz") as tf:
        for n in names:
            tf.add(FIXTURE_IMAGES / Path(n).name, f"./{n}")
    for archive in ("day.zip", "day.tar.gz"):
        found = tiles_by_file(read_all(tmp_path / archive))
        assert list(found) == [f"{tmp_path / archive}:{n}" for n in names]
        for n, [(_, _, tile, _)] in zip(names, found.values(), strict=False):
            np.testing.assert_array_equal(tile, gray(Path(n).stem) / np.float32(255))


def test_a_damaged_archive_keeps_the_members_before_the_damage(tmp_path):
    with tarfile.open(tmp_path / "full.tar", "w") as tf:
        for n in NAMES:
            tf.add(FIXTURE_IMAGES / f"{n}.bmp", f"{n}.bmp")
    member = 512 + 41472  # header + the 41,078-byte BMP padded to 512-byte blocks
    (tmp_path / "cut.tar").write_bytes((tmp_path / "full.tar").read_bytes()[:2 * member + 20000])  # inside the 3rd
    items = read_all(tmp_path / "cut.tar")
    assert len(tiles_by_file(items)) == 2
    assert "damaged or not a tar archive, unreadable after 2 images" in errors(items)[str(tmp_path / "cut.tar")]


def test_size_limits_give_error_rows(tmp_path):
    items = read_all(FIXTURE_IMAGES / "Cr_1.bmp", max_bytes=1000)
    assert "above the reader's limit" in errors(items)[str(FIXTURE_IMAGES / "Cr_1.bmp")]
    items = read_all(FIXTURE_IMAGES / "Cr_1.bmp", max_pixels=10_000)
    assert "cut it into smaller images" in errors(items)[str(FIXTURE_IMAGES / "Cr_1.bmp")]


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    for rel in ["b/Sc_1.bmp", "a.bmp", "b/a/In_1.bmp", "B.bmp", "c/deep/er/Pa_1.bmp", ".hidden/Cr_1.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((FIXTURE_IMAGES / "RS_1.bmp").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    expected = [str(p) for p in sorted(tmp_path.rglob("*.bmp")) if ".hidden" not in p.parts]
    assert list(tiles_by_file(read_all(tmp_path))) == expected


def test_missing_input_is_a_usage_error_and_empty_input_says_so(tmp_path):
    with pytest.raises(StageError, match="no such file or folder"):
        TileStream([FIXTURE_IMAGES, tmp_path / "nope"])
    with pytest.raises(StageError, match="no images found"):
        read_all(tmp_path)


def wait_idle(stream: TileStream) -> int:
    """``stream.files_read`` once the reader thread has stopped advancing (it blocks when ahead)."""
    seen, still = -1, 0
    while still < 5:
        time.sleep(0.02)
        still = still + 1 if stream.files_read == seen else 0
        seen = stream.files_read
    return seen


def test_the_reader_runs_a_bounded_number_of_batches_ahead():
    stream = TileStream([FIXTURE_IMAGES], batch_size=1, prefetch=2)
    items = iter(stream)
    for consumed in range(1, 6):
        next(items)
        # ahead: `prefetch` queued, one waiting to be queued, one being filled
        assert wait_idle(stream) <= consumed + 2 + 2
    assert len(list(items)) == 30 - 5 and stream.files_read == 30


def test_stopping_early_ends_the_reader_thread():
    items = iter(TileStream([FIXTURE_IMAGES], batch_size=1, prefetch=1))
    next(items)
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "neu-tile-reader"]


def test_csv_contract_and_error_rows():
    assert CSV_COLUMNS == ("file", "x", "y", "predicted", "confidence", "needs_review", "p_Cr", "p_In", "p_Pa",
                           "p_PS", "p_RS", "p_Sc", "unknown_score", "unknown", "error")
    row = error_row(ReadError("a.bmp", "empty file"))
    assert list(row) == list(CSV_COLUMNS) and row["needs_review"] is True and row["predicted"] == ""
    assert row["unknown"] == row["unknown_score"] == ""


def test_notes_are_counted_per_image_and_shown_for_the_first_few():
    tally = NoteTally(show=2)
    shown = [tally.add(f, n) for f, n in [("a", "rgb"), ("a", "rgb"), ("b", "rgb"), ("c", "rgb"), ("c", ""),
                                          ("d", "1-bit")]]
    assert shown == [True, False, True, False, False, True]
    assert tally.summary() == ["note: 3 images: rgb (first: a)", "note: 1 image: 1-bit (first: d)"]


def test_reader_imports_no_training_code_mlflow_or_matplotlib():
    code = ("import sys, neu_model.inference.tiles, neu_model.inference.stripmap; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'matplotlib') "
            "or m in ('neu_model.training.train', 'neu_model.data.dataset', 'neu_model.model.networks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_progress_passes_every_item_through_and_logs_the_counts(caplog, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    stream = TileStream([FIXTURE_IMAGES, tmp_path], batch_size=7)
    with caplog.at_level(logging.INFO, logger="neu_model.inference.tiles"):
        items = list(with_progress(stream))
    assert sum(len(i) for i in items if isinstance(i, Batch)) == 30 and len(errors(items)) == 1
    assert "read 31 files, 30 tiles, 1 unreadable" in caplog.text
