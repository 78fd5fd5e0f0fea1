"""The strip map: tiles tinted by class, flagged tiles outlined, a legend under the image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from neu_model.inference.stripmap import CLASS_COLOURS, REVIEW_COLOUR, cells, strip_map
from neu_model.inference.tiles import tile_origins

from conftest import FIXTURE_IMAGES


def blend(grey: float, colour: tuple[int, int, int], tint: float = 0.4) -> np.ndarray:
    return np.array(colour) * tint + round(grey * 255) * (1 - tint)


def test_tiles_are_tinted_by_class_and_flagged_ones_outlined(tmp_path):
    image = np.full((200, 400), 0.5, dtype=np.float32)
    out = strip_map(image, [(0, 0, "Cr", False), (200, 0, "PS", True)], tmp_path / "maps" / "strip.png")
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert pixels.shape[1] == 400 and pixels.shape[0] > 200  # the legend sits under the image
    np.testing.assert_allclose(pixels[150, 100], blend(0.5, CLASS_COLOURS["Cr"]), atol=1)
    np.testing.assert_allclose(pixels[150, 300], blend(0.5, CLASS_COLOURS["PS"]), atol=1)
    assert tuple(pixels[150, 200]) == (0, 0, 0) and tuple(pixels[150, 202]) == REVIEW_COLOUR  # the PS tile's edge
    assert tuple(pixels[150, 199]) != (0, 0, 0)  # the Cr tile is not outlined
    legend = pixels[200:]
    for colour in CLASS_COLOURS.values():
        assert (legend == colour).all(axis=-1).sum() >= 100, colour  # every class has its swatch


def test_real_images_keep_their_texture_under_the_tint(tmp_path):
    names = [["Cr_1", "In_1", "Pa_1"], ["PS_1", "RS_1", "Sc_1"]]
    image = np.vstack([np.hstack([np.asarray(Image.open(FIXTURE_IMAGES / f"{n}.bmp")) for n in row])
                       for row in names]) / np.float32(255)
    tiles = [(x, y, names[y // 200][x // 200][:2], False) for y in tile_origins(400) for x in tile_origins(600)]
    pixels = np.asarray(Image.open(strip_map(image, tiles, tmp_path / "m.png"))).astype(float)[:400]
    # tint 0.4 keeps 60 % of the image: the map's grey-level variation follows the image's
    inside = (slice(20, 180), slice(220, 380))  # the In tile, away from its edges
    np.testing.assert_allclose(pixels[inside].mean(axis=-1).std(), 0.6 * 255 * image[inside].std(), rtol=0.05)


def test_a_long_strip_is_shrunk_to_max_side(tmp_path):
    image = np.zeros((200, 2000), dtype=np.float32)
    tiles = [(x, 0, "Sc", False) for x in tile_origins(2000)]
    out = Image.open(strip_map(image, tiles, tmp_path / "long.png", max_side=500))
    assert out.width == 500


def test_overlapping_tiles_split_the_overlap():
    assert cells([0, 200, 250], 200, 450) == {0: (0, 200), 200: (200, 325), 250: (325, 450)}
    assert cells([0, 200, 400], 200, 600) == {0: (0, 200), 200: (200, 400), 400: (400, 600)}


def test_unknown_class_or_colour_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown classes \\['XX'\\]"):
        strip_map(np.zeros((200, 200)), [(0, 0, "XX", False)], tmp_path / "m.png")
    with pytest.raises(ValueError, match="grayscale"):
        strip_map(np.zeros((200, 200, 3)), [(0, 0, "Cr", False)], tmp_path / "m.png")
    assert not list(tmp_path.iterdir())
