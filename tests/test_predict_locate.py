"""neu-predict --locate and --overlays on real fixture images with the one-epoch model."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neu_model.core.config import CLASSES
from neu_model.inference.overlays import TOP_BOX
from neu_model.inference.predict import cli
from neu_model.inference.tile_boxes import TileLocator, locate_params
from neu_model.inference.tiles import CSV_COLUMNS
from neu_model.inference.torch_model import load_torch_model
from neu_model.localisation.methods import DEFAULT_LOCATE, locate_one, params_from_dict

from conftest import FIXTURE_IMAGES

GRID = [["Cr_1", "In_1", "Pa_1"], ["PS_1", "RS_1", "Sc_1"]]  # the 3x2 strip, row by row
NAMES = [name for row in GRID for name in row]
NAMES_CODES = [n.split("_")[0] for n in NAMES]
LABEL = (80, 24)  # a tile's label covers at most this much of its top-left corner


def gray(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE_IMAGES / f"{name}.bmp"))


def strip(path: Path) -> Path:
    Image.fromarray(np.vstack([np.hstack([gray(n) for n in row]) for row in GRID])).save(path)
    return path


def predict(capsys, model: Path, *args) -> tuple[int, pd.DataFrame, str]:
    status = cli(["--model", str(model), "--device", "cpu", *map(str, args)])
    out, err = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(out), keep_default_na=False) if out else pd.DataFrame()
    return status, frame, err


def boxes_of(frame: pd.DataFrame) -> list[list[list[float]]]:
    return [json.loads(cell) for cell in frame["boxes"]]


def test_boxes_of_a_strip_are_its_tiles_boxes_moved_to_their_offsets(tiny_model, tmp_path, capsys):
    status, tiled, err = predict(capsys, tiny_model, strip(tmp_path / "strip.png"), "--locate")
    assert status == 0, err
    assert list(tiled.columns) == [*CSV_COLUMNS, "boxes"]
    # The same six images one by one, in the strip's order: the same batch, so the same maps.
    _, alone, _ = predict(capsys, tiny_model, *(FIXTURE_IMAGES / f"{n}.bmp" for n in NAMES), "--locate")
    assert list(tiled["predicted"]) == list(alone["predicted"])
    for row, tile_boxes, own_boxes in zip(tiled.itertuples(), boxes_of(tiled), boxes_of(alone), strict=True):
        assert tile_boxes, "every tile gets at least one box"
        assert tile_boxes == [[x0 + row.x, y0 + row.y, x1 + row.x, y1 + row.y, s] for x0, y0, x1, y1, s in own_boxes]
        for x0, y0, x1, y1, score in tile_boxes:
            assert row.x <= x0 < x1 <= row.x + 200 and row.y <= y0 < y1 <= row.y + 200 and score >= 0
            assert 0 <= x0 and x1 <= 600 and 0 <= y0 and y1 <= 400


def test_each_tile_is_explained_for_its_predicted_class(tiny_model):
    net, _ = load_torch_model(tiny_model, "cpu")
    tiles = torch.from_numpy(np.stack([gray(n) for n in NAMES])[:, None] / np.float32(255))
    locator = TileLocator(net, DEFAULT_LOCATE)
    assert [a.code for a in locator.locate(tiles, NAMES_CODES)] == NAMES_CODES
    # another class's knobs and map give other boxes on at least one tile
    turned = locator.locate(tiles, NAMES_CODES[1:] + NAMES_CODES[:1])
    first = locator.locate(tiles, NAMES_CODES)
    assert any(not np.array_equal(a.regions, b.regions) for a, b in zip(first, turned, strict=True))


def test_locate_params_come_from_the_config_when_it_has_them():
    class WithSection:
        locate = {"method": "classical", "classes": {"Sc": {"max_regions": 1}}}

    assert locate_params(object()) is DEFAULT_LOCATE
    chosen = locate_params(WithSection())
    assert chosen == params_from_dict(WithSection.locate)
    assert chosen.method == "classical" and chosen.for_class("Sc").max_regions == 1


def test_without_a_network_the_classical_method_is_used_and_said(tiny_model):
    tiles = np.stack([gray(n) for n in NAMES])[:, None].astype(np.float32) / 255
    locator = TileLocator(None, DEFAULT_LOCATE)
    assert locator.method == "classical" and "classical method instead of combined" in locator.note
    for tile, answer, code in zip(tiles, locator.locate(tiles, NAMES_CODES), NAMES_CODES, strict=True):
        expected = locate_one(np.rint(tile[0] * 255).astype(np.uint8), "classical", DEFAULT_LOCATE, code)
        np.testing.assert_array_equal(answer.regions, expected.regions)


def test_overlays_draw_one_png_per_image_with_its_boxes(tiny_model, tmp_path, capsys):
    folder = tmp_path / "line 1"
    folder.mkdir()
    strip(folder / "strip.png")
    for name in ("Cr_1", "Sc_2"):
        shutil.copy(FIXTURE_IMAGES / f"{name}.bmp", folder / f"{name}.bmp")
    (folder / "broken.bmp").write_bytes(b"not an image")
    # --review-below 0: no review outline drawn over a box's edge
    status, frame, err = predict(capsys, tiny_model, folder, "--overlays", tmp_path / "overlays", "--review-below", "0")
    assert status == 1 and "boxes" in frame.columns  # --overlays implies --locate
    drawn = {p.name.rpartition("line_1_")[2]: p for p in (tmp_path / "overlays").iterdir()}
    assert sorted(drawn) == ["Cr_1.png", "Sc_2.png", "strip.png"]  # none for the unreadable file
    assert f"3 overlays in {tmp_path / 'overlays'}" in err.splitlines()[-1]
    for png, file in [("strip.png", "strip.png"), ("Sc_2.png", "Sc_2.bmp")]:
        rows = frame[frame["file"].str.endswith(file)]
        with Image.open(drawn[png]) as image:
            assert image.format == "PNG"
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape[1] == 200 * (3 if file == "strip.png" else 1) and pixels.shape[0] > 200
        for row, tile_boxes in zip(rows.itertuples(), boxes_of(rows), strict=True):
            x0, y0, x1, y1, _ = tile_boxes[0]
            middles = [(x0, (y0 + y1) // 2), (x1 - 1, (y0 + y1) // 2), ((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1 - 1)]
            clear = [(x, y) for x, y in middles if not (x < int(row.x) + LABEL[0] and y < int(row.y) + LABEL[1])]
            if str(row.needs_review) == "True":  # an unknown tile: its review outline covers the tile's edge
                x_tile, y_tile = int(row.x), int(row.y)
                clear = [(x, y) for x, y in clear if 6 <= x - x_tile < 194 and 6 <= y - y_tile < 194]
            assert clear, "a box wholly under the label"
            # the best box's outline is green at the middle of each edge
            assert all(tuple(pixels[y, x]) == TOP_BOX for x, y in clear), (row.file, row.x, row.y, tile_boxes[0])


def test_map_and_overlays_in_one_folder_are_refused(tiny_model, tmp_path, capsys):
    assert cli(["--model", str(tiny_model), "--map", str(tmp_path), "--overlays", str(tmp_path),
                str(FIXTURE_IMAGES / "Cr_1.bmp")]) == 2
    assert "--map and --overlays both name" in capsys.readouterr().err


@pytest.mark.parametrize("code", CLASSES)
def test_image_boxes_stay_inside_the_tile_for_every_class(tiny_model, code):
    net, _ = load_torch_model(tiny_model, "cpu")
    tiles = np.stack([gray(n) for n in NAMES])[:, None].astype(np.float32) / 255
    for answer in TileLocator(net).locate(tiles, [code] * len(NAMES)):
        assert answer.code == code and len(answer.regions) >= 1
        x0, y0, x1, y1 = answer.regions[:, :4].T
        assert (0 <= x0).all() and (x0 < x1).all() and (x1 <= 200).all()
        assert (0 <= y0).all() and (y0 < y1).all() and (y1 <= 200).all()
